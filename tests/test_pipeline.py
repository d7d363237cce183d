"""Whole pipelines against diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline on the same small random weights.

sdlearn's `mode="diffusers"` must give diffusers' latents and images given the same initial noise and the
equivalent scheduler; the A1111 mode (the default) is checked for the behaviour A1111 documents: step
counting, pixels kept outside the mask, seeds per batch image, the parameters text in saved PNGs.
"""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint_module
from PIL import Image
from reference_tokenizer import write_sd15_tokenizer_folder
from transformers import CLIPTokenizer as HFCLIPTokenizer
from weights_helpers import SMALL_CLIP, SMALL_UNET, SMALL_VAE, clip_state, reference_models

from sdlearn.clip import CLIPTextModel
from sdlearn.pipeline import Pipeline, parse_infotext, save_png
from sdlearn.tokenizer import CLIPTokenizer
from sdlearn.unet import UNet2DConditionModel, UNetConfig
from sdlearn.vae import AutoencoderKL

# SD1.5's scheduler_config.json.
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True)
SIZE = 64  # 8x8 latents
PROMPT, NEGATIVE = "a red circle at the top left on a blue background", "blurry, low quality"


def build(unet_config=SMALL_UNET, seed=0):
    """diffusers/transformers reference models and sdlearn's, loaded strictly from the same tensors."""
    unet, vae, clip = reference_models(seed=seed, unet_config=unet_config)
    ours = Pipeline(CLIPTokenizer(), CLIPTextModel(SMALL_CLIP), UNet2DConditionModel(unet_config),
                    AutoencoderKL(SMALL_VAE), source="small random")
    ours.unet.load_state_dict(unet.state_dict(), strict=True)
    ours.vae.load_state_dict(vae.state_dict(), strict=True)
    ours.text_encoder.load_state_dict(clip_state(clip), strict=True)
    for m in (ours.unet, ours.vae, ours.text_encoder):
        m.eval()
    return (unet, vae, clip), ours


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return HFCLIPTokenizer.from_pretrained(write_sd15_tokenizer_folder(tmp_path_factory.mktemp("tok") / "tokenizer"))


@pytest.fixture(scope="module")
def models():
    return build()


def reference_pipeline(cls, refs, tokenizer, scheduler):
    unet, vae, clip = refs
    pipe = cls(vae=vae, text_encoder=clip, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_txt2img_equals_diffusers_euler(models, hf_tokenizer):
    refs, ours = models
    scheduler = EulerDiscreteScheduler.from_config(SD15_SCHEDULER, use_karras_sigmas=True)
    ref = reference_pipeline(StableDiffusionPipeline, refs, hf_tokenizer, scheduler)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    expected = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=7.5, height=SIZE,
                   width=SIZE, latents=noise.clone(), output_type="latent").images
    got = ours.txt2img(PROMPT, negative_prompt=NEGATIVE, steps=8, cfg_scale=7.5, sampler="Euler", scheduler="karras",
                       width=SIZE, height=SIZE, latents=noise, mode="diffusers", progress=False)
    diff = (got.latents - expected).abs().max().item()
    print(f"txt2img Euler Karras: max abs latent difference {diff:.2e}")
    assert expected.abs().max() > 0.1 and diff < 1e-4
    # The decoded image too (uint8: one level of rounding allowed).
    image = ref.vae.decode(expected / ref.vae.config.scaling_factor).sample
    image = ((image.clamp(-1, 1) + 1) * 127.5).round().squeeze(0).permute(1, 2, 0).detach().numpy()
    assert np.abs(np.asarray(got.images[0], np.float32) - image).max() <= 1


def test_txt2img_equals_diffusers_ddim(models, hf_tokenizer):
    refs, ours = models
    scheduler = DDIMScheduler.from_config(SD15_SCHEDULER, set_alpha_to_one=True)
    ref = reference_pipeline(StableDiffusionPipeline, refs, hf_tokenizer, scheduler)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    expected = ref(PROMPT, num_inference_steps=10, guidance_scale=5.0, height=SIZE, width=SIZE,
                   latents=noise.clone(), output_type="latent").images
    got = ours.txt2img(PROMPT, steps=10, cfg_scale=5.0, sampler="DDIM", width=SIZE, height=SIZE, latents=noise,
                       mode="diffusers", progress=False)
    diff = (got.latents - expected).abs().max().item()
    print(f"txt2img DDIM: max abs latent difference {diff:.2e}")
    assert diff < 1e-4


