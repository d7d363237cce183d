"""Fine-tuning TinySD: teaching a finished model a new word, three ways.

TinySD was trained on the shapes world's eight colours; "pink" (`shapes.NEW_COLOURS`) never appeared
in its training data. Ask it for "a small pink circle" and it draws some other colour. The three
fine-tuning methods designers use with SD1.5 each try to teach it the word from a few hundred
captioned pink scenes — as far as its VAE can paint pink (below) — and the judge (`shapes.judge`)
measures how well, before and after:

    LoRA (Hu et al. 2021; kohya-ss for SD)
        learns   low-rank updates of the U-Net's attention projections (optionally the text encoder's)
        saves    a kohya .safetensors: 260 KB here at rank 4 (SD1.5: 10-150 MB)
        WebUI    <lora:pink:0.8> with the file in models/Lora
    Textual inversion (Gal et al. 2022)
        learns   one or a few new token vectors for the word; every weight stays frozen
        saves    an embedding of a few hundred bytes (SD1.5: a few KB)
        WebUI    the file name, "pink", in the prompt, with the file in embeddings/
    DreamBooth (Ruiz et al. 2022)
        learns   every U-Net weight, with prior preservation
        saves    a whole model folder (SD1.5: 2-4 GB)
        WebUI    a new checkpoint in models/Stable-diffusion

All three train with the loss TinySD itself was trained with, `sdlearn.train.diffusion_loss`: noise a
clean latent to a random timestep and regress the noise. They differ in which tensors get gradients
and in what protects what the model already knew:

* **LoRA** leaves W frozen and learns W + (alpha/rank) up @ down; the change is small by construction
  and can be switched off (strength 0) or turned down.
* **Textual inversion** changes nothing but the vectors the trigger word maps to; prompts without the
  word give bit-identical contexts, so nothing else can be damaged — and nothing the U-Net cannot
  already draw can be learnt (TinySD has never drawn pink pixels, which makes this the hard case).
* **DreamBooth** changes everything, so it mixes in *prior-preservation* data: ordinary scenes with
  their captions, trained on alongside (loss = L_new + prior_weight * L_prior). DreamBooth made its
  prior images with the frozen model itself ("a dog" samples) because the original training set was
  not at hand; kohya calls them regularisation images and often uses real photos. We have the world
  itself, so the prior batch is rendered ordinary scenes. The rare identifier DreamBooth binds the new
  concept to ("a [V] dog") is here the new word itself: TinySD's text encoder never saw "pink" either.

None of the three touches the VAE, so none can teach a colour the VAE cannot draw: the decoder's
ceiling (`vae_ceiling`: the new-word scenes encoded and decoded, then judged) bounds what any of them
can reach. SD1.5's VAE draws nearly any picture; a small VAE trained on eight flat colours may not
(TinySD v1's turns pink into white), which is why the benchmark reports that ceiling first.

Caption dropout (10%, as in TinySD's training) is kept in LoRA and DreamBooth training so the
unconditional prediction that CFG extrapolates from stays what it was.

Reading order: 1. data; 2. the shared loop; 3. LoRA; 4. textual inversion; 5. DreamBooth;
6. measuring with the judge. Every method is reproducible from its seed (for a given thread count),
returns a `FineTuneResult` (the artifact, the loss per step, the time) and has small defaults meant
for one CPU thread: `SETTINGS["real"]` takes a few minutes for all three, `SETTINGS["tiny"]` seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import shapes
from .embeddings import Embedding, PromptEmbeddings, save_embedding
from .lora import TEXT_ENCODER_ALL, UNET_ATTENTION, inject_lora, lora_state_dict, lora_targets, remove_lora, save_lora
from .train import diffusion_loss, encode_captions, encode_latents, lr_at, save_tinysd

NEW_WORD = "pink"

# Step counts and data sizes: "real" for the benchmark (measured on one thread of a busy 2-core CPU:
# LoRA and textual inversion ~1.5 min each, DreamBooth ~2.5 min — it runs two batches per step, new
# word and prior), "tiny" for a check that everything runs (seconds).
SETTINGS = {
    "real": dict(scenes=400, prior_scenes=2000, lora_steps=300, ti_steps=300, dreambooth_steps=300, batch_size=32,
                 dreambooth_batch_size=16),
    "tiny": dict(scenes=32, prior_scenes=32, lora_steps=8, ti_steps=8, dreambooth_steps=8, batch_size=8,
                 dreambooth_batch_size=4),
}


# ---------------------------------------------------------------------------------------------
# 1. Data: captioned scenes as cached latents
# ---------------------------------------------------------------------------------------------


@dataclass
class FineTuneData:
    """Scenes as the training loop uses them: latents (N, 4, h, w) in the U-Net's scale, captions, token ids."""
    latents: torch.Tensor
    captions: list
    input_ids: torch.Tensor  # (N, 77) from the pipeline's tokenizer: the trigger word still a plain word


