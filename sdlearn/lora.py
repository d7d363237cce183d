"""LoRA: small add-on files that change what a Stable Diffusion model draws.

A LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"; brought to SD by
cloneofsimo and kohya-ss in 2022-23) does not store new weights. For some of the model's Linear
layers (and 1x1 convolutions) it stores two thin matrices whose product is a CHANGE to the weight:

    W' = W + strength · (alpha / rank) · up @ down        W: (out, in), up: (out, rank), down: (rank, in)

`rank` is small (4 to 128, where SD1.5's layers are 320 to 3072 wide), so a LoRA is a few MB
instead of the 2 GB checkpoint. `alpha` is a number fixed at training time (kohya's
`--network_alpha`) so that the learning rate does not depend on the rank; `strength` is the slider
the user moves: the 0.8 in A1111's `<lora:name:0.8>`, ComfyUI's LoraLoader `strength_model`
(the U-Net) and `strength_clip` (the text encoder).

There are two ways to use the product, and they give the same numbers:

* **Forward with the adapter** (training): y = W x + strength · (alpha/rank) · up(down(x)).
  `LoRALinear` wraps a layer this way; W stays frozen and only `down` and `up` learn.
* **Merge** (generation): add the product into W once, then run the plain model at full speed.
  `merge_lora` / `unmerge_lora` add and subtract it; `applied_loras` merges for one generation
  and restores the original tensors bit for bit afterwards (subtracting again leaves rounding
  errors of about 1e-7, which would add up over many generations; A1111 keeps a backup copy of
  the weights for the same reason).

Which layers? The attention projections of the U-Net (to_q, to_k, to_v, to_out.0 of self- and
cross-attention) are where the classic LoRA lives; kohya's default "LoRA" network also covers
the spatial transformer's proj_in / proj_out and its feed-forward Linears, and the text encoder's
q/k/v/out projections and MLP (fc1, fc2). LoCon-style files add the ResBlocks' convolutions; any
Linear or Conv2d of the two models can be a target here.

Files. `load_lora(source, pipe)` reads the layouts designers download (see docs/lora.md):

    kohya / A1111 / ComfyUI   lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
                              ....lora_up.weight, ....alpha;  lora_te_text_model_encoder_layers_0_self_attn_q_proj...
                              (also the original-layout names, lora_unet_input_blocks_1_1_...)
    diffusers / PEFT          unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight / lora_B
                              text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight
    diffusers, older          ....to_q.lora.down.weight / .lora.up.weight, ....processor.to_q_lora.down.weight

strictly, like `weights.py`: every tensor is used, every target layer must exist, every shape is
checked, and a LoRA for another model family (SDXL, SD2, Flux) or another kind of file (LyCORIS,
a whole checkpoint, an embedding) is named as such in the error.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .weights import CheckpointError, TensorFile, to_original_key, unet_rules


class LoRAError(CheckpointError):
    """A LoRA could not be read or applied. The message says what was wrong and what to do."""


# ---------------------------------------------------------------------------------------------
# 1. The adapter layer
# ---------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen layer plus a low-rank update: y = base(x) + strength · (alpha/rank) · up(down(x)).

    `base` is an nn.Linear or an nn.Conv2d (SD1.5's proj_in / proj_out are 1x1 convolutions; a
    LoCon adapter on a 3x3 conv uses a 3x3 `down` and a 1x1 `up`). As in the paper, `down` starts
    random and `up` starts at zero, so a fresh adapter changes nothing until it is trained.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, strength: float = 1.0):
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"LoRALinear wraps an nn.Linear or nn.Conv2d, got {type(base).__name__}.")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer (4 to 128 is usual), got {rank!r}.")
        self.base = base
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)  # (rank, in)
            self.up = nn.Linear(rank, base.out_features, bias=False)  # (out, rank)
        else:
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        self.down.to(base.weight)  # same device and dtype as the layer it adapts
        self.up.to(base.weight)
        # down: Kaiming-uniform (nn.Linear's default init, what kohya and PEFT use); up: zeros.
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.alpha = float(rank if alpha is None else alpha)  # kohya: no alpha means alpha = rank
        self.strength = float(strength)
        self.merged = False

    @property
    def rank(self) -> int:
        return self.down.weight.shape[0]

    @property
    def scale(self) -> float:
        return self.strength * self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # W x + b
        if self.merged:  # the update is already inside base.weight
            return y
        return y + self.scale * self.up(self.down(x))  # + strength · (alpha/rank) · up(down(x))

    def delta_weight(self) -> torch.Tensor:
        """strength · (alpha/rank) · up @ down, in the shape of base.weight."""
        return self.scale * low_rank_product(self.up.weight, self.down.weight, self.base.weight.shape)

    @torch.no_grad()
    def merge(self):
        """W <- W + ΔW; the forward then runs the plain layer."""
        if self.merged:
            raise RuntimeError("this LoRA is already merged into its layer; unmerge() first.")
        _add_(self.base.weight, self.delta_weight(), +1)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W <- W - ΔW (equal to the original W up to float rounding, ~1e-7)."""
        if not self.merged:
            raise RuntimeError("this LoRA is not merged; there is nothing to unmerge.")
        _add_(self.base.weight, self.delta_weight(), -1)
        self.merged = False


