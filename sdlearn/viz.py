"""Pictures of what the model computes: image grids, latent previews, attention heat maps, plots.

The notebooks and the widgets (widgets.py) draw with these helpers. They return PIL images (or PNG
bytes for ipywidgets.Image), so they work without a browser and without a matplotlib backend; only
`line_plot` imports matplotlib, and only when called.

Seeing a latent. A latent is (4, h, w), an eighth of the image's side. Two honest ways to look at it:

* its four channels as grayscale images (`latent_channels`) — what the U-Net really works on;
* a *linear preview*: each latent pixel's 4 numbers times a fixed 4×3 matrix gives an RGB colour
  (`latent_to_rgb`). This is A1111's "Approx cheap" live preview (Settings → Live previews) and
  ComfyUI's "latent2rgb" preview. It works because SD's VAE keeps colour roughly linear in the
  latent; the decoder adds the detail. For SD1.5 the matrix is the one A1111 ships in
  modules/sd_vae_approx.py (`cheap_approximation`, from
  https://discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2). Any other VAE
  (TinySD's) gets its own matrix, fitted here by least squares on a few images (`fit_latent_rgb`).
"""

import io
import warnings
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

# A1111's "Approx cheap" factors for SD1.x latents (already × 0.18215, the U-Net's scale):
# rgb = latent · SD15_LATENT_RGB, RGB roughly in [-1, 1]. Rows: latent channels 0..3; columns: R, G, B.
SD15_LATENT_RGB = torch.tensor([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
])


# ---------------------------------------------------------------------------------------------
# 1. Images in, images out
# ---------------------------------------------------------------------------------------------


