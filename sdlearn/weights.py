"""Loading real weights: from the files designers actually have into sdlearn's modules.

A Stable Diffusion 1.5 model reaches people in three shapes:

* a **single file** (`.safetensors` or `.ckpt`), the way A1111 (`models/Stable-diffusion/`) and
  ComfyUI (`models/checkpoints/`) keep it. Its tensor names are those of the original CompVis
  "latent diffusion" code: `model.diffusion_model.*` (U-Net), `first_stage_model.*` (VAE),
  `cond_stage_model.transformer.*` (CLIP text encoder), sometimes an EMA copy `model_ema.*`;
* a **diffusers folder** (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, each with a
  `config.json` and a weight file), whose tensor names are diffusers'/transformers' names;
* a **hub repo id** such as `stable-diffusion-v1-5/stable-diffusion-v1-5`, which is a diffusers
  folder on huggingface.co.

sdlearn's modules use diffusers'/transformers' names (DEVELOPERS.md), so a diffusers folder loads
as is and a single file needs its names translated. The translation is not a table of a thousand
names: it is a short list of RULES, each renaming a prefix (one block of the network) and, inside
a ResNet or attention block, a handful of layer names. The rules are computed from the config
(how many levels, how many ResNets per level, which levels have attention), and the same rules
run backwards to write a file in the original layout (the tests do that).

Loading is strict, like nanoGPT's `from_pretrained`: every tensor in the file is used or matched by
one of the documented IGNORED rules, every parameter of the model is filled, every shape is checked,
and any failure is a `CheckpointError` naming the tensor and saying what to do.

Safety: a `.ckpt`/`.bin`/`.pt` file is a Python pickle, and unpickling can run any code the file's
author chose. We only ever read pickles with `torch.load(..., weights_only=True)`, which rebuilds
tensors and plain containers and refuses everything else; a refusal becomes a CheckpointError
telling the user to get the `.safetensors` version. A `.safetensors` file is only a JSON header
plus raw numbers and cannot run code. Nothing here ever writes to the user's files.

The public entry point is `load_pipeline(source, device=None, dtype=None, vae=None, use_ema=True)`
at the bottom of this file.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from .pipeline import Pipeline


class CheckpointError(Exception):
    """A checkpoint could not be loaded. The message says what was wrong and what to do."""


# Where `load_pipeline("tiny")` looks: a diffusers-style folder written by sdlearn.train.
TINY_DIR = Path(__file__).resolve().parent.parent / "assets" / "tinysd"

# The tokenizer every SD1.5 model shares: CLIP's byte-level BPE with 49408 ids.
CLIP_VOCAB_SIZE = 49408


# ---------------------------------------------------------------------------------------------
# 1. Reading one file safely
# ---------------------------------------------------------------------------------------------
#
# We never trust the extension: a PNG renamed to .ckpt, a half-downloaded .safetensors or an HTML
# error page saved as a model all happen. The first bytes say what a file really is.


def _sniff(path: Path) -> str:
    """'safetensors', 'zip-pickle' (torch.save since 1.6), 'pickle' (older torch.save) or a complaint."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy failed. Download it again.")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip-pickle"
    if head[:1] == b"\x80":  # pickle PROTO opcode
        return "pickle"
    # safetensors: an 8-byte little-endian header length, then the JSON header itself.
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    for magic, what in ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
                        (b"RIFF", "a WEBP image"), (b"<", "an HTML/XML page (a failed download?)")):
        if head.startswith(magic):
            raise CheckpointError(
                f"{path} is not a checkpoint: it is {what} with a model's file name. "
                "Download the model file itself (.safetensors) again."
            )
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        raise CheckpointError(
            f"{path} is not a checkpoint: it is a text file (it starts with {head!r}). A Git LFS pointer "
            "or a saved web page looks like this; download the real model file (.safetensors)."
        )
    raise CheckpointError(
        f"{path} is not a checkpoint sdlearn can read (unknown format, first bytes {head[:8]!r}). "
        "Use a .safetensors or .ckpt Stable Diffusion 1.5 file."
    )