def low_rank_product(up: torch.Tensor, down: torch.Tensor, weight_shape) -> torch.Tensor:
    """up @ down, reshaped to the layer's weight: (out, in) or (out, in, kh, kw), computed in fp32.

    up is (out, rank[, 1, 1]); down is (rank, in) or (rank, in, kh, kw). For a conv the product
    acts on the flattened kernel: ΔW[o, i, y, x] = Σ_r up[o, r] · down[r, i, y, x].
    """
    product = up.flatten(1).float() @ down.flatten(1).float()  # (out, in·kh·kw)
    return product.reshape(weight_shape)


@torch.no_grad()
def _add_(weight: torch.Tensor, delta: torch.Tensor, sign: int):
    # The sum is taken in fp32 and rounded once to the weight's dtype (fp16 on a GPU), as A1111 does.
    weight.copy_((weight.float() + sign * delta.to(weight.device)).to(weight.dtype))


# ---------------------------------------------------------------------------------------------
# 2. Which layers get adapters (for training)
# ---------------------------------------------------------------------------------------------

# The U-Net's attention projections: the original LoRA recipe for Stable Diffusion.
UNET_ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                  "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
# kohya's default network adds the rest of the spatial transformer's Linear/1x1 layers.
UNET_ALL_LINEAR = UNET_ATTENTION + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_ENCODER_ALL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                    "mlp.fc1", "mlp.fc2")


def lora_targets(model: nn.Module, suffixes=UNET_ATTENTION) -> list[str]:
    """Names of the model's layers that end with one of `suffixes` (e.g. UNET_ALL_LINEAR)."""
    names = [name for name, _ in _layers(model) if name.endswith(tuple("." + s for s in suffixes))]
    if not names:
        raise ValueError(f"{type(model).__name__} has no layer ending with any of {suffixes}.")
    return names


