"""sdlearn.widgets driven without a browser: setting a control changes the image, to exactly what a direct computation gives.

The pipeline is a small random sdlearn model with SD1.5's layout (the configs of tests/weights_helpers.py), 64×64
images and 8×8 latents as TinySD; it is built from sdlearn alone, so this file does not import diffusers.
"""

import datetime
import io
import math

import pytest
import torch

from sdlearn import viz, widgets
from sdlearn.clip import CLIPTextConfig, CLIPTextModel
from sdlearn.pipeline import Pipeline
from sdlearn.samplers import get_sampler, initial_latents
from sdlearn.schedule import add_noise
from sdlearn.shapes import random_scene
from sdlearn.tokenizer import CLIPTokenizer
from sdlearn.unet import Attention, UNet2DConditionModel, UNetConfig
from sdlearn.vae import AutoencoderKL, VAEConfig

PROMPT = "a red circle at the top left on a blue background"
SIZE = 64  # widgets.DISPLAY_SIZE is 256: a ×4 nearest upscale


def randomize(model, generator):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def pipe():
    g = torch.Generator().manual_seed(0)
    unet = UNet2DConditionModel(UNetConfig(block_out_channels=(32, 64, 64, 64), cross_attention_dim=48, sample_size=8))
    vae = AutoencoderKL(VAEConfig(block_out_channels=(32, 32, 64, 64)))
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=12))
    p = Pipeline(CLIPTokenizer(), randomize(clip, g), randomize(unet, g), randomize(vae, g), source="small random")
    assert p.default_size == SIZE
    # A random VAE keeps no colour in its latent (a least-squares fit explains ~5 %, and its factors are huge),
    # so the linear previews use SD1.5's factors; a trained TinySD gets its fitted ones (tests/test_viz.py).
    viz.set_latent_rgb_factors(p, viz.SD15_LATENT_RGB)
    return p


def png(image, size=widgets.DISPLAY_SIZE):
    return viz.to_png(viz.upscale(image, size))


def trace(pipe, steps, sampler, seed, cfg_scale=7.0):
    """An independent run: the callback's (x after each step, denoised) and the result."""
    xs, ds = [], []
    out = pipe.txt2img(PROMPT, steps=steps, sampler=sampler, seed=seed, cfg_scale=cfg_scale, progress=False,
                       callback=lambda d: (xs.append(d["x"].clone()), ds.append(d["denoised"].clone())))
    return xs, ds, out


# ------------------------------------------------------------------ denoising explorer


def test_denoising_explorer_frames_are_the_generations_steps(pipe):
    steps, seed = 4, 11
    ex = widgets.denoising_explorer(pipe, PROMPT, steps=steps, sampler="Euler a", seed=seed)
    xs, ds, out = trace(pipe, steps, "Euler a", seed)
    # Same generation as txt2img with that seed (the explorer draws the seed's noise the pipeline's way).
    assert torch.equal(ex.result.latents, out.latents) and torch.equal(ex.latents[-1:], out.latents)
    assert ex.latents.shape == (steps + 1, 4, 8, 8) and ex.denoised.shape == (steps, 4, 8, 8)
    sigmas = get_sampler("Euler a").sigmas(steps)
    noise = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(seed))[None]
    x_in = [initial_latents(noise, sigmas)] + xs[:-1]  # the latent entering each step

    shown = []
    for k in (0, 2, 3):
        ex.slider.value = k
        s = sigmas[k].item()
        assert ex.clean_image.value == png(pipe.decode_latents(ds[k])[0])
        assert ex.noise_image.value == png(viz.latent_preview(pipe, (x_in[k] - ds[k]) / s))
        assert ex.noisy_image.value == png(viz.latent_preview(pipe, x_in[k] / math.sqrt(s**2 + 1)))
        assert f"step {k + 1} of {steps}" in ex.text.value and f"σ = {s:.3f}" in ex.text.value
        shown.append((ex.noisy_image.value, ex.noise_image.value, ex.clean_image.value))
    for a, b in zip(shown[0], shown[1]):
        assert a != b  # each of the three panels changes with the step


