"""The U-Net: the network that looks at a noisy latent and says which part of it is noise.

Stable Diffusion's denoiser (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models") is a U-Net (Ronneberger et al. 2015) in the form used by DDPM (Ho et al. 2020)
and improved DDPM (Nichol & Dhariwal 2021), with transformer layers added so that it can read the
prompt. Every sampler step calls it once per image (twice with CFG: once with the prompt, once
with the negative prompt):

    eps = unet(x, t, context)      x: noisy latent (B, 4, h, w), t: timestep 0..999,
                                   context: CLIP's token vectors (B, 77, 768) -> eps: (B, 4, h, w)

It is built from four kinds of pieces:

* **Timestep embedding.** t becomes a vector of sines and cosines at 160 frequencies (the
  Transformer's positional encoding, Vaswani et al. 2017), then a small MLP (320 -> 1280 -> 1280).
  Every ResBlock adds a projection of it to its feature maps: this is how the network knows how
  noisy its input is.
* **ResBlock**: GroupNorm, SiLU, 3x3 conv, + time embedding, GroupNorm, SiLU, dropout, 3x3 conv,
  plus the input (through a 1x1 conv when the channel count changes). It does the local image work.
* **Spatial transformer** (diffusers' `Transformer2DModel`, LDM's `SpatialTransformer`): treats
  the h*w latent pixels as tokens and runs self-attention (pixels look at each other), then
  cross-attention (pixels look at the prompt's 77 token vectors, the only place the prompt enters
  the U-Net), then a GEGLU feed-forward. Prompt emphasis, regional prompting and attention maps
  all live in this cross-attention.
* **Down/upsampling.** A stride-2 3x3 conv halves the size; nearest-neighbour x2 + 3x3 conv doubles it.
  Every output of the way down is kept and concatenated (channel-wise) to the input of a ResBlock on
  the way up: the "skip connections" that give the U its rungs and carry fine detail across.

SD1.5 at 512x512 (a 64x64 latent), batch B; `skip` marks a tensor pushed on the skip stack,
`+skip` one popped from it and concatenated before the ResBlock. T = spatial transformer
(heads x head_dim, tokens):

    x (B, 4, 64, 64)
    conv_in 3x3                                      -> (B,  320, 64, 64) skip
    down_blocks.0 CrossAttnDownBlock2D   2 x [Res 320->320, T 8x40 @4096 tok]    skip, skip
                  downsamplers.0 stride 2            -> (B,  320, 32, 32) skip
    down_blocks.1 CrossAttnDownBlock2D   [Res 320->640, T], [Res 640->640, T]    skip, skip
                  downsamplers.0                     -> (B,  640, 16, 16) skip
    down_blocks.2 CrossAttnDownBlock2D   [Res 640->1280, T], [Res 1280->1280, T] skip, skip
                  (T 8x160 @256 tok)  downsamplers.0 -> (B, 1280,  8,  8) skip
    down_blocks.3 DownBlock2D            2 x Res 1280->1280 (no attention)       skip, skip
    mid_block     Res 1280, T 8x160 @64 tokens, Res 1280                -> (B, 1280,  8,  8)
    up_blocks.0   UpBlock2D              3 x Res (1280+1280)->1280 (no attention)
                  upsamplers.0 nearest x2 + conv     -> (B, 1280, 16, 16)
    up_blocks.1   CrossAttnUpBlock2D     Res (1280+1280)->1280, Res (1280+1280)->1280,
                                         Res (1280+640)->1280, each followed by T 8x160
                  upsamplers.0                       -> (B, 1280, 32, 32)
    up_blocks.2   CrossAttnUpBlock2D     Res (1280+640)->640, Res (640+640)->640,
                                         Res (640+320)->640, each followed by T 8x80 @1024 tok
                  upsamplers.0                       -> (B,  640, 64, 64)
    up_blocks.3   CrossAttnUpBlock2D     Res (640+320)->320, Res (320+320)->320,
                                         Res (320+320)->320, each followed by T 8x40 @4096 tok
    conv_norm_out GroupNorm, SiLU, conv_out 3x3      -> (B,    4, 64, 64)  eps

Twelve skips go down (conv_in, 2 per level, 1 per downsampler) and twelve come back (3 per level).
Any latent size works: where halving leaves an odd size, the upsampler on the way back matches the
skip's size (see Upsample), so image sides need only be multiples of 8.

Module and parameter names are exactly diffusers' `UNet2DConditionModel`'s, so a diffusers
`unet/` folder loads with a strict `load_state_dict`. The original checkpoints (what A1111 and
ComfyUI load) name the same tensors `model.diffusion_model.input_blocks.*`, `middle_block.*`,
`output_blocks.*`; `weights.py` maps those names onto these. The same classes build the
miniature TinySD U-Net: everything below is derived from the lists in `UNetConfig`.
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

CROSS_ATTN_DOWN = "CrossAttnDownBlock2D"  # ResBlocks each followed by a spatial transformer
DOWN = "DownBlock2D"  # ResBlocks only
CROSS_ATTN_UP = "CrossAttnUpBlock2D"
UP = "UpBlock2D"


@dataclass
class UNetConfig:
    in_channels: int = 4  # 4 latent channels; 9 for the inpainting U-Net (latent + mask + masked image)
    out_channels: int = 4  # the predicted noise has the latent's 4 channels
    block_out_channels: tuple = (320, 640, 1280, 1280)  # channels at each resolution level
    down_block_types: tuple = (CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, DOWN)
    up_block_types: tuple = (UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP)
    layers_per_block: int = 2  # ResBlocks per down block (up blocks have one more)
    # diffusers' naming quirk: for SD1.x `attention_head_dim` is the number of attention HEADS,
    # not their width (diffusers issue #2011; the name stuck for compatibility with thousands of
    # config.json files). SD1.5 has 8 heads everywhere, so head_dim = channels / 8: 40, 80, 160.
    attention_head_dim: int = 8
    transformer_layers_per_block: int = 1  # BasicTransformerBlocks inside each spatial transformer
    cross_attention_dim: int = 768  # width of the text context (CLIP ViT-L/14's hidden size)
    norm_num_groups: int = 32  # GroupNorm groups in ResBlocks, transformers and conv_norm_out
    norm_eps: float = 1e-5  # GroupNorm eps of ResBlocks and conv_norm_out
    flip_sin_to_cos: bool = True  # timestep embedding is [cos, sin] (True) or [sin, cos]
    freq_shift: int = 0  # frequencies exp(-ln(10000) i / (half - freq_shift)); see timestep_embedding
    dropout: float = 0.0  # inside ResBlocks; only active in training mode
    sample_size: int = 64  # the latent size the model was trained at (informational: 512 px / 8)

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        for name in ("in_channels", "out_channels", "layers_per_block", "attention_head_dim",
                     "transformer_layers_per_block", "cross_attention_dim", "norm_num_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"UNetConfig: {name}={value!r} must be a positive int (sdlearn does not implement "
                    f"per-block lists, which SD1.5 does not use)."
                )
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"UNetConfig: block_out_channels has {n} entries, down_block_types "
                f"{len(self.down_block_types)} and up_block_types {len(self.up_block_types)}; "
                f"give one block type per level in each list."
            )
        for name, allowed in (("down_block_types", (CROSS_ATTN_DOWN, DOWN)),
                              ("up_block_types", (CROSS_ATTN_UP, UP))):
            for block_type in getattr(self, name):
                if block_type not in allowed:
                    raise ValueError(
                        f"UNetConfig: {name} contains {block_type!r}; sdlearn implements {allowed}."
                    )
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups:
                raise ValueError(
                    f"UNetConfig: block_out_channels entry {ch} is not divisible by "
                    f"norm_num_groups={self.norm_num_groups} (GroupNorm splits channels into groups)."
                )
            if ch % self.attention_head_dim:
                raise ValueError(
                    f"UNetConfig: block_out_channels entry {ch} is not divisible by "
                    f"attention_head_dim={self.attention_head_dim} (the number of heads: see its comment)."
                )

    @property
    def downsample_factor(self) -> int:
        """How much smaller the deepest feature map is than the latent: 2 ** (levels - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sd15(cls, in_channels: int = 4) -> "UNetConfig":
        """Stable Diffusion 1.5's U-Net; in_channels=9 is its inpainting variant."""
        return cls(in_channels=in_channels)

    @classmethod
    def from_diffusers(cls, d: dict) -> "UNetConfig":
        """Read a diffusers `unet/config.json` dict, rejecting what sdlearn does not implement."""
        ours = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key.startswith("_"):  # _class_name, _diffusers_version, _name_or_path: metadata
                continue
            if key in ours:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            elif key in _FIXED_SETTINGS:
                accepted, meaning = _FIXED_SETTINGS[key]
                if value not in accepted:
                    raise ValueError(
                        f"UNet config: {key}={value!r} is not supported by sdlearn, which implements "
                        f"SD1.5's U-Net ({key}={accepted[0]!r}). {meaning}"
                    )
            elif key not in _IGNORED_SETTINGS:
                raise ValueError(
                    f"UNet config: unknown setting {key}={value!r}; sdlearn implements SD1.5's "
                    f"UNet2DConditionModel and cannot tell whether this setting changes the network."
                )
        return cls(**kwargs)

    def to_diffusers(self) -> dict:
        """Keyword arguments that build the same network as diffusers' UNet2DConditionModel."""
        d = asdict(self)
        for key in ("block_out_channels", "down_block_types", "up_block_types"):
            d[key] = tuple(d[key])
        return d


# diffusers settings that change the network in ways sdlearn does not implement: the values
# sdlearn accepts (SD1.5's first) and what another value means, for the error message.
_FIXED_SETTINGS = {
    "act_fn": (("silu",), "Only SiLU activations are implemented."),
    "center_input_sample": ((False,), "Centering maps the input to 2x-1; SD does not do this."),
    "mid_block_type": (("UNetMidBlock2DCrossAttn",), "Only the ResBlock-transformer-ResBlock mid block is implemented."),
    "only_cross_attention": ((False,), "Transformers without self-attention are not implemented."),
    "mid_block_only_cross_attention": ((None, False), "Transformers without self-attention are not implemented."),
    "downsample_padding": ((1,), "Downsampling convs use padding 1."),
    "mid_block_scale_factor": ((1,), "The mid block's outputs are not rescaled."),
    "reverse_transformer_layers_per_block": ((None,), "Per-block transformer depths (SDXL-style) are not implemented."),
    "encoder_hid_dim": ((None,), "A projection of the text context (e.g. for non-CLIP text encoders) is not implemented."),
    "encoder_hid_dim_type": ((None,), "A projection of the text context (e.g. for non-CLIP text encoders) is not implemented."),
    "num_attention_heads": ((None,), "Give the number of heads as attention_head_dim, as SD1.5's config does."),
    "dual_cross_attention": ((False,), "Dual cross-attention (Versatile Diffusion) is not implemented."),
    "use_linear_projection": ((False,), "Linear proj_in/proj_out is SD2.x's (and SDXL's) transformer; SD1.x uses 1x1 convs."),
    "class_embed_type": ((None,), "Class embeddings (upscaler, unCLIP, image variation U-Nets) are not implemented."),
    "num_class_embeds": ((None,), "Class embeddings (upscaler, unCLIP, image variation U-Nets) are not implemented."),
    "projection_class_embeddings_input_dim": ((None,), "Class/size conditioning (SDXL, unCLIP) is not implemented."),
    "class_embeddings_concat": ((False,), "Class embeddings are not implemented."),
    "addition_embed_type": ((None,), "Added text/time embeddings are SDXL's size and pooled-text conditioning."),
    "addition_time_embed_dim": ((None,), "Added time embeddings are SDXL's size conditioning."),
    "upcast_attention": ((False,), "Upcast attention is SD2.1's fp32 attention; not implemented."),
    "resnet_time_scale_shift": (("default",), "ResBlocks add the time embedding; scale-shift (FiLM) is not implemented."),
    "resnet_skip_time_act": ((False,), "ResBlocks apply SiLU to the time embedding first."),
    "resnet_out_scale_factor": ((1,), "ResBlock outputs are not rescaled."),
    "time_embedding_type": (("positional",), "Only the sinusoidal timestep embedding is implemented."),
    "time_embedding_dim": ((None,), "The time embedding is 4 x block_out_channels[0] wide."),
    "time_embedding_act_fn": ((None,), "No extra activation after the time MLP is implemented."),
    "timestep_post_act": ((None,), "No extra activation after the time MLP is implemented."),
    "time_cond_proj_dim": ((None,), "A guidance-scale embedding (LCM-distilled U-Nets) is not implemented."),
    "conv_in_kernel": ((3,), "conv_in is a 3x3 conv."),
    "conv_out_kernel": ((3,), "conv_out is a 3x3 conv."),
    "attention_type": (("default",), "Gated (GLIGEN) attention is not implemented."),
    "cross_attention_norm": ((None,), "The text context is not normalised inside attention."),
}
# Settings that are recorded in config.json but cannot change this network.
_IGNORED_SETTINGS = {
    "addition_embed_type_num_heads",  # only read when addition_embed_type is set (rejected above)
}


# ---------------------------------------------------------------------------------------------
# Timestep embedding
# ---------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t (B,) -> (B, dim), in fp32.

    With half = dim / 2 frequencies  f_i = exp(-ln(max_period) * i / (half - freq_shift)),
    i = 0 .. half-1, the embedding is [cos(t f), sin(t f)] (flip_sin_to_cos=True) or
    [sin(t f), cos(t f)]. The frequencies fall geometrically from 1 (one radian per step: tells
    t=500 from t=501) to about 1/max_period (moves only 0.1 rad over all of 0..999: tells early
    from late), so together the waves pin t down at every scale.

    SD1.5 uses flip_sin_to_cos=True, freq_shift=0 because that is what the original LDM code
    (`timestep_embedding` in openaimodel.py) computes: cos first, and divided by `half`, so the
    lowest frequency is 10000^(-(half-1)/half) rather than exactly 1/10000. DDPM's own code put sin
    first and divided by half - 1 (freq_shift=1). Either works for training; for *trained weights*
    the layout must match, because time_embedding.linear_1 learned which input column is which wave.
    """
    half = dim // 2
    # Computed in the same order as the reference implementations: in fp32, the phase t * f_i
    # reaches ~1000 rad, so a different rounding of f_i would shift it by ~1e-4.
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))  # (half,)
    phase = t.float()[:, None] * freqs[None, :]  # (B, half)
    if flip_sin_to_cos:
        emb = torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)  # (B, 2 half)
    else:
        emb = torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1)
    if dim % 2:  # an odd width gets a zero column
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """The time MLP: (B, C0) sinusoids -> Linear -> SiLU -> Linear -> (B, 4 C0)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(emb)))