def inject_lora(model: nn.Module, targets, rank: int = 4, alpha: float | None = None,
                strength: float = 1.0) -> dict[str, LoRALinear]:
    """Replace each target layer by a LoRALinear around it; returns {name: adapter}.

    Only the adapters' `down`/`up` are new parameters; freeze the rest (model.requires_grad_(False)
    before injecting) to train a LoRA rather than the whole model.
    """
    adapters = {}
    for name in targets:
        layer = model.get_submodule(name)
        if isinstance(layer, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter; remove_lora(model) first.")
        parent_name, _, child = name.rpartition(".")
        adapter = LoRALinear(layer, rank, alpha, strength)
        setattr(model.get_submodule(parent_name), child, adapter)
        adapters[name] = adapter
    return adapters


def remove_lora(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put the plain layers back; with merge=True each adapter's update is first added to its weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            if merge and not module.merged:
                module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.base)
    return model


def _layers(model: nn.Module):
    """(name, Linear or Conv2d) for every layer a LoRA may target; an adapter stands for its base."""
    inside_adapter = ()
    for name, module in model.named_modules():
        if inside_adapter and name.startswith(inside_adapter):
            continue
        if isinstance(module, LoRALinear):
            inside_adapter += (name + ".",)
            yield name, module.base
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            yield name, module


# ---------------------------------------------------------------------------------------------
# 3. A LoRA in memory: one (down, up, alpha) per target layer
# ---------------------------------------------------------------------------------------------


@dataclass
class LoRALayer:
    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float
    key: str  # the file's name for this layer, for error messages

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, weight_shape, strength: float = 1.0) -> torch.Tensor:
        """strength · (alpha/rank) · up @ down, shaped like the target weight, fp32."""
        return strength * self.alpha / self.rank * low_rank_product(self.up, self.down, weight_shape)


@dataclass
class LoRA:
    """A LoRA read from a file, checked against a model: {target: LoRALayer}.

    Targets are "unet.<module name>" or "text_encoder.<module name>", sdlearn's (= diffusers') names.
    """
    layers: dict
    name: str = ""
    layout: str = ""

    def targets(self, component: str) -> list[str]:
        return [t for t in self.layers if t.startswith(component + ".")]


COMPONENTS = ("unet", "text_encoder")


def _model_layer(pipe, target: str) -> nn.Module:
    component, _, name = target.partition(".")
    layer = getattr(pipe, component).get_submodule(name)
    return layer.base if isinstance(layer, LoRALinear) else layer


# ---------------------------------------------------------------------------------------------
# 4. Reading LoRA files
# ---------------------------------------------------------------------------------------------
#
# Every layout is reduced to (component, module name, role) per tensor, role being "down", "up"
# or "alpha". A kohya name has its dots replaced by underscores, which cannot be undone by rule
# (is `to_q` one name or two?), so we go the other way: list every layer of the actual model,
# write down the kohya name each would have, and look the file's names up in that table.

KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}

# diffusers/PEFT suffixes after the module name, longest first.
DIFFUSERS_SUFFIXES = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),  # PEFT (diffusers >= 0.24)
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),  # LoRACompatibleLinear (~0.21)
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),  # old text encoder
    (".alpha", "alpha"),
)
# diffusers' first LoRA format kept the adapters in attention processors: attn1.processor.to_q_lora.down.weight.
OLD_PROCESSOR = re.compile(r"^(.*?)\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
OLD_PROCESSOR_NAMES = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                       "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}

# Keys that mean "this is not a LoRA for sdlearn", checked before anything else: (test, message).
LYCORIS = {"hada_w1_a", "hada_w2_a", "hada_t1", "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_t2", "lora_mid",
           "oft_blocks", "oft_diag", "dora_scale", "lora_magnitude_vector", "diff", "diff_b", "b_norm", "w_norm"}
CONTEXT_WIDTH_FAMILY = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL", 1280: "SDXL (refiner)"}


def load_lora(source, pipe, name: str | None = None) -> LoRA:
    """Read a LoRA (a .safetensors/.pt/.ckpt path or a {name: tensor} dict) and check it against `pipe`.

    `pipe` is anything with `.unet` and `.text_encoder` (a Pipeline). Raises LoRAError naming the
    key when a tensor fits no layer, a shape does not fit, or the file is another kind of model.
    """
    if isinstance(source, LoRA):
        _check_shapes(source, pipe, source.name)
        return source
    tensors, metadata, where = _read(source)
    where = name or where
    _reject_other_kinds(tensors, metadata, where)
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in tensors):
        layout, parts = "kohya", _parse_kohya(tensors, pipe, where)
    else:
        layout, parts = "diffusers", _parse_diffusers(tensors, pipe, where)
    alphas = _diffusers_alphas(metadata, where) if layout == "diffusers" else {}

    # Gather (down, up, alpha) per target layer.
    grouped: dict = {}
    for key, (target, role) in parts.items():
        entry = grouped.setdefault(target, {})
        if role in entry:
            raise LoRAError(f"{where}: {key} and {entry[role][0]} are both the {role} tensor of {target}; "
                            "the file mixes two layouts or is a bad merge.")
        entry[role] = (key, tensors[key])
    layers = {}
    for target, entry in grouped.items():
        for role in ("down", "up"):
            if role not in entry:
                other = next(iter(entry.values()))[0]
                raise LoRAError(f"{where}: {other} has no matching {role} tensor for {target}; the file is incomplete.")
        down_key, down = entry["down"]
        up = entry["up"][1]
        if "alpha" in entry:
            alpha = float(entry["alpha"][1].float().reshape(-1)[0])
        else:
            alpha = _alpha_from_metadata(alphas, target, down.shape[0])
        layers[target] = LoRALayer(down.float(), up.float(), alpha, down_key)
    lora = LoRA(layers, name=str(where), layout=layout)
    _check_shapes(lora, pipe, where)
    return lora