def test_a1111_prompt_mode_equals_diffusers_for_a_plain_prompt(models):
    _, ours = models
    a = ours.encode_prompt(PROMPT, mode="a1111")
    b = ours.encode_prompt(PROMPT, mode="diffusers")
    assert a.shape == b.shape == (1, 77, SMALL_CLIP.hidden_size)
    assert (a - b).abs().max() < 1e-6


@pytest.mark.parametrize("strength, n_steps", [(0.6, 6), (1.0, 10)])
def test_img2img_equals_diffusers(models, hf_tokenizer, strength, n_steps):
    refs, ours = models
    scheduler = EulerDiscreteScheduler.from_config(SD15_SCHEDULER, use_karras_sigmas=True)
    ref = reference_pipeline(StableDiffusionImg2ImgPipeline, refs, hf_tokenizer, scheduler)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    # diffusers draws a sample of the VAE posterior; sdlearn takes its mean. Hand diffusers that mean as
    # latents (its img2img accepts 4-channel input) so both start from the same clean latent.
    init = ours.encode_image(image)
    expected = ref(PROMPT, image=init, strength=strength, num_inference_steps=10, guidance_scale=7.0,
                   generator=torch.Generator().manual_seed(11), output_type="latent").images
    steps = []
    got = ours.img2img(image, PROMPT, strength=strength, steps=10, cfg_scale=7.0, sampler="Euler", scheduler="karras",
                       seed=11, mode="diffusers", progress=False, callback=lambda d: steps.append(d["i"]))
    diff = (got.latents - expected).abs().max().item()
    print(f"img2img Euler Karras, strength {strength}: max abs latent difference {diff:.2e}")
    assert len(steps) == n_steps and diff < 1e-4  # diffusers runs int(strength * 10) steps


@pytest.fixture()
def mean_not_sample(monkeypatch):
    """diffusers' inpaint pipeline samples the VAE posterior; make it take the mean, as sdlearn does."""
    original = inpaint_module.retrieve_latents
    monkeypatch.setattr(inpaint_module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": original(out, sample_mode="argmax"))


def square_mask(size=SIZE, box=(16, 16, 48, 40)):
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, box)
    return mask


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_equals_diffusers(models, hf_tokenizer, mean_not_sample, strength):
    refs, ours = models
    scheduler = EulerDiscreteScheduler.from_config(SD15_SCHEDULER, use_karras_sigmas=True)
    ref = reference_pipeline(StableDiffusionInpaintPipeline, refs, hf_tokenizer, scheduler)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    expected = ref(PROMPT, image=image, mask_image=square_mask(), strength=strength, num_inference_steps=8,
                   guidance_scale=7.0, height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(5),
                   output_type="latent").images
    got = ours.inpaint(image, square_mask(), PROMPT, strength=strength, steps=8, cfg_scale=7.0, sampler="Euler",
                       scheduler="karras", seed=5, mode="diffusers", progress=False)
    diff = (got.latents - expected).abs().max().item()
    print(f"inpaint (4-channel U-Net, strength {strength}): max abs latent difference {diff:.2e}")
    assert diff < 1e-4


def test_inpaint_9_channel_unet_equals_diffusers(hf_tokenizer, mean_not_sample):
    config = UNetConfig(**{**SMALL_UNET.__dict__, "in_channels": 9})
    refs, ours = build(config, seed=3)
    assert ours.is_inpainting_model
    scheduler = EulerDiscreteScheduler.from_config(SD15_SCHEDULER, use_karras_sigmas=True)
    ref = reference_pipeline(StableDiffusionInpaintPipeline, refs, hf_tokenizer, scheduler)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    expected = ref(PROMPT, image=image, mask_image=square_mask(), strength=1.0, num_inference_steps=6,
                   guidance_scale=7.0, height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(9),
                   output_type="latent").images
    got = ours.inpaint(image, square_mask(), PROMPT, strength=1.0, steps=6, cfg_scale=7.0, sampler="Euler",
                       scheduler="karras", seed=9, mode="diffusers", progress=False)
    diff = (got.latents - expected).abs().max().item()
    print(f"inpaint (9-channel U-Net): max abs latent difference {diff:.2e}")
    assert diff < 1e-4


# --------------------------------------------------------------------------- A1111 behaviour


def count_steps(fn, **kwargs):
    steps = []
    result = fn(callback=lambda d: steps.append(d), progress=False, **kwargs)
    return result, steps


