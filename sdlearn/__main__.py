"""txt2img and img2img from the command line: `python -m sdlearn "a prompt"` saves PNGs the way A1111 does.

    python -m sdlearn "a large red circle in the middle on a blue background"          # TinySD, on any CPU
    python -m sdlearn "a cat" --model v1-5-pruned-emaonly.safetensors --device cuda --steps 25 --seed 1
    python -m sdlearn "a cat, oil painting" --init-image cat.png --denoising-strength 0.6   # img2img

The flags carry the names of the WebUI's controls. Images go to outputs/txt2img-images/ (with
--init-image: outputs/img2img-images/) as 00000-<seed>.png, numbered on from what is already there
(nothing is ever overwritten), each with its parameters text, which A1111's "PNG Info" tab and
ComfyUI's prompt readers show. `make demo` runs the first line above.
"""

import argparse
import sys

import torch
from PIL import Image

from . import load_pipeline
from .samplers import SAMPLER_NAMES
from .weights import CheckpointError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdlearn", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("prompt", help="the prompt; (word:1.2) emphasis and <lora:name:weight> work as in A1111")
    parser.add_argument("--negative-prompt", default="", help="what to steer away from")
    parser.add_argument("--model", default="tiny",
                        help='"tiny", a .safetensors/.ckpt checkpoint, a diffusers folder or a hub repo id')
    parser.add_argument("--steps", type=int, default=20, help="Sampling steps")
    parser.add_argument("--sampler", default="Euler a", help="Sampling method: " + ", ".join(SAMPLER_NAMES))
    parser.add_argument("--cfg-scale", type=float, default=7.0, help="CFG Scale")
    parser.add_argument("--seed", type=int, default=-1, help="Seed; -1 picks a random one")
    parser.add_argument("--width", type=int, default=None, help="Width (default: the model's size, 512 for SD1.5)")
    parser.add_argument("--height", type=int, default=None, help="Height (default: the model's size)")
    parser.add_argument("--batch-size", type=int, default=1, help="Batch size: images from seed, seed+1, ...")
    parser.add_argument("--clip-skip", type=int, default=1, help="Clip skip")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps (default: cpu)")
    parser.add_argument("--fp16", action="store_true", help="half precision: half the memory on a GPU")
    parser.add_argument("--init-image", default=None, help="img2img: start from this picture instead of pure noise")
    parser.add_argument("--denoising-strength", type=float, default=0.75,
                        help="img2img: how much of the picture is repainted (0 keeps it, 1 ignores it)")
    parser.add_argument("--outdir", default=None,
                        help="folder for the PNGs (default: outputs/txt2img-images or outputs/img2img-images)")
    return parser


def main(argv=None) -> list:
    """Parse argv, generate, save. Returns the saved paths; bad input exits with status 2 and a message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        init_image = Image.open(args.init_image) if args.init_image else None   # before minutes of loading
        pipe = load_pipeline(args.model, device=args.device, dtype=torch.float16 if args.fp16 else None)
        settings = dict(negative_prompt=args.negative_prompt, steps=args.steps, sampler=args.sampler,
                        cfg_scale=args.cfg_scale, seed=args.seed, width=args.width, height=args.height,
                        batch_size=args.batch_size, clip_skip=args.clip_skip)
        if init_image is None:
            result = pipe.txt2img(args.prompt, **settings)
        else:
            result = pipe.img2img(init_image, args.prompt, strength=args.denoising_strength, **settings)
    except (CheckpointError, ValueError, OSError) as e:   # every input check in sdlearn says what to do
        parser.exit(2, f"error: {e}\n")
    tab = "txt2img" if init_image is None else "img2img"
    paths = result.save(args.outdir or f"outputs/{tab}-images")
    for path in paths:
        print(path)
    print(result.info)
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