def _read(source):
    """(tensors, metadata, description) from a path or a dict of tensors."""
    if isinstance(source, dict):
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise LoRAError(f"the LoRA state dict has a non-tensor entry {bad[0]!r}; pass {{name: tensor}}.")
        return dict(source), {}, "LoRA state dict"
    if not isinstance(source, (str, Path)):
        raise TypeError(f"a LoRA is a file path or a dict of tensors, got {type(source).__name__}.")
    tf = TensorFile.open(source)  # safetensors, or torch.load(weights_only=True): never runs code
    if not tf.keys() and ("string_to_param" in tf.top_level or "emb_params" in tf.top_level):
        raise LoRAError(f"{tf.path} is a textual-inversion embedding, not a LoRA. Put it in A1111's "
                        "embeddings/ folder (ComfyUI: models/embeddings/; sdlearn: a folder in "
                        "pipe.embedding_dirs) and use its name in the prompt.")
    return {k: tf[k] for k in tf.keys()}, tf.metadata, tf.path


def _reject_other_kinds(tensors: dict, metadata: dict, where):
    keys = list(tensors)
    if not keys:
        raise LoRAError(f"{where} holds no tensors; it is not a LoRA.")
    if set(keys) <= {"emb_params", "clip_l", "clip_g"}:
        raise LoRAError(f"{where} is a textual-inversion embedding, not a LoRA (it holds only {sorted(keys)}).")
    lycoris = next((k for k in keys if LYCORIS & set(k.split("."))), None)
    if lycoris is not None:
        raise LoRAError(
            f"{where} is a LyCORIS-family adapter (LoHa / LoKr / DoRA / OFT / full-diff; key {lycoris}), not a "
            "plain LoRA. sdlearn does not support these yet; A1111 and ComfyUI load them from the same folder."
        )
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys) or (
            any(k.endswith(("conv_in.weight", "norm1.weight", "time_embedding.linear_1.weight")) for k in keys)
            and not any("lora" in k for k in keys)):
        raise LoRAError(
            f"{where} is a full model checkpoint (it has the model's own weights, e.g. "
            f"{next((k for k in keys if 'lora' not in k), keys[0])}), not a LoRA. Load it with sdlearn.load_pipeline "
            "(A1111: models/Stable-diffusion/, ComfyUI: models/checkpoints/)."
        )
    family = _family_from_names(keys, metadata)
    if family:
        raise LoRAError(f"{where} is a LoRA for {family}, not Stable Diffusion 1.5; it cannot be applied to "
                        "this model. Use a LoRA made for SD1.5 (civitai lists the base model of every LoRA).")