# ---------------------------------------------------------------------------------------------
# ResBlock
# ---------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """diffusers' ResnetBlock2D (LDM's ResBlock):

    out = shortcut(x) + conv2(dropout(SiLU(GN(conv1(SiLU(GN(x))) + W_t SiLU(emb)))))
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, eps: float, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, out_ch)  # the time embedding as a per-channel bias
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # The residual path needs a 1x1 conv only where the channel count changes.
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x: (B, in_ch, H, W); emb: (B, emb_dim), the time embedding already passed through SiLU
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H, W)
        h = h + self.time_emb_proj(emb)[:, :, None, None]  # same shift for every pixel
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


# ---------------------------------------------------------------------------------------------
# Spatial transformer
# ---------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention: softmax(Q K^T / sqrt(head_dim)) V, Q from x, K and V from context.

    Self-attention when context is None (attn1), cross-attention to the prompt otherwise (attn2).
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        # A Sequential so the output projection is named to_out.0, like the checkpoints
        # (the reference library keeps a dropout layer with p=0 at to_out.1; it holds no weights).
        self.to_out = nn.Sequential(nn.Linear(dim, dim))
        # Low-memory mode only (sdlearn.memory.enable_sliced_attention): attend for this many queries at
        # a time. None, the default, computes all T queries in one call.
        self.query_chunk_size = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape  # T = h*w pixel tokens
        context = x if context is None else context  # (B, S, context_dim); S = 77 text tokens
        d = C // self.heads  # head_dim
        q = self.to_q(x).view(B, T, self.heads, d).transpose(1, 2)  # (B, heads, T, head_dim)
        k = self.to_k(context).view(B, -1, self.heads, d).transpose(1, 2)  # (B, heads, S, head_dim)
        v = self.to_v(context).view(B, -1, self.heads, d).transpose(1, 2)  # (B, heads, S, head_dim)
        n = self.query_chunk_size
        if n is None or n >= T:
            # softmax(q k^T / sqrt(head_dim)) v, in one fused kernel (flash / memory-efficient on GPU)
            out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head_dim)
        else:
            # Sliced ("chunked") attention: row i of softmax(q k^T) v depends on query i alone, so
            # slicing the queries gives the same result while only a (chunk, S) block of scores exists
            # at a time instead of (T, S): 4096 x 4096 per head at 512x512 without a fused kernel.
            out = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + n], k, v)
                             for i in range(0, T, n)], dim=2)  # (B, heads, T, head_dim)
        out = out.transpose(1, 2).reshape(B, T, C)  # heads side by side again: (B, T, C)
        return self.to_out(out)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): one Linear to 2 x inner, then a * GELU(gate)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)  # (B, T, inner) each
        return a * F.gelu(gate)  # exact (erf) GELU