@torch.no_grad()
def prepare_data(pipe, n: int, seed: int, new_colour: str | None = NEW_WORD) -> FineTuneData:
    """n shapes-world scenes — each with one kind of object in `new_colour`, or ordinary scenes when
    new_colour=None (the prior-preservation data) — encoded once by the pipeline's frozen VAE."""
    images, captions = shapes.dataset(n, seed=seed, size=pipe.default_size, new_colour=new_colour)
    # A sample of q(z | x) per image, as SD's training uses; drawn once, like TinySD's own cache.
    latents = encode_latents(pipe.vae, images, pipe.vae.config.scaling_factor,
                             generator=torch.Generator().manual_seed(seed))             # (N, 4, h, w)
    return FineTuneData(latents.float(), captions, pipe.tokenizer(captions))


@dataclass
class FineTuneResult:
    method: str
    artifact: object  # LoRA: kohya state dict; textual inversion: Embedding; DreamBooth: the U-Net
    losses: list  # training loss per step
    seconds: float
    settings: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# 2. The shared loop: AdamW on a few tensors, warmup + cosine learning rate, gradient clipping
# ---------------------------------------------------------------------------------------------


def _train(params: list, batch_loss, steps: int, lr: float, seed: int, log, name: str) -> tuple[list, float]:
    """Run `steps` optimizer steps of batch_loss(generator) -> scalar over `params`. Returns (losses, seconds)."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)  # batches, timesteps, noise and caption dropout
    losses, start = [], time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 10))
        loss = batch_loss(generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if log is not None and ((step + 1) % 50 == 0 or step + 1 == steps):
            log(f"{name} step {step + 1}/{steps}  loss {np.mean(losses[-50:]):.4f}  {time.time() - start:.0f}s")
    return losses, time.time() - start


def _batch(data: FineTuneData, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, len(data.captions), (batch_size,), generator=generator)  # (B,) indices


def _drop_captions(context: torch.Tensor, empty: torch.Tensor, p: float, generator) -> torch.Tensor:
    """Replace each context (B, 77, D) by the empty prompt's (1, 77, D) with probability p."""
    dropped = torch.rand(len(context), generator=generator) < p  # (B,)
    return torch.where(dropped[:, None, None], empty, context)


@contextmanager
def _frozen(*modules: nn.Module):
    """requires_grad False on every parameter for the block, each flag restored afterwards."""
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@torch.no_grad()
def eval_loss(unet: nn.Module, data: FineTuneData, contexts: torch.Tensor, n: int = 64, repeats: int = 4,
              seed: int = 1234, min_snr_gamma: float | None = None) -> float:
    """The diffusion loss on the first n items, each at `repeats` timesteps, with timesteps and noise fixed
    by `seed`: the same draw before and after training, so a fall is the model's doing, not the luck of
    the draw. Unweighted by default. contexts: (N, 77, D), or (1, 77, D) for one prompt."""
    n = min(n, len(data.captions))
    x0 = data.latents[:n].repeat(repeats, 1, 1, 1)                               # (n·repeats, 4, h, w)
    context = contexts[:n].expand(n, -1, -1).repeat(repeats, 1, 1)              # (n·repeats, 77, D)
    return diffusion_loss(unet, x0, context, torch.Generator().manual_seed(seed), min_snr_gamma).item()


# ---------------------------------------------------------------------------------------------
# 3. LoRA: low-rank adapters on the attention projections
# ---------------------------------------------------------------------------------------------