def _family_from_names(keys, metadata: dict) -> str | None:
    """Another model family recognised from key names or kohya's metadata, or None."""
    base = str(metadata.get("ss_base_model_version", "")) + " " + str(metadata.get("modelspec.architecture", ""))
    if "sdxl" in base.lower() or "stable-diffusion-xl" in base.lower():
        return "SDXL"
    if re.search(r"sd_v2|stable-diffusion-v2", base):
        return "SD2.x"
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        return "SDXL (it has two text encoders, lora_te1_/lora_te2_)"
    if any(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_\d+_1_transformer_blocks_[1-9]", k)
           for k in keys):
        return "SDXL (its spatial transformers are 2 and 10 blocks deep; SD1.5's are 1)"
    if any(k.startswith(("lora_transformer_", "transformer.")) or "double_blocks" in k
           or "single_blocks" in k or "joint_blocks" in k for k in keys):
        return "a diffusion-transformer model (Flux / SD3 / similar)"
    return None


def _kohya_table(pipe) -> dict:
    """{kohya layer name: target} for every layer of the pipe's U-Net and text encoder.

    kohya trains SD1.x on diffusers' module names (lora_unet_down_blocks_0_...); LoRAs made with
    the original LDM code use the checkpoint's names (lora_unet_input_blocks_1_1_...). A1111 and
    ComfyUI read both, so we list both.
    """
    table = {}
    rules = unet_rules(pipe.unet.config.to_diffusers())
    for name, _ in _layers(pipe.unet):
        table["lora_unet_" + name.replace(".", "_")] = "unet." + name
        original = to_original_key(name + ".weight", rules)[: -len(".weight")]
        table.setdefault("lora_unet_" + original.replace(".", "_"), "unet." + name)
    for name, _ in _layers(pipe.text_encoder):
        table["lora_te_" + name.replace(".", "_")] = "text_encoder." + name
    return table


def _parse_kohya(tensors: dict, pipe, where) -> dict:
    table = _kohya_table(pipe)
    parts = {}
    for key in tensors:
        layer_name, _, suffix = key.partition(".")
        if suffix not in KOHYA_SUFFIXES:
            raise LoRAError(f"{where}: key {key} is not a kohya LoRA tensor (expected <layer>.lora_down.weight, "
                            ".lora_up.weight or .alpha).")
        if layer_name not in table:
            raise LoRAError(f"{where}: key {key} names no layer of this model ({_no_layer_hint(layer_name)}).")
        parts[key] = (table[layer_name], KOHYA_SUFFIXES[suffix])
    return parts


def _parse_diffusers(tensors: dict, pipe, where) -> dict:
    layers = {c: {n for n, _ in _layers(getattr(pipe, c))} for c in COMPONENTS}
    parts = {}
    for key in tensors:
        component, rest = _component_of(key)
        if component is None:
            raise LoRAError(f"{where}: key {key} is not a LoRA tensor sdlearn knows (kohya names start with "
                            "lora_unet_/lora_te_, diffusers names with unet./text_encoder. and end with "
                            ".lora_A.weight / .lora_B.weight).")
        old = OLD_PROCESSOR.match(rest)
        if old:
            module, role = f"{old.group(1)}.{OLD_PROCESSOR_NAMES[component][old.group(2)]}", old.group(3)
        else:
            suffix = next(((s, r) for s, r in DIFFUSERS_SUFFIXES if rest.endswith(s)), None)
            if suffix is None:
                what = (" (a LoRA bias: PEFT's lora_bias is not supported)" if rest.endswith(".lora_B.bias")
                        else "")
                raise LoRAError(f"{where}: key {key} is not a LoRA down/up/alpha tensor{what}.")
            module, role = rest[: -len(suffix[0])], suffix[1]
        if component == "text_encoder" and not module.startswith("text_model."):
            # transformers 5 keeps CLIP's modules at the top level, so diffusers running on it
            # saves text_encoder.encoder.layers.0...; the same layer as text_encoder.text_model.encoder...
            module = "text_model." + module
        if module not in layers[component]:
            raise LoRAError(f"{where}: key {key} names no layer of this model's {component} "
                            f"({_no_layer_hint(module)}).")
        parts[key] = (f"{component}.{module}", role)
    return parts