class FeedForward(nn.Module):
    """Per-token MLP: GEGLU dim -> 4 dim, Linear 4 dim -> dim."""

    def __init__(self, dim: int):
        super().__init__()
        # Slot 1 is a dropout layer (p=0) in the reference library; the Identity keeps the output
        # Linear's checkpoint name, ff.net.2.
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, cross-attention to the prompt, feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        # LayerNorm eps is 1e-5 here whatever the U-Net's norm_eps says (as in the reference).
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: (B, T, C) pixel tokens; context: (B, S, context_dim) text tokens
        x = x + self.attn1(self.norm1(x))  # every pixel looks at every pixel
        x = x + self.attn2(self.norm2(x), context)  # every pixel looks at the prompt
        x = x + self.ff(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel: feature map -> tokens -> transformer blocks -> feature map, + x."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, depth: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)  # eps fixed at 1e-6 in SD
        self.proj_in = nn.Conv2d(channels, channels, 1)  # SD1.x: 1x1 convs (SD2: Linear layers)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))  # (B, C, H, W)
        # One token per latent pixel: (B, HW, C). From a channels-first map the permuted reshape is only a
        # view whose channels lie far apart in memory; every residual add would keep that layout and every
        # LayerNorm copy it again, so it is made contiguous once here (a no-op for a channels-last map).
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C).contiguous()
        for block in self.transformer_blocks:
            h = block(h, context)
        # Back to (B, C, H, W); made contiguous in the layout the input came in, so no conv after it
        # has to convert: standard channels-first by default, channels-last on the GPU fast path
        # (Pipeline.enable_fast_path), where the permuted view already is channels-last and needs no copy.
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        layout = torch.channels_last if channels_last else torch.contiguous_format
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous(memory_format=layout)
        return x + self.proj_out(h)


