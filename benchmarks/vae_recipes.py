"""Which VAE recipe keeps TinySD's shapes? The comparison behind train.vae_loss's L1 choice.

    python benchmarks/vae_recipes.py                          # squared error vs L1 at 2500 steps, L1 at 6000
    python benchmarks/vae_recipes.py --runs mse:2500,l1:2500  # any "loss:steps[:kl_weight]" list (~6 min per 1000 steps)

Each run trains a VAE the way `python -m sdlearn.train` does (same scenes, pink scenes included, 32-pixel
crops, batch 32, seed 0, one thread) with the given reconstruction loss and step count, then reports its
PSNR on 256 held-out scenes and the judge's accuracy on 200 fresh scenes sent through it (encode, decode):
what any U-Net on top of it can show at best. Prints a table; nothing is written.
"""

import argparse
import inspect
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdlearn import shapes, train  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="mse:2500,l1:2500,l1:6000",
                        help='comma-separated "loss:steps" or "loss:steps:kl_weight" (default kl_weight: train_vae\'s)')
    parser.add_argument("--scenes", type=int, default=30000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    images, _ = shapes.dataset(args.scenes, seed=0, split="train")
    pink = [shapes.dataset(args.scenes // 10, seed=3_000_000, new_colour=c)[0] for c in shapes.NEW_COLOURS]
    training_images = np.concatenate([images, *pink])                      # as train_tinysd builds them
    heldout = shapes.dataset(256, seed=1_000_000, split="heldout")[0]
    rng = random.Random(7)
    scenes = [shapes.random_scene(rng, 64, "train") for _ in range(200)]
    print("| loss | steps | KL weight | held-out PSNR | colour | shape | size | overall | minutes |\n|---|---|---|---|---|---|---|---|---|")
    for run in args.runs.split(","):
        loss, steps, *kl = run.split(":")
        kl_weight = float(kl[0]) if kl else inspect.signature(train.train_vae).parameters["kl_weight"].default
        start = time.time()
        vae, _ = train.train_vae(training_images, steps=int(steps), seed=0, reconstruction=loss, kl_weight=kl_weight,
                                 log=None)
        with torch.no_grad():
            x = train.to_model_range(np.stack([np.asarray(image) for image, _ in scenes]))
            decoded = vae.decode(vae.encode(x).mode()).clamp(-1, 1)                  # (200, 3, 64, 64)
        pictures = [((d.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8) for d in decoded]
        acc = shapes.accuracy(zip(pictures, [caption for _, caption in scenes]))
        print(f"| {loss} | {steps} | {kl_weight:g} | {train.reconstruction_psnr(vae, heldout):.1f} dB | {acc['colour']:.0%} | "
              f"{acc['shape']:.0%} | {acc['size']:.0%} | {acc['overall']:.0%} | {(time.time() - start) / 60:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