def _component_of(key: str):
    """("unet" | "text_encoder" | None, the rest of the key)."""
    for prefix, component in (("unet.", "unet"), ("text_encoder.", "text_encoder")):
        if key.startswith(prefix):
            return component, key[len(prefix):]
    if key.startswith(("down_blocks.", "mid_block.", "up_blocks.")):  # unet.save_attn_procs() wrote no prefix
        return "unet", key
    return None, key


def _no_layer_hint(name: str) -> str:
    if re.search(r"(^|[._])(input_blocks|output_blocks|middle_block)", name):
        return ("an original-layout U-Net name that SD1.5 does not have; an SDXL LoRA uses such names")
    if "text_model" in name and re.search(r"layers[._](1[2-9]|[2-9]\d)", name):
        return "a text-encoder layer beyond CLIP ViT-L's 12; SD2.x's OpenCLIP has 23, SDXL's second encoder 32"
    return "it may be a LoRA for another model family, or a network type sdlearn does not read"


def _diffusers_alphas(metadata: dict, where) -> dict:
    """{component: PEFT LoraConfig dict} from diffusers' `lora_adapter_metadata` (saved since ~0.34)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        raise LoRAError(f"{where}: its lora_adapter_metadata is not valid JSON; the file is damaged.") from None
    configs = {c: {k[len(c) + 1:]: v for k, v in flat.items() if k.startswith(c + ".")} for c in COMPONENTS}
    for component, config in configs.items():
        for setting in ("use_dora", "use_rslora", "lora_bias"):
            if config.get(setting):
                raise LoRAError(f"{where}: its {component} adapter uses {setting}=True, which sdlearn does not "
                                "implement (plain LoRA only).")
    return configs


def _alpha_from_metadata(configs: dict, target: str, rank: int) -> float:
    """alpha for one layer from PEFT's config: alpha_pattern, else lora_alpha; no config: alpha = rank."""
    component, _, module = target.partition(".")
    config = configs.get(component) or {}
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        # PEFT matches a pattern against the end of the module name ("^..." anchors it at the start).
        if re.fullmatch(pattern[1:] if pattern.startswith("^") else rf"(.*\.)?(?:{pattern})", module):
            return float(alpha)
    if config:  # PEFT's scale is lora_alpha / rank, lora_alpha defaulting to 8 in LoraConfig
        return float(config.get("lora_alpha", 8))
    return float(rank)  # diffusers/PEFT without metadata: scale alpha/rank = 1


def _check_shapes(lora: LoRA, pipe, where):
    """Every target exists and every (down, up) fits it; errors name the key and guess the family."""
    for target, layer in lora.layers.items():
        try:
            weight = _model_layer(pipe, target).weight
        except AttributeError:
            raise LoRAError(f"{where}: {layer.key} targets {target}, which this model does not have.") from None
        out_ch, in_ch = weight.shape[:2]
        kernel = tuple(weight.shape[2:])  # () for a Linear, (kh, kw) for a conv
        down, up = layer.down, layer.up
        # A 1x1 conv and a Linear are the same matrix: accept (r, in) or (r, in, 1, 1) for either.
        down_ok = down.ndim in (2, 4) and down.shape[1] == in_ch and (
            tuple(down.shape[2:]) in ((), (1, 1)) and kernel in ((), (1, 1)) or tuple(down.shape[2:]) == kernel)
        up_ok = up.ndim in (2, 4) and up.shape[0] == out_ch and up.shape[1] == down.shape[0] and \
            tuple(up.shape[2:]) in ((), (1, 1))
        if down_ok and up_ok:
            continue
        expected = f"down ({layer.rank}, {in_ch}{', ' + 'x'.join(map(str, kernel)) if kernel else ''}), " \
                   f"up ({out_ch}, {layer.rank})"
        message = (f"{where}: {layer.key} does not fit {target}: the file has down {tuple(down.shape)}, "
                   f"up {tuple(up.shape)}; this model needs {expected}.")
        if target.endswith(("attn2.to_k", "attn2.to_v")) and down.ndim == 2 and down.shape[1] != in_ch:
            family = CONTEXT_WIDTH_FAMILY.get(down.shape[1], f"a model with {down.shape[1]}-wide text vectors")
            message += (f" Its cross-attention reads {down.shape[1]}-wide text vectors: it is a LoRA for {family}, "
                        f"and this model's text encoder gives {in_ch}.")
        else:
            message += " The LoRA was made for a different model (family or size)."
        raise LoRAError(message)