def train_lora(pipe, data: FineTuneData, rank: int = 4, alpha: float | None = None, targets=UNET_ATTENTION,
               text_encoder: bool = False, steps: int = 300, batch_size: int = 32, lr: float = 2e-3,
               caption_dropout: float = 0.1, min_snr_gamma: float | None = 5.0, seed: int = 0, log=None
               ) -> FineTuneResult:
    """Train a LoRA on `data`; the pipeline's weights are untouched (adapters removed at the end).

    rank, alpha: kohya's --network_dim and --network_alpha (alpha None = rank: scale 1). targets: the
    U-Net layer suffixes that get adapters (UNET_ATTENTION: to_q/k/v/out of self- and cross-attention,
    the original recipe; lora.UNET_ALL_LINEAR adds kohya's proj_in/out and feed-forward). text_encoder:
    also adapt the text encoder's attention and MLP (kohya trains both unless --network_train_unet_only).
    Returns a FineTuneResult whose artifact is the kohya-layout state dict (save_lora / load_lora read it).
    """
    torch.manual_seed(seed)  # the adapters' random `down` init
    unet, te = pipe.unet, pipe.text_encoder
    empty_ids = pipe.tokenizer([""])                                             # (1, 77)
    with _frozen(unet, te), torch.no_grad():
        empty = te(empty_ids)                                                    # (1, 77, D)
        contexts = encode_captions(te, data.input_ids) if not text_encoder else None   # (N, 77, D)
    with _frozen(unet, te):
        adapters = inject_lora(unet, lora_targets(unet, targets), rank, alpha)
        if text_encoder:
            adapters.update({"te." + k: v for k, v in
                             inject_lora(te, lora_targets(te, TEXT_ENCODER_ALL), rank, alpha).items()})
        try:
            params = [p for a in adapters.values() for p in (a.down.weight, a.up.weight)]
            for p in params:
                p.requires_grad_(True)

            def batch_loss(generator):
                idx = _batch(data, batch_size, generator)
                if text_encoder:         # the adapted text encoder runs in the step, empty prompt included
                    context, empty_now = te(data.input_ids[idx]), te(empty_ids)          # (B, 77, D), (1, 77, D)
                else:
                    context, empty_now = contexts[idx], empty
                context = _drop_captions(context, empty_now, caption_dropout, generator)
                return diffusion_loss(unet, data.latents[idx], context, generator, min_snr_gamma)

            losses, seconds = _train(params, batch_loss, steps, lr, seed, log, "lora")
            state_dict = lora_state_dict(unet, te if text_encoder else None)
        finally:
            remove_lora(unet)
            remove_lora(te)
    settings = dict(rank=rank, alpha=float(rank if alpha is None else alpha), targets=list(targets),
                    text_encoder=text_encoder, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                    scenes=len(data.captions))
    return FineTuneResult("LoRA", state_dict, losses, seconds, settings)


# ---------------------------------------------------------------------------------------------
# 4. Textual inversion: new vectors for the trigger word, nothing else
# ---------------------------------------------------------------------------------------------
#
# The trigger word's tokens in every caption are replaced by n_vectors added token ids (as the
# pipeline does for an embedding from embedding_dirs); their vectors v (n_vectors, D) are the only
# trainable tensor. Gradients flow from the diffusion loss back through the frozen U-Net's
# cross-attention and the frozen text encoder to v:  v* = argmin_v E ||eps - eps_theta(x_t, t, c(y; v))||^2.


def caption_ids_with_embedding(tokenizer, captions, word: str, n_vectors: int, vocab_size: int) -> torch.Tensor:
    """(N, 77) token ids with `word` replaced by the added ids vocab_size .. vocab_size + n_vectors - 1."""
    table = PromptEmbeddings.build(tokenizer, {word: torch.zeros(n_vectors, 1)}, vocab_size)
    rows = []
    for caption in captions:
        tokens = [t for unit in table.units(tokenizer.encode(caption)) for t in unit][:75]
        rows.append([tokenizer.bos_token_id] + tokens + [tokenizer.eos_token_id] * (76 - len(tokens)))
    ids = torch.tensor(rows)
    if not bool((ids >= vocab_size).any(dim=1).all()):
        raise ValueError(f"some captions do not contain the trigger word {word!r}; textual inversion learns "
                         "nothing from them.")
    return ids


