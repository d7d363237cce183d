"""Does TinySD's text encoder know which object a position phrase belongs to?

    python benchmarks/text_encoder_binding.py                     # the shipped TinySD, ~10 s
    python benchmarks/text_encoder_binding.py --model my_tinysd   # any folder sdlearn.train wrote

For 200 canonical two-object captions ("a small white cross at the bottom left and a large black triangle at
the bottom right on a blue background") the text encoder reads the caption and five variants:

  - binding swap, positions: the two objects' places exchanged (the same words, paired differently);
  - word swap: one object's place replaced by a third cell (one word changed, what NegCLIP negatives do);
  - binding swap, colours: the two objects' colours exchanged;
  - word swap, one colour / one shape: one object's colour or shape replaced by one the caption does not name.

It prints the cosine between the caption's pooled vector (what CLIP's contrastive loss compares) and each
variant's, and how much the whole context (77 x D, what the U-Net reads) changes, relative to its norm. A bag
of words gives a binding swap a cosine near 1. Appends the table to benchmarks/RESULTS.md.
"""

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import sdlearn
from sdlearn import shapes
from sdlearn.tokenizer import CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import append_to_section  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## TinySD text encoder: binding"


def two_object_scenes(n, seed):
    """n scenes with exactly two objects in different cells and of different colours."""
    rng, scenes = random.Random(seed), []
    while len(scenes) < n:
        scene = shapes.sample_scene(rng, 64, "train")
        a, b = scene.objects if len(scene.objects) == 2 else (None, None)
        if a is not None and a.position != b.position and a.colour != b.colour:
            scenes.append(scene)
    return scenes, rng


def variants(scene, rng):
    """{name: the scene's objects changed} for each kind of change."""
    a, b = scene.objects
    third = rng.choice([p for p in shapes.POSITIONS if p not in (a.position, b.position)])
    # The one-word swaps for colour and shape draw from a second generator, so that the rows above them keep the
    # draws of the first version of this benchmark (and its figures in RESULTS.md stay comparable).
    words = random.Random(shapes.scene_to_caption(scene))          # a str seed: the same draws in every process
    colour = words.choice([c for c in shapes.COLOURS if c not in (a.colour, b.colour, scene.background)])
    shape = words.choice([s for s in shapes.SHAPES if s not in (a.shape, b.shape)])
    return {"binding swap, positions": (dataclasses.replace(a, position=b.position),
                                        dataclasses.replace(b, position=a.position)),
            "word swap, one position": (dataclasses.replace(a, position=third), b),
            "binding swap, colours": (dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour)),
            "word swap, one colour": (dataclasses.replace(a, colour=colour), b),
            "word swap, one shape": (dataclasses.replace(a, shape=shape), b)}


@torch.no_grad()
def measure(text_encoder, scenes, rng):
    """{name: (mean pooled cosine, min pooled cosine, mean relative context change)} over the scenes."""
    tokenizer, rows = CLIPTokenizer(), {}
    for scene in scenes:
        changed = variants(scene, rng)
        captions = [shapes.scene_to_caption(scene)] + [shapes.scene_to_caption(dataclasses.replace(scene, objects=o))
                                                       for o in changed.values()]
        ids = tokenizer(captions)
        context = text_encoder(ids)                                            # (1 + variants, 77, D)
        pooled = F.normalize(text_encoder.pooled(context, ids), dim=-1)        # (1 + variants, D)
        for k, name in enumerate(changed, start=1):
            rows.setdefault(name, []).append(((pooled[0] @ pooled[k]).item(),
                                              ((context[k] - context[0]).norm() / context[0].norm()).item()))
    return {name: (np.mean([c for c, _ in r]), np.min([c for c, _ in r]), np.mean([d for _, d in r]))
            for name, r in rows.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="what sdlearn.load_pipeline loads (default: the shipped TinySD)")
    parser.add_argument("--n", type=int, default=200, help="two-object captions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args(argv)
    text_encoder = sdlearn.load_pipeline(args.model).text_encoder
    scenes, rng = two_object_scenes(args.n, args.seed)
    table = measure(text_encoder, scenes, rng)
    lines = ["| caption vs | pooled cosine, mean | pooled cosine, min | context change (relative) |", "|---|---|---|---|"]
    lines += [f"| {name} | {mean:.3f} | {low:.3f} | {change:.3f} |" for name, (mean, low, change) in table.items()]
    report = "\n".join(lines)
    print(report)
    if not args.no_append:
        command = "python benchmarks/text_encoder_binding.py " + " ".join(argv if argv is not None else sys.argv[1:])
        append_to_section(RESULTS, SECTION, f"### Model `{args.model}`, {time.strftime('%Y-%m-%d %H:%M')}\n\n"
                                            f"```\n{command.strip()}\n```\n\n{args.n} canonical two-object captions "
                                            f"(seed {args.seed}).\n\n{report}\n")
        print(f"\nappended to {RESULTS}")


if __name__ == "__main__":
    main()