# ---------------------------------------------------------------------------------------------
# 5. Applying: merge, unmerge, and "for one generation"
# ---------------------------------------------------------------------------------------------


def merge_lora(pipe, lora: LoRA, strength: float = 1.0, strength_clip: float | None = None):
    """W += strength · ΔW on the U-Net and strength_clip · ΔW (default: strength) on the text encoder."""
    _apply(pipe, lora, strength, strength if strength_clip is None else strength_clip, +1)


def unmerge_lora(pipe, lora: LoRA, strength: float = 1.0, strength_clip: float | None = None):
    """W -= the same; restores the weights up to float rounding (~1e-7). applied_loras restores exactly."""
    _apply(pipe, lora, strength, strength if strength_clip is None else strength_clip, -1)


@torch.no_grad()
def _apply(pipe, lora: LoRA, strength_model: float, strength_clip: float, sign: int):
    for target, layer in lora.layers.items():
        strength = strength_model if target.startswith("unet.") else strength_clip
        if strength == 0:
            continue
        weight = _model_layer(pipe, target).weight
        _add_(weight, layer.delta(weight.shape, strength), sign)


@contextmanager
def applied_loras(pipe, loras):
    """Merge LoRAs for the duration of a `with` block; afterwards the model's tensors are restored exactly.

    `loras` is a list of (source, strength) or (source, strength_model, strength_clip) — ComfyUI's
    LoraLoader sliders — where source is a file path, a state dict or a LoRA. Every LoRA is read and
    checked before any weight changes, so a bad file leaves the model untouched.

        with applied_loras(pipe, [("models/Lora/paper_cut.safetensors", 0.8)]):
            image = pipe.txt2img("a fox, paper cut style").images[0]
    """
    specs = []
    for item in loras:
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise ValueError(f"each LoRA is (source, strength) or (source, strength_model, strength_clip), "
                             f"got {item!r}.")
        source, strength_model, strength_clip = (*item, item[1]) if len(item) == 2 else item
        specs.append((load_lora(source, pipe), float(strength_model), float(strength_clip)))
    # A backup of every weight a LoRA touches (only those: a few percent of the model).
    backup = {}
    for lora, _, _ in specs:
        for target in lora.layers:
            weight = _model_layer(pipe, target).weight
            backup.setdefault(id(weight), (weight, weight.detach().clone()))
    try:
        for lora, strength_model, strength_clip in specs:
            merge_lora(pipe, lora, strength_model, strength_clip)
        yield pipe
    finally:
        with torch.no_grad():
            for weight, original in backup.values():
                weight.copy_(original)


# ---------------------------------------------------------------------------------------------
# 6. A1111's prompt syntax: <lora:name:0.8>
# ---------------------------------------------------------------------------------------------
#
# A1111 takes LoRAs from the prompt: `<lora:name>` applies models/Lora/name.safetensors at
# strength 1, `<lora:name:0.8>` at 0.8. The tag is cut out of the prompt before CLIP sees it
# (A1111 replaces it by nothing, so "a cat, <lora:x:0.8>" becomes "a cat, ").

LORA_TAG = re.compile(r"<lora:([^>]*)>")
LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")


