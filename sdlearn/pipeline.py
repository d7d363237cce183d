"""The Stable Diffusion pipeline: the WebUI's tabs, written out.

A `Pipeline` holds what a checkpoint contains — tokenizer, CLIP text encoder, U-Net, VAE — and runs
the loops that A1111's tabs and a ComfyUI graph run:

    txt2img   prompt -> context; seed -> noise; sampler loop (U-Net + CFG) -> latent; VAE decode -> image
              ComfyUI: CLIPTextEncode -> EmptyLatentImage -> KSampler -> VAEDecode
    img2img   image -> VAE encode -> latent; add noise up to the "Denoising strength"; finish the loop
              ComfyUI: VAEEncode -> KSampler(denoise=strength)
    inpaint   img2img where only the masked latent pixels may change (A1111's mask blur, masked
              content, "Only masked"); with a 9-channel inpainting U-Net the mask goes in as input
    outpaint  inpaint on a bigger canvas whose new borders are the mask
    hires fix txt2img at the base size, upscale the latent, img2img at the big size

Every call returns a `GenerationResult` whose `info` is A1111's "parameters" text; saving writes it
into the PNG so A1111's "PNG Info" tab reads it back.

Seeds. Each image's initial noise is `torch.randn` from a CPU generator seeded with seed + i (i the
image's index in the batch, as A1111 numbers seeds), so a seed gives the same image on any device —
as ComfyUI does. A1111's default ("Random number generator source: GPU") draws on the GPU, which
gives different numbers per GPU vendor; its "CPU" setting matches sdlearn's.

A1111 vs diffusers. `mode="a1111"` (default) follows A1111: prompt emphasis and 75-token chunks,
img2img runs int(strength·steps)+1 steps, inpainting blends the predicted clean latent and pastes
the original pixels back. `mode="diffusers"` follows diffusers' pipelines: 77-token truncation,
int(strength·steps) steps, inpainting blends the noisy latent after each step. The tests check that
mode against StableDiffusionPipeline / Img2Img / Inpaint on the same weights.
"""

import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps, PngImagePlugin

from .guidance import cfg_combine, encode_prompt, pad_to_same_length
from .memory import enable_sliced_attention, tiled_decode, tiled_encode
from .samplers import BrownianNoise, Denoiser, get_sampler, initial_latents, sample_dpmpp_sde
from .schedule import SD15, NoiseSchedule

MODES = ("a1111", "diffusers")
INPAINT_FILLS = ("fill", "original", "latent noise", "latent nothing")  # A1111 "Masked content"
HIRES_UPSCALERS = ("Latent", "Latent (nearest)", "Lanczos")


@dataclass
class GenerationResult:
    images: list  # PIL images
    seed: int  # the first image's seed (what A1111 shows)
    seeds: list  # one per image: seed, seed + 1, ...
    infotexts: list  # A1111 "parameters" text per image
    latents: torch.Tensor  # (B, 4, h, w) final latents, in the U-Net's scale (× scaling_factor)

    @property
    def info(self) -> str:
        return self.infotexts[0]

    def save(self, directory=".", prefix: str = "") -> list:
        """Save each image as NNNNN-seed.png (A1111's naming) with its parameters; never overwrites."""
        return [save_png(img, _next_free(directory, prefix, s), info)
                for img, s, info in zip(self.images, self.seeds, self.infotexts)]


