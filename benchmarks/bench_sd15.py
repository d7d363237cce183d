"""SD1.5 speed and memory: sdlearn against diffusers, on the same full-size weights, in one run.

    .venv/bin/python benchmarks/bench_sd15.py --device cpu            # fp32 and bf16, 2 threads
    .venv/bin/python benchmarks/bench_sd15.py --device cuda           # fp16: eager, fast path, low-memory

Weights are random but of SD1.5's exact architecture (sdlearn's `UNetConfig.sd15()`, `VAEConfig.sd15()`,
`CLIPTextConfig.sd15()`; diffusers' and transformers' models built from the same configs). Every
parameter is filled from a generator seeded by its *name*, and sdlearn's names are the reference
libraries' names, so both libraries hold the same numbers without ever loading each other; the first
outputs of each are saved and compared (the "max |diff|" rows), so the table times the same computation.

Each configuration (library x dtype x path) runs in its own subprocess, so its peak memory is its own:
on CPU the peak resident set size (getrusage) above what the process held after importing its
libraries; on a GPU torch.cuda.max_memory_allocated during one prompt-to-image run. Times are medians
of --repeats runs after a warm-up, measured with CUDA events on a GPU. On a CPU each library runs twice
(--rounds), sdlearn first and then diffusers first, and each figure is the median over the rounds: a
machine that slows down or speeds up during the run then favours neither.

What is timed (512x512, CFG batch 2 where the U-Net runs):
  CLIP          one prompt, (1, 77) tokens -> (1, 77, 768)
  U-Net step    (2, 4, 64, 64) latents, (2, 77, 768) context: one call, both CFG halves
  loop it/s     sampler steps per second inside the prompt-to-image run (Euler, Karras sigmas)
  VAE decode    (1, 4, 64, 64) -> (1, 3, 512, 512)
  prompt->image the whole pipeline, prompt and negative prompt to a PIL image, --steps steps
The U-Net's FLOPs are counted with torch's FlopCounterMode on the meta device; "TFLOP/s" is that
count over the measured step time.

The table is printed and appended, with the device, torch version, date and this command, to
benchmarks/RESULTS.md under "SD1.5 speed and memory" (--results elsewhere, --no-results for none).
"""

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # reference_tokenizer: transformers' tokenizer files from sdlearn's vocab
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from results import append_to_section  # noqa: E402

PROMPT, NEGATIVE, CFG = "a photograph of an astronaut riding a horse on the moon", "blurry, low quality", 7.5
SIZE = 512
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# SD1.5's scheduler_config.json (diffusers' side of the Euler/Karras pair, as in tests/test_pipeline.py).
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True)
SECTION = "## SD1.5 speed and memory"


# ============================================================================ weights and inputs


