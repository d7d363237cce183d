"""The VAE: how a 512x512 picture becomes a 64x64x4 latent, and back.

Stable Diffusion does not denoise pixels. It denoises *latents*: a compressed picture made by the
autoencoder of Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models",
the "kl-f8" model). Every 8x8 patch of RGB pixels becomes one 4-channel latent vector, 48x fewer
numbers (3*8*8 = 192 -> 4), so the U-Net works on a 64x64 grid instead of 512x512. In A1111 this is
the "SD VAE" setting; in ComfyUI the "VAE Encode" / "VAE Decode" nodes.

    image (B, 3, H, W) in [-1, 1]
      Encoder: conv_in -> down blocks (ResNet blocks; stride-2 conv halves H, W between blocks)
               -> mid block (ResNet, self-attention, ResNet) -> GroupNorm, SiLU, conv_out
      quant_conv (1x1)                              -> moments (B, 2*4, H/8, W/8) = mean, log-variance
      DiagonalGaussian: z = mean + std * noise      -> latent (B, 4, H/8, W/8)
      post_quant_conv (1x1)
      Decoder: conv_in -> mid block -> up blocks (ResNet blocks; nearest x2 upsample + conv)
               -> GroupNorm, SiLU, conv_out         -> image (B, 3, H, W), roughly in [-1, 1]

Why a *variational* autoencoder ("KL")? The encoder outputs a small Gaussian per latent value rather
than one number, and training adds a weak KL penalty pulling it towards N(0, 1). That keeps the
latent space smooth and its scale bounded, so noise can be added to it meaningfully. The penalty is
so weak that in the trained SD1.5 VAE the Gaussian is very narrow compared with how much the means
vary: `sample()` and `mode()` give nearly the same latent. The VAE is not a filter and not a
diffusion model: it is a learned compressor, and what its decoder paints back (faces, text, fine
texture) is where "VAE artifacts" come from.

The downsampling factor is 2^(number of levels - 1): SD1.5 has 4 levels, hence 8. The miniature
TinySD reuses these classes with narrower levels (still 4 of them, so still 8x).

State-dict keys are exactly diffusers' `AutoencoderKL` keys (`encoder.down_blocks.0.resnets.0.norm1.weight`,
`encoder.mid_block.attentions.0.to_q.weight`, ...), so a diffusers `vae/` folder loads with a strict
`load_state_dict`. Neither `encode` nor `decode` applies the scaling factor; the pipeline does.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Every GroupNorm in the kl-f8 autoencoder uses this epsilon (not PyTorch's default 1e-5).
NORM_EPS = 1e-6


@dataclass
class VAEConfig:
    in_channels: int = 3  # RGB
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)  # width of each resolution level
    layers_per_block: int = 2  # ResNet blocks per level (the decoder uses one more)
    norm_num_groups: int = 32
    # Latents are multiplied by this before the U-Net sees them (and divided before decoding), so that
    # they have roughly unit variance like the noise the diffusion process adds. The number is not
    # learned: the LDM authors encoded a batch of training images, measured the standard deviation of
    # the latents (about 5.49) and took its reciprocal, 1 / 5.49 = 0.18215 (LDM paper, appendix on
    # the autoencoders). Other VAEs have their own (SDXL's is 0.13025).
    scaling_factor: float = 0.18215

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if not self.block_out_channels:
            raise ValueError("VAEConfig: block_out_channels needs at least one level, e.g. (128, 256, 512, 512).")
        if self.layers_per_block < 1:
            raise ValueError(f"VAEConfig: layers_per_block must be at least 1, got {self.layers_per_block}.")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"VAEConfig: every entry of block_out_channels={self.block_out_channels} must be divisible by "
                f"norm_num_groups={self.norm_num_groups} (GroupNorm splits channels into equal groups); "
                f"{bad} are not."
            )

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side: 2^(levels - 1), 8 for SD1.5."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sd15(cls) -> "VAEConfig":
        """SD1.5's kl-f8 autoencoder (`vae/` of the diffusers folder): 83,653,863 parameters."""
        return cls()

    @classmethod
    def from_diffusers(cls, d: dict) -> "VAEConfig":
        """Read a diffusers `AutoencoderKL` config dict (a `vae/config.json`)."""

        def reject(what, fix):
            raise ValueError(f"VAEConfig.from_diffusers: {what} is not implemented by sdlearn's VAE; {fix}")

        if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            reject(f"_class_name={d['_class_name']!r}", "only AutoencoderKL (SD1.x/SD2.x/SDXL-style VAEs) is.")
        if d.get("act_fn", "silu") != "silu":
            reject(f"act_fn={d['act_fn']!r}", "the kl-f8 autoencoder uses 'silu'.")
        block_out_channels = tuple(d.get("block_out_channels", cls.block_out_channels))
        n = len(block_out_channels)
        down = tuple(d.get("down_block_types", ("DownEncoderBlock2D",) * n))
        up = tuple(d.get("up_block_types", ("UpDecoderBlock2D",) * n))
        if down != ("DownEncoderBlock2D",) * n or up != ("UpDecoderBlock2D",) * n:
            reject(
                f"down_block_types={down} / up_block_types={up}",
                f"expected {n} x 'DownEncoderBlock2D' and {n} x 'UpDecoderBlock2D' (one per block_out_channels entry).",
            )
        for flag in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            if d.get(flag, True) is not True:
                reject(f"{flag}={d[flag]}", "SD1.5-style VAEs have it on (SD3/Flux VAEs are a different design).")
        for name in ("shift_factor", "latents_mean", "latents_std"):
            if d.get(name) is not None:
                reject(f"{name}={d[name]!r}", "sdlearn's pipeline only scales latents by scaling_factor.")
        # `sample_size` (tiling) and `force_upcast` (run the VAE in fp32 under fp16) are runtime choices
        # of diffusers' pipeline, not architecture, so they are not part of this config.
        defaults = cls()
        return cls(
            in_channels=d.get("in_channels", defaults.in_channels),
            out_channels=d.get("out_channels", defaults.out_channels),
            latent_channels=d.get("latent_channels", defaults.latent_channels),
            block_out_channels=block_out_channels,
            layers_per_block=d.get("layers_per_block", defaults.layers_per_block),
            norm_num_groups=d.get("norm_num_groups", defaults.norm_num_groups),
            scaling_factor=d.get("scaling_factor", defaults.scaling_factor),
        )

    def to_diffusers(self) -> dict:
        """Keyword arguments for diffusers' `AutoencoderKL` building the same network."""
        n = len(self.block_out_channels)
        return dict(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            latent_channels=self.latent_channels,
            block_out_channels=list(self.block_out_channels),
            down_block_types=["DownEncoderBlock2D"] * n,
            up_block_types=["UpDecoderBlock2D"] * n,
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            act_fn="silu",
            scaling_factor=self.scaling_factor,
        )