def extract_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """'a fox <lora:paper_cut:0.8>' -> ('a fox ', [('paper_cut', 0.8)])."""
    found = []

    def take(match):
        parts = match.group(1).split(":")
        name = parts[0].strip()
        if not name:
            raise ValueError(f"{match.group(0)} has no LoRA name; write <lora:name> or <lora:name:0.8>.")
        if len(parts) > 2:
            raise ValueError(
                f"{match.group(0)}: sdlearn reads <lora:name:strength>; separate text-encoder and U-Net "
                "strengths are set with applied_loras(pipe, [(file, strength_model, strength_clip)]).")
        try:
            strength = float(parts[1]) if len(parts) == 2 else 1.0
        except ValueError:
            raise ValueError(f"{match.group(0)}: the strength {parts[1]!r} is not a number (e.g. 0.8).") from None
        found.append((name, strength))
        return ""

    return LORA_TAG.sub(take, prompt), found


def find_lora(name: str, folders) -> Path:
    """The file called name.safetensors / .pt / .ckpt in `folders` (searched with their subfolders)."""
    folders = [Path(f) for f in ([folders] if isinstance(folders, (str, Path)) else folders)]
    available: dict = {}
    for folder in folders:
        if folder.is_dir():
            for path in sorted(folder.rglob("*")):
                if path.suffix.lower() in LORA_EXTENSIONS and path.is_file():
                    available.setdefault(path.stem, []).append(path)
    matches = available.get(name, [])
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise LoRAError(f"the LoRA name {name!r} matches several files: {', '.join(map(str, matches))}; "
                        "rename or remove all but one.")
    listing = ", ".join(sorted(available)) or "none"
    raise LoRAError(f"no LoRA called {name!r} (name.safetensors, .pt or .ckpt) in {', '.join(map(str, folders))}. "
                    f"Available LoRAs: {listing}.")


def loras_from_prompt(prompt: str, folders) -> tuple[str, list[tuple[Path, float]]]:
    """The prompt without its <lora:...> tags, and [(file, strength)] ready for applied_loras."""
    text, tags = extract_lora_tags(prompt)
    return text, [(find_lora(name, folders), strength) for name, strength in tags]


# ---------------------------------------------------------------------------------------------
# 7. Saving a trained LoRA in the layout A1111 and ComfyUI read
# ---------------------------------------------------------------------------------------------


def lora_state_dict(unet: nn.Module | None = None, text_encoder: nn.Module | None = None) -> dict:
    """The adapters injected in the models, in kohya's layout (what A1111/ComfyUI load from models/Lora/)."""
    sd = {}
    for prefix, model in (("lora_unet_", unet), ("lora_te_", text_encoder)):
        if model is None:
            continue
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear):
                kohya = prefix + name.replace(".", "_")
                sd[kohya + ".lora_down.weight"] = module.down.weight.detach().float().cpu().contiguous()
                sd[kohya + ".lora_up.weight"] = module.up.weight.detach().float().cpu().contiguous()
                sd[kohya + ".alpha"] = torch.tensor(module.alpha)
    if not sd:
        raise ValueError("no LoRA adapters found; inject_lora(...) into the U-Net or text encoder first.")
    return sd


def save_lora(path, unet: nn.Module | None = None, text_encoder: nn.Module | None = None,
              state_dict: dict | None = None, overwrite: bool = False) -> Path:
    """Write the injected adapters (or a kohya-layout `state_dict`, e.g. a finished training's) as a
    .safetensors file. An existing file is replaced only with overwrite=True."""
    import os

    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save LoRAs as .safetensors (safe to share), got {path.name}.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it, or choose another name "
                              "(the file name is the name in <lora:name:0.8>).")
    if state_dict is None:
        state_dict = lora_state_dict(unet, text_encoder)
    elif unet is not None or text_encoder is not None:
        raise ValueError("pass either the models with injected adapters or a state_dict, not both.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")    # written next to it and renamed: never half a file
    # kohya's metadata keys: A1111's and ComfyUI's LoRA browsers show them.
    save_file(state_dict, str(tmp),
              metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1",
                        "ss_training_comment": "made with sdlearn"})
    os.replace(tmp, path)
    return path