def fill_by_name(model: torch.nn.Module, rename=lambda name: name) -> torch.nn.Module:
    """Deterministic random weights keyed by parameter name: PyTorch-default-like scales.

    Matrices and conv kernels U(-1/sqrt(fan_in), 1/sqrt(fan_in)); 1-D weights (norm scales) 1 + U(-0.1, 0.1);
    biases U(-0.1, 0.1). `rename` maps the model's names to the shared (diffusers / checkpoint) names.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(rename(name).encode()))
            u = torch.rand(p.shape, generator=g) * 2 - 1
            if p.ndim >= 2:
                u = u / math.sqrt(p[0].numel())
            elif name.endswith("weight"):
                u = 1 + 0.1 * u
            else:
                u = 0.1 * u
            p.copy_(u)
    return model


def build(make, device, dtype, rename=lambda name: name) -> torch.nn.Module:
    """Build on the meta device (no slow default init), allocate directly in `dtype` on `device`, fill.

    Allocating in the final dtype keeps an fp32 copy out of the bf16/fp16 runs' peak memory. A model
    with buffers (transformers' CLIP keeps position ids) is built normally instead, since to_empty would
    leave its buffers uninitialised.
    """
    with torch.device("meta"):
        model = make()
    if list(model.buffers()):
        return fill_by_name(make(), rename).to(device, dtype).eval()
    return fill_by_name(model.to(dtype).to_empty(device=device), rename).eval()


def inputs(device, dtype):
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=g)  # U-Net latents, CFG batch 2
    context = torch.randn(2, 77, 768, generator=g)
    z = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=g) / 0.18215  # VAE input: latent / scaling factor
    noise = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=g)  # the prompt-to-image run's initial noise
    t = torch.full((2,), 500.0)
    return (x.to(device, dtype), t.to(device), context.to(device, dtype), z.to(device, dtype), noise)


# ============================================================================ one configuration (subprocess)


class Timer:
    """Wall time on CPU; CUDA events on a GPU (device-side time, one synchronize at the end)."""

    def __init__(self, device):
        self.cuda = device == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b):
        if self.cuda:
            torch.cuda.synchronize()
            return a.elapsed_time(b) / 1000
        return b - a

    def run(self, fn):
        a = self.mark()
        out = fn()
        b = self.mark()
        return out, self.seconds(a, b)


def current_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def make_sdlearn(device, dtype):
    from sdlearn.clip import CLIPTextConfig, CLIPTextModel
    from sdlearn.pipeline import Pipeline
    from sdlearn.tokenizer import CLIPTokenizer
    from sdlearn.unet import UNet2DConditionModel, UNetConfig
    from sdlearn.vae import AutoencoderKL, VAEConfig

    unet = build(lambda: UNet2DConditionModel(UNetConfig.sd15()), device, dtype)
    vae = build(lambda: AutoencoderKL(VAEConfig.sd15()), device, dtype)
    clip = build(lambda: CLIPTextModel(CLIPTextConfig.sd15()), device, dtype)
    return Pipeline(CLIPTokenizer(), clip, unet, vae, source="random SD1.5")


def make_diffusers(device, dtype, workdir):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from reference_tokenizer import write_sd15_tokenizer_folder
    from transformers import CLIPTextConfig as HFCLIPTextConfig
    from transformers import CLIPTextModel as HFCLIPTextModel
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    from sdlearn.clip import CLIPTextConfig
    from sdlearn.unet import UNetConfig
    from sdlearn.vae import VAEConfig

    unet = build(lambda: UNet2DConditionModel(**UNetConfig.sd15().to_diffusers()), device, dtype)
    vae = build(lambda: AutoencoderKL(**VAEConfig.sd15().to_diffusers()), device, dtype)
    # transformers 5 keeps CLIP's modules at the top level; files (and sdlearn) say text_model.*
    clip = build(lambda: HFCLIPTextModel(HFCLIPTextConfig(**CLIPTextConfig.sd15().to_transformers())), device, dtype,
                 rename=lambda n: n if n.startswith("text_model.") else "text_model." + n)
    tokenizer = HFCLIPTokenizer.from_pretrained(write_sd15_tokenizer_folder(Path(workdir) / "tokenizer"))
    scheduler = EulerDiscreteScheduler.from_config(SD15_SCHEDULER, use_karras_sigmas=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=clip, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def worker(cfg: dict) -> None:
    """Time one configuration; write results.json and outputs.pt into cfg['out']."""
    global SIZE
    device, dtype, lib, path = cfg["device"], DTYPES[cfg["dtype"]], cfg["lib"], cfg["path"]
    SIZE = cfg["size"]
    torch.set_num_threads(cfg["threads"])
    if lib == "diffusers":
        import diffusers  # noqa: F401  (imported before the baseline, like sdlearn's imports below)
        import transformers  # noqa: F401
    import sdlearn.pipeline  # noqa: F401
    baseline = current_rss_bytes()
    torch.manual_seed(0)
    timer = Timer(device)
    x, t, context, z, noise = inputs(device, dtype)
    out, res = {}, {}

    with torch.inference_mode():
        if lib == "sdlearn":
            pipe = make_sdlearn(device, dtype)
            if path == "fast":
                pipe.enable_fast_path(channels_last=True, compile=True, compile_mode=cfg["compile_mode"])
            elif path == "lowmem":
                pipe.enable_low_memory()
            from sdlearn.memory import tiled_decode

            ids = pipe.tokenizer(PROMPT).to(device)

            def clip():  # with offloading (low-memory path) this includes moving CLIP to the GPU and back
                with pipe._on_device(pipe.text_encoder):
                    return pipe.text_encoder(ids)

            def vae():
                with pipe._on_device(pipe.vae):
                    tile = pipe.vae_tile_size and pipe.vae_tile_size // 8
                    return tiled_decode(pipe.vae, z, tile, tile // 4) if tile else pipe.vae.decode(z)

            unet = lambda: pipe.unet(x, t, context)  # noqa: E731
        else:
            pipe = make_diffusers(device, dtype, cfg["out"])
            ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids.to(device)
            clip = lambda: pipe.text_encoder(ids)[0]  # noqa: E731
            unet = lambda: pipe.unet(x, t, encoder_hidden_states=context).sample  # noqa: E731
            vae = lambda: pipe.vae.decode(z).sample  # noqa: E731

        def e2e():
            """Prompt -> PIL image; returns (image, final latents, per-step timestamps)."""
            marks = []
            if lib == "sdlearn":
                r = pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, steps=cfg["steps"], cfg_scale=CFG, sampler="Euler",
                                 scheduler="karras", width=SIZE, height=SIZE, latents=noise, mode="diffusers",
                                 progress=False, callback=lambda d: marks.append(timer.mark()))
                return r.images[0], r.latents, marks
            last = {}

            def on_step(p, i, step_t, kw):
                marks.append(timer.mark())
                last["latents"] = kw["latents"]
                return kw

            r = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=cfg["steps"], guidance_scale=CFG,
                     height=SIZE, width=SIZE, latents=noise.to(device, dtype), callback_on_step_end=on_step)
            return r.images[0], last["latents"], marks

        def repeat(fn, n, name, warmup=True):
            """Median time of n runs after a warm-up (kernels, allocator, compilation); the first output."""
            first = fn() if warmup else None
            times = []
            for _ in range(n):
                output, seconds = timer.run(fn)
                times.append(seconds)
                first = output if first is None else first
            res[name], res[name + "_all"] = statistics.median(times), times
            return first

        out["clip"] = repeat(clip, cfg["repeats"], "clip_s").float().cpu()
        out["unet"] = repeat(unet, cfg["repeats"], "unet_s").float().cpu()

        # Prompt-to-image; the loop's it/s from the step timestamps inside it (steps - 1 intervals).
        if cfg["device"] == "cuda":
            e2e()  # warm-up at these shapes (a compiled U-Net may see new input strides here)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        e2e_times, its = [], []
        for _ in range(cfg["e2e_repeats"]):
            (image, latents, marks), seconds = timer.run(e2e)
            e2e_times.append(seconds)
            if len(marks) >= 2:
                its.append((len(marks) - 1) / timer.seconds(marks[0], marks[-1]))
        res["e2e_s"], res["e2e_all"] = statistics.median(e2e_times), e2e_times
        res["loop_its"] = statistics.median(its) if its else float("nan")
        out["e2e_latents"], out["e2e_image"] = latents.float().cpu(), torch.from_numpy(np.asarray(image).copy())
        if device == "cuda":
            res["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30

        # The VAE was warmed up by the prompt-to-image run on CPU (a separate warm-up costs ~15 s there).
        out["vae"] = repeat(vae, cfg["repeats"], "vae_s", warmup=device == "cuda").float().cpu()

        if device == "cuda" and path == "lowmem":
            # The hires fix: 512x512, then 2x to 1024x1024 (A1111's "Hires. fix", Latent upscaler).
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            (_, seconds) = timer.run(lambda: pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, steps=cfg["steps"],
                                                           cfg_scale=CFG, sampler="Euler", seed=1, width=SIZE,
                                                           height=SIZE, hires_scale=2.0, progress=False))
            res["hires_peak_gb"], res["hires_s"] = torch.cuda.max_memory_allocated() / 2**30, seconds

    if device == "cpu":
        res["peak_gb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline) / 2**30
    torch.save(out, Path(cfg["out"]) / "outputs.pt")
    (Path(cfg["out"]) / "results.json").write_text(json.dumps(res))


# ============================================================================ the driver


def count_unet_flops() -> float:
    """FLOPs of one SD1.5 U-Net call at batch 2, 64x64 latents, 77 tokens, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from sdlearn.unet import UNet2DConditionModel, UNetConfig

    with torch.device("meta"):
        unet = UNet2DConditionModel(UNetConfig.sd15())
        x, context = torch.randn(2, 4, SIZE // 8, SIZE // 8), torch.randn(2, 77, 768)
        with FlopCounterMode(display=False) as counter:
            unet(x, torch.full((2,), 500.0), context)
    return counter.get_total_flops()


def run_config(cfg, workdir, round_: int = 0) -> tuple[dict, dict]:
    name = f"{cfg['lib']}-{cfg['path']}-{cfg['dtype']}"
    cfg = dict(cfg, out=str(Path(workdir) / f"{name}-{round_}"))
    Path(cfg["out"]).mkdir(parents=True)
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
    start = time.time()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(cfg["threads"]))
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], env=env)
    if proc.returncode:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see its output above.")
    res = json.loads((Path(cfg["out"]) / "results.json").read_text())
    print(f"    done in {time.time() - start:.0f} s", flush=True)
    return res, torch.load(Path(cfg["out"]) / "outputs.pt")