def test_a1111_img2img_step_counting(models):
    _, ours = models
    image = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
    _, a1111 = count_steps(ours.img2img, image=image, prompt="x", strength=0.75, steps=20, sampler="Euler")
    _, diffusers = count_steps(ours.img2img, image=image, prompt="x", strength=0.75, steps=20, sampler="Euler",
                               mode="diffusers")
    assert len(a1111) == 16 and len(diffusers) == 15  # int(0.75·20) + 1 vs int(0.75·20)
    assert a1111[0]["sigma"] > diffusers[0]["sigma"]  # A1111 starts one step earlier (noisier)


def test_callback_carries_step_latent_prediction_and_sigma(models):
    _, ours = models
    result, steps = count_steps(ours.txt2img, prompt="x", steps=5, seed=1, sampler="DPM++ 2M Karras")
    assert [d["i"] for d in steps] == list(range(5))
    for d in steps:
        assert d["x"].shape == d["denoised"].shape == (1, 4, 8, 8)
        assert float(d["sigma"]) > float(d["sigma_next"]) >= 0
    assert torch.equal(steps[-1]["x"], result.latents)


def test_seed_reproducible_and_batch_images_equal_single_seeds(models):
    _, ours = models
    batch = ours.txt2img("a circle", steps=4, seed=100, batch_size=3, sampler="Euler a", progress=False)
    assert batch.seeds == [100, 101, 102]
    again = ours.txt2img("a circle", steps=4, seed=100, batch_size=3, sampler="Euler a", progress=False)
    assert torch.equal(batch.latents, again.latents)
    single = ours.txt2img("a circle", steps=4, seed=102, sampler="Euler a", progress=False)
    assert (batch.latents[2] - single.latents[0]).abs().max() < 1e-5
    assert (batch.latents[0] - batch.latents[1]).abs().max() > 0.1
    # A random seed (-1) is reported, and reusing it reproduces the image.
    rand = ours.txt2img("a circle", steps=3, seed=-1, progress=False)
    assert torch.equal(rand.latents, ours.txt2img("a circle", steps=3, seed=rand.seed, progress=False).latents)


def test_a_list_of_prompts_is_one_batch_equal_to_separate_runs(models):
    _, ours = models
    prompts = ["a circle", "a red square at the top left on a blue background, " * 12, ""]   # 1, 2 and 1 chunks
    negatives = ["blurry", "", "low quality"]
    batch = ours.txt2img(prompts, negative_prompt=negatives, steps=4, seed=7, sampler="DPM++ 2M Karras",
                         progress=False)
    assert batch.seeds == [7, 8, 9] and len(batch.images) == 3
    for i, (prompt, negative) in enumerate(zip(prompts, negatives)):
        alone = ours.txt2img(prompt, negative_prompt=negative, steps=4, seed=7 + i, sampler="DPM++ 2M Karras",
                             progress=False)
        assert (batch.latents[i] - alone.latents[0]).abs().max() < 1e-4
        assert batch.infotexts[i] == alone.info      # each image's parameters name its own prompt
    # One negative prompt for a list of prompts; img2img takes lists too.
    shared = ours.txt2img(prompts[:2], negative_prompt="blurry", steps=2, seed=7, progress=False)
    assert [parse_infotext(t)["Negative prompt"] for t in shared.infotexts] == ["blurry", "blurry"]
    image = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
    assert len(ours.img2img(image, prompts[:2], steps=2, progress=False).images) == 2


def test_a_list_of_prompts_bad_input(models):
    _, ours = models
    with pytest.raises(ValueError, match="one prompt per image"):
        ours.txt2img([], steps=2, progress=False)
    with pytest.raises(ValueError, match="as many as the prompts"):
        ours.txt2img(["a", "b"], negative_prompt=["c", "d", "e"], steps=2, progress=False)
    with pytest.raises(ValueError, match="leave batch_size out"):
        ours.txt2img(["a", "b"], batch_size=3, steps=2, progress=False)


@pytest.mark.parametrize("sampler", ["DPM++ SDE", "DPM++ 2M SDE", "DDPM", "DPM++ 2S a"])
def test_stochastic_samplers_are_per_image_reproducible(models, sampler):
    _, ours = models
    batch = ours.txt2img("x", steps=3, seed=5, batch_size=2, sampler=sampler, progress=False)
    single = ours.txt2img("x", steps=3, seed=6, sampler=sampler, progress=False)
    assert (batch.latents[1] - single.latents[0]).abs().max() < 1e-4