class TensorFile:
    """The named tensors of one checkpoint file.

    `.safetensors` files are opened lazily (memory-mapped, a tensor is read when asked for), so an
    EMA checkpoint does not have to fit in memory twice. Pickles are read whole, but memory-mapped
    where torch allows it.
    """

    def __init__(self, path, tensors: dict | None = None, top_level: dict | None = None):
        self.path = Path(path)
        self._tensors = tensors  # for pickles: {name: tensor}
        self._handle = None  # for safetensors: safe_open handle
        self._names: set = set()  # for safetensors: the tensor names, for fast `in`
        self.metadata: dict = {}
        # Entries next to the weights in a pickle ({"state_dict": ..., "global_step": ...}).
        self.top_level = top_level or {}

    @classmethod
    def open(cls, path) -> "TensorFile":
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"No such file: {path}. Check the path (absolute paths avoid surprises).")
        if path.is_dir():
            raise CheckpointError(f"{path} is a folder; expected a .safetensors or .ckpt file.")
        kind = _sniff(path)
        if kind == "safetensors":
            return cls._open_safetensors(path)
        return cls._open_pickle(path, kind)

    @classmethod
    def _open_safetensors(cls, path: Path) -> "TensorFile":
        from safetensors import safe_open

        size = path.stat().st_size
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = f.read(header_len) if 8 + header_len <= size else b""
        try:
            entries = json.loads(header)
        except ValueError:
            entries = None
        # safe_open checks the header; we also check the data really is all there, so that a
        # truncated download fails now with a clear message rather than later with garbage.
        if not isinstance(entries, dict):
            raise CheckpointError(
                f"{path} is a damaged .safetensors file (its header is incomplete or not valid JSON): "
                "most likely a truncated download. Download it again."
            )
        data_end = max((e["data_offsets"][1] for k, e in entries.items() if k != "__metadata__"), default=0)
        if 8 + header_len + data_end > size:
            raise CheckpointError(
                f"{path} is truncated: its header promises {8 + header_len + data_end:,} bytes but the file "
                f"has {size:,}. The download or copy stopped early; download it again."
            )
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"{path} is a damaged .safetensors file ({e}). Download it again.") from None
        tf = cls(path)
        tf._handle = handle
        tf._names = set(handle.keys())
        tf.metadata = handle.metadata() or {}
        return tf

    @classmethod
    def _open_pickle(cls, path: Path, kind: str) -> "TensorFile":
        try:
            # weights_only=True: only tensors and plain containers may be rebuilt; any other
            # object in the pickle (a class, a function such as os.system) is refused unrun.
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip-pickle")
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f" (it asks for `{found.group(1)}`)" if found else ""
            raise CheckpointError(
                f"refused: this {path.suffix or 'pickle'} contains code{what}, not only tensors. "
                "Unpickling it could run anything on your computer, so sdlearn does not. "
                "Use the .safetensors version of this model (almost every model is published as one)."
            ) from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
            raise CheckpointError(
                f"{path} is a damaged {path.suffix or 'pickle'} file ({str(e).splitlines()[0][:200]}): most "
                "likely a truncated download. Download it again, preferably as .safetensors."
            ) from None
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dictionary of tensors; it is not a checkpoint.")
        # PyTorch Lightning wraps the weights: {"state_dict": {...}, "global_step": ..., "epoch": ...}.
        top = obj
        while isinstance(obj.get("state_dict"), dict):
            top, obj = obj, obj["state_dict"]
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if len(tensors) < len(obj):
            # Textual-inversion .pt files look like this: {"string_to_param": {"*": tensor}, "name": ...}.
            return cls(path, tensors={}, top_level=obj)
        return cls(path, tensors=tensors, top_level={k: v for k, v in top.items() if k != "state_dict"})

    def keys(self) -> list[str]:
        return list(self._handle.keys()) if self._handle is not None else list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in (self._names if self._handle is not None else self._tensors)

    def shape(self, key: str) -> tuple:
        if self._handle is not None:
            return tuple(self._handle.get_slice(key).get_shape())
        return tuple(self._tensors[key].shape)

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._handle is not None:
            return self._handle.get_tensor(key)
        return self._tensors[key]


# ---------------------------------------------------------------------------------------------
# 2. What kind of file is this?
# ---------------------------------------------------------------------------------------------
#
# People pass the wrong file often: a LoRA, an embedding, a VAE, an SDXL model. A few tell-tale
# names identify each, so the error can say what the file is and where it belongs instead of
# listing a thousand missing keys.

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."


def _check_family(tf: TensorFile, vae_supplied: bool = False) -> None:
    """Raise a CheckpointError unless `tf` looks like a full SD1.x checkpoint in the original layout.

    A checkpoint without a VAE is accepted only when a separate VAE file is given."""
    keys = tf.keys()
    p = tf.path

    def any_key(test) -> bool:
        return any(test(k) for k in keys)

    top = tf.top_level
    if not keys and ("string_to_param" in top or "emb_params" in top):
        raise CheckpointError(
            f"{p} is a textual-inversion embedding, not a checkpoint. Put it in A1111's embeddings/ "
            "(ComfyUI: models/embeddings/) and load a base SD1.5 checkpoint instead."
        )
    if not keys:
        raise CheckpointError(f"{p} holds no tensors (entries: {sorted(top)[:8]}); it is not a Stable Diffusion checkpoint.")
    if set(keys) <= {"emb_params", "clip_l", "clip_g"}:  # A1111 / SDXL embedding .safetensors
        raise CheckpointError(
            f"{p} is a textual-inversion embedding (it holds only {sorted(keys)}), not a checkpoint. "
            "Put it in A1111's embeddings/ folder (ComfyUI: models/embeddings/) and load a base checkpoint."
        )
    if any_key(lambda k: k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) or ".lora_down." in k
               or ".lora_A." in k or ".lora_up." in k):
        raise CheckpointError(
            f"{p} is a LoRA (it has lora_unet_*/lora_down keys), a small add-on, not a full model. "
            "Load a base SD1.5 checkpoint and apply the LoRA to it (sdlearn.lora; A1111 models/Lora/)."
        )
    if any_key(lambda k: k.startswith("conditioner.embedders.")):
        raise CheckpointError(
            f"{p} is an SDXL checkpoint (conditioner.embedders.* keys). sdlearn implements Stable "
            "Diffusion 1.5 only; use an SD1.5 checkpoint such as v1-5-pruned-emaonly.safetensors."
        )
    if any_key(lambda k: k.startswith("cond_stage_model.model.")):
        raise CheckpointError(
            f"{p} is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder, cond_stage_model.model.*). "
            "sdlearn implements SD1.5 only; use an SD1.5 checkpoint."
        )
    if any_key(lambda k: re.match(r"^(model\.diffusion_model\.)?(joint_blocks|double_blocks|single_blocks|"
                                  r"transformer_blocks|x_embedder|blocks\.0\.)", k) or k.startswith("text_encoders.")):
        raise CheckpointError(
            f"{p} looks like a diffusion-transformer model (SD3 / Flux / similar: joint_blocks, "
            "double_blocks, ... keys), not SD1.5's U-Net. sdlearn implements Stable Diffusion 1.5 only."
        )
    has_unet = any_key(lambda k: k.startswith(UNET))
    looks_vae = any_key(lambda k: k.startswith(("encoder.", "decoder.", VAE, "quant_conv.")))
    if not has_unet and looks_vae:
        raise CheckpointError(
            f"{p} is a VAE on its own, not a full checkpoint. Pass it as the VAE of a model: "
            f"load_pipeline(<checkpoint>, vae={str(p)!r}) (A1111: the SD VAE setting; ComfyUI: Load VAE)."
        )
    if not has_unet and any_key(lambda k: k.startswith(("down_blocks.", "mid_block.", "conv_in."))):
        raise CheckpointError(
            f"{p} is one component of a diffusers folder (diffusers names such as down_blocks.*), "
            "not a single-file checkpoint. Pass the whole diffusers folder (the one with model_index.json)."
        )
    if not has_unet:
        raise CheckpointError(
            f"{p} is not a Stable Diffusion 1.x checkpoint: it has no U-Net (model.diffusion_model.*). "
            f"Its first keys are {sorted(keys)[:5]}."
        )
    for prefix, part, hint in ((VAE, "VAE (first_stage_model.*)", "pass a VAE file with vae=..."),
                               (CLIP, "text encoder (cond_stage_model.transformer.*)", "use a full SD1.5 checkpoint")):
        if not any_key(lambda k: k.startswith(prefix)) and not (prefix == VAE and vae_supplied):
            raise CheckpointError(f"{p} has a U-Net but no {part}: it is a partial checkpoint; {hint}.")
    in_channels = tf.shape(UNET + "input_blocks.0.0.weight")[1]
    if in_channels == 8:
        raise CheckpointError(
            f"{p} is an InstructPix2Pix model (its U-Net takes 8 input channels: latents + the input image's "
            "latents). sdlearn implements the 4-channel SD1.5 U-Net and the 9-channel inpainting one."
        )
    if in_channels not in (4, 9):
        raise CheckpointError(
            f"{p} has a U-Net with {in_channels} input channels; sdlearn supports 4 (SD1.5) and "
            "9 (SD1.5 inpainting)."
        )