# ---------------------------------------------------------------------------------------------
# The posterior q(z | x): a diagonal Gaussian per latent value.
# ---------------------------------------------------------------------------------------------


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) from the encoder's moments (B, 2C, h, w): first C channels mean, rest log-variance."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        # Clamp as the LDM code does, so that exp() of a wild value gives neither inf nor exactly 0 (in fp32).
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)  # sigma = exp(log sigma^2 / 2)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I): the reparameterisation trick (Kingma & Welling 2014).

        The noise is drawn on the generator's device and then moved, so a CPU generator with a given
        seed gives the same latent on any device (diffusers does the same).
        """
        noise_device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=noise_device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        """The most likely latent, the mean: what img2img uses when it should be deterministic."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per image, summed over latent values: 1/2 sum(mean^2 + var - 1 - logvar). (B,)"""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


# ---------------------------------------------------------------------------------------------
# Building blocks. Every convolution keeps H, W unless it says otherwise.
# ---------------------------------------------------------------------------------------------


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))); a 1x1 conv matches channels on the skip path when they change."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv.

    The original LDM code pads one row/column at the bottom/right only (not one on every side), so each
    output pixel i looks at input pixels 2i..2i+2. Weights trained that way need exactly this padding.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1))  # (left, right, top, bottom): (B, C, H+1, W+1)
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W: repeat each pixel 2x2 (nearest neighbour), then a 3x3 conv smooths and refines."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all h*w positions, with a residual connection.

    Only used at the lowest resolution (64x64 latents for a 512x512 image), where it lets distant
    parts of the picture agree with each other (global colour, symmetry) at an affordable cost.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        # A list because diffusers' to_out is [Linear, Dropout]; the key is therefore `to_out.0.weight`.
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x.flatten(2)).transpose(1, 2)  # (B, C, H*W) -> (B, H*W, C): one token per position
        # (B, 1, H*W, C): one head as wide as the channels
        q = self.to_q(h).unsqueeze(1)
        k = self.to_k(h).unsqueeze(1)
        v = self.to_v(h).unsqueeze(1)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(Q K^T / sqrt(C)) V, (B, 1, H*W, C)
        h = self.to_out[0](h.squeeze(1))  # (B, H*W, C)
        # Back to (B, C, H, W) as a view, which is channels-last in memory. Adding the residual second
        # keeps that layout for the layers after it, as diffusers does, so both give identical numbers.
        return h.transpose(1, 2).reshape(B, C, H, W) + x