def run_pair(base, dtype, rounds, workdir) -> tuple[dict, dict, dict, dict]:
    """sdlearn and diffusers eager, each `rounds` times in the order A B, B A, A B, ... so that a slow drift
    of the machine (temperature, other programs) hits both alike. Each timing is the median over the
    rounds; outputs are the first round's (every round computes the same numbers)."""
    runs = {"sdlearn": [], "diffusers": []}
    for r in range(rounds):
        for lib in ("sdlearn", "diffusers") if r % 2 == 0 else ("diffusers", "sdlearn"):
            runs[lib].append(run_config(dict(base, lib=lib, path="eager", dtype=dtype), workdir, r))

    def merged(results):
        return {key: ([v for r in results for v in r[key]] if key.endswith("_all") else
                      statistics.median(r[key] for r in results)) for key in results[0]}

    (ours, ours_out), (theirs, theirs_out) = ((merged([res for res, _ in runs[lib]]), runs[lib][0][1])
                                              for lib in ("sdlearn", "diffusers"))
    return ours, ours_out, theirs, theirs_out


def max_diffs(a: dict, b: dict) -> str:
    """Max |a - b| per output, relative to max |b| for the float outputs; uint8 levels for the image."""
    parts = []
    for key in ("clip", "unet", "vae", "e2e_latents"):
        d = (a[key] - b[key]).abs().max().item()
        parts.append(f"{key} {d:.1e} ({d / max(b[key].abs().max().item(), 1e-12):.0e} rel)")
    img = (a["e2e_image"].int() - b["e2e_image"].int()).abs().max().item()
    parts.append(f"image {img}/255")
    return "; ".join(parts)


