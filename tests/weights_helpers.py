"""Builders for test_weights.py: small reference models and checkpoint files in every layout.

The small models keep SD1.5's key layout (4 levels, 2 ResNets per level, attention on the first
three levels) and SD1.5's non-shape hyperparameters (32 GroupNorm groups, 8 U-Net heads, 12 CLIP
heads), because a single file carries only tensors and the loader takes those from SD1.5, as
A1111 and ComfyUI do.
"""

import copy
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel

from sdlearn.clip import CLIPTextConfig
from sdlearn.unet import UNetConfig
from sdlearn.vae import VAEConfig
from sdlearn.weights import CLIP, UNET, VAE, ema_key, to_original_key, unet_rules, vae_rules

SMALL_UNET = UNetConfig(block_out_channels=(32, 64, 64, 64), cross_attention_dim=48, sample_size=8)
SMALL_VAE = VAEConfig(block_out_channels=(32, 32, 64, 64))
SMALL_CLIP = CLIPTextConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=12)

# SD1.5's training schedule as the LDM code stores it in every full checkpoint.
_BETAS = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2


def schedule_buffers(betas=_BETAS) -> dict:
    a = torch.cumprod(1 - betas, 0)
    a_prev = torch.cat([torch.ones(1, dtype=a.dtype), a[:-1]])
    post_var = betas * (1 - a_prev) / (1 - a)
    bufs = {
        "betas": betas, "alphas_cumprod": a, "alphas_cumprod_prev": a_prev,
        "sqrt_alphas_cumprod": a.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - a).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - a).log(), "sqrt_recip_alphas_cumprod": (1 / a).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / a - 1).sqrt(), "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * a_prev.sqrt() / (1 - a),
        "posterior_mean_coef2": (1 - a_prev) * (1 - betas).sqrt() / (1 - a),
    }
    return {k: v.float() for k, v in bufs.items()}


def randomize(model: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Distinct values in every tensor (default inits leave norms at 1, biases at 0: a swap would hide)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def reference_models(seed=0, unet_config=SMALL_UNET):
    g = torch.Generator().manual_seed(seed)
    unet = randomize(UNet2DConditionModel(**unet_config.to_diffusers()), g)
    vae = randomize(AutoencoderKL(**SMALL_VAE.to_diffusers()), g)
    clip = randomize(HFCLIPTextModel(HFCLIPTextConfig(**SMALL_CLIP.to_transformers())), g)
    return unet, vae, clip


def clip_state(clip: HFCLIPTextModel) -> dict:
    """transformers 5 keeps CLIP's modules at the top level; files and sdlearn say `text_model.*`."""
    return {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in clip.state_dict().items()}


def original_vae(vae_state: dict, cfg: dict, prefix: str = VAE) -> dict:
    """diffusers AutoencoderKL names -> original names, Linear attention weights back to 1x1 convs."""
    rules, out = vae_rules(cfg), {}
    for k, v in vae_state.items():
        if "mid_block.attentions.0.to_" in k and k.endswith("weight"):
            v = v[:, :, None, None]
        out[prefix + to_original_key(k, rules)] = v
    return out


def original_checkpoint(unet_state, vae_state, clip_st, unet_cfg, vae_cfg, ema_state=None,
                        text_model_prefix=True, schedule=True) -> dict:
    """A full checkpoint in the CompVis layout, built by running the loader's rules backwards."""
    rules = unet_rules(unet_cfg)
    sd = {UNET + to_original_key(k, rules): v for k, v in unet_state.items()}
    if ema_state is not None:
        sd.update({ema_key(UNET + to_original_key(k, rules)): v for k, v in ema_state.items()})
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32)
    sd.update(original_vae(vae_state, vae_cfg))
    # Files written with transformers < 4.x lack `text_model.` after the prefix.
    for k, v in clip_st.items():
        sd[CLIP + (k if text_model_prefix else k[len("text_model."):])] = v
    sd[CLIP + ("text_model." if text_model_prefix else "") + "embeddings.position_ids"] = torch.arange(77)[None]
    if schedule:
        sd.update(schedule_buffers())
    return {k: v.contiguous() for k, v in sd.items()}


def save_ckpt(sd: dict, path: Path, wrap=True) -> Path:
    torch.save({"state_dict": sd, "global_step": 470000} if wrap else sd, path)
    return path


def save_safetensors(sd: dict, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def diffusers_folder(root: Path, unet, vae, clip, variant=None, safe=True, with_vae=True) -> Path:
    """A diffusers folder as `StableDiffusionPipeline.save_pretrained` writes it (components only)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"]}))
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "vocab.json").write_text(json.dumps({f"t{i}": i for i in range(49408)}))
    half = (lambda m: copy.deepcopy(m).half()) if variant == "fp16" else (lambda m: m)
    half(unet).save_pretrained(root / "unet", safe_serialization=safe, variant=variant)
    if with_vae:
        half(vae).save_pretrained(root / "vae", safe_serialization=safe, variant=variant)
    te = root / "text_encoder"
    clip.save_pretrained(te)  # transformers 5 always writes model.safetensors
    if variant or not safe:
        weights = clip_state(clip)  # as older transformers saved them, with `text_model.`
        (te / "model.safetensors").unlink()
        if safe:
            save_file({k: v.half().contiguous() for k, v in weights.items()}, str(te / f"model.{variant}.safetensors"))
        else:
            torch.save(weights, te / "pytorch_model.bin")
    return root