def test_denoising_explorer_play_drives_the_slider(pipe):
    ex = widgets.denoising_explorer(pipe, PROMPT, steps=3, sampler="Euler", seed=0)
    before = ex.clean_image.value
    ex.play.value = 2
    assert ex.slider.value == 2 and ex.clean_image.value != before
    assert ex.play.max == ex.slider.max == 2


def test_denoising_explorer_rejects_bad_input(pipe):
    with pytest.raises(ValueError, match="steps"):
        widgets.denoising_explorer(pipe, PROMPT, steps=0)
    with pytest.raises(ValueError, match="seed"):
        widgets.denoising_explorer(pipe, PROMPT, steps=2, seed=-1)
    with pytest.raises(ValueError, match="unknown sampler"):
        widgets.denoising_explorer(pipe, PROMPT, steps=2, sampler="Eulr b")
    with pytest.raises(TypeError, match="prompt"):
        widgets.denoising_explorer(pipe, None, steps=2)


# ------------------------------------------------------------------ forward noising


def test_forward_noising_slider(pipe):
    image, _ = random_scene(0)
    fw = widgets.forward_noising_slider(pipe, image, t=100, seed=3)
    x0 = pipe.encode_image(image)
    assert torch.equal(fw.x0, x0)

    def expected(t, seed):
        noise = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(seed))[None]
        return png(pipe.decode_latents(add_noise(x0, noise, t))[0])

    assert fw.noisy_image.value == expected(100, 3)
    first = fw.noisy_image.value
    fw.t_slider.value = 900
    assert fw.noisy_image.value == expected(900, 3) != first
    a = pipe.schedule.alphas_cumprod[900].item()
    assert f"sqrt(ᾱ) = {math.sqrt(a):.4f}" in fw.text.value and f"SNR = ᾱ/(1−ᾱ) = {a / (1 - a):.4g}" in fw.text.value
    fw.seed.value = 4
    assert fw.noisy_image.value == expected(900, 4) != expected(900, 3)
    assert fw.clean_image.value == png(pipe.decode_latents(x0)[0])
    with pytest.raises(ValueError, match="0..999"):
        widgets.forward_noising_slider(pipe, image, t=1000)
    with pytest.raises(TypeError, match="PIL image"):
        widgets.forward_noising_slider(pipe, torch.zeros(3, 64, 64))


# ------------------------------------------------------------------ generation panel


def test_generation_panel_txt2img(pipe):
    panel = widgets.generation_panel(pipe, PROMPT, steps=3, seed=5, sampler="Euler")
    assert panel.image.value == b"" and panel.result is None
    panel.generate.click()
    out = pipe.txt2img(PROMPT, steps=3, seed=5, sampler="Euler", cfg_scale=7.0, progress=False)
    assert panel.image.value == png(out.images[0]) and panel.info.value == out.info
    assert "Seed: 5" in panel.info.value and "Sampler: Euler" in panel.info.value

    first = panel.image.value
    panel.sampler.value = "DPM++ 2M Karras"
    panel.negative_prompt.value = "blurry"
    panel.cfg_scale.value = 3.0
    panel.generate.click()
    out2 = pipe.txt2img(PROMPT, negative_prompt="blurry", steps=3, seed=5, sampler="DPM++ 2M Karras", cfg_scale=3.0,
                        progress=False)
    assert panel.image.value == png(out2.images[0]) != first
    assert "Negative prompt: blurry" in panel.info.value

    panel.random_seed.click()
    assert panel.seed.value == -1
    panel.generate.click()
    drawn = panel.result.seed
    assert f"Seed: {drawn}" in panel.info.value
    panel.reuse_seed.click()
    assert panel.seed.value == drawn