class MidBlock(nn.Module):
    """ResNet -> attention -> ResNet at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(channels, groups)])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock(nn.Module):
    """`num_layers` ResNet blocks, then (except at the last level) a Downsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock(nn.Module):
    """`num_layers` ResNet blocks, then (except at the last level) an Upsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


# ---------------------------------------------------------------------------------------------
# Encoder and decoder: mirror images of each other.
# ---------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> moments (B, 2*latent, H/f, W/f), f = 2^(levels-1)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock(ch[max(i - 1, 0)], ch[i], config.layers_per_block, groups, downsample=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)  # (B, ch[0], H, W)
        for block in self.down_blocks:
            x = block(x)  # SD1.5: 128@512 -> 256@256 -> 512@128 -> 512@64
        x = self.mid_block(x)  # (B, ch[-1], H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 2*latent, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, latent, h, w) -> image (B, 3, h*f, w*f). One more ResNet block per level than the encoder."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock(ch[max(i - 1, 0)], ch[i], config.layers_per_block + 1, groups, upsample=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(ch[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)  # (B, ch[0], h, w)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)  # SD1.5: 512@64 -> 512@128 -> 512@256 -> 256@512 -> 128@512
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 3, H, W)


class AutoencoderKL(nn.Module):
    """The SD VAE. `encode(image) -> DiagonalGaussian`, `decode(latent) -> image`; no scaling factor applied."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # 1x1 convs around the latent, kept from the LDM code base (where a vector-quantised variant put
        # its codebook here, hence "quant"); for the KL model they are plain per-pixel linear maps.
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Image (B, 3, H, W) in [-1, 1] -> q(z | x) over latents (B, 4, H/8, W/8)."""
        cfg, f = self.config, self.config.downsample_factor
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"encode expects images of shape (batch, {cfg.in_channels}, height, width) scaled to [-1, 1], "
                f"got {tuple(x.shape)}; for one image use x[None], for HWC arrays permute to CHW first."
            )
        H, W = x.shape[-2:]
        if H % f or W % f:
            raise ValueError(
                f"image size {W}x{H} (width x height) is not a multiple of {f}: the VAE maps each {f}x{f} "
                f"pixel patch to one latent. Resize or crop to multiples of {f} (e.g. {W // f * f}x{H // f * f}); "
                f"A1111 and ComfyUI round width/height the same way."
            )
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, 4, h, w) -> image (B, 3, 8h, 8w), roughly in [-1, 1] (clamp before converting to pixels)."""
        cfg = self.config
        if z.dim() != 4 or z.shape[1] != cfg.latent_channels:
            raise ValueError(
                f"decode expects latents of shape (batch, {cfg.latent_channels}, height/{cfg.downsample_factor}, "
                f"width/{cfg.downsample_factor}), got {tuple(z.shape)}. Latents from the sampler must first be "
                f"divided by the scaling factor ({cfg.scaling_factor})."
            )
        return self.decoder(self.post_quant_conv(z))