def train_textual_inversion(pipe, data: FineTuneData, word: str = NEW_WORD, n_vectors: int = 1,
                            init_text: str = "red", steps: int = 300, batch_size: int = 32, lr: float = 5e-3,
                            min_snr_gamma: float | None = 5.0, seed: int = 0, log=None) -> FineTuneResult:
    """Learn n_vectors token vectors for `word` (the embedding's file name) with everything else frozen.

    init_text: the vectors start as this text's token vectors, repeated to n_vectors (A1111's
    "Initialization text"; Gal et al. start from a coarse descriptor of the concept — pink is a light red).
    lr 5e-3 is A1111's default. Returns a FineTuneResult whose artifact is an Embedding.
    """
    te, unet, tokenizer = pipe.text_encoder, pipe.unet, pipe.tokenizer
    table = te.text_model.embeddings.token_embedding.weight                     # (V, D)
    init_ids = tokenizer.encode(init_text)
    if not init_ids:
        raise ValueError("init_text must contain at least one word.")
    init = table[torch.tensor(init_ids)].detach()                                # (k, D)
    vectors = nn.Parameter(init[torch.arange(n_vectors) % len(init_ids)].clone().float())  # (n_vectors, D)
    ids = caption_ids_with_embedding(tokenizer, data.captions, word, n_vectors, te.config.vocab_size)  # (N, 77)

    def batch_loss(generator):
        idx = _batch(data, batch_size, generator)
        context = te(ids[idx], extra_tokens=vectors)                             # (B, 77, D), grad to vectors only
        return diffusion_loss(unet, data.latents[idx], context, generator, min_snr_gamma)

    with _frozen(unet, te):
        losses, seconds = _train([vectors], batch_loss, steps, lr, seed, log, "textual inversion")
    settings = dict(word=word, n_vectors=n_vectors, init_text=init_text, steps=steps, batch_size=batch_size,
                    lr=lr, seed=seed, scenes=len(data.captions))
    return FineTuneResult("textual inversion", Embedding(word, vectors.detach().clone()), losses, seconds, settings)


# ---------------------------------------------------------------------------------------------
# 5. DreamBooth: the whole U-Net, with prior preservation
# ---------------------------------------------------------------------------------------------


def train_dreambooth(pipe, data: FineTuneData, prior: FineTuneData | None, prior_weight: float = 1.0,
                     steps: int = 300, batch_size: int = 16, lr: float = 2e-4, caption_dropout: float = 0.1,
                     min_snr_gamma: float | None = 5.0, seed: int = 0, log=None) -> FineTuneResult:
    """Fine-tune a copy of the whole U-Net on `data`, plus `prior` scenes (prior preservation).

    Each step draws batch_size new-word scenes and batch_size prior scenes:
        loss = L(new-word batch) + prior_weight * L(prior batch)          (Ruiz et al. 2022, eq. 2)
    prior=None trains without preservation (to see the damage it prevents). The text encoder stays
    frozen. Returns a FineTuneResult whose artifact is the fine-tuned U-Net (pipe.unet is untouched).
    """
    torch.manual_seed(seed)
    te = pipe.text_encoder
    with torch.no_grad(), _frozen(te):
        empty = te(pipe.tokenizer([""]))                                          # (1, 77, D)
        contexts = encode_captions(te, data.input_ids)                            # (N, 77, D)
        prior_contexts = encode_captions(te, prior.input_ids) if prior is not None else None
    unet = copy.deepcopy(pipe.unet).float().requires_grad_(True)

    def batch_loss(generator):
        idx = _batch(data, batch_size, generator)
        context = _drop_captions(contexts[idx], empty, caption_dropout, generator)
        loss = diffusion_loss(unet, data.latents[idx], context, generator, min_snr_gamma)
        if prior is not None:
            jdx = _batch(prior, batch_size, generator)
            context = _drop_captions(prior_contexts[jdx], empty, caption_dropout, generator)
            loss = loss + prior_weight * diffusion_loss(unet, prior.latents[jdx], context, generator, min_snr_gamma)
        return loss

    losses, seconds = _train(list(unet.parameters()), batch_loss, steps, lr, seed, log, "dreambooth")
    settings = dict(prior_weight=prior_weight if prior is not None else 0.0, steps=steps, batch_size=batch_size,
                    lr=lr, seed=seed, scenes=len(data.captions), prior_scenes=0 if prior is None else len(prior.captions))
    return FineTuneResult("DreamBooth", unet.eval().requires_grad_(False), losses, seconds, settings)


def with_unet(pipe, unet: nn.Module):
    """A pipeline sharing `pipe`'s tokenizer, text encoder and VAE, with another U-Net (e.g. DreamBooth's)."""
    return dataclasses.replace(pipe, unet=unet.to(pipe.device, pipe.dtype))