def fmt_row(name, ours, theirs, unit, scale=1.0, higher_is_better=False):
    if theirs is None:
        return f"| {name} | {ours * scale:.3g} {unit} | | |"
    ratio = (theirs / ours) if higher_is_better else (ours / theirs)  # sdlearn time / diffusers time
    return f"| {name} | {ours * scale:.3g} {unit} | {theirs * scale:.3g} {unit} | {ratio:.2f} |"


def table(dtype, ours, theirs, flops) -> list:
    lines = [f"| {dtype} | sdlearn | diffusers | sdlearn/diffusers time |", "|---|---|---|---|"]
    lines.append(fmt_row("CLIP (1x77)", ours["clip_s"], theirs and theirs["clip_s"], "ms", 1e3))
    lines.append(fmt_row(f"U-Net step (2x4x{SIZE // 8}x{SIZE // 8})", ours["unet_s"], theirs and theirs["unet_s"], "ms", 1e3))
    tf = lambda r: flops / r["unet_s"] / 1e12  # noqa: E731
    lines.append(f"| U-Net achieved TFLOP/s | {tf(ours):.3g} | {tf(theirs):.3g} | |" if theirs else
                 f"| U-Net achieved TFLOP/s | {tf(ours):.3g} | | |")
    lines.append(fmt_row("denoising loop", ours["loop_its"], theirs and theirs["loop_its"], "it/s",
                         higher_is_better=True))
    lines.append(fmt_row(f"VAE decode ({SIZE}x{SIZE})", ours["vae_s"], theirs and theirs["vae_s"], "ms", 1e3))
    lines.append(fmt_row("prompt -> image", ours["e2e_s"], theirs and theirs["e2e_s"], "s"))
    lines.append(fmt_row("peak memory", ours["peak_gb"], theirs and theirs["peak_gb"], "GiB"))
    return lines


