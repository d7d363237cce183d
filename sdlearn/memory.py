"""Low-memory paths: sliced attention and tiled VAE encode/decode.

Generating a 512x512 SD1.5 image in fp16 needs about 1.7 GB for the U-Net's weights; what pushes a
4-8 GB GPU over the edge is the *activations* of the two biggest operations:

* **Attention at the finest level.** 64x64 latent pixels are 4096 tokens, so self-attention's score
  matrix softmax(Q K^T / sqrt(d)) is 4096 x 4096 per head: 8 heads x batch 2 (CFG) x 2 bytes = 512 MB
  in fp16, and 16 times that (8 GB) at 1024x1024 (hires fix), where there are 4x the tokens. A fused
  kernel (flash / memory-efficient attention, which `F.scaled_dot_product_attention` picks on most GPUs)
  never stores it. Where no fused kernel runs, *sliced attention* (A1111 "--opt-split-attention",
  diffusers `enable_attention_slicing`) computes it for a slice of queries at a time: row i of the
  result depends on query i only, so the output is the same and only a (slice, tokens) block exists.
* **The VAE decoder at full resolution.** Its last levels run 256 and 128 channels at every output
  pixel: at 1024x1024 one such feature map is 128 x 1024 x 1024 x 2 bytes = 256 MB, and the decoder
  keeps several. *Tiled* decoding (A1111's Tiled VAE extension, diffusers `enable_vae_tiling`,
  ComfyUI "VAE Decode (Tiled)") decodes overlapping latent tiles one by one and blends the overlaps.

Tiling is not exact. The decoder is not a local filter: its GroupNorms normalise each channel with
statistics taken over the whole picture, and its mid-block self-attention lets every position see
every other. A tile sees only itself, so its statistics differ a little from the full image's, and a
hard cut would leave a visible seam. Overlapping the tiles and cross-fading them with linear ramps
(each output pixel a weighted average of the tiles that cover it) hides the seam; the remaining
difference from untiled decoding is small but not zero (tests/test_memory.py measures it). diffusers'
tiled VAE has the same property. An image that fits in one tile is decoded untiled, bit for bit.

Moving the text encoder and VAE off the GPU while the U-Net runs, and the fp16 VAE's fall-back to
fp32, live in `Pipeline.enable_low_memory` and `Pipeline.decode_latents` (sdlearn.pipeline).
"""

import math

import torch
from torch import nn

from .unet import Attention
from .vae import DiagonalGaussian

# ---------------------------------------------------------------------------------------------
# Sliced attention
# ---------------------------------------------------------------------------------------------


def enable_sliced_attention(unet: nn.Module, query_chunk_size: int | None = 1024) -> nn.Module:
    """Make every attention layer of a U-Net attend `query_chunk_size` queries at a time (None: all at once).

    1024 queries keep SD1.5's largest score block at 8 heads x 1024 x 4096 per image instead of
    8 x 4096 x 4096. Returns the U-Net, changed in place.
    """
    if query_chunk_size is not None and (not isinstance(query_chunk_size, int) or query_chunk_size < 1):
        raise ValueError(f"query_chunk_size must be a positive int (e.g. 1024) or None to turn slicing off, "
                         f"got {query_chunk_size!r}.")
    layers = [m for m in unet.modules() if isinstance(m, Attention)]
    if not layers:
        raise ValueError("no sdlearn attention layers found: pass sdlearn's UNet2DConditionModel.")
    for layer in layers:
        layer.query_chunk_size = query_chunk_size
    return unet


# ---------------------------------------------------------------------------------------------
# Tiles and their blending weights
# ---------------------------------------------------------------------------------------------


def tile_starts(size: int, tile: int, overlap: int) -> list:
    """Offsets of tiles `tile` long that cover 0..size, neighbours overlapping by at least `overlap`.

    The first tile starts at 0, the last ends at `size`, the rest are spread evenly between, so every
    overlap is about the same width (never less than asked for).
    """
    if size <= tile:
        return [0]
    n = math.ceil((size - tile) / (tile - overlap)) + 1  # tiles needed at stride tile - overlap
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _ramp(length: int, ramp: int, rise: bool, fall: bool) -> torch.Tensor:
    """1-D blending weight over one tile: ramps up over `ramp` pixels where the tile overlaps a neighbour
    before it (`rise`), down where it overlaps one after it (`fall`), 1 in between. Never exactly 0,
    so every pixel has some weight."""
    w = torch.ones(length)
    edge = (torch.arange(min(ramp, length)) + 0.5) / ramp  # (ramp,), from 1/(2 ramp) up to almost 1
    if rise:
        w[: len(edge)] = edge
    if fall:
        w[length - len(edge):] = torch.minimum(w[length - len(edge):], edge.flip(0))
    return w


