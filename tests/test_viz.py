"""sdlearn.viz: grids, nearest upscaling, latent previews (A1111's linear approximation and a fitted one), plots."""

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdlearn import viz
from sdlearn.pipeline import images_to_tensor
from sdlearn.vae import VAEConfig


def noise_image(seed, size=(16, 12)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_png_round_trip():
    im = noise_image(0)
    back = Image.open(io.BytesIO(viz.to_png(im)))
    assert np.array_equal(np.asarray(back), np.asarray(im))


def test_upscale_is_nearest_with_whole_factor():
    im = noise_image(1, (16, 12))
    big = viz.upscale(im, 64)
    assert big.size == (64, 48)  # factor 4 = ceil(64 / 16)
    expected = np.asarray(im).repeat(4, axis=0).repeat(4, axis=1)
    assert np.array_equal(np.asarray(big), expected)
    assert viz.upscale(im, 8) is im  # already big enough
    with pytest.raises(TypeError, match="PIL image"):
        viz.upscale(np.zeros((4, 4, 3)), 16)


def test_image_grid_places_each_image():
    ims = [noise_image(k, (10, 8)) for k in range(5)]
    grid = viz.image_grid(ims, labels=list("abcde"), cols=3, pad=2, label_height=12)
    assert grid.size == (3 * 10 + 4 * 2, 2 * (8 + 12) + 3 * 2)
    a = np.asarray(grid)
    for k, im in enumerate(ims):
        x, y = 2 + (k % 3) * 12, 2 + (k // 3) * 22
        assert np.array_equal(a[y:y + 8, x:x + 10], np.asarray(im))
    with pytest.raises(ValueError, match="one label per image"):
        viz.image_grid(ims, labels=["a"])
    with pytest.raises(ValueError, match="at least one"):
        viz.image_grid([])
    with pytest.raises(TypeError, match="PIL"):
        viz.image_grid([torch.zeros(3, 4, 4)])


def test_latent_channels_and_stats():
    z = torch.randn(1, 4, 8, 6, generator=torch.Generator().manual_seed(0)) * torch.tensor([1, 2, 3, 4.0])[:, None, None]
    chans = viz.latent_channels(z)
    assert len(chans) == 4
    for c, im in enumerate(chans):
        a = np.asarray(im)
        assert im.mode == "L" and a.shape == (8, 6) and a.min() == 0 and a.max() == 255
        # the brightest pixel is the channel's largest value
        assert np.unravel_index(a.argmax(), a.shape) == np.unravel_index(z[0, c].argmax().item(), (8, 6))
    stats = viz.latent_stats(z)
    for c, (mean, std) in enumerate(stats):
        assert mean == pytest.approx(z[0, c].mean().item()) and std == pytest.approx(z[0, c].std().item())
    with pytest.raises(ValueError, match="one latent"):
        viz.latent_channels(torch.zeros(2, 4, 8, 8))


def test_latent_to_rgb_is_the_linear_map():
    z = torch.randn(4, 5, 7, generator=torch.Generator().manual_seed(1)) * 0.5
    im = np.asarray(viz.latent_to_rgb(z)).astype(np.float32)  # SD1.5's A1111 factors by default
    rgb = torch.einsum("chw,cr->hwr", z, viz.SD15_LATENT_RGB).clamp(-1, 1)
    assert im.shape == (5, 7, 3)
    assert np.abs(im - ((rgb.numpy() + 1) * 127.5)).max() <= 0.5 + 1e-4  # rounding to uint8 only
    bias = torch.tensor([0.1, -0.2, 0.3])
    factors = torch.randn(4, 3, generator=torch.Generator().manual_seed(2)) * 0.3
    im2 = np.asarray(viz.latent_to_rgb(z, factors, bias)).astype(np.float32)
    rgb2 = (torch.einsum("chw,cr->hwr", z, factors) + bias).clamp(-1, 1)
    assert np.abs(im2 - ((rgb2.numpy() + 1) * 127.5)).max() <= 0.5 + 1e-4
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        viz.latent_to_rgb(z, torch.zeros(3, 3))


class LinearVAEPipe:
    """A stand-in whose 'VAE' is exactly linear in each 8×8 block's mean colour: z = rgb·M + c."""

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.M, self.c = torch.randn(3, 4, generator=g), torch.randn(4, generator=g)

    def encode_image(self, images):
        rgb = F.avg_pool2d(images_to_tensor(images), 8)  # (B, 3, h, w)
        return torch.einsum("bchw,cl->blhw", rgb, self.M) + self.c[:, None, None]


def test_fit_latent_rgb_recovers_an_exactly_linear_vae():
    pipe = LinearVAEPipe()
    images = [noise_image(k, (32, 32)) for k in range(3)]
    factors, bias, r2 = viz.fit_latent_rgb(pipe, images)
    z = pipe.encode_image(images)
    rgb = F.avg_pool2d(images_to_tensor(images), 8)
    predicted = torch.einsum("blhw,lr->brhw", z, factors) + bias[:, None, None]
    err = (predicted - rgb).abs().max().item()
    print(f"linear-VAE fit: max abs RGB error {err:.2e}, r2 {r2:.8f}")
    assert err < 1e-4 and r2 == pytest.approx(1, abs=1e-8)
    assert factors.shape == (4, 3) and bias.shape == (3,)


def test_latent_rgb_factors_sd15_uses_a1111s():
    pipe = SimpleNamespace(vae=SimpleNamespace(config=VAEConfig.sd15()))
    factors, bias = viz.latent_rgb_factors(pipe)
    assert torch.equal(factors, viz.SD15_LATENT_RGB) and torch.equal(bias, torch.zeros(3))


def small_vae():
    """A module standing for a non-SD1.5 VAE: latent_rgb_factors only reads its config and keys its cache on it."""
    vae = torch.nn.Linear(1, 1)
    vae.config = VAEConfig(block_out_channels=(32, 32, 32, 32))
    return vae


def test_latent_rgb_factors_fits_other_vaes_once_and_warns_when_the_fit_is_poor():
    pipe = LinearVAEPipe()
    pipe.vae, pipe.default_size = small_vae(), 32  # not SD1.5's VAE: fitted on shapes scenes
    first = viz.latent_rgb_factors(pipe)
    assert viz.latent_rgb_factors(pipe) is first  # cached per VAE
    scenes_z = pipe.encode_image([Image.new("RGB", (32, 32), (200, 30, 90))])
    rgb = torch.einsum("blhw,lr->brhw", scenes_z, first[0]) + first[1][:, None, None]
    assert torch.allclose(rgb, torch.tensor([200, 30, 90]).float()[None, :, None, None] / 127.5 - 1, atol=1e-4)

    noise_pipe = SimpleNamespace(vae=small_vae(), default_size=32,
                                 encode_image=lambda ims: torch.randn(len(ims), 4, 4, 4))  # colour-blind latents
    with pytest.warns(UserWarning, match="explains only"):
        viz.latent_rgb_factors(noise_pipe)


def test_set_latent_rgb_factors_is_used_by_the_preview():
    pipe = SimpleNamespace(vae=torch.nn.Linear(1, 1))  # any module: factors are kept per VAE
    factors, bias = torch.randn(4, 3, generator=torch.Generator().manual_seed(5)) * 0.3, torch.tensor([0.2, 0, -0.1])
    viz.set_latent_rgb_factors(pipe, factors, bias)
    z = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(6))
    assert np.array_equal(np.asarray(viz.latent_preview(pipe, z)), np.asarray(viz.latent_to_rgb(z, factors, bias)))
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        viz.set_latent_rgb_factors(pipe, torch.zeros(3, 4))


def test_heatmap_overlay():
    im = noise_image(4, (16, 16))
    assert np.array_equal(np.asarray(viz.heatmap_overlay(im, torch.full((4, 4), 0.3))), np.asarray(im))  # flat
    heat = torch.full((16, 16), 0.5)
    heat[3, 5] = 2.0  # the minimum is 0.5 everywhere else: stretched to 0
    out = np.asarray(viz.heatmap_overlay(im, heat, alpha=1.0)).astype(int)
    assert out[3, 5].tolist() == [255, 255, 0]  # the peak is fully yellow at alpha 1
    assert np.array_equal(out[10, 10], np.asarray(im)[10, 10])  # zero weight: the image itself
    with pytest.raises(ValueError, match="2-D"):
        viz.heatmap_overlay(im, torch.zeros(1, 4, 4))


def test_line_plot():
    import matplotlib.pyplot as plt

    fig = viz.line_plot([1, 3, 7], {"Euler": [0.2, 0.5, 0.6], "DDIM": [0.1, 0.4, 0.7]}, "CFG scale", "accuracy")
    ax = fig.axes[0]
    assert [list(line.get_ydata()) for line in ax.lines] == [[0.2, 0.5, 0.6], [0.1, 0.4, 0.7]]
    assert ax.get_xlabel() == "CFG scale" and [t.get_text() for t in ax.get_legend().get_texts()] == ["Euler", "DDIM"]
    im = viz.figure_image(fig, dpi=50)
    assert im.size == (250, 160)  # figsize (5, 3.2) at 50 dpi
    plt.close(fig)
    with pytest.raises(ValueError, match="has 2 values"):
        viz.line_plot([1, 2, 3], {"a": [1, 2]})
    with pytest.raises(ValueError, match="at least one series"):
        viz.line_plot([1], {})


def test_compact_image_bytes_picks_the_smaller_format():
    flat = Image.new("RGB", (64, 64), (200, 30, 40))                         # flat colour: PNG wins
    data, fmt = viz.compact_image_bytes(flat)
    assert fmt == "png" and Image.open(io.BytesIO(data)).size == (64, 64)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    data, fmt = viz.compact_image_bytes(noise)                               # noise: JPEG wins
    assert fmt == "jpeg" and len(data) < len(viz.to_png(noise))
    data, fmt = viz.compact_image_bytes(noise, colors=16)                    # a palette keeps PNG, and small
    assert fmt == "png" and len(Image.open(io.BytesIO(data)).getcolors(256)) <= 16