def device_name(device) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return f"{model} (CPU)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtypes", default=None, help="comma-separated: fp32,bf16 (CPU default), fp16 (GPU default)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (CPU 2, GPU 20)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="runs of each library, alternating which goes first (CPU 2, GPU 1)")
    ap.add_argument("--e2e-repeats", type=int, default=None, help="timed prompt-to-image runs (CPU 1, GPU 5)")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps in the prompt-to-image run (CPU 2, GPU 25)")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (512; smaller only for smoke tests)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--paths", default=None, help="sdlearn paths besides eager: fast,lowmem (GPU default both)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode for the fast path (default: inductor's)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--no-results", action="store_true", help="print only; do not append to RESULTS.md")
    ap.add_argument("--note", default="", help="a sentence for RESULTS.md about the conditions (e.g. other load)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    global SIZE
    SIZE = args.size
    cpu = args.device == "cpu"
    if not cpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is False).")
    dtypes = (args.dtypes or ("fp32,bf16" if cpu else "fp16")).split(",")
    paths = [p for p in (args.paths if args.paths is not None else ("" if cpu else "fast,lowmem")).split(",") if p]
    bad = [d for d in dtypes if d not in DTYPES] + [p for p in paths if p not in ("fast", "lowmem")]
    if bad:
        raise SystemExit(f"unknown dtype/path {bad}; dtypes: {list(DTYPES)}, paths: fast, lowmem.")
    steps = args.steps or (2 if cpu else 25)
    rounds = args.rounds or (2 if cpu else 1)
    if steps < 2:
        raise SystemExit("--steps must be at least 2 (the loop's it/s is measured between step ends).")
    base = dict(device=args.device, threads=args.threads, size=SIZE, steps=steps, compile_mode=args.compile_mode,
                repeats=args.repeats or (2 if cpu else 20), e2e_repeats=args.e2e_repeats or (1 if cpu else 5))
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + sys.argv[1:])

    flops = count_unet_flops()
    print(f"U-Net step at batch 2, {SIZE // 8}x{SIZE // 8} latents: {flops / 1e12:.3f} TFLOP (torch FlopCounterMode, meta device)")
    started = time.time()
    report, eager = [], {}
    with tempfile.TemporaryDirectory() as workdir:
        for dtype in dtypes:
            ours, ours_out, theirs, theirs_out = run_pair(base, dtype, rounds, workdir)
            eager[dtype] = ours_out
            report += [f"**{dtype}**", ""] + table(dtype, ours, theirs, flops) + [""]
            report.append(f"Same computation (sdlearn vs diffusers, first outputs, max |diff|): "
                          f"{max_diffs(ours_out, theirs_out)}.")
            for path in paths:
                res, out = run_config(dict(base, lib="sdlearn", path=path, dtype=dtype), workdir)
                label = {"fast": "sdlearn fast path (channels-last + torch.compile"
                                 + (f", mode {args.compile_mode}" if args.compile_mode else "") + ")",
                         "lowmem": "sdlearn low-memory (sliced attention 1024, VAE tiles 512, offload)"}[path]
                report += ["", f"{label}:", ""] + table(dtype, res, theirs, flops) + [""]
                if "hires_peak_gb" in res:
                    report.append(f"Hires fix 512 -> 1024 ({steps}+{steps} steps): peak {res['hires_peak_gb']:.2f} GiB, "
                                  f"{res['hires_s']:.2f} s.")
                report.append(f"Output vs sdlearn eager (max |diff|): {max_diffs(out, ours_out)}.")
            report.append("")
        if "fp32" in eager:
            for dtype in [d for d in dtypes if d != "fp32"]:
                report.append(f"Accuracy of sdlearn {dtype} vs fp32 (max |diff|): {max_diffs(eager[dtype], eager['fp32'])}.")
    threads = f", {args.threads} threads" if cpu else ""
    header = [f"### {device_name(args.device)}{threads} — {datetime.date.today().isoformat()}", "",
              f"torch {torch.__version__}, " + (f"CUDA {torch.version.cuda}, " if not cpu else "") +
              f"{base['repeats']} repeats (median), {base['e2e_repeats']} prompt-to-image runs of {steps} steps, "
              f"{rounds} round(s) of each library (alternating which runs first; median over rounds), "
              f"Euler (Karras), CFG {CFG}, {SIZE}x{SIZE}, batch 1. Ratio < 1: sdlearn is faster. "
              f"Run time {time.time() - started:.0f} s." + (f" {args.note}" if args.note else ""),
              "", "```", command, "```", ""]
    text = "\n".join(header + report).rstrip() + "\n"
    print("\n" + text)
    if not args.no_results:
        path = Path(args.results)
        append_to_section(path, SECTION, text)
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