def test_a1111_inpaint_keeps_every_pixel_outside_the_mask(models):
    _, ours = models
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    for fill in ("fill", "original", "latent noise", "latent nothing"):
        out = ours.inpaint(image, square_mask(box=(24, 24, 40, 40)), "x", inpainting_fill=fill, mask_blur=2,
                           steps=4, seed=1, progress=False)
        got, orig = np.asarray(out.images[0]).astype(int), np.asarray(image).astype(int)
        far = np.ones((SIZE, SIZE), bool)
        far[24 - 8:40 + 8, 24 - 8:40 + 8] = False  # beyond the blur's reach
        assert np.array_equal(got[far], orig[far]), fill
        assert np.abs(got[28:36, 28:36] - orig[28:36, 28:36]).mean() > 5, fill  # the inside was repainted
        assert "Masked content: " + fill in out.info


def test_inpaint_only_masked_and_outpaint_sizes(models):
    _, ours = models
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    out = ours.inpaint(image, square_mask(box=(40, 40, 56, 56)), "x", inpaint_full_res=True,
                       inpaint_full_res_padding=4, width=64, height=64, steps=3, seed=1, progress=False)
    got, orig = np.asarray(out.images[0]).astype(int), np.asarray(image).astype(int)
    assert out.images[0].size == image.size
    assert np.array_equal(got[:28], orig[:28])  # far from the crop: untouched
    wide = ours.outpaint(image, "x", right=16, up=8, steps=3, seed=1, progress=False)
    assert wide.images[0].size == (SIZE + 16, SIZE + 8)
    # The original sits at (0, 8) on the new canvas; beyond the seam's blur it is kept exactly.
    assert np.array_equal(np.asarray(wide.images[0])[8 + 20:, :SIZE - 20], orig[20:, :SIZE - 20])


def test_hires_fix_runs_hires_steps_at_the_bigger_size(models):
    _, ours = models
    for upscaler in ("Latent", "Lanczos"):
        out, steps = count_steps(ours.txt2img, prompt="x", steps=4, hires_scale=2, hires_steps=3,
                                 hires_upscaler=upscaler, seed=1)
        assert out.images[0].size == (2 * SIZE, 2 * SIZE)
        assert len(steps) == 4 + 3 and steps[-1]["x"].shape == (1, 4, 16, 16)
        info = parse_infotext(out.info)
        assert info["Size"] == f"{2 * SIZE}x{2 * SIZE}" and info["Hires upscaler"] == upscaler


def test_sizes_not_multiple_of_64_work(models):
    _, ours = models
    out = ours.txt2img("x", width=72, height=80, steps=2, progress=False)
    assert out.images[0].size == (72, 80)


def test_empty_and_very_long_prompts(models):
    _, ours = models
    ours.txt2img("", steps=2, progress=False)
    long = ", ".join(f"word{i}" for i in range(500))  # ~1,000 tokens
    context = ours.encode_prompt(long)
    assert context.shape[1] % 77 == 0 and context.shape[1] >= 77 * 13
    out = ours.txt2img(long, negative_prompt="short", steps=2, progress=False)
    assert out.images[0].size == (SIZE, SIZE)


def test_png_parameters_round_trip_and_no_overwrite(models, tmp_path):
    _, ours = models
    out = ours.txt2img(PROMPT, negative_prompt=NEGATIVE, steps=3, seed=42, cfg_scale=6.5, clip_skip=2,
                       sampler="DPM++ 2M Karras", progress=False)
    paths = out.save(tmp_path)
    paths += out.save(tmp_path)
    assert [p.name for p in paths] == ["00000-42.png", "00001-42.png"]
    text = Image.open(paths[0]).text["parameters"]
    assert text == out.info
    info = parse_infotext(text)
    assert info["Prompt"] == PROMPT and info["Negative prompt"] == NEGATIVE
    assert (info["Steps"], info["Sampler"], info["CFG scale"], info["Seed"], info["Size"], info["Clip skip"]) == (
        "3", "DPM++ 2M Karras", "6.5", "42", f"{SIZE}x{SIZE}", "2")
    before = paths[0].read_bytes()
    with pytest.raises(FileExistsError, match="never overwrites"):
        save_png(out.images[0], paths[0], "x")
    assert paths[0].read_bytes() == before


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, message", [
    (dict(width=100), "multiples of 8"),
    (dict(height=0), "multiples of 8"),
    (dict(steps=0), "steps must be"),
    (dict(sampler="Euler b"), "Did you mean 'Euler a', 'Euler'"),
    (dict(sampler="dpm++2m karras"), "Did you mean 'DPM\\+\\+ 2M Karras'"),
    (dict(mode="comfy"), "mode must be"),
    (dict(hires_scale=2, hires_upscaler="ESRGAN"), "hires_upscaler must be"),
])
def test_txt2img_bad_input(models, kwargs, message):
    _, ours = models
    with pytest.raises(ValueError, match=message):
        ours.txt2img("x", progress=False, **{"steps": 2, **kwargs})