def test_generation_panel_img2img_and_upload(pipe):
    init, _ = random_scene(1)
    panel = widgets.generation_panel(pipe, PROMPT, steps=4, seed=2, sampler="Euler", init_image=init, strength=0.5)
    assert panel.use_init.value
    panel.generate.click()
    out = pipe.img2img(init, PROMPT, strength=0.5, steps=4, seed=2, sampler="Euler", progress=False)
    assert panel.image.value == png(out.images[0]) and "Denoising strength: 0.5" in panel.info.value

    other, _ = random_scene(2)
    buf = io.BytesIO()
    other.save(buf, format="PNG")
    panel.upload.value = ({"name": "other.png", "type": "image/png", "size": len(buf.getvalue()),
                           "content": memoryview(buf.getvalue()),
                           "last_modified": datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)},)
    panel.generate.click()
    out2 = pipe.img2img(other, PROMPT, strength=0.5, steps=4, seed=2, sampler="Euler", progress=False)
    assert panel.image.value == png(out2.images[0]) != png(out.images[0])

    panel.use_init.value = False  # back to txt2img
    panel.generate.click()
    assert panel.image.value == png(pipe.txt2img(PROMPT, steps=4, seed=2, sampler="Euler", progress=False).images[0])


def test_generation_panel_errors(pipe):
    with pytest.raises(ValueError, match="sampler must be one of"):
        widgets.generation_panel(pipe, PROMPT, sampler="euler_ancestral")
    with pytest.raises(TypeError, match="init_image"):
        widgets.generation_panel(pipe, PROMPT, init_image="cat.png")
    panel = widgets.generation_panel(pipe, PROMPT, steps=2, seed=1)
    panel.use_init.value = True  # ticked, but nothing uploaded
    panel.generate.click()
    assert "no init image" in panel.status.value and panel.image.value == b""
    panel.use_init.value = False
    panel.seed.value = -7
    panel.generate.click()
    assert "seed must be" in panel.status.value and panel.result is None


# ------------------------------------------------------------------ cross-attention


def all_pre_hooks(module):
    return sum(len(m._forward_pre_hooks) for m in module.modules())


def test_capture_leaves_the_unet_unchanged_and_removes_its_hooks(pipe):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 48, generator=g)
    t = torch.tensor([500, 20])
    n_attn2 = sum(1 for name, _ in pipe.unet.named_modules() if name.endswith("attn2"))
    assert n_attn2 > 0 and all_pre_hooks(pipe.unet) == 0
    with torch.no_grad():
        before = pipe.unet(x, t, ctx)
        with widgets.capture_cross_attention(pipe.unet, (8, 8)) as rec:
            assert all_pre_hooks(pipe.unet) == n_attn2  # one pre-hook per attn2 while capturing
            during = pipe.unet(x, t, ctx)
        after = pipe.unet(x, t, ctx)
    assert rec.calls == n_attn2
    assert torch.equal(before, during) and torch.equal(before, after)
    assert all_pre_hooks(pipe.unet) == 0
    # Removed after an error too.
    with pytest.raises(RuntimeError, match="boom"):
        with widgets.capture_cross_attention(pipe.unet, (8, 8)):
            raise RuntimeError("boom")
    assert all_pre_hooks(pipe.unet) == 0


def test_recorded_probabilities_reproduce_the_attention_output():
    """With one head, output = to_out(P · V): the recorded P must give attn2's actual output (computed by SDPA)."""
    g = torch.Generator().manual_seed(1)
    attn = randomize(Attention(16, heads=1, context_dim=12), g)
    holder = torch.nn.ModuleDict({"attn2": attn})
    x, ctx = torch.randn(1, 6 * 5, 16, generator=g), torch.randn(1, 7, 12, generator=g)
    with torch.no_grad(), widgets.capture_cross_attention(holder, (6, 5)) as rec:
        out = attn(x, ctx)
        P = rec.maps().reshape(7, 30).T  # (T, S)
        rebuilt = attn.to_out(P @ attn.to_v(ctx)[0])
    assert torch.allclose(P.sum(-1), torch.ones(30), atol=1e-6)
    diff = (rebuilt - out[0]).abs().max().item()
    print(f"attention rebuilt from recorded probabilities: max abs diff {diff:.2e}")
    assert diff < 1e-5