def _blend_tiles(run, x: torch.Tensor, tile: int, overlap: int, scale: float) -> torch.Tensor:
    """Apply `run` tile by tile over x's last two dims and cross-fade the outputs.

    x: (B, C, H, W); `run` maps a (B, C, h, w) tile to (B, C', h*scale, w*scale) (scale 8 for the
    decoder, 1/8 for the encoder). Output pixel = sum over tiles (weight * tile output) / sum of
    weights, the weights being products of linear ramps (see _ramp) across the overlaps.
    """
    H, W = x.shape[-2:]
    rows, cols = tile_starts(H, tile, overlap), tile_starts(W, tile, overlap)
    out = weight = None
    ramp = max(1, int(overlap * scale))  # the overlap, in output pixels
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            y = run(x[..., top:top + tile, left:left + tile]).float()  # (B, C', th, tw)
            if out is None:
                out = y.new_zeros(y.shape[:2] + (int(H * scale), int(W * scale)))
                weight = y.new_zeros(out.shape[-2:])
            th, tw = y.shape[-2:]
            w = (_ramp(th, ramp, i > 0, i < len(rows) - 1)[:, None]
                 * _ramp(tw, ramp, j > 0, j < len(cols) - 1)[None, :]).to(y.device)  # (th, tw)
            r, c = int(top * scale), int(left * scale)
            out[..., r:r + th, c:c + tw] += w * y
            weight[r:r + th, c:c + tw] += w
    return out / weight


# ---------------------------------------------------------------------------------------------
# Tiled VAE
# ---------------------------------------------------------------------------------------------


def tiled_decode(vae: nn.Module, z: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
    """vae.decode(z) in overlapping latent tiles: z (B, 4, h, w) -> image (B, 3, 8h, 8w), in z's dtype.

    `tile` and `overlap` are in latent pixels (64 = a 512-pixel tile; 16 = 128 pixels of cross-fade).
    A latent no bigger than one tile is decoded in one call, exactly as vae.decode does.
    """
    _check_tiles(tile, overlap)
    if z.shape[-2] <= tile and z.shape[-1] <= tile:
        return vae.decode(z)
    f = vae.config.downsample_factor
    return _blend_tiles(vae.decode, z, tile, overlap, f).to(z.dtype)


def tiled_encode(vae: nn.Module, x: torch.Tensor, tile: int = 512, overlap: int = 128) -> DiagonalGaussian:
    """vae.encode(x) in overlapping image tiles: x (B, 3, H, W) -> q(z | x) over (B, 4, H/8, W/8).

    `tile` and `overlap` are in pixels and must be multiples of 8 (the VAE maps 8x8 pixels to one latent).
    The blended quantity is the encoder's moments (mean and log-variance), as one encode would return.
    """
    _check_tiles(tile, overlap)
    f = vae.config.downsample_factor
    if tile % f or overlap % f:
        raise ValueError(f"tile={tile} and overlap={overlap} must be multiples of {f} pixels (one latent pixel).")
    if x.shape[-2] <= tile and x.shape[-1] <= tile:
        return vae.encode(x)
    if x.dim() != 4 or x.shape[-2] % f or x.shape[-1] % f:
        raise ValueError(f"tiled_encode expects images (B, 3, H, W) with H and W multiples of {f}, "
                         f"got {tuple(x.shape)}; resize or crop to multiples of {f} first.")
    moments = _blend_tiles(lambda t: vae.quant_conv(vae.encoder(t)), x, tile, overlap, 1 / f)
    return DiagonalGaussian(moments.to(x.dtype))


def _check_tiles(tile, overlap):
    if not (isinstance(tile, int) and isinstance(overlap, int) and 0 <= overlap < tile):
        raise ValueError(f"need integers 0 <= overlap < tile, got tile={tile!r}, overlap={overlap!r}.")