@dataclass
class Pipeline:
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    source: str = ""
    # What the loader found out about the checkpoint (model family, EMA or not, ...).
    info: dict = field(default_factory=dict)
    schedule: NoiseSchedule = SD15
    # Low-memory switches, set by enable_low_memory(); all off by default.
    offload_device: torch.device | None = None  # where the text encoder and VAE wait while idle
    vae_tile_size: int | None = None  # tiled VAE decode/encode, tile side in pixels
    # Folders searched for <lora:name:weight> in prompts (A1111: models/Lora, ComfyUI: models/loras).
    lora_dirs: list = field(default_factory=list)
    # Textual-inversion embeddings (sdlearn.embeddings): folders whose files' names are trigger words
    # (A1111: embeddings/, ComfyUI: models/embeddings), and embeddings already in memory {word: vectors}.
    embedding_dirs: list = field(default_factory=list)
    embeddings: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ basics

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device=None, dtype=None) -> "Pipeline":
        for m in (self.text_encoder, self.unet, self.vae):
            m.to(device=device, dtype=dtype)
        return self

    @property
    def model_name(self) -> str:
        """What A1111 writes as "Model": the checkpoint's file name without extension ("TinySD" for tiny)."""
        if self.info.get("model") == "TinySD":
            return "TinySD"
        from pathlib import Path

        return Path(self.source).stem if self.source else ""

    def enable_low_memory(self, sliced_attention: int | None = 1024, vae_tile_size: int | None = 512,
                          offload: bool = True) -> "Pipeline":
        """The low-VRAM mode for 4-8 GB GPUs (A1111's --medvram plus sliced attention and Tiled VAE).

        sliced_attention: queries per attention call in the U-Net (sdlearn.memory; None = off).
        vae_tile_size: decode/encode the VAE in tiles of this many pixels, overlapping by a quarter
            (None = off). 512 leaves a 512x512 image untiled; tiled results differ slightly (see memory.py).
        offload: keep the text encoder and VAE in CPU memory and move each to the GPU only while it
            runs: they are idle during the whole sampling loop, which only needs the U-Net.
        """
        if vae_tile_size is not None and (not isinstance(vae_tile_size, int) or vae_tile_size % 32
                                          or vae_tile_size < 64):
            raise ValueError(f"vae_tile_size must be a multiple of 32 pixels, at least 64 (e.g. 512), or None; "
                             f"got {vae_tile_size!r}.")
        enable_sliced_attention(self.unet, sliced_attention)
        self.vae_tile_size = vae_tile_size
        self.offload_device = torch.device("cpu") if offload else None
        if offload:
            self.text_encoder.to(self.offload_device)
            self.vae.to(self.offload_device)
        return self

    def enable_fast_path(self, channels_last: bool = True, compile: bool = True, compile_mode=None) -> "Pipeline":
        """The fast path for GPUs: the U-Net in channels-last layout, compiled with torch.compile.

        channels_last: NHWC memory layout, which GPU convolution kernels (cuDNN, tensor cores) prefer;
            the spatial transformers keep it (see SpatialTransformer.forward).
        compile: torch.compile the U-Net in place (its state_dict keys do not change). The first call
            compiles (a minute or more); every new latent size or batch recompiles. compile_mode is
            torch.compile's mode: None (default), "max-autotune", "reduce-overhead" (CUDA graphs).
        Outputs match the eager path to float rounding (tests/test_fast_path.py, benchmarks/bench_sd15.py).
        """
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if compile:
            self.unet.compile(mode=compile_mode, fullgraph=True)
        return self

    @property
    def vae_scale(self) -> int:
        """Pixels per latent pixel along each side: 8 for SD1.5 (three 2× downsamplings)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        """The resolution the model was trained at: 512 for SD1.5 (64-pixel latents × 8)."""
        return self.unet.config.sample_size * self.vae_scale

    @property
    def is_inpainting_model(self) -> bool:
        return self.unet.config.in_channels == 9

    @torch.no_grad()
    def encode_image(self, images) -> torch.Tensor:
        """PIL image(s) -> latents (B, 4, H/8, W/8) in the U-Net's scale.

        Takes the mean of the VAE's Gaussian (as ComfyUI's VAEEncode); A1111 and diffusers draw a
        sample from it instead, which differs by the posterior's small std (~1e-2 of the latent's).
        """
        x = images_to_tensor(images)
        return self._vae_run(lambda dtype: self._vae_encode(x.to(self.device, dtype)))

    def _vae_encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image tensor (B, 3, H, W) in [-1, 1] -> mean latent × scaling_factor; tiled if enabled."""
        if self.vae_tile_size is None:
            posterior = self.vae.encode(x)
        else:
            posterior = tiled_encode(self.vae, x, self.vae_tile_size, self.vae_tile_size // 4)
        # Latents are kept in float32 whatever the models' dtype (see _denoiser).
        return (posterior.mode() * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list:
        """Latents in the U-Net's scale (B, 4, h, w) -> PIL images. The VAE expects latents / scaling_factor."""
        def decode(dtype):
            z = latents.to(self.device, dtype) / self.vae.config.scaling_factor
            if self.vae_tile_size is None:
                return self.vae.decode(z)
            tile = self.vae_tile_size // self.vae_scale  # in latent pixels
            return tiled_decode(self.vae, z, tile, tile // 4)

        return tensor_to_images(self._vae_run(decode))

    def _vae_run(self, run):
        """run(dtype) -> tensor, with the VAE on the pipeline's device and in `dtype`, the VAE's own.

        fp16 fallback (A1111's "Automatically revert VAE to 32-bit floats"): SD1.5's VAE decoder has
        activations beyond fp16's largest number, 65504, on some latents, which become inf and then
        NaN in the next GroupNorm: a black image. If a half-precision result is not finite, the VAE
        is converted to fp32 for good (as A1111 does) and the call repeated, with a warning.
        """
        dtype = next(self.vae.parameters()).dtype
        with self._on_device(self.vae):
            out = run(dtype)
            if dtype != torch.float32 and not bool(torch.isfinite(out).all()):
                warnings.warn(f"the VAE produced NaN/inf in {dtype} (an overflow); converted it to float32 and "
                              "ran it again, as A1111's 'Automatically revert VAE to 32-bit floats' does. "
                              "A fixed fp16 VAE (e.g. madebyollin/sdxl-vae-fp16-fix for SDXL) avoids the cost.",
                              RuntimeWarning, stacklevel=3)
                self.vae.float()
                out = run(torch.float32)
        return out

    @contextmanager
    def _on_device(self, module):
        """Run `module` on the pipeline's device; with offloading on, send it back to offload_device after."""
        if self.offload_device is None:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to(self.offload_device)

    def encode_prompt(self, prompt: str, clip_skip: int = 1, mode: str = "a1111") -> torch.Tensor:
        """Prompt -> context (1, 77·chunks, D); see sdlearn.guidance. Trigger words of embeddings are used."""
        embeddings = self.prompt_embeddings(prompt)
        with self._on_device(self.text_encoder):
            return encode_prompt(self.tokenizer, self.text_encoder, prompt, clip_skip=clip_skip, mode=mode,
                                 embeddings=embeddings)

    def prompt_embeddings(self, prompt: str) -> dict:
        """{word: Embedding} for the embeddings this prompt may use: self.embeddings first, then the files in
        self.embedding_dirs whose names occur in the prompt. Only those files are read, each strictly."""
        if not prompt or not (self.embeddings or self.embedding_dirs):
            return {}
        from .embeddings import EmbeddingError, embeddings_in_prompt, find_embeddings, load_embedding

        width = self.text_encoder.config.hidden_size
        used = {word: load_embedding(self.embeddings[word], width, word)
                for word in embeddings_in_prompt(prompt, self.embeddings)}
        files = find_embeddings(self.embedding_dirs) if self.embedding_dirs else {}
        for word in embeddings_in_prompt(prompt, files):
            if word in used:
                continue
            if len(files[word]) > 1:
                raise EmbeddingError(f"the embedding name {word!r} matches several files: "
                                     f"{', '.join(map(str, files[word]))}; rename or remove all but one.")
            used[word] = load_embedding(files[word][0], width)
        return used

    # ------------------------------------------------------------------ the tabs

    def txt2img(self, prompt, negative_prompt="", steps=20, cfg_scale=7.0, sampler="Euler a", scheduler=None,
                seed=-1, width=None, height=None, batch_size=1, clip_skip=1, latents=None, callback=None,
                hires_scale=None, hires_strength=0.7, hires_steps=0, hires_upscaler="Latent",
                mode="a1111", progress=True) -> GenerationResult:
        """Text to image. `latents` (B, 4, h, w) replaces the seed's unit-variance noise.

        `prompt` (and `negative_prompt`) may be a list, one per image: a batch of different prompts in one
        run of the U-Net (A1111's "Prompts from file or textbox" script runs them one after another). Image
        i still uses seed + i, so each comes out as it would alone, up to float rounding.

        Hires fix (A1111 "Hires. fix", 高清修复): with hires_scale set, the base image is upscaled by that
        factor and run through img2img with `hires_strength` ("Denoising strength", 0.7) for `hires_steps`
        steps (0 = the same as steps), so the model adds detail at a size it was not trained for without
        repeating the composition.
        """
        batch_size = _batch_size(prompt, negative_prompt, batch_size)
        with self._prompt_loras(prompt):
            width, height = self._size(width, height)
            seeds = _seeds(seed, batch_size)
            spec, sigmas = self._sigmas(sampler, scheduler, steps)
            self._check_mode(mode)
            shape = (4, height // self.vae_scale, width // self.vae_scale)
            if latents is None:
                noise = _noise(seeds, shape)
            else:
                noise = latents.float().cpu()
                if tuple(noise.shape) != (batch_size,) + shape:
                    raise ValueError(f"latents must have shape {(batch_size,) + shape} for a {width}x{height} batch of "
                                     f"{batch_size}, got {tuple(noise.shape)}.")
            cond, uncond = self._conditioning(prompt, negative_prompt, batch_size, clip_skip, mode)
            model = self._denoiser(cond, uncond, cfg_scale)
            x = initial_latents(noise.to(self.device), sigmas, vp=spec.vp_start)  # float32, see _denoiser
            x = self._run(spec, model, x, sigmas.to(self.device), seeds, callback, progress)

            params = dict(steps=steps, sampler=spec.name, cfg_scale=cfg_scale, seeds=seeds, width=width, height=height,
                          clip_skip=clip_skip)
            if hires_scale is not None and hires_scale != 1:
                x, extra = self._hires_fix(x, cond, uncond, spec, steps, cfg_scale, seeds, hires_scale, hires_strength,
                                           hires_steps, hires_upscaler, callback, progress)
                params.update(extra)
            images = self.decode_latents(x)
            return self._result(images, x, prompt, negative_prompt, params)

    def img2img(self, image, prompt, strength=0.75, negative_prompt="", steps=20, cfg_scale=7.0, sampler="Euler a",
                scheduler=None, seed=-1, width=None, height=None, batch_size=1, clip_skip=1, callback=None,
                mode="a1111", progress=True) -> GenerationResult:
        """Image to image (图生图): encode, noise up to `strength` ("Denoising strength", 重绘幅度), denoise.

        strength 0 returns the image through the VAE; 1 starts from (almost) pure noise. A1111 runs
        int(min(strength, 0.999)·steps) + 1 of the `steps` steps; diffusers runs int(strength·steps).
        """
        batch_size = _batch_size(prompt, negative_prompt, batch_size)
        with self._prompt_loras(prompt):
            image = _as_rgb(image, "image")
            width, height = self._size(width or image.width, height or image.height)  # default: the image's size
            image = _resize(image, width, height)
            x0 = self.encode_image([image] * batch_size)
            return self._from_latent(x0, prompt, negative_prompt, strength, steps, cfg_scale, sampler, scheduler, seed,
                                     batch_size, clip_skip, callback, mode, progress, width, height)

    def inpaint(self, image, mask, prompt, strength=0.75, negative_prompt="", mask_blur=4, inpainting_fill="original",
                inpaint_full_res=False, inpaint_full_res_padding=32, invert_mask=False, steps=20, cfg_scale=7.0,
                sampler="Euler a", scheduler=None, seed=-1, width=None, height=None, batch_size=1, clip_skip=1,
                callback=None, mode="a1111", progress=True) -> GenerationResult:
        """Inpainting (局部重绘): repaint where `mask` is white, keep the rest.

        A1111's options: mask_blur (px, softens the seam), inpainting_fill = "Masked content"
        (fill / original / latent noise / latent nothing), inpaint_full_res = "Inpaint area: Only
        masked" (crop around the mask plus `inpaint_full_res_padding`, work at full resolution there,
        paste back). Pixels outside the (blurred) mask are the original's, exactly.
        """
        batch_size = _batch_size(prompt, negative_prompt, batch_size)
        with self._prompt_loras(prompt):
            image = _as_rgb(image, "image")
            mask = _as_mask(mask, image, invert_mask)
            if inpainting_fill not in INPAINT_FILLS:
                raise ValueError(f"inpainting_fill must be one of {INPAINT_FILLS}, got {inpainting_fill!r}.")
            if mask_blur < 0:
                raise ValueError(f"mask_blur must be >= 0 pixels, got {mask_blur}.")
            self._check_mode(mode)
            if mask.getbbox() is None:
                raise ValueError("the mask is all black, so there is nothing to inpaint; paint the area to change white.")

            blurred = mask.filter(ImageFilter.GaussianBlur(mask_blur)) if mask_blur > 0 and mode == "a1111" else mask
            # The overlay keeps the original wherever the mask is 0; A1111 doubles the blurred mask first so the
            # repainted area covers the whole painted mask and only the outer half of the blur blends.
            overlay_mask = Image.fromarray(np.clip(np.asarray(blurred, np.float32) * 2, 0, 255).astype(np.uint8))

            if inpaint_full_res:
                crop = _crop_region(blurred, inpaint_full_res_padding)
                width, height = self._size(width, height)
                crop = _expand_to_aspect(crop, width, height, image.size)
                work_image = _resize(image.crop(crop), width, height)
                work_mask = blurred.crop(crop).resize((width, height), Image.LANCZOS)
            else:
                width, height = self._size(width or image.width, height or image.height)
                work_image, work_mask = _resize(image, width, height), blurred.resize((width, height), Image.LANCZOS)
            if inpainting_fill == "fill":
                work_image = fill_masked(work_image, work_mask)

            x0 = self.encode_image([work_image] * batch_size)
            h, w = x0.shape[-2:]
            if mode == "a1111":
                # A1111 rounds the downsampled mask to 0/1: a latent pixel is either repainted or kept.
                latent_mask = torch.from_numpy(np.asarray(work_mask.resize((w, h)), np.float32) / 255).round()
            else:
                # diffusers: nearest-neighbour downsampling of the binarised mask.
                binary = torch.from_numpy((np.asarray(work_mask, np.float32) / 255 >= 0.5).astype(np.float32))
                latent_mask = F.interpolate(binary[None, None], size=(h, w))[0, 0]
            latent_mask = latent_mask.to(self.device, x0.dtype)[None, None]  # (1, 1, h, w), 1 = repaint

            seeds = _seeds(seed, batch_size)
            if inpainting_fill == "latent noise":
                x0 = x0 * (1 - latent_mask) + _noise(seeds, x0.shape[1:]).to(x0) * latent_mask
            elif inpainting_fill == "latent nothing":
                x0 = x0 * (1 - latent_mask)

            image_cond = None
            if self.is_inpainting_model:
                # The 9-channel U-Net sees [noisy latent (4), mask (1), latent of the image with the hole (4)].
                binary = (np.asarray(work_mask, np.float32) / 255 >= 0.5).astype(np.float32)  # (H, W)
                hole = images_to_tensor([work_image]) * torch.from_numpy(1 - binary)[None, None]
                hole_latent = self._vae_run(lambda dtype: self._vae_encode(hole.to(self.device, dtype)))
                cond_mask = F.interpolate(torch.from_numpy(binary)[None, None], size=(h, w)).to(self.device, self.dtype)
                image_cond = torch.cat([cond_mask, hole_latent.to(self.dtype)], dim=1).expand(batch_size, -1, -1, -1)

            result = self._from_latent(x0, prompt, negative_prompt, strength, steps, cfg_scale, sampler, scheduler, seeds,
                                       batch_size, clip_skip, callback, mode, progress, width, height,
                                       latent_mask=latent_mask, image_cond=image_cond)
            if mode == "a1111":
                result.images = [_paste_back(image, gen, overlay_mask, crop if inpaint_full_res else None)
                                 for gen in result.images]
            params_note = f", Mask blur: {mask_blur}, Masked content: {inpainting_fill}"
            if inpaint_full_res:
                params_note += f", Inpaint area: Only masked, Only masked padding: {inpaint_full_res_padding}"
            result.infotexts = [t + params_note for t in result.infotexts]
            return result

    def outpaint(self, image, prompt, left=0, right=0, up=0, down=0, strength=0.8, mask_blur=4,
                 inpainting_fill="fill", **kwargs) -> GenerationResult:
        """Outpainting (扩图 / 外补扩充): extend the canvas by the given pixels and inpaint the new borders.

        Like A1111's "Poor man's outpainting" script: the new area starts as the image's colours
        smeared outward ("fill") and the mask overlaps the old image by `mask_blur` pixels so the seam blends.
        """
        image = _as_rgb(image, "image")
        for name, px in (("left", left), ("right", right), ("up", up), ("down", down)):
            if px < 0:
                raise ValueError(f"{name}={px}: outpainting extends the canvas, so pixels must be >= 0.")
        if left + right + up + down == 0:
            raise ValueError("give at least one of left, right, up, down (pixels to add on that side).")
        width, height = image.width + left + right, image.height + up + down
        if width % 8 or height % 8:
            raise ValueError(f"the extended canvas would be {width}x{height}; both sides must be multiples of 8. "
                             f"Adjust left/right/up/down (e.g. right={right + (-width) % 8}, down={down + (-height) % 8}).")
        canvas = Image.new("RGB", (width, height))
        canvas.paste(image, (left, up))
        mask = Image.new("L", (width, height), 255)
        inner = (left + mask_blur if left else 0, up + mask_blur if up else 0,
                 left + image.width - (mask_blur if right else 0), up + image.height - (mask_blur if down else 0))
        mask.paste(0, inner)
        return self.inpaint(canvas, mask, prompt, strength=strength, mask_blur=mask_blur,
                            inpainting_fill=inpainting_fill, **kwargs)

    # ------------------------------------------------------------------ the loop

    def _from_latent(self, x0, prompt, negative_prompt, strength, steps, cfg_scale, sampler, scheduler, seed,
                     batch_size, clip_skip, callback, mode, progress, width, height, latent_mask=None, image_cond=None):
        """Shared by img2img and inpaint: noise the clean latent x0 to the strength's level and denoise."""
        if not 0 <= strength <= 1:
            raise ValueError(f"strength (denoising strength) must be between 0 and 1, got {strength}.")
        self._check_mode(mode)
        seeds = seed if isinstance(seed, list) else _seeds(seed, batch_size)
        spec, sigmas = self._sigmas(sampler, scheduler, steps)
        if mode == "a1111":
            t_enc = int(min(strength, 0.999) * steps)
            sigmas = sigmas[steps - t_enc - 1:]  # the last t_enc + 1 steps
        else:
            n = min(int(steps * strength), steps)
            sigmas = sigmas[steps - n:]  # the last n steps
        sigmas = sigmas.to(self.device)

        cond, uncond = self._conditioning(prompt, negative_prompt, batch_size, clip_skip, mode)
        model = self._denoiser(cond, uncond, cfg_scale, image_cond)
        noise = _noise(seeds, x0.shape[1:]).to(self.device, x0.dtype)

        if len(sigmas) < 2:  # strength 0 in diffusers' counting: nothing to do
            x = x0
        else:
            if mode == "diffusers" and strength == 1 and latent_mask is not None:
                # diffusers' inpaint pipeline starts from pure noise at strength 1; its img2img pipeline
                # still noises the image (x0 + σ_max · noise: a trace of the image survives).
                x = initial_latents(noise, sigmas, vp=spec.vp_start)
            else:
                x = initial_latents(noise, sigmas, x0=x0)  # x = x0 + σ_start · noise
            step_callback = callback
            if latent_mask is not None and mode == "a1111":
                # A1111: outside the mask the model's clean-latent guess is replaced by the original's.
                inner = model
                model = lambda x, sigma, **kw: x0 + latent_mask * (inner(x, sigma, **kw) - x0)  # noqa: E731
            elif latent_mask is not None and image_cond is None:
                # diffusers: after each step the kept area is reset to the original noised to σ_next (clean at the end).
                def step_callback(d):
                    d["x"].copy_(latent_mask * d["x"] + (1 - latent_mask) * (x0 + noise * d["sigma_next"]))
                    if callback is not None:
                        callback(d)
            x = self._run(spec, model, x, sigmas, seeds, step_callback, progress)
            if latent_mask is not None and mode == "a1111":
                x = x0 + latent_mask * (x - x0)

        images = self.decode_latents(x)
        params = dict(steps=steps, sampler=spec.name, cfg_scale=cfg_scale, seeds=seeds, width=width, height=height,
                      clip_skip=clip_skip, denoising_strength=strength)
        return self._result(images, x, prompt, negative_prompt, params)

    def _conditioning(self, prompt, negative_prompt, batch_size, clip_skip, mode):
        """(cond, uncond), each (B, 77·chunks, D), padded to the same length with empty-prompt chunks.
        A prompt (or negative prompt) is one for the whole batch or a list of one per image."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        prompts, negatives = _as_list(prompt), _as_list(negative_prompt)
        contexts = [self._context(p, clip_skip, mode) for p in prompts + negatives]   # each (1, 77·chunks, D)
        if len({c.shape[1] for c in contexts}) > 1:
            contexts = pad_to_same_length(*contexts, empty=self.encode_prompt("", clip_skip, mode))
        cond, uncond = torch.cat(contexts[:len(prompts)]), torch.cat(contexts[len(prompts):])
        return cond.expand(batch_size, -1, -1), uncond.expand(batch_size, -1, -1)

    @contextmanager
    def _prompt_loras(self, prompt):
        """A1111's `<lora:name:0.8>` in the prompt: merge those LoRAs (found in self.lora_dirs) for this
        generation only; the base weights are restored exactly afterwards (sdlearn.lora.applied_loras)."""
        tagged = [p for p in _as_list(prompt) if isinstance(p, str) and "<lora:" in p]
        if not tagged:
            yield
            return
        from .lora import applied_loras, loras_from_prompt

        loras = [loras_from_prompt(p, self.lora_dirs)[1] if isinstance(p, str) else [] for p in _as_list(prompt)]
        if any(other != loras[0] for other in loras):
            raise ValueError("the prompts of one batch carry different <lora:...> tags; a LoRA changes the model's "
                             "weights for the whole batch, so generate prompts with different LoRAs in separate calls.")
        with applied_loras(self, loras[0]):
            yield

    def _context(self, prompt, clip_skip, mode):
        """A prompt's context (1, L, D); a tensor is taken as an already-computed context (prompt walks).
        LoRA tags are not words for CLIP: they are removed before encoding (as A1111 does)."""
        if torch.is_tensor(prompt):
            if prompt.ndim != 3 or prompt.shape[0] != 1:
                raise ValueError(f"a context given as the prompt must have shape (1, tokens, dim), got {tuple(prompt.shape)}.")
            return prompt.to(self.device, self.dtype)
        if prompt and "<lora:" in prompt:
            from .lora import extract_lora_tags

            prompt = extract_lora_tags(prompt)[0]
        return self.encode_prompt(prompt or "", clip_skip, mode)

    def _denoiser(self, cond, uncond, cfg_scale, image_cond=None):
        """The model the sampler calls: D(x, σ) from the U-Net with classifier-free guidance.

        The sampler's latents stay in float32 even when the models run in fp16/bf16 (as diffusers'
        schedulers and A1111 do): only the U-Net call is in the model's dtype, so the many small
        updates of a 20-step loop do not lose precision.
        """

        def eps_model(x_in, t):  # x_in (B, 4, h, w) float32, already scaled by 1/sqrt(σ²+1); t (B,)
            x_in = x_in.to(self.dtype)
            if image_cond is not None:
                x_in = torch.cat([x_in, image_cond], dim=1)  # (B, 9, h, w)
            if cfg_scale == 1:  # the unconditional pass would be multiplied by 0: skip it
                return self.unet(x_in, t, cond).float()
            eps_uncond, eps_cond = self.unet(torch.cat([x_in, x_in]), torch.cat([t, t]),
                                             torch.cat([uncond, cond])).float().chunk(2)  # one batch of 2B
            return cfg_combine(eps_uncond, eps_cond, cfg_scale)

        return Denoiser(eps_model, self.schedule)

    def _run(self, spec, model, x, sigmas, seeds, callback, progress):
        """Run the sampler with per-image noise and a progress bar."""
        kwargs = dict(spec.options)
        if spec.stochastic:
            kwargs["noise_sampler"] = _per_image_noise(spec, x, seeds)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(sigmas) - 1, desc=spec.name, leave=False)

        def on_step(d):
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback(d)

        try:
            with torch.no_grad():
                return spec.function(model, x, sigmas, callback=on_step, **kwargs)
        finally:
            if bar is not None:
                bar.close()

    def _hires_fix(self, x, cond, uncond, spec, steps, cfg_scale, seeds, scale, strength, hires_steps, upscaler,
                   callback, progress):
        if upscaler not in HIRES_UPSCALERS:
            raise ValueError(f"hires_upscaler must be one of {HIRES_UPSCALERS}, got {upscaler!r}.")
        if not 0 <= strength <= 1:
            raise ValueError(f"hires_strength must be between 0 and 1, got {strength}.")
        h, w = x.shape[-2:]
        H, W = int(h * self.vae_scale * scale) // 8 * 8, int(w * self.vae_scale * scale) // 8 * 8
        if upscaler.startswith("Latent"):
            # A1111's "Latent" upscaler: bilinear resize of the latent itself (no VAE round trip).
            x0 = F.interpolate(x, size=(H // self.vae_scale, W // self.vae_scale),
                               mode="nearest" if "nearest" in upscaler else "bilinear")
        else:
            big = [im.resize((W, H), Image.LANCZOS) for im in self.decode_latents(x)]
            x0 = self.encode_image(big)
        # A1111 runs exactly hires_steps steps: it builds a schedule of steps/strength and keeps its tail.
        n = hires_steps or steps
        total = int(n / min(strength, 0.999)) if strength > 0 else n
        sigmas = spec.sigmas(total, self.schedule)[total - n:].to(self.device)
        noise = _noise(seeds, x0.shape[1:]).to(self.device, x0.dtype)
        model = self._denoiser(cond, uncond, cfg_scale)
        x = self._run(spec, model, initial_latents(noise, sigmas, x0=x0), sigmas, seeds, callback, progress)
        return x, dict(width=W, height=H, hires=f"Hires upscale: {scale}, Hires steps: {hires_steps}, "
                                               f"Hires upscaler: {upscaler}, Denoising strength: {strength}")

    # ------------------------------------------------------------------ checks and bookkeeping

    def _size(self, width, height):
        width = self.default_size if width is None else width
        height = self.default_size if height is None else height
        for name, v in (("width", width), ("height", height)):
            if not isinstance(v, (int, np.integer)) or v <= 0 or v % 8:
                ok = max(8, int(v) // 8 * 8) if isinstance(v, (int, float)) and v > 0 else 8 * round(self.default_size / 8)
                raise ValueError(f"{name}={v!r}: image sides must be positive multiples of 8 (the VAE works in 8×8 "
                                 f"pixel blocks); try {ok}.")
        return int(width), int(height)

    def _sigmas(self, sampler, scheduler, steps):
        if not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be a whole number >= 1 (20 is A1111's default), got {steps!r}.")
        spec = get_sampler(sampler, scheduler)
        return spec, spec.sigmas(int(steps), self.schedule)

    @staticmethod
    def _check_mode(mode):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")

    def _result(self, images, latents, prompt, negative_prompt, params) -> GenerationResult:
        n = len(params["seeds"])
        prompts, negatives = ([p if isinstance(p, str) or p is None else "<context tensor>" for p in _as_list(q)]
                              for q in (prompt, negative_prompt))
        prompts, negatives = (q * n if len(q) == 1 else q for q in (prompts, negatives))
        infotexts = [infotext(p, neg, seed=s, model=self.model_name, **params)
                     for p, neg, s in zip(prompts, negatives, params["seeds"])]
        return GenerationResult(images, params["seeds"][0], list(params["seeds"]), infotexts, latents)


# ---------------------------------------------------------------------- seeds and noise


def _as_list(prompt) -> list:
    """A prompt for the whole batch as [prompt]; a list of one per image as it is."""
    return list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]


def _batch_size(prompt, negative_prompt, batch_size: int) -> int:
    """batch_size, or the number of prompts when a list of one per image is given."""
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1 (images per run), got {batch_size!r}.")
    lengths = {len(p) for p in (prompt, negative_prompt) if isinstance(p, (list, tuple))}
    if not lengths:
        return batch_size
    n = lengths.pop()
    if lengths or n == 0:
        raise ValueError("a list of prompts needs one prompt per image, and a list of negative prompts as many "
                         "as the prompts (or one negative prompt for all).")
    if batch_size not in (1, n):
        raise ValueError(f"{n} prompts make a batch of {n}; leave batch_size out (it was {batch_size}).")
    return n


def _seeds(seed, n):
    """A1111's rule: seed -1 (or None) picks a random seed; image i of a batch uses seed + i."""
    if seed is None or seed == -1:
        seed = random.randrange(2**32)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or -1 for random, got {seed!r}.")
    return [int(seed) + i for i in range(n)]


def _noise(seeds, shape) -> torch.Tensor:
    """(B, *shape) unit Gaussian noise, image i from a CPU generator seeded with seeds[i]."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])


def _per_image_noise(spec, x, seeds):
    """The fresh noise an ancestral/SDE sampler adds each step, continuing each image's own generator.

    A1111 does the same: each image's sampler noise comes from its own seed, so image 3 of a batch
    equals a single generation with seed + 3.
    """
    gens = [torch.Generator("cpu").manual_seed(s + 0x5EED) for s in seeds]
    if spec.function is sample_dpmpp_sde:  # needs one consistent Brownian motion per image
        paths = [BrownianNoise(x[i:i + 1].cpu(), g) for i, g in enumerate(gens)]
        return lambda s, sn: torch.cat([p(s, sn) for p in paths]).to(x)
    return lambda s, sn: torch.stack([torch.randn(tuple(x.shape[1:]), generator=g) for g in gens]).to(x)


# ---------------------------------------------------------------------- images


def images_to_tensor(images) -> torch.Tensor:
    """PIL image(s) -> (B, 3, H, W) in [-1, 1], the VAE's input range."""
    if isinstance(images, Image.Image):
        images = [images]
    arrays = [np.asarray(_as_rgb(im, "image"), dtype=np.float32) / 127.5 - 1 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def tensor_to_images(x: torch.Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in x]


def _as_rgb(image, what) -> Image.Image:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"{what} must be a PIL image or a numpy array, got {type(image).__name__}.")
    return image.convert("RGB")


def _as_mask(mask, image, invert) -> Image.Image:
    if isinstance(mask, np.ndarray):
        mask = Image.fromarray((mask > 0).astype(np.uint8) * 255 if mask.dtype == bool else mask)
    if not isinstance(mask, Image.Image):
        raise TypeError(f"mask must be a PIL image or a numpy array, got {type(mask).__name__}.")
    if mask.size != image.size:
        raise ValueError(f"the mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}; "
                         "draw the mask on the same canvas as the image (white = repaint).")
    mask = mask.convert("L")
    return ImageOps.invert(mask) if invert else mask


def _resize(image, width, height):
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": paint the masked area with the surrounding colours, smeared inward.

    Normalised blurs from coarse to fine: each pass replaces masked pixels by the average of the
    visible pixels around them, so the U-Net starts from plausible colours rather than what was there.
    """
    from scipy.ndimage import gaussian_filter

    img = np.asarray(image, np.float32)  # (H, W, 3)
    keep = 1 - np.asarray(mask, np.float32)[..., None] / 255  # (H, W, 1), 1 = original visible
    out = img * keep
    for sigma in (64, 16, 4, 1):
        num = gaussian_filter(img * keep, (sigma, sigma, 0), truncate=2.0)  # blurred visible colours
        den = gaussian_filter(keep, (sigma, sigma, 0), truncate=2.0)  # how much visible pixel went into each
        smeared = np.where(den > 1e-3, num / np.maximum(den, 1e-6), out)
        out = smeared * (1 - keep) + img * keep
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def _crop_region(mask: Image.Image, padding: int):
    """The mask's bounding box grown by `padding` pixels, inside the image (A1111's "Only masked")."""
    x1, y1, x2, y2 = mask.getbbox()
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def _expand_to_aspect(crop, width, height, image_size):
    """Grow a crop box so its aspect ratio matches width:height (no distortion when resized)."""
    x1, y1, x2, y2 = crop
    W, H = image_size
    cw, ch = x2 - x1, y2 - y1
    if cw / ch < width / height:
        grow = int(ch * width / height) - cw
        x1, x2 = x1 - grow // 2, x2 + grow - grow // 2
        if x1 < 0:
            x2, x1 = x2 - x1, 0
        if x2 > W:
            x1, x2 = max(x1 - (x2 - W), 0), W
    else:
        grow = int(cw * height / width) - ch
        y1, y2 = y1 - grow // 2, y2 + grow - grow // 2
        if y1 < 0:
            y2, y1 = y2 - y1, 0
        if y2 > H:
            y1, y2 = max(y1 - (y2 - H), 0), H
    return x1, y1, x2, y2


def _paste_back(original, generated, overlay_mask, crop):
    """Put the generated pixels into the original where the mask allows; keep every other pixel exactly."""
    base = original.copy()
    if crop is not None:
        x1, y1, x2, y2 = crop
        base.paste(generated.resize((x2 - x1, y2 - y1), Image.LANCZOS), (x1, y1))
    else:
        base = generated.resize(original.size, Image.LANCZOS)
    return Image.composite(base, original, overlay_mask)


# ---------------------------------------------------------------------- parameters text and PNGs


def infotext(prompt, negative_prompt, steps, sampler, cfg_scale, seed, width, height, clip_skip=1, model="",
             denoising_strength=None, hires=None, seeds=None) -> str:
    """A1111's "parameters" text: prompt, negative prompt, then 'Key: value' pairs."""
    from . import __version__

    pairs = [("Steps", steps), ("Sampler", sampler), ("CFG scale", cfg_scale), ("Seed", seed),
             ("Size", f"{width}x{height}")]
    if model:
        pairs.append(("Model", str(model).replace(",", " ")))
    if denoising_strength is not None:
        pairs.append(("Denoising strength", denoising_strength))
    if clip_skip != 1:
        pairs.append(("Clip skip", clip_skip))
    text = prompt or ""
    if negative_prompt:
        text += f"\nNegative prompt: {negative_prompt}"
    line = ", ".join(f"{k}: {v}" for k, v in pairs)
    if hires:
        line += ", " + hires
    return f"{text}\n{line}, Version: sdlearn {__version__}"


def parse_infotext(text: str) -> dict:
    """Read A1111's parameters text back: {"Prompt", "Negative prompt", "Steps", "Sampler", ...} as strings."""
    lines = text.strip().split("\n")
    params = dict(pair.split(": ", 1) for pair in lines[-1].split(", ") if ": " in pair)
    prompt_lines, negative = [], []
    for line in lines[:-1]:
        if line.startswith("Negative prompt: ") or negative:
            negative.append(line.removeprefix("Negative prompt: "))
        else:
            prompt_lines.append(line)
    return {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative), **params}


def save_png(image: Image.Image, path, info: str = "", overwrite: bool = False):
    """Save a PNG with A1111's "parameters" text chunk (read by A1111's PNG Info and prompt readers)."""
    from pathlib import Path

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; sdlearn never overwrites a file. Pick another name or pass overwrite=True.")
    meta = PngImagePlugin.PngInfo()
    if info:
        meta.add_text("parameters", info)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=meta)
    return path


def _next_free(directory, prefix, seed):
    """A1111's file names: 00000-<seed>.png, numbering on from the files already there."""
    from pathlib import Path

    directory = Path(directory)
    taken = [int(p.name[:5]) for p in directory.glob("*.png") if p.name[:5].isdigit()] if directory.exists() else []
    return directory / f"{prefix}{(max(taken) + 1) if taken else 0:05d}-{seed}.png"