def test_recorder_keeps_only_the_prompts_rows_and_normalises(pipe):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 8, 8, generator=g)
    cond, uncond = torch.randn(1, 77, 48, generator=g), torch.randn(1, 77, 48, generator=g)
    with torch.no_grad():
        with widgets.capture_cross_attention(pipe.unet, (8, 8), cond) as both:
            pipe.unet(torch.cat([x, x]), 300, torch.cat([uncond, cond]))  # CFG's batch: [uncond, cond]
        with widgets.capture_cross_attention(pipe.unet, (8, 8)) as alone:
            pipe.unet(x, 300, cond)
    assert torch.allclose(both.maps(), alone.maps(), atol=1e-6)
    sums = both.maps().sum(0)  # (8, 8): each latent pixel's attention over the 77 tokens
    assert both.maps().shape == (77, 8, 8) and torch.allclose(sums, torch.ones(8, 8), atol=1e-5)
    with pytest.raises(RuntimeError, match="no cross-attention call"):
        widgets.CrossAttentionMaps((8, 8)).maps()
    with pytest.raises(ValueError, match="no cross-attention"):
        with widgets.capture_cross_attention(torch.nn.Linear(2, 2), (8, 8)):
            pass


def test_cross_attention_explorer(pipe):
    xa = widgets.cross_attention_explorer(pipe, "a (red:1.3) circle", steps=3, sampler="Euler", seed=4)
    assert [label for label, _ in xa.tokens] == ["0: <start>", "1: a", "2: red", "3: circle", "4: <end>"]
    assert xa.token.value == 1  # the first word
    out = pipe.txt2img("a (red:1.3) circle", steps=3, sampler="Euler", seed=4, progress=False)
    assert torch.equal(xa.result.latents, out.latents)  # the hooks did not change the generation
    assert torch.allclose(xa.maps.sum(0), torch.ones(8, 8), atol=1e-5)
    generated = viz.upscale(out.images[0], widgets.DISPLAY_SIZE)
    assert xa.generated_image.value == viz.to_png(generated)
    assert xa.image.value == viz.to_png(viz.heatmap_overlay(generated, xa.maps[1]))
    assert not torch.equal(xa.maps[1], xa.maps[2])
    first = xa.image.value
    xa.token.value = 2
    assert xa.image.value == viz.to_png(viz.heatmap_overlay(generated, xa.maps[2])) != first
    assert f"{xa.maps[2].mean().item():.1%}" in xa.text.value
    with pytest.raises(ValueError, match="give a prompt"):
        widgets.cross_attention_explorer(pipe, "  ", steps=2)


# ------------------------------------------------------------------ latent channels


def test_latent_channel_viewer(pipe):
    image, _ = random_scene(3)
    view = widgets.latent_channel_viewer(pipe, image=image)
    z = pipe.encode_image(image)[0]
    for k, im in enumerate(viz.latent_channels(z)):
        assert view.channel_images[k].value == png(im, widgets.DISPLAY_SIZE // 2)
        mean, std = z[k].mean().item(), z[k].std().item()
        assert view.labels[k].value == f"channel {k}: mean {mean:+.3f}, std {std:.3f}"
    assert view.step.disabled

    ex_latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    steps = widgets.latent_channel_viewer(latents=ex_latents)
    first = [im.value for im in steps.channel_images]
    steps.step.value = 2
    for k, im in enumerate(viz.latent_channels(ex_latents[2])):
        assert steps.channel_images[k].value == png(im, widgets.DISPLAY_SIZE // 2) != first[k]

    with pytest.raises(ValueError, match="exactly one"):
        widgets.latent_channel_viewer(pipe, image=image, latents=ex_latents)
    with pytest.raises(ValueError, match="pass pipe"):
        widgets.latent_channel_viewer(image=image)
    with pytest.raises(ValueError, match=r"\(N, 4, h, w\)"):
        widgets.latent_channel_viewer(latents=torch.zeros(8, 8))
