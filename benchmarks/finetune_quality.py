"""Teaching TinySD a new word: LoRA, textual inversion and DreamBooth, measured with the judge.

    python benchmarks/finetune_quality.py                 # the real settings, ~15 minutes on one CPU thread
    python benchmarks/finetune_quality.py --tiny --n 4 --no-append     # a one-minute check that it all runs

Each method trains on the same scenes with the new word (`shapes.NEW_COLOURS`: "pink", never in TinySD's
training data), with `sdlearn.finetune`'s settings, and is saved where the WebUI looks for it and loaded
back from there: the LoRA as models/Lora/pink.safetensors used through `<lora:pink:1>`, the embedding as
embeddings/pink.safetensors used through the word "pink" itself, the DreamBooth U-Net as a model folder.
Then, as benchmarks/tinysd_quality.py does (20 steps of DPM++ 2M Karras, CFG 7, image i with seed + i),
the judge scores
  * captions with the new word, before (the base model) and after — did it learn the word?
  * ordinary captions, before and after — what did it break (the "damage" check)?
and the table, the training times, the command, date and CPU are appended to benchmarks/RESULTS.md
(section "## Fine-tuning TinySD"; --no-append only prints).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import append_to_section  # noqa: E402
from tinysd_quality import ATTRIBUTES, row  # noqa: E402  (the TinySD benchmark's table)

import sdlearn  # noqa: E402
from sdlearn import finetune as ft  # noqa: E402
from sdlearn.train import cpu_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Fine-tuning TinySD"


def timed_row(name, acc, seconds=None):
    return row(name, acc, "—" if seconds is None else f"{seconds:.0f} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="what sdlearn.load_pipeline loads (default: the shipped TinySD)")
    parser.add_argument("--n", type=int, default=100, help="test captions of each kind (new word, ordinary)")
    parser.add_argument("--seed", type=int, default=2024, help="seed of the test captions and of the images")
    parser.add_argument("--train-seed", type=int, default=0, help="seed of the training data and of each method")
    parser.add_argument("--tiny", action="store_true", help="finetune.SETTINGS['tiny']: seconds, to check the script")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the markdown file to append to")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = ft.SETTINGS["tiny" if args.tiny else "real"]
    log = (lambda text: print("   ", text, flush=True))

    start = time.time()
    pipe = sdlearn.load_pipeline(args.model)
    data = ft.prepare_data(pipe, settings["scenes"], seed=args.train_seed)
    prior = ft.prepare_data(pipe, settings["prior_scenes"], seed=args.train_seed + 1, new_colour=None)
    new_captions = ft.eval_captions(args.n, args.seed)                       # other scenes than the training ones
    base_captions = ft.eval_captions(args.n, args.seed + 1, new_colour=None)

    header = ["| model | " + " | ".join(ATTRIBUTES) + " | n | training |", "|---" * (len(ATTRIBUTES) + 3) + "|"]
    new_rows, base_rows, times = list(header), list(header), {}
    # The decoder's ceiling: rendered new-word scenes through the VAE. No method here trains the VAE.
    new_rows.append(timed_row("rendered scenes through the VAE (decoder's ceiling)", ft.vae_ceiling(pipe, args.n, args.seed)))
    new_rows.append(timed_row("TinySD (before)", ft.judge_pipeline(pipe, new_captions, args.seed)))
    base_rows.append(timed_row("TinySD (before)", ft.judge_pipeline(pipe, base_captions, args.seed)))
    print(new_rows[-1] + "\n" + base_rows[-1], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        word = ft.NEW_WORD
        # LoRA: a file in a LoRA folder, used through the prompt tag.
        print(f"LoRA (rank 4 on the U-Net's attention projections, {settings['lora_steps']} steps)", flush=True)
        lora = ft.train_lora(pipe, data, steps=settings["lora_steps"], batch_size=settings["batch_size"],
                             seed=args.train_seed, log=log)
        ft.save_result(tmp / "Lora" / f"{word}.safetensors", lora)
        pipe.lora_dirs = [tmp / "Lora"]
        name = f"LoRA `<lora:{word}:1>`"
        new_rows.append(timed_row(name, ft.judge_pipeline(pipe, new_captions, args.seed, f" <lora:{word}:1>"), lora.seconds))
        base_rows.append(timed_row(name, ft.judge_pipeline(pipe, base_captions, args.seed, f" <lora:{word}:1>"), lora.seconds))
        pipe.lora_dirs = []
        print(new_rows[-1] + "\n" + base_rows[-1], flush=True)

        # Textual inversion: an embedding file named after the word, in an embeddings folder.
        print(f"textual inversion (1 vector, {settings['ti_steps']} steps)", flush=True)
        ti = ft.train_textual_inversion(pipe, data, steps=settings["ti_steps"], batch_size=settings["batch_size"],
                                        seed=args.train_seed, log=log)
        ft.save_result(tmp / "embeddings" / f"{word}.safetensors", ti, pipe)
        pipe.embedding_dirs = [tmp / "embeddings"]
        name = f"textual inversion `embeddings/{word}.safetensors`"
        new_rows.append(timed_row(name, ft.judge_pipeline(pipe, new_captions, args.seed), ti.seconds))
        base_rows.append(timed_row(name, ft.judge_pipeline(pipe, base_captions, args.seed), ti.seconds))
        pipe.embedding_dirs = []
        print(new_rows[-1] + "\n" + base_rows[-1], flush=True)

        # DreamBooth: a whole model folder, loaded like any other.
        print(f"DreamBooth (the whole U-Net, prior preservation, {settings['dreambooth_steps']} steps)", flush=True)
        db = ft.train_dreambooth(pipe, data, prior, steps=settings["dreambooth_steps"],
                                 batch_size=settings["dreambooth_batch_size"], seed=args.train_seed, log=log)
        tuned = sdlearn.load_pipeline(ft.save_result(tmp / "tinysd-pink", db, pipe))
        name = "DreamBooth + prior preservation (model folder)"
        new_rows.append(timed_row(name, ft.judge_pipeline(tuned, new_captions, args.seed), db.seconds))
        base_rows.append(timed_row(name, ft.judge_pipeline(tuned, base_captions, args.seed), db.seconds))
        print(new_rows[-1] + "\n" + base_rows[-1], flush=True)
    elapsed = time.time() - start

    methods = {"LoRA": lora, "textual inversion": ti, "DreamBooth": db}
    details = "\n".join(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in r.settings.items() if k != "targets")
                        + f"; final loss {sum(r.losses[-50:]) / len(r.losses[-50:]):.4f}" for name, r in methods.items())
    report = (f"Captions with the new word \"{ft.NEW_WORD}\" (did it learn the word?):\n\n" + "\n".join(new_rows)
              + "\n\nOrdinary captions (the damage check):\n\n" + "\n".join(base_rows) + "\n\n" + details)
    print("\n" + report)

    if not args.no_append:
        command = "python benchmarks/finetune_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
        entry = (f"### New word \"{ft.NEW_WORD}\", {time.strftime('%Y-%m-%d %H:%M')}\n\n"
                 f"```\n{command.strip()}\n```\n\n"
                 f"Model `{args.model}`; {settings['scenes']} training scenes with the new word (seed {args.train_seed}), "
                 f"{settings['prior_scenes']} prior-preservation scenes; {args.n} test captions of each kind (seed "
                 f"{args.seed}); {ft.STEPS} steps of {ft.SAMPLER} at CFG {ft.CFG:g}, image i with seed {args.seed}+i. "
                 f"Training times on {args.threads} thread(s) of {cpu_name()} (2 cores, shared with other work), torch "
                 f"{torch.__version__}. Benchmark run time {elapsed / 60:.1f} min.\n\n{report}\n")
        append_to_section(args.results, SECTION, entry)
        print(f"\nappended to {args.results}")


if __name__ == "__main__":
    main()
