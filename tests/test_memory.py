"""Low-memory paths (sdlearn.memory, Pipeline.enable_low_memory) and the fp16 VAE fallback, on CPU.

Each path is compared with the normal path on the same small random weights (tests/test_pipeline.build):
sliced attention and offloading must give the same numbers; tiled VAE decoding cannot (GroupNorm and the
mid-block attention see one tile at a time), so its difference is measured and bounded.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_pipeline import PROMPT, SIZE, build

from sdlearn import memory
from sdlearn.memory import enable_sliced_attention, tile_starts, tiled_decode, tiled_encode
from sdlearn.pipeline import tensor_to_images
from sdlearn.unet import Attention


@pytest.fixture()
def pipe():
    return build()[1]


def unet_inputs(size=16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, size, size, generator=g)  # 16x16 latents: 256 tokens at the finest level
    context = torch.randn(2, 77, 48, generator=g)
    return x, torch.tensor([999, 500]), context


# ---------------------------------------------------------------------------- sliced attention


def test_sliced_attention_equals_full_attention(pipe, monkeypatch):
    x, t, context = unet_inputs()
    with torch.no_grad():
        expected = pipe.unet(x, t, context)
    enable_sliced_attention(pipe.unet, 48)  # 256 tokens -> 5 slices of 48 and one of 16 (a ragged last slice)
    assert all(m.query_chunk_size == 48 for m in pipe.unet.modules() if isinstance(m, Attention))
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v: calls.append(q.shape[2]) or sdpa(q, k, v))
    with torch.no_grad():
        got = pipe.unet(x, t, context)
    diff = (got - expected).abs().max().item()
    print(f"sliced attention: max abs difference {diff:.2e} (output max {expected.abs().max():.2f})")
    assert max(calls) == 48 and 16 in calls  # it really sliced, including the remainder
    assert diff < 1e-6
    enable_sliced_attention(pipe.unet, None)  # off again: the default path, bit for bit
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t, context), expected)


def test_sliced_attention_rejects_bad_sizes(pipe):
    with pytest.raises(ValueError, match="positive int"):
        enable_sliced_attention(pipe.unet, 0)
    with pytest.raises(ValueError, match="no sdlearn attention"):
        enable_sliced_attention(torch.nn.Linear(2, 2), 64)


# ---------------------------------------------------------------------------- tiles


@pytest.mark.parametrize("size,tile,overlap", [(24, 8, 4), (24, 16, 8), (100, 64, 16), (64, 64, 16), (9, 8, 2)])
def test_tiles_cover_with_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and min(starts[-1] + tile, size) == size
    for a, b in zip(starts, starts[1:]):
        assert a + tile - b >= overlap  # neighbours overlap by at least `overlap`
    covered = torch.zeros(size)
    for s in starts:
        covered[s:s + tile] = 1
    assert covered.all()


def test_blending_reproduces_a_pointwise_map_exactly():
    # For a map with no context across pixels (nearest upsampling), tiling must change nothing: this checks
    # tile placement, scaling and that the blending weights sum to one everywhere.
    x = torch.randn(1, 4, 24, 20)
    up = lambda t: F.interpolate(t, scale_factor=8)  # noqa: E731
    tiled = memory._blend_tiles(up, x, 8, 3, 8)
    assert tiled.shape == (1, 4, 192, 160)
    assert (tiled - up(x)).abs().max() < 1e-6
    pool = lambda t: F.avg_pool2d(t, 8)  # noqa: E731  (the encoder's direction, scale 1/8)
    img = torch.randn(1, 3, 96, 80)
    assert (memory._blend_tiles(pool, img, 32, 16, 1 / 8) - pool(img)).abs().max() < 1e-6


# ---------------------------------------------------------------------------- tiled VAE


def test_tiled_decode_one_tile_is_exact(pipe):
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(tiled_decode(pipe.vae, z, tile=8, overlap=2), pipe.vae.decode(z))


def test_tiled_decode_is_close_to_untiled(pipe):
    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(0))  # a 192x192 image
    with torch.no_grad():
        full = pipe.vae.decode(z)
        tiled = tiled_decode(pipe.vae, z, tile=16, overlap=8)  # 2x2 tiles of 128 px, 64 px cross-fade
        hard_cut = tiled_decode(pipe.vae, z, tile=8, overlap=0)  # 3x3 tiles butted together, no blending
    diff, seam = (tiled - full).abs(), (hard_cut - full).abs()
    print(f"tiled decode (16/8 latent px): max abs difference {diff.max():.4f} = {diff.max() * 127.5:.1f} uint8 "
          f"levels, mean {diff.mean():.5f}; hard-cut tiles: max {seam.max():.4f}; output std {full.std():.4f}")
    assert tiled.shape == full.shape and tiled.dtype == full.dtype
    assert diff.max() * 127.5 < 3  # under 3 of 255 levels on this random VAE (GroupNorm sees one tile)
    assert diff.mean() < 0.6 * seam.mean()  # overlap + blending is much closer than butted tiles


def test_tiled_encode_is_close_to_untiled(pipe):
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.rand(1, 3, 12, 12, generator=g) * 2 - 1, size=(192, 192), mode="bicubic").clamp(-1, 1)
    with torch.no_grad():
        full = pipe.vae.encode(x)
        tiled = tiled_encode(pipe.vae, x, tile=128, overlap=32)
        one_tile = tiled_encode(pipe.vae, x, tile=192, overlap=32)
    diff = (tiled.mean - full.mean).abs().max().item()
    print(f"tiled encode (128/32 px): max abs difference of the mean latent {diff:.4f} "
          f"(latent max {full.mean.abs().max():.3f})")
    assert tiled.mean.shape == full.mean.shape == (1, 4, 24, 24)
    assert diff < 0.05 * full.mean.abs().max()
    assert torch.equal(one_tile.mean, full.mean)
    with pytest.raises(ValueError, match="multiples of 8"):
        tiled_encode(pipe.vae, x, tile=100, overlap=20)


# ---------------------------------------------------------------------------- the pipeline's low-memory mode


def test_low_memory_pipeline_equals_normal(pipe):
    kwargs = dict(steps=4, sampler="Euler", seed=3, width=SIZE, height=SIZE, progress=False)
    normal = pipe.txt2img(PROMPT, **kwargs)
    events = []  # the offload sequence: where each idle model is sent, and when it runs
    for name in ("text_encoder", "vae"):
        module = getattr(pipe, name)
        original_to = module.to
        module.to = lambda *a, _to=original_to, _n=name, **k: events.append((_n, "to", str(a[0] if a else k))) or _to(*a, **k)
        module.register_forward_pre_hook(lambda m, args, _n=name: events.append((_n, "run", str(next(m.parameters()).device))))
    pipe.vae.decoder.register_forward_pre_hook(lambda m, args: events.append(("vae", "run", "decoder")))
    # vae_tile_size 64 = the whole 64x64 test image, so decoding is exact; sliced attention at 16 of 64 queries.
    pipe.enable_low_memory(sliced_attention=16, vae_tile_size=64, offload=True)
    low = pipe.txt2img(PROMPT, **kwargs)
    diff = (low.latents - normal.latents).abs().max().item()
    print(f"low-memory txt2img: max abs latent difference {diff:.2e}")
    assert diff < 1e-5
    assert np.abs(np.asarray(low.images[0], np.int16) - np.asarray(normal.images[0], np.int16)).max() <= 1
    # Every text-encoder run is preceded by a move to the pipeline's device and followed by a move back.
    te = [e[1:] for e in events if e[0] == "text_encoder"]
    assert te[0] == ("to", "cpu") and te[1:] == [("to", "cpu"), ("run", "cpu"), ("to", "cpu")] * 2
    assert pipe.offload_device == torch.device("cpu")
    assert ("vae", "run", "decoder") in events and [e for e in events if e[0] == "vae"][-1] == ("vae", "to", "cpu")


def test_low_memory_rejects_bad_tile_size(pipe):
    with pytest.raises(ValueError, match="multiple of 32"):
        pipe.enable_low_memory(vae_tile_size=100)


# ---------------------------------------------------------------------------- fp16 VAE fallback


def overflowing_fp16_vae(pipe):
    """Scale the decoder's first conv so its output exceeds fp16's 65504 (but stays finite in fp32)."""
    with torch.no_grad():
        w = pipe.vae.decoder.conv_in.weight
        w.mul_(2e4 / w.abs().max())  # |w| up to 2e4: finite in fp16 itself
    pipe.vae.half()


def test_fp16_vae_overflow_falls_back_to_fp32(pipe):
    overflowing_fp16_vae(pipe)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    z = latents / pipe.vae.config.scaling_factor
    with torch.no_grad():
        plain_fp16 = pipe.vae.decode(z.half())
        fp32 = pipe.vae.float().decode(z)  # the same (fp16-rounded) weights in fp32
    pipe.vae.half()
    assert not torch.isfinite(plain_fp16).all()  # the overflow is real: fp16 decoding gives inf/NaN
    assert torch.isfinite(fp32).all()
    with pytest.warns(RuntimeWarning, match="float32"):
        images = pipe.decode_latents(latents)
    assert next(pipe.vae.parameters()).dtype == torch.float32  # reverted for good, as A1111 does
    expected = np.asarray(tensor_to_images(fp32)[0])
    assert np.array_equal(np.asarray(images[0]), expected) and expected.std() > 0


def test_fp16_vae_without_overflow_stays_fp16(pipe, recwarn):
    pipe.vae.half()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    images = pipe.decode_latents(latents)
    with torch.no_grad():
        expected = tensor_to_images(pipe.vae.decode(latents.half() / pipe.vae.config.scaling_factor))
    assert np.array_equal(np.asarray(images[0]), np.asarray(expected[0]))
    assert next(pipe.vae.parameters()).dtype == torch.float16
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