def test_img2img_and_inpaint_bad_input(models):
    _, ours = models
    image = Image.new("RGB", (SIZE, SIZE))
    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            ours.img2img(image, "x", strength=strength, steps=2, progress=False)
    with pytest.raises(ValueError, match="mask is 32x32 but the image is 64x64"):
        ours.inpaint(image, Image.new("L", (32, 32), 255), "x", steps=2, progress=False)
    with pytest.raises(ValueError, match="all black"):
        ours.inpaint(image, Image.new("L", (SIZE, SIZE), 0), "x", steps=2, progress=False)
    with pytest.raises(ValueError, match="inpainting_fill must be one of"):
        ours.inpaint(image, square_mask(), "x", inpainting_fill="noise", steps=2, progress=False)
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.img2img(Image.new("RGB", (60, 64)), "x", steps=2, progress=False)
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.outpaint(image, "x", right=5, steps=2, progress=False)
    with pytest.raises(TypeError, match="PIL image"):
        ours.img2img("photo.png", "x", steps=2, progress=False)


def test_sampler_latents_stay_float32_with_bf16_models():
    _, ours = build()
    ours.to(dtype=torch.bfloat16)
    dtypes = []
    out = ours.txt2img("a red circle", steps=3, seed=1, sampler="DPM++ 2M Karras", progress=False,
                       callback=lambda d: dtypes.append((d["x"].dtype, d["denoised"].dtype)))
    assert set(dtypes) == {(torch.float32, torch.float32)}
    assert out.latents.dtype == torch.float32 and torch.isfinite(out.latents).all()
    image = Image.new("RGB", (SIZE, SIZE), (10, 200, 30))
    assert ours.img2img(image, "x", steps=3, progress=False).latents.dtype == torch.float32


def test_lora_tags_in_the_prompt_apply_for_one_generation(tmp_path):
    from sdlearn.lora import inject_lora, lora_targets, remove_lora, save_lora

    _, ours = build()
    # A LoRA for this model: random adapters on the attention projections, saved in kohya's layout.
    donor = build()[1]
    adapters = inject_lora(donor.unet, lora_targets(donor.unet), rank=2)
    with torch.no_grad():
        for a in adapters.values():
            a.up.weight.normal_(0, 0.5)
    save_lora(tmp_path / "paper_cut.safetensors", unet=donor.unet)
    remove_lora(donor.unet)

    ours.lora_dirs = [tmp_path]
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    plain = ours.txt2img("a fox", steps=3, seed=1, progress=False)
    tagged = ours.txt2img("a fox <lora:paper_cut:0.8>", steps=3, seed=1, progress=False)
    assert (tagged.latents - plain.latents).abs().max() > 1e-3  # the LoRA changed the U-Net
    assert all(torch.equal(v, before[k]) for k, v in ours.unet.state_dict().items())  # and is gone again
    assert tagged.info.startswith("a fox <lora:paper_cut:0.8>")  # A1111 keeps the tag in the parameters
    assert torch.equal(ours.encode_prompt("a fox "), ours._context("a fox <lora:paper_cut:0.8>", 1, "a1111"))
    with pytest.raises(Exception, match="paper_cut"):  # a missing LoRA lists the ones there are
        ours.txt2img("a fox <lora:watercolor:1>", steps=2, progress=False)
    with pytest.raises(ValueError, match="different <lora:...> tags"):  # a LoRA changes the whole batch's model
        ours.txt2img(["a fox <lora:paper_cut:0.8>", "a fox"], steps=2, progress=False)
    both = ours.txt2img(["a fox <lora:paper_cut:0.8>", "a fox <lora:paper_cut:0.8>"], steps=3, seed=1, progress=False)
    assert (both.latents[0] - tagged.latents[0]).abs().max() < 1e-4