def to_png(image: Image.Image) -> bytes:
    """A PIL image as PNG bytes: what ipywidgets.Image displays."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def compact_image_bytes(image: Image.Image, colors: int | None = None) -> tuple[bytes, str]:
    """(bytes, "png" | "jpeg"): the image in whichever of PNG and JPEG is smaller.

    colors=N first reduces it to an N-colour palette and keeps PNG: sharp edges, small files, even
    for pictures of noise.
    """
    if colors:
        return to_png(image.convert("RGB").convert("P", palette=Image.ADAPTIVE, colors=colors)), "png"
    png = to_png(image)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=90)
    return (png, "png") if len(png) <= buf.tell() else (buf.getvalue(), "jpeg")


def show(image: Image.Image, colors: int | None = None):
    """Display a PIL image in a notebook, stored once and small (see compact_image_bytes).

    A PIL image left as a cell's result is saved twice, as PNG and as JPEG; the course's notebooks are
    committed with their outputs, so they show pictures through this instead.
    """
    from IPython.display import Image as IPythonImage, display

    data, fmt = compact_image_bytes(image, colors)
    display(IPythonImage(data=data, format=fmt))


def upscale(image: Image.Image, size: int = 256) -> Image.Image:
    """Enlarge a small image (a 64×64 TinySD output, an 8×8 latent) so its longer side is at least `size`.

    Nearest neighbour on purpose: every pixel stays a sharp square, so learners see the real
    resolution instead of a smooth blur that was never generated. Whole-number factors only.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"upscale needs a PIL image, got {type(image).__name__}.")
    factor = max(1, -(-size // max(image.size)))  # ceil(size / longest side)
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def image_grid(images, labels=None, cols=None, pad=4, label_height=14, background=(255, 255, 255)):
    """Lay images out in a grid, each with an optional label underneath. Returns one PIL image.

    Cells are as big as the largest image; smaller ones sit in the top-left of their cell.
    """
    images = list(images)
    if not images:
        raise ValueError("image_grid needs at least one image.")
    if not all(isinstance(im, Image.Image) for im in images):
        raise TypeError("image_grid takes PIL images; convert tensors with pipe.decode_latents or latent_to_rgb first.")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels; give one label per image (or none).")
    cols = len(images) if cols is None else cols
    if cols < 1:
        raise ValueError(f"cols must be at least 1, got {cols}.")
    rows = -(-len(images) // cols)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images) + (label_height if labels is not None else 0)
    grid = Image.new("RGB", (cols * cell_w + (cols + 1) * pad, rows * cell_h + (rows + 1) * pad), background)
    draw = ImageDraw.Draw(grid)
    for k, im in enumerate(images):
        x = pad + (k % cols) * (cell_w + pad)
        y = pad + (k // cols) * (cell_h + pad)
        grid.paste(im.convert("RGB"), (x, y))
        if labels is not None:
            draw.text((x, y + cell_h - label_height + 1), str(labels[k]), fill=(0, 0, 0))
    return grid


# ---------------------------------------------------------------------------------------------
# 2. Looking at latents
# ---------------------------------------------------------------------------------------------


def _as_latent(latent) -> torch.Tensor:
    """(4, h, w) or (1, 4, h, w) -> (4, h, w) float32 on the CPU."""
    if not torch.is_tensor(latent):
        raise TypeError(f"expected a latent tensor of shape (4, h, w), got {type(latent).__name__}.")
    if latent.ndim == 4 and latent.shape[0] == 1:
        latent = latent[0]
    if latent.ndim != 3:
        raise ValueError(f"expected one latent of shape (4, h, w) or (1, 4, h, w), got {tuple(latent.shape)}; "
                         "for a batch, pass one latent at a time.")
    return latent.detach().float().cpu()


def channel_to_image(channel: torch.Tensor, low=None, high=None) -> Image.Image:
    """(h, w) -> grayscale image; low..high (default the channel's own min..max) maps to black..white."""
    low = channel.min().item() if low is None else low
    high = channel.max().item() if high is None else high
    scaled = (channel - low) / max(high - low, 1e-8)
    return Image.fromarray((scaled.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), mode="L")


def latent_channels(latent) -> list:
    """A latent's channels as grayscale images, each stretched to its own min..max (its mean/std: `latent_stats`)."""
    return [channel_to_image(c) for c in _as_latent(latent)]


def latent_stats(latent) -> list:
    """[(mean, std)] per channel, as Python floats."""
    z = _as_latent(latent)
    return [(c.mean().item(), c.std().item()) for c in z]


def latent_to_rgb(latent, factors=None, bias=None) -> Image.Image:
    """The linear live preview: rgb = latent · factors + bias per latent pixel, an (h, w) RGB image.

    latent (4, h, w) in the U-Net's scale; factors (4, 3) (default SD1.5's, A1111's "Approx cheap");
    bias (3,) (default 0, as A1111). RGB in [-1, 1] is mapped to 0..255 and clipped.
    """
    z = _as_latent(latent)  # (4, h, w)
    factors = SD15_LATENT_RGB if factors is None else torch.as_tensor(factors, dtype=torch.float32)
    if factors.shape != (z.shape[0], 3):
        raise ValueError(f"factors must be ({z.shape[0]}, 3), one RGB row per latent channel; got {tuple(factors.shape)}.")
    rgb = torch.einsum("chw,cr->hwr", z, factors)  # (h, w, 3)
    if bias is not None:
        rgb = rgb + torch.as_tensor(bias, dtype=torch.float32)
    return Image.fromarray(((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy())


@torch.no_grad()
def fit_latent_rgb(pipe, images) -> tuple:
    """Least-squares fit of a (4, 3) latent→RGB matrix and a (3,) bias for the pipeline's VAE.

    Each latent pixel covers an 8×8 block of the image; we average each block to one RGB colour
    (in [-1, 1]) and solve  min ‖[z, 1] · W − rgb‖²  over all latent pixels of all images.
    Returns (factors (4, 3), bias (3,), r2) where r2 = 1 − residual/variance says how much of the
    colour the linear preview explains (1 = all of it).
    """
    from .pipeline import images_to_tensor

    images = list(images)
    if len(images) < 1:
        raise ValueError("fit_latent_rgb needs at least one image.")
    z = pipe.encode_image(images).float().cpu()  # (B, 4, h, w), U-Net scale
    x = images_to_tensor(images)  # (B, 3, H, W) in [-1, 1]
    rgb = F.adaptive_avg_pool2d(x, z.shape[-2:])  # (B, 3, h, w): the mean colour of each 8×8 block
    Z = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (N, 4)
    Y = rgb.permute(0, 2, 3, 1).reshape(-1, 3)  # (N, 3)
    A = torch.cat([Z, torch.ones(len(Z), 1)], dim=1).double()  # (N, 5): a constant column for the bias
    W = torch.linalg.lstsq(A, Y.double()).solution  # (5, 3)
    residual = ((A @ W - Y.double()) ** 2).sum()
    r2 = 1 - (residual / ((Y.double() - Y.double().mean(0)) ** 2).sum()).item()
    return W[:4].float(), W[4].float(), r2


# Factors per VAE module (fitted or set), so each pipeline is fitted once per session.
_FITTED = weakref.WeakKeyDictionary()


def set_latent_rgb_factors(pipe, factors, bias=None):
    """Use these (4, 3) factors (and (3,) bias) for the linear previews of `pipe`'s VAE from now on
    (for a VAE whose factors are published, or one fitted on your own images with `fit_latent_rgb`)."""
    factors = torch.as_tensor(factors, dtype=torch.float32)
    bias = torch.zeros(3) if bias is None else torch.as_tensor(bias, dtype=torch.float32)
    if factors.shape != (4, 3) or bias.shape != (3,):
        raise ValueError(f"factors must be (4, 3) and bias (3,), got {tuple(factors.shape)} and {tuple(bias.shape)}.")
    _FITTED[pipe.vae] = (factors, bias)


def latent_rgb_factors(pipe) -> tuple:
    """(factors (4, 3), bias (3,)) for `pipe`'s VAE: set ones, A1111's for the SD1.5 VAE, else fitted on shapes scenes.

    A fit that explains less than half of the colour (an untrained VAE) warns: its previews mean little.
    """
    from .vae import VAEConfig

    if pipe.vae in _FITTED:
        return _FITTED[pipe.vae]
    if pipe.vae.config == VAEConfig.sd15():
        return SD15_LATENT_RGB, torch.zeros(3)
    from .shapes import random_scene

    scenes = [random_scene(seed, size=pipe.default_size)[0] for seed in range(8)]
    factors, bias, r2 = fit_latent_rgb(pipe, scenes)
    if r2 < 0.5:
        warnings.warn(f"the linear latent preview explains only {r2:.0%} of the colour for this VAE (is it trained?); "
                      "the previews will not look like the decoded images.", stacklevel=2)
    _FITTED[pipe.vae] = (factors, bias)
    return _FITTED[pipe.vae]


def latent_preview(pipe, latent) -> Image.Image:
    """The pipeline's linear live preview of one latent (4, h, w), an (h, w) RGB image."""
    factors, bias = latent_rgb_factors(pipe)
    return latent_to_rgb(latent, factors, bias)


# ---------------------------------------------------------------------------------------------
# 3. Heat maps and plots
# ---------------------------------------------------------------------------------------------


def heatmap_overlay(image: Image.Image, heat, alpha: float = 0.6) -> Image.Image:
    """Colour `image` by a heat map (h, w), any size: its minimum stays the image, its maximum turns red-yellow.

    The map is stretched to 0..1 between its own min and max — it shows *where* the weight is larger,
    not how large it is (print the numbers for that) — so a flat map leaves the image as it is. It is
    resized to the image with bilinear interpolation.
    """
    heat = torch.as_tensor(heat, dtype=torch.float32)
    if heat.ndim != 2:
        raise ValueError(f"heat must be a 2-D map (h, w), got shape {tuple(heat.shape)}.")
    span = (heat.max() - heat.min()).item()
    heat = (heat - heat.min()) / span if span > 0 else torch.zeros_like(heat)
    heat = F.interpolate(heat[None, None], size=(image.height, image.width), mode="bilinear")[0, 0].clamp(0, 1)
    h = heat.numpy()[..., None]  # (H, W, 1)
    # A simple "hot" colour ramp: black -> red -> yellow as the weight grows.
    colour = np.concatenate([np.clip(2 * h, 0, 1), np.clip(2 * h - 1, 0, 1), np.zeros_like(h)], axis=-1) * 255
    base = np.asarray(image.convert("RGB"), np.float32)
    out = base * (1 - alpha * h) + colour * alpha * h
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def line_plot(x, series: dict, xlabel: str = "", ylabel: str = "", title: str = "", ax=None):
    """Curves such as "judge accuracy vs CFG scale": `series` maps a legend label to y values over `x`.

    Returns the matplotlib Figure (shown by Jupyter; `to_png(figure_image(fig))` for a widget).
    """
    import matplotlib.pyplot as plt

    x = list(x)
    if not series:
        raise ValueError("line_plot needs at least one series: {'label': [y values]}.")
    for label, ys in series.items():
        if len(ys) != len(x):
            raise ValueError(f"series {label!r} has {len(ys)} values but there are {len(x)} x values.")
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.2))
    else:
        fig = ax.figure
    for label, ys in series.items():
        ax.plot(x, list(ys), marker="o", label=str(label))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def figure_image(fig, dpi: int = 100) -> Image.Image:
    """A matplotlib Figure rendered to a PIL image (no display needed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    return Image.open(buf).convert("RGB")