def save_dreambooth(folder, pipe, result: FineTuneResult, overwrite: bool = False) -> Path:
    """Write the fine-tuned model as a folder `sdlearn.load_pipeline(folder)` reads (float32: the fine-tune's
    small weight changes are kept exactly), with finetune.json saying how it was made."""
    folder = save_tinysd(folder, pipe.vae, pipe.text_encoder, result.artifact, overwrite=overwrite,
                         dtype=torch.float32)
    info = {"method": result.method, "base_model": pipe.model_name or pipe.source, "settings": result.settings,
            "seconds": round(result.seconds, 1), "final_loss": float(np.mean(result.losses[-50:]))}
    (folder / "finetune.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return folder


def save_result(path, result: FineTuneResult, pipe=None, overwrite: bool = False) -> Path:
    """Save any method's artifact where the WebUI would look for it: a LoRA .safetensors (models/Lora),
    an embedding .safetensors/.pt (embeddings/, file name = trigger word), or a model folder."""
    if result.method == "LoRA":
        return save_lora(path, state_dict=result.artifact, overwrite=overwrite)
    if result.method == "textual inversion":
        emb = result.artifact
        return save_embedding(path, emb.vectors, emb.name, overwrite=overwrite, step=result.settings.get("steps"),
                              model_name=getattr(pipe, "model_name", "") if pipe is not None else "")
    if pipe is None:
        raise ValueError("saving a DreamBooth model needs the pipeline (its VAE and text encoder go in the folder).")
    return save_dreambooth(path, pipe, result, overwrite)


# ---------------------------------------------------------------------------------------------
# 6. Measuring: the judge before and after
# ---------------------------------------------------------------------------------------------
#
# Two questions per method: did it learn the word (accuracy on captions with "pink"), and what did it
# break (accuracy on ordinary captions: the "damage" check)? Images are made as in
# benchmarks/tinysd_quality.py: 20 steps of DPM++ 2M Karras at CFG 7, image i with seed + i.

SAMPLER, STEPS, CFG = "DPM++ 2M Karras", 20, 7.0


def eval_captions(n: int, seed: int, new_colour: str | None = NEW_WORD) -> list:
    """n fresh captions (not the training scenes: another seed) with the new word, or ordinary ones."""
    rng = random.Random(seed)
    return [shapes.random_scene(rng, 64, "train", new_colour)[1] for _ in range(n)]


def generate_for_judging(pipe, captions, seed: int = 2024, prompt_suffix: str = "", steps: int = STEPS,
                         cfg_scale: float = CFG, batch_size: int = 25) -> list:
    """One image per caption (prompt = caption + prompt_suffix, e.g. " <lora:pink:1>"), image i from seed + i:
    a list of (image, caption) pairs for the judge.

    Captions go through the U-Net `batch_size` at a time (a list of prompts is one batch): on a CPU a batch
    of 25 tiny images costs little more than one.
    """
    pairs = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        out = pipe.txt2img([caption + prompt_suffix for caption in chunk], steps=steps, cfg_scale=cfg_scale,
                           sampler=SAMPLER, seed=seed + start, progress=False)
        pairs += zip(out.images, chunk)
    return pairs


def judge_pipeline(pipe, captions, seed: int = 2024, prompt_suffix: str = "", steps: int = STEPS,
                   cfg_scale: float = CFG, batch_size: int = 25) -> dict:
    """generate_for_judging's images, judged: shapes.accuracy's {attribute: fraction, ..., "overall", "n"}."""
    return shapes.accuracy(generate_for_judging(pipe, captions, seed, prompt_suffix, steps, cfg_scale, batch_size))


@torch.no_grad()
def vae_ceiling(pipe, n: int, seed: int, new_colour: str | None = NEW_WORD) -> dict:
    """The judge's accuracy on n rendered scenes after a VAE round trip (encode, decode): what the decoder
    can show at best. No fine-tune of the U-Net or the text encoder gets above it."""
    rng = random.Random(seed)
    scenes = [shapes.random_scene(rng, pipe.default_size, "train", new_colour) for _ in range(n)]
    decoded = pipe.decode_latents(pipe.encode_image([image for image, _ in scenes]))
    return shapes.accuracy(zip(decoded, [caption for _, caption in scenes]))