# ---------------------------------------------------------------------------------------------
# 3. The renaming rules: original (CompVis/LDM) names <-> diffusers names
# ---------------------------------------------------------------------------------------------
#
# A rule is (original prefix, diffusers prefix, renames inside the block). The original U-Net is
# a flat list of blocks, `input_blocks.N`, each a small sequential: `.0` a ResBlock (or a
# downsampler `.0.op`), `.1` a spatial transformer. diffusers groups the same blocks by
# resolution level: down_blocks.b.resnets.k / .attentions.k / .downsamplers.0. With L ResNets per
# level the N-th input block is level b = (N-1) // (L+1), position k = (N-1) % (L+1); position L
# is the downsampler. The up path has L+1 ResNets per level, and the upsampler sits after the
# attention (`output_blocks.N.2.conv`) when the level has one, otherwise at `.1.conv`. The VAE
# decoder numbers its levels the other way round: original `up.0` is the last (full-resolution)
# level, diffusers `up_blocks.0` the first.

# Inside an original ResBlock: in_layers = [GroupNorm, SiLU, conv], out_layers = [GroupNorm, SiLU,
# dropout, conv]; only the modules with weights are named.
UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
# The VAE's single-head attention: original 1x1 convolutions q, k, v, proj_out; diffusers Linears.
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _is_cross_attn(block_type: str) -> bool:
    return block_type.startswith("CrossAttn")


def unet_rules(cfg: dict) -> list[tuple[str, str, dict]]:
    """Rules for the U-Net, from its diffusers config (block_out_channels, layers_per_block, block types)."""
    levels, L = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    down_attn = [_is_cross_attn(t) for t in cfg["down_block_types"]]
    up_attn = [_is_cross_attn(t) for t in cfg["up_block_types"]]
    rules = [("time_embed.0.", "time_embedding.linear_1.", {}), ("time_embed.2.", "time_embedding.linear_2.", {}),
             ("input_blocks.0.0.", "conv_in.", {}), ("out.0.", "conv_norm_out.", {}), ("out.2.", "conv_out.", {}),
             ("middle_block.0.", "mid_block.resnets.0.", UNET_RESNET),
             ("middle_block.1.", "mid_block.attentions.0.", {}),
             ("middle_block.2.", "mid_block.resnets.1.", UNET_RESNET)]
    n = 1  # input_blocks.0 is conv_in
    for b in range(levels):
        for k in range(L):
            rules.append((f"input_blocks.{n}.0.", f"down_blocks.{b}.resnets.{k}.", UNET_RESNET))
            if down_attn[b]:
                rules.append((f"input_blocks.{n}.1.", f"down_blocks.{b}.attentions.{k}.", {}))
            n += 1
        if b < levels - 1:  # every level but the last halves the resolution
            rules.append((f"input_blocks.{n}.0.op.", f"down_blocks.{b}.downsamplers.0.conv.", {}))
            n += 1
    n = 0
    for b in range(levels):
        for k in range(L + 1):
            rules.append((f"output_blocks.{n}.0.", f"up_blocks.{b}.resnets.{k}.", UNET_RESNET))
            if up_attn[b]:
                rules.append((f"output_blocks.{n}.1.", f"up_blocks.{b}.attentions.{k}.", {}))
            if k == L and b < levels - 1:  # every level but the last doubles the resolution
                slot = 2 if up_attn[b] else 1
                rules.append((f"output_blocks.{n}.{slot}.conv.", f"up_blocks.{b}.upsamplers.0.conv.", {}))
            n += 1
    return rules