# ---------------------------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------------------------


class Downsample(nn.Module):
    """Halve the size: 3x3 conv with stride 2. (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the size: nearest-neighbour x2, then a 3x3 conv. (B, C, H, W) -> (B, C, 2H, 2W).

    `size` overrides the doubling: a 9-pixel-wide latent goes down 9 -> 5 -> 3 -> 2, and on the way
    up 2 must become 3, not 4, to match the skip it is concatenated with. This is how 520x520 works
    (image sides need only be multiples of 8): diffusers passes the skip's size, A1111 resizes
    before concatenating.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


# ---------------------------------------------------------------------------------------------
# The blocks of the U
# ---------------------------------------------------------------------------------------------


class DownBlock(nn.Module):
    """One level on the way down: `layers` x [ResBlock (+ transformer)], then maybe a Downsample.

    CrossAttnDownBlock2D when cross_attention, DownBlock2D otherwise. Returns the output and the
    tensors it pushes on the skip stack (one per ResBlock, one after the downsampler).
    """

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig, emb_dim: int, cross_attention: bool,
                 downsample: bool):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            [ResBlock(in_ch if i == 0 else out_ch, out_ch, emb_dim, g, eps, cfg.dropout)
             for i in range(cfg.layers_per_block)]
        )
        self.attentions = nn.ModuleList(
            [SpatialTransformer(out_ch, cfg.attention_head_dim, cfg.cross_attention_dim, g,
                                cfg.transformer_layers_per_block)
             for _ in range(cfg.layers_per_block)]
        ) if cross_attention else None
        # A list of one, as in the reference: the checkpoint name is downsamplers.0.conv.
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if downsample else None

    def forward(self, x, emb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, emb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """The bottom of the U (UNetMidBlock2DCrossAttn): ResBlock, spatial transformer, ResBlock."""

    def __init__(self, ch: int, cfg: UNetConfig, emb_dim: int):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList([ResBlock(ch, ch, emb_dim, g, eps, cfg.dropout) for _ in range(2)])
        self.attentions = nn.ModuleList(
            [SpatialTransformer(ch, cfg.attention_head_dim, cfg.cross_attention_dim, g,
                                cfg.transformer_layers_per_block)]
        )

    def forward(self, x, emb, context):
        x = self.resnets[0](x, emb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, emb)


class UpBlock(nn.Module):
    """One level on the way up: `layers + 1` x [concat a skip, ResBlock (+ transformer)], maybe Upsample.

    CrossAttnUpBlock2D when cross_attention, UpBlock2D otherwise. `skip_chs` lists the channel
    counts of the skips this block pops, in popping order; ResBlock i takes in the running
    channels plus skip i's.
    """

    def __init__(self, in_ch: int, out_ch: int, skip_chs: list, cfg: UNetConfig, emb_dim: int,
                 cross_attention: bool, upsample: bool):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            [ResBlock((in_ch if i == 0 else out_ch) + skip_ch, out_ch, emb_dim, g, eps, cfg.dropout)
             for i, skip_ch in enumerate(skip_chs)]
        )
        self.attentions = nn.ModuleList(
            [SpatialTransformer(out_ch, cfg.attention_head_dim, cfg.cross_attention_dim, g,
                                cfg.transformer_layers_per_block)
             for _ in skip_chs]
        ) if cross_attention else None
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, x, skips, emb, context, size=None):
        # skips: this block's skip tensors, in popping order (deepest first);
        # size: the next level's spatial size, which the upsampler must produce
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips[i]], dim=1)  # (B, ch + skip_ch, H, W)
            x = resnet(x, emb)  # (B, out_ch, H, W)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


# ---------------------------------------------------------------------------------------------
# The U-Net
# ---------------------------------------------------------------------------------------------


class UNet2DConditionModel(nn.Module):
    """eps = unet(x (B, in_channels, h, w), t (scalar or (B,)), context (B, S, cross_attention_dim))."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        chs = config.block_out_channels
        n = len(chs)
        emb_dim = 4 * chs[0]  # 1280 for SD1.5

        self.conv_in = nn.Conv2d(config.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], emb_dim)

        # The way down. `skip_chs` follows the skip stack's channel counts as it is filled.
        skip_chs = [chs[0]]  # conv_in's output
        self.down_blocks = nn.ModuleList()
        ch = chs[0]
        for i, block_type in enumerate(config.down_block_types):
            downsample = i < n - 1  # every level but the deepest halves the size
            self.down_blocks.append(
                DownBlock(ch, chs[i], config, emb_dim, block_type == CROSS_ATTN_DOWN, downsample)
            )
            ch = chs[i]
            skip_chs += [ch] * (config.layers_per_block + downsample)

        self.mid_block = MidBlock(ch, config, emb_dim)

        # The way up, deepest level first; each up block pops layers_per_block + 1 skips.
        self.up_blocks = nn.ModuleList()
        for i, block_type in enumerate(config.up_block_types):
            out_ch = chs[n - 1 - i]
            popped = [skip_chs.pop() for _ in range(config.layers_per_block + 1)]
            upsample = i < n - 1
            self.up_blocks.append(
                UpBlock(ch, out_ch, popped, config, emb_dim, block_type == CROSS_ATTN_UP, upsample)
            )
            ch = out_ch

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, chs[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(chs[0], config.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        B = self._check_inputs(x, context)
        t = self._timesteps(t, B, x.device)  # (B,)

        # Time embedding, passed through SiLU once here: every ResBlock starts with SiLU(emb).
        emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = F.silu(self.time_embedding(emb.to(x.dtype)))  # (B, 4 C0)

        h = self.conv_in(x)  # (B, C0, h, w)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, context)
            skips += block_skips
        h = self.mid_block(h, emb, context)
        for block in self.up_blocks:
            popped = [skips.pop() for _ in range(len(block.resnets))]
            h = block(h, popped, emb, context, size=skips[-1].shape[-2:] if skips else None)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, h, w)

    def _check_inputs(self, x: torch.Tensor, context: torch.Tensor) -> int:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"UNet: x has shape {tuple(x.shape)}; expected (B, {cfg.in_channels}, h, w) latents"
                + (" (the inpainting U-Net takes 9 channels: latent, mask, masked-image latent)"
                   if cfg.in_channels == 9 else "") + "."
            )
        shape = tuple(context.shape) if isinstance(context, torch.Tensor) else None
        if shape is None or len(shape) != 3 or shape[0] != x.shape[0] or shape[2] != cfg.cross_attention_dim:
            raise ValueError(
                f"UNet: context has shape {shape}; expected ({x.shape[0]}, tokens, "
                f"{cfg.cross_attention_dim}): one row of text-encoder outputs per latent, "
                f"{cfg.cross_attention_dim} wide (is it from the matching text encoder?)."
            )
        return x.shape[0]

    @staticmethod
    def _timesteps(t, B: int, device) -> torch.Tensor:
        """A scalar (int, float or 0-d tensor) or (B,) tensor -> (B,) tensor on `device`."""
        if not isinstance(t, torch.Tensor):
            # torch.full fills on the device itself: no host-to-GPU copy, which would make the
            # CPU wait for the GPU at every step. An int gives int64, a float float32.
            return torch.full((B,), t, device=device)
        t = t.to(device)
        if t.numel() == 1:
            return t.reshape(1).expand(B)
        if t.shape != (B,):
            raise ValueError(
                f"UNet: timestep has shape {tuple(t.shape)}; give a scalar or one timestep per "
                f"sample, shape ({B},)."
            )
        return t