def vae_rules(cfg: dict) -> list[tuple[str, str, dict]]:
    """Rules for the VAE, from its diffusers config (block_out_channels, layers_per_block)."""
    levels, L = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    rules = [("quant_conv.", "quant_conv.", {}), ("post_quant_conv.", "post_quant_conv.", {})]
    for part in ("encoder", "decoder"):
        rules += [(f"{part}.conv_in.", f"{part}.conv_in.", {}), (f"{part}.norm_out.", f"{part}.conv_norm_out.", {}),
                  (f"{part}.conv_out.", f"{part}.conv_out.", {}),
                  (f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", VAE_RESNET),
                  (f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", VAE_ATTENTION),
                  (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", VAE_RESNET)]
    for i in range(levels):
        for j in range(L):
            rules.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.", VAE_RESNET))
        if i < levels - 1:
            rules.append((f"encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv.", {}))
    for i in range(levels):
        level = levels - 1 - i  # the decoder's original levels count from full resolution up
        for j in range(L + 1):
            rules.append((f"decoder.up.{level}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.", VAE_RESNET))
        if i < levels - 1:
            rules.append((f"decoder.up.{level}.upsample.conv.", f"decoder.up_blocks.{i}.upsamplers.0.conv.", {}))
    return rules


# The text encoder needs no renaming: SD1.5's files store transformers' own CLIPTextModel names
# under `cond_stage_model.transformer.`, with `text_model.` in between since transformers 4.x
# (older files lack it, so the loader picks the prefix the file uses).
CLIP_RULES = [("text_model.", "text_model.", {})]


def _apply(key: str, rules, to_diffusers: bool) -> str:
    """Rename one key with the longest matching rule, in either direction."""
    src, dst = (0, 1) if to_diffusers else (1, 0)
    best = None
    for rule in rules:
        if key.startswith(rule[src]) and (best is None or len(rule[src]) > len(best[src])):
            best = rule
    if best is None:
        raise KeyError(key)
    rest = key[len(best[src]):]
    module, _, param = rest.rpartition(".")
    renames = best[2] if to_diffusers else {v: k for k, v in best[2].items()}
    if module in renames:
        rest = f"{renames[module]}.{param}"
    return best[dst] + rest


def to_diffusers_key(original_key: str, rules) -> str:
    return _apply(original_key, rules, to_diffusers=True)


def to_original_key(diffusers_key: str, rules) -> str:
    return _apply(diffusers_key, rules, to_diffusers=False)


def ema_key(original_unet_key: str) -> str:
    """The EMA copy's name for a U-Net weight: the LitEma module stores it with the dots removed
    (module buffers cannot contain dots), e.g. model.diffusion_model.input_blocks.0.0.weight ->
    model_ema.diffusion_modelinput_blocks00weight."""
    return "model_ema." + original_unet_key[len("model."):].replace(".", "")


# Tensors of a file that carry no weights of the three networks, and why we may skip them.
# Each rule is a regular expression on the full key; every other key must be used.
IGNORED = [
    (r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
     r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance|"
     r"posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2)$",
     "the training noise schedule; sdlearn.schedule computes it (betas are checked against SD1.5's)"),
    (r"^model_ema\.(decay|num_updates)$", "the EMA's bookkeeping (decay rate, step count)"),
    (r"(^|\.)embeddings\.position_ids$", "CLIP's constant positions 0..76, recomputed by sdlearn.clip"),
    (r"^(first_stage_model\.)?loss\.", "the VAE's training loss (discriminator, LPIPS) saved in some VAE files"),
]


def _ignore_reason(key: str):
    for pattern, reason in IGNORED:
        if re.search(pattern, key):
            return reason
    return None


# ---------------------------------------------------------------------------------------------
# 4. Configs read off the tensor shapes
# ---------------------------------------------------------------------------------------------
#
# A single file has no config.json. Every size can be read from a shape (channels per level,
# ResNets per level, which levels have attention, input channels: 4, or 9 for inpainting, context
# width, CLIP width and depth). Three numbers cannot: GroupNorm's group count, the U-Net's and
# CLIP's numbers of attention heads. For those we take SD1.5's (32 groups, 8 U-Net heads, 12 CLIP
# heads), exactly what A1111 and ComfyUI assume for an SD1.x file.


def _count(keys, prefix: str) -> int:
    """How many numbered children `prefix.N.` exist."""
    return len({k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)})


def unet_config_from_shapes(tf: TensorFile, p: str = UNET) -> dict:
    from .unet import UNetConfig

    keys = [k for k in tf.keys() if k.startswith(p)]
    n_inputs = _count(keys, p + "input_blocks.")
    n_down = sum(1 for n in range(n_inputs) if p + f"input_blocks.{n}.0.op.weight" in tf)
    levels = n_down + 1
    L = (n_inputs - 1 - n_down) // levels
    channels, attn = [], []
    for b in range(levels):
        n = 1 + b * (L + 1)  # the first ResBlock of level b
        channels.append(tf.shape(p + f"input_blocks.{n}.0.out_layers.3.weight")[0])
        attn.append(p + f"input_blocks.{n}.1.proj_in.weight" in tf)
    mid = p + "middle_block.1."
    cfg = UNetConfig.sd15().to_diffusers()
    cfg.update(
        in_channels=tf.shape(p + "input_blocks.0.0.weight")[1],  # 4, or 9 = latents + mask + masked image
        out_channels=tf.shape(p + "out.2.weight")[0],
        block_out_channels=channels,
        layers_per_block=L,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        cross_attention_dim=tf.shape(mid + "transformer_blocks.0.attn2.to_k.weight")[1],
        transformer_layers_per_block=_count(keys, mid + "transformer_blocks."),
        use_linear_projection=len(tf.shape(mid + "proj_in.weight")) == 2,
    )
    return cfg


def vae_config_from_shapes(tf: TensorFile, p: str) -> dict:
    """`p` is the VAE prefix: "first_stage_model." in a full checkpoint, "" in a VAE file."""
    from .vae import VAEConfig

    keys = [k for k in tf.keys() if k.startswith(p)]
    levels = _count(keys, p + "encoder.down.")
    cfg = VAEConfig.sd15().to_diffusers()
    cfg.update(
        in_channels=tf.shape(p + "encoder.conv_in.weight")[1],
        out_channels=tf.shape(p + "decoder.conv_out.weight")[0],
        block_out_channels=[tf.shape(p + f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)],
        layers_per_block=_count(keys, p + "encoder.down.0.block."),
        latent_channels=tf.shape(p + "post_quant_conv.weight")[0],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
    )
    return cfg


def vae_config_from_diffusers_shapes(tf: TensorFile) -> dict:
    """The same for a VAE file saved with diffusers names (an AutoencoderKL state dict)."""
    from .vae import VAEConfig

    keys = tf.keys()
    levels = _count(keys, "encoder.down_blocks.")
    cfg = VAEConfig.sd15().to_diffusers()
    cfg.update(
        in_channels=tf.shape("encoder.conv_in.weight")[1],
        out_channels=tf.shape("decoder.conv_out.weight")[0],
        block_out_channels=[tf.shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels)],
        layers_per_block=_count(keys, "encoder.down_blocks.0.resnets."),
        latent_channels=tf.shape("post_quant_conv.weight")[0],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
    )
    return cfg


def clip_config_from_shapes(tf: TensorFile, p: str) -> dict:
    """`p` ends just before `embeddings.` / `encoder.` / `final_layer_norm.`."""
    from .clip import CLIPTextConfig

    vocab, width = tf.shape(p + "embeddings.token_embedding.weight")
    cfg = CLIPTextConfig.sd15().to_transformers()
    cfg.update(
        vocab_size=vocab,
        hidden_size=width,
        max_position_embeddings=tf.shape(p + "embeddings.position_embedding.weight")[0],
        intermediate_size=tf.shape(p + "encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=_count(tf.keys(), p + "encoder.layers."),
    )
    return cfg


# ---------------------------------------------------------------------------------------------
# 5. Strict filling: every parameter from exactly one tensor of the file, shapes checked
# ---------------------------------------------------------------------------------------------


def _build(cls, config):
    """Build an sdlearn module without spending time on a random initialisation (meta device)."""
    with torch.device("meta"):
        return cls(config)


def _take(model: torch.nn.Module, tf: TensorFile, name_of, dtype, what: str, used: set) -> dict:
    """{model key: tensor} with every model key's tensor read from `tf` under `name_of(key)`.

    A 1x1 convolution weight (out, in, 1, 1) may fill a Linear weight (out, in): the original VAE's
    attention uses convolutions where diffusers uses Linears; the numbers are the same.
    """
    state, missing = {}, []
    for key, param in model.state_dict().items():
        name = name_of(key)
        if name not in tf:
            missing.append(f"{name} (for {what} {key})")
            continue
        shape = tf.shape(name)
        tensor = tf[name]
        if shape != tuple(param.shape):
            if len(param.shape) == 2 and shape == (*param.shape, 1, 1):
                tensor = tensor[:, :, 0, 0]
            else:
                raise CheckpointError(
                    f"{tf.path}: tensor {name} has shape {shape}, but {what} parameter {key} needs "
                    f"{tuple(param.shape)}. The file is not the architecture sdlearn inferred for it "
                    "(an SD1.5-family model); it may be a different model family or a damaged merge."
                )
        if not tensor.is_floating_point():
            raise CheckpointError(f"{tf.path}: tensor {name} holds {tensor.dtype} numbers, expected floats.")
        state[key] = tensor.to(dtype)
        used.add(name)
    if missing:
        raise CheckpointError(
            f"{tf.path} lacks {len(missing)} tensor(s) of the {what}, e.g. {missing[0]}"
            + (f" and {missing[1]}" if len(missing) > 1 else "")
            + ". The file is incomplete or not an SD1.5 model; download it again or use another file."
        )
    return state


def _check_all_used(tf: TensorFile, used: set, extra_reason=None) -> dict:
    """Every tensor of the file is used or matched by an IGNORED rule; returns {reason: count}."""
    ignored, unknown = {}, []
    for key in tf.keys():
        if key in used:
            continue
        reason = (extra_reason(key) if extra_reason else None) or _ignore_reason(key)
        if reason is None:
            unknown.append(key)
        else:
            ignored[reason] = ignored.get(reason, 0) + 1
    if unknown:
        raise CheckpointError(
            f"{tf.path} has {len(unknown)} tensor(s) that belong to no part of an SD1.5 model, e.g. "
            f"{', '.join(sorted(unknown)[:3])}. It is probably another model type or an SD1.5 model with "
            "extra modules (ControlNet, adapters) baked in; sdlearn loads plain SD1.5 checkpoints."
        )
    return ignored


def _load_into(model: torch.nn.Module, state: dict) -> torch.nn.Module:
    # strict=True: the key sets must match exactly; assign=True: the meta tensors are replaced by ours.
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"internal error: {type(model).__name__} has tensors no file fills: {left[:3]}")
    return model.eval()


def _schedule_note(tf: TensorFile):
    """Compare the file's `betas` with SD1.5's scaled-linear schedule (sqrt-linear from 0.00085 to 0.012)."""
    if "betas" not in tf:
        return None
    betas = tf["betas"].double()
    sd15 = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    # fp16 files store betas to ~3 significant digits; other schedules differ by far more.
    if betas.shape == sd15.shape and torch.allclose(betas, sd15, rtol=2e-3, atol=0):
        return "SD1.5 scaled-linear (betas checked)"
    warnings.warn(f"{tf.path}: its training schedule (betas) differs from SD1.5's; sdlearn samples with SD1.5's.")
    return "differs from SD1.5's; sdlearn uses SD1.5's"


# ---------------------------------------------------------------------------------------------
# 6. Sources: a single file, a separate VAE file, a diffusers folder, a hub id, "tiny"
# ---------------------------------------------------------------------------------------------


def _models():
    from .clip import CLIPTextConfig, CLIPTextModel
    from .unet import UNet2DConditionModel, UNetConfig
    from .vae import AutoencoderKL, VAEConfig

    return (UNetConfig, UNet2DConditionModel), (VAEConfig, AutoencoderKL), (CLIPTextConfig, CLIPTextModel)


def _config(make, d: dict, where):
    try:
        return make(d)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def load_single_file(path, dtype, use_ema: bool, vae_supplied: bool):
    """(unet, vae or None, text_encoder, info) from an original-layout .safetensors/.ckpt."""
    (UNetConfig, UNet), (VAEConfig, AutoencoderKL), (CLIPConfig, CLIPModel) = _models()
    tf = TensorFile.open(path)
    _check_family(tf, vae_supplied)
    used: set = set()
    info = {"format": f"single file ({tf.path.suffix or 'no extension'}, original CompVis layout)"}

    # U-Net, from the EMA copy when there is one and use_ema (the weights SD1.5's images were made with).
    unet_cfg = unet_config_from_shapes(tf)
    unet = _build(UNet, _config(UNetConfig.from_diffusers, unet_cfg, tf.path))
    rules = unet_rules(unet_cfg)
    original = {k: UNET + to_original_key(k, rules) for k in unet.state_dict()}
    has_ema = any(k.startswith("model_ema.") and _ignore_reason(k) is None for k in tf.keys())
    if has_ema and use_ema:
        unet_state = _take(unet, tf, lambda k: ema_key(original[k]), dtype, "U-Net (EMA)", used)
        skipped, info["unet_weights"] = set(original.values()), "EMA (model_ema.*)"
    else:
        unet_state = _take(unet, tf, original.get, dtype, "U-Net", used)
        skipped = {ema_key(o) for o in original.values()} if has_ema else set()
        info["unet_weights"] = ("non-EMA (model.diffusion_model.*; use_ema=False)" if has_ema else
                                "model.diffusion_model.* (this file has no separate EMA copy)")
    # The copy we did not choose must be a complete copy of the same U-Net, nothing else.
    absent = sorted(n for n in skipped if n not in tf)
    if absent:
        raise CheckpointError(
            f"{tf.path} has two copies of the U-Net (EMA and non-EMA) but one is incomplete: {absent[0]} is "
            "missing. The file is damaged or a bad merge; download it again."
        )
    unused_copy = {k for k in tf.keys() if (k.startswith(UNET) or k.startswith("model_ema.")) and k not in used
                   and _ignore_reason(k) is None}
    if unused_copy - skipped:
        bad = sorted(unused_copy - skipped)[0]
        raise CheckpointError(f"{tf.path}: U-Net tensor {bad} fits no parameter of the U-Net; the file is not plain SD1.5.")
    _load_into(unet, unet_state)

    # Text encoder: transformers' names after the prefix; `text_model.` present or not.
    p = CLIP + "text_model." if any(k.startswith(CLIP + "text_model.") for k in tf.keys()) else CLIP
    clip_cfg = clip_config_from_shapes(tf, p)
    text_encoder = _build(CLIPModel, _config(CLIPConfig.from_transformers, clip_cfg, tf.path))
    clip_state = _take(text_encoder, tf, lambda k: p + k[len("text_model."):], dtype, "text encoder", used)
    _load_into(text_encoder, clip_state)

    vae = None
    if any(k.startswith(VAE) for k in tf.keys()):
        vae_cfg = vae_config_from_shapes(tf, VAE)
        vae = _build(AutoencoderKL, _config(VAEConfig.from_diffusers, vae_cfg, tf.path))
        vrules = vae_rules(vae_cfg)
        _load_into(vae, _take(vae, tf, lambda k: VAE + to_original_key(k, vrules), dtype, "VAE", used))

    info["ignored"] = _check_all_used(tf, used, lambda k: "the U-Net copy not chosen (EMA rule)" if k in skipped else None)
    info["schedule"] = _schedule_note(tf)
    info["model"] = "SD1.5 inpainting (9-channel U-Net)" if unet_cfg["in_channels"] == 9 else "SD1.5"
    info["configs"] = {"unet": unet_cfg, "vae": vae_cfg if vae is not None else None, "text_encoder": clip_cfg}
    return unet, vae, text_encoder, info


def load_vae_file(path, dtype):
    """An AutoencoderKL from a separate VAE file (A1111 "SD VAE", ComfyUI "Load VAE").

    Accepted: original names (`encoder.down.0.block.0...`, `decoder.up...`, `quant_conv`,
    `post_quant_conv`), the same under `first_stage_model.`, or diffusers AutoencoderKL names.
    `loss.*` tensors (the training discriminator and LPIPS network kept in some released VAE .ckpt
    files) are skipped by the IGNORED rules; anything else unknown is an error.
    """
    _, (VAEConfig, AutoencoderKL), _ = _models()
    tf = TensorFile.open(path)
    keys = tf.keys()
    if any(k.startswith(UNET) for k in keys):
        raise CheckpointError(
            f"{tf.path} is a full checkpoint (it has a U-Net), not a VAE file. Pass it as the source, or "
            "pass a VAE file (e.g. vae-ft-mse-840000-ema-pruned.safetensors) as vae=."
        )
    p = VAE if any(k.startswith(VAE) for k in keys) else ""
    used: set = set()
    if p + "encoder.norm_out.weight" in tf:  # original names
        cfg = vae_config_from_shapes(tf, p)
        rules = vae_rules(cfg)
        vae = _build(AutoencoderKL, _config(VAEConfig.from_diffusers, cfg, tf.path))
        state = _take(vae, tf, lambda k: p + to_original_key(k, rules), dtype, "VAE", used)
    elif "encoder.conv_norm_out.weight" in tf:  # diffusers names
        cfg = vae_config_from_diffusers_shapes(tf)
        vae = _build(AutoencoderKL, _config(VAEConfig.from_diffusers, cfg, tf.path))
        state = _take(vae, tf, lambda k: k, dtype, "VAE", used)
    else:
        raise CheckpointError(
            f"{tf.path} is not a VAE file: it has no encoder/decoder tensors (first keys {sorted(keys)[:3]}). "
            "A VAE file is e.g. vae-ft-mse-840000-ema-pruned.safetensors."
        )
    ignored = _check_all_used(tf, used)
    return _load_into(vae, state), {"file": str(tf.path), "ignored": ignored}


# --- diffusers folders ---------------------------------------------------------------------

# Weight file names per component, in order of preference (safetensors first: it cannot run code).
WEIGHT_NAMES = {
    "unet": ["diffusion_pytorch_model{v}.safetensors", "diffusion_pytorch_model{v}.bin"],
    "vae": ["diffusion_pytorch_model{v}.safetensors", "diffusion_pytorch_model{v}.bin"],
    "text_encoder": ["model{v}.safetensors", "pytorch_model{v}.bin"],
}


def choose_weight_file(component: str, names, dtype, use_ema: bool = True):
    """Pick one weight file for a component from the file names available.

    Variants: `.fp16` (half-precision copy, preferred when loading in fp16, half the download) and,
    in SD1.5's repo, `.non_ema` for the U-Net (the raw training weights, taken when use_ema=False).
    """
    names = set(names)
    variants = [""]
    if dtype == torch.float16:
        variants.insert(0, ".fp16")
    else:
        variants.append(".fp16")  # fp16 only: still usable, upcast on load
    if component == "unet" and not use_ema:
        variants.insert(0, ".non_ema")
    for v in variants:
        for pattern in WEIGHT_NAMES[component]:
            if pattern.format(v=v) in names:
                return pattern.format(v=v)
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} could not be read as JSON ({e}); the folder is damaged, download it again.") from None


def _check_folder_tokenizer(folder: Path) -> None:
    vocab = folder / "tokenizer" / "vocab.json"
    if vocab.exists():
        size = len(_read_json(vocab))
        if size != CLIP_VOCAB_SIZE:
            raise CheckpointError(
                f"{vocab} has {size} tokens, CLIP's has {CLIP_VOCAB_SIZE}: this model uses another tokenizer, "
                "so it is not an SD1.5-family model. sdlearn uses CLIP's tokenizer from assets/clip."
            )


def load_diffusers_folder(folder, dtype, use_ema: bool, vae_supplied: bool):
    """(unet, vae or None, text_encoder, info) from a diffusers folder (names need no translation)."""
    (UNetConfig, UNet), (VAEConfig, AutoencoderKL), (CLIPConfig, CLIPModel) = _models()
    folder = Path(folder)
    index = folder / "model_index.json"
    if index.exists():
        pipeline_class = _read_json(index).get("_class_name", "")
        if "XL" in pipeline_class or pipeline_class.startswith(("StableDiffusion3", "Flux", "StableCascade")):
            raise CheckpointError(
                f"{folder} holds a {pipeline_class}; sdlearn implements Stable Diffusion 1.5 only."
            )
    _check_folder_tokenizer(folder)
    info = {"format": "diffusers folder", "files": {}}
    parts = {}
    for component, (make_config, cls) in (("unet", (UNetConfig.from_diffusers, UNet)),
                                           ("vae", (VAEConfig.from_diffusers, AutoencoderKL)),
                                           ("text_encoder", (CLIPConfig.from_transformers, CLIPModel))):
        sub = folder / component
        if component == "vae" and vae_supplied and not sub.exists():
            parts[component] = None
            continue
        if not (sub / "config.json").exists():
            hint = " or pass a VAE file with vae=..." if component == "vae" else ""
            raise CheckpointError(
                f"{folder} has no {component}/ (with config.json): the diffusers folder is incomplete. "
                f"Download the {component}/ subfolder{hint}."
            )
        config = _read_json(sub / "config.json")
        name = choose_weight_file(component, os.listdir(sub), dtype, use_ema)
        if name is None:
            raise CheckpointError(
                f"{sub} has config.json but no weight file ({', '.join(p.format(v='') for p in WEIGHT_NAMES[component])}"
                f" or their .fp16 variants); download it."
            )
        model = _build(cls, _config(make_config, config, sub / "config.json"))
        tf = TensorFile.open(sub / name)
        used: set = set()
        if component == "text_encoder":
            # transformers up to 4.x saves `text_model.*`, transformers 5 drops the prefix.
            has_prefix = any(k.startswith("text_model.") for k in tf.keys())
            state = _take(model, tf, (lambda k: k) if has_prefix else (lambda k: k[len("text_model."):]),
                          dtype, "text encoder", used)
        else:
            state = _take(model, tf, lambda k: k, dtype, component, used)
        _check_all_used(tf, used)
        parts[component] = _load_into(model, state)
        info["files"][component] = name
        if component == "unet":
            info["model"] = "SD1.5 inpainting (9-channel U-Net)" if config.get("in_channels") == 9 else "SD1.5"
            info["unet_weights"] = ("non-EMA (.non_ema variant)" if ".non_ema." in name else
                                    "as saved in the folder (SD1.5's repo saves the EMA weights)")
    return parts["unet"], parts["vae"], parts["text_encoder"], info


# --- hub ids -------------------------------------------------------------------------------


def _looks_like_repo_id(source: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", source)) and not source.endswith((".safetensors", ".ckpt", ".pt", ".bin"))


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download_from_hub(repo_id: str, dtype, use_ema: bool) -> Path:
    """Fetch only what loading needs: configs plus one weight file per component. Returns the folder."""
    need_network = (
        f"{repo_id!r} looks like a hub repo id; it is not in your Hugging Face cache and downloading it "
        "needs the network (HF_HUB_OFFLINE is set or huggingface.co cannot be reached). Connect and retry, "
        "or pass a local path: a diffusers folder or a single .safetensors file. "
        f"(If you meant a local folder: {Path(repo_id).resolve()} does not exist.)"
    )
    try:
        import huggingface_hub as hub
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise CheckpointError("Loading a hub id needs the huggingface_hub package: pip install huggingface_hub") from None
    configs = ["model_index.json", "tokenizer/vocab.json"] + [f"{c}/config.json" for c in WEIGHT_NAMES]
    try:
        if _hub_offline():
            # The cache may already hold an earlier download; local_files_only never touches the network.
            return Path(hub.snapshot_download(repo_id, local_files_only=True,
                                              allow_patterns=configs + [f"{c}/*" for c in WEIGHT_NAMES]))
        files = hub.list_repo_files(repo_id)
        wanted = [f for f in configs if f in files]
        for component in WEIGHT_NAMES:
            in_sub = [f.split("/", 1)[1] for f in files if f.startswith(component + "/")]
            name = choose_weight_file(component, in_sub, dtype, use_ema)
            if name is None:
                raise CheckpointError(f"hub repo {repo_id} has no {component}/ weights; it is not an SD1.5 diffusers repo.")
            wanted.append(f"{component}/{name}")
        return Path(hub.snapshot_download(repo_id, allow_patterns=wanted))
    except CheckpointError:
        raise
    except hub_errors.GatedRepoError:
        raise CheckpointError(f"{repo_id} is gated: accept its licence on huggingface.co and log in (hf auth login).") from None
    except hub_errors.RepositoryNotFoundError:
        raise CheckpointError(f"No hub repo {repo_id!r} (and no local file or folder by that name).") from None
    except Exception as e:  # offline, no cache entry, DNS or connection failure (requests/httpx errors)
        raise CheckpointError(f"{need_network} [{type(e).__name__}: {str(e)[:200]}]") from None


# ---------------------------------------------------------------------------------------------
# 7. The front door
# ---------------------------------------------------------------------------------------------

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _resolve_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype={dtype!r}: use torch.float32 (default), torch.float16 or torch.bfloat16 ('fp16', 'bf16').")


def _resolve_device(device) -> torch.device:
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but this torch sees no CUDA GPU; use device='cpu' "
                         "or install a CUDA build of torch (README).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device='mps' was asked for, but Apple's MPS is not available here; use device='cpu'.")
    return device


def load_pipeline(source, device=None, dtype=None, vae=None, use_ema: bool = True) -> Pipeline:
    """Load a Stable Diffusion 1.5 model into sdlearn's modules.

    source   "tiny" (the shipped TinySD), a single-file .safetensors/.ckpt (A1111/ComfyUI layout),
             a diffusers folder, or a hub repo id like "stable-diffusion-v1-5/stable-diffusion-v1-5".
    device   where the modules live: None = "cpu", or "cuda" / "mps".
    dtype    None = torch.float32; torch.float16 halves memory on a GPU.
    vae      a separate VAE file replacing the checkpoint's own (A1111 "SD VAE", ComfyUI "Load VAE").
    use_ema  for a single file with both weight copies: True takes the EMA copy (model_ema.*), the
             weights the published images were made with; False the raw training weights.

    `pipe.info` records what was loaded: format, model type, which U-Net weights, VAE, ignored tensors.
    """
    dtype, device = _resolve_dtype(dtype), _resolve_device(device)
    source_str = str(source)
    if source_str == "tiny":
        if not (TINY_DIR / "unet" / "config.json").exists():
            raise CheckpointError(
                f"The TinySD weights are not in assets/ yet ({TINY_DIR} is missing or incomplete). They are "
                "produced by sdlearn.train; until they ship, load SD1.5 weights instead."
            )
        unet, vae_model, text_encoder, info = load_diffusers_folder(TINY_DIR, dtype, use_ema, vae is not None)
        info["model"] = "TinySD"
    else:
        path = Path(source_str).expanduser()
        if path.is_dir():
            unet, vae_model, text_encoder, info = load_diffusers_folder(path, dtype, use_ema, vae is not None)
        elif path.is_file():
            unet, vae_model, text_encoder, info = load_single_file(path, dtype, use_ema, vae is not None)
        elif _looks_like_repo_id(source_str):
            folder = download_from_hub(source_str, dtype, use_ema)
            unet, vae_model, text_encoder, info = load_diffusers_folder(folder, dtype, use_ema, vae is not None)
            info["format"] = f"hub repo {source_str} (diffusers folder {folder})"
        else:
            raise CheckpointError(
                f"No such file or folder: {path.resolve()}. Pass a .safetensors/.ckpt file, a diffusers folder, "
                "a hub repo id (owner/name) or 'tiny'."
            )
    if vae is not None:
        vae_model, vae_info = load_vae_file(vae, dtype)
        info["vae"] = f"separate file {vae_info['file']}"
        if vae_info["ignored"]:
            info["vae_ignored"] = vae_info["ignored"]
    else:
        info["vae"] = "the checkpoint's own"
    latent = vae_model.config.latent_channels
    if unet.config.out_channels != latent:
        raise CheckpointError(
            f"The VAE makes {latent}-channel latents but the U-Net predicts {unet.config.out_channels} channels: "
            "this VAE does not belong to this model. Use an SD1.5 VAE (4 latent channels)."
        )

    from .tokenizer import CLIPTokenizer

    info.update(dtype=str(dtype).replace("torch.", ""), device=str(device), use_ema=use_ema)
    pipe = Pipeline(CLIPTokenizer(), text_encoder, unet, vae_model, source=source_str, info=info)
    return pipe.to(device=device)


# ---------------------------------------------------------------------------------------------
# 8. The course's SD1.5 cells: where are the learner's weights?
# ---------------------------------------------------------------------------------------------

SD15_ENV = "SDLEARN_SD15"  # a single-file checkpoint, a diffusers folder or a hub repo id


def sd15_from_env(device=None, dtype=None, allow_cpu: bool = False):
    """The learner's SD1.5 pipeline if the environment says where the weights are, else None.

    Notebooks call this in their SD1.5 cells. Set the weights once, before starting JupyterLab:
        export SDLEARN_SD15=~/ComfyUI/models/checkpoints/v1-5-pruned-emaonly.safetensors
    (or a diffusers folder, or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5). A CUDA GPU
    (or Apple MPS) is used in fp16; on a CPU a 512x512 image takes minutes, so CPU runs only with
    allow_cpu=True. When something is missing this prints what is needed and returns None, so the
    notebook still runs through on TinySD.
    """
    source = os.environ.get(SD15_ENV, "").strip()
    if not source:
        print(f"SD1.5 cell skipped: set the environment variable {SD15_ENV} to your SD1.5 weights (a .safetensors "
              "from ComfyUI's models/checkpoints/ or A1111's models/Stable-diffusion/, a diffusers folder, or a hub "
              "id like stable-diffusion-v1-5/stable-diffusion-v1-5) and restart JupyterLab. See README, "
              "'Using your own SD1.5 weights'.")
        return None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if torch.device(device).type == "cpu" and not allow_cpu:
        print("SD1.5 cell skipped: no CUDA GPU (or Apple MPS) found. SD1.5 at 512x512 needs one to run in seconds; "
              "install a CUDA build of torch (README, 'NVIDIA GPU').")
        return None
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.float16
    return load_pipeline(os.path.expanduser(source), device=device, dtype=dtype)
