"""Explorers for the notebooks: drag a slider, watch the model work.

Each function takes a Pipeline (TinySD in the notebooks, SD1.5 on a GPU) and returns an ipywidgets
box to display. The box keeps its controls and image widgets as attributes (`explorer.slider`,
`panel.generate`, ...), so a notebook — or a test, without a browser — can drive it:
setting `explorer.slider.value = 5` redraws the images exactly as dragging the slider does.
Images are `ipywidgets.Image` holding PNG bytes, enlarged with nearest neighbour so a 64×64 TinySD
image shows its real pixels.

    denoising_explorer        scrub through the sampling steps: noisy latent, predicted noise, predicted image
    forward_noising_slider    an image noised to any training timestep t, with ᾱ_t and the signal-to-noise ratio
    generation_panel          a small WebUI: prompt, negative prompt, steps, CFG, sampler, seed, denoising strength
    cross_attention_explorer  where each prompt token is looked at (the U-Net's cross-attention maps, attn2)
    latent_channel_viewer     the 4 latent channels of an image or of each generation step

How the cross-attention maps are captured: every U-Net transformer block has `attn2`, attention
from the latent pixels (queries) to the prompt's tokens (keys). `capture_cross_attention` puts a
forward *pre*-hook on each attn2 that recomputes softmax(Q Kᵀ / sqrt(d)) from the module's own
to_q/to_k on the inputs it is about to see, and adds it to a running average. The hook returns
nothing, so the U-Net's computation is untouched, and it is removed when the `with` block ends.
"""

import io
import math
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

try:
    import ipywidgets as widgets
except ImportError as e:  # the widgets belong to the "course" extra
    raise ImportError("sdlearn.widgets needs ipywidgets: pip install 'sdlearn[course]' (or pip install ipywidgets).") from e
from PIL import Image

from .guidance import chunk_prompt
from .samplers import SAMPLER_NAMES, get_sampler, initial_latents
from .schedule import add_noise
from .viz import heatmap_overlay, latent_channels, latent_preview, latent_stats, to_png, upscale

DISPLAY_SIZE = 256  # pixels on screen for the longer side of each image


def _png(image: Image.Image, size: int) -> bytes:
    return to_png(upscale(image, size))


def _image_widget(size: int) -> widgets.Image:
    return widgets.Image(format="png", width=size, height=size)


def _check_prompt(prompt, what="prompt"):
    if not isinstance(prompt, str):
        raise TypeError(f"{what} must be a string, got {type(prompt).__name__}.")


def _check_steps(steps):
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a whole number >= 1 (A1111's default is 20), got {steps!r}.")


def _initial_noise(pipe, seed, width, height) -> torch.Tensor:
    """(1, 4, h, w) unit noise drawn the way the pipeline draws it: torch.randn from a CPU generator seeded with seed."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative whole number (the explorers need a fixed seed), got {seed!r}.")
    shape = (4, height // pipe.vae_scale, width // pipe.vae_scale)
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))[None]


# ---------------------------------------------------------------------------------------------
# 1. Denoising explorer
# ---------------------------------------------------------------------------------------------


def denoising_explorer(pipe, prompt, negative_prompt="", steps=20, sampler="Euler a", seed=0, cfg_scale=7.0,
                       display_size=DISPLAY_SIZE):
    """Run one txt2img generation and scrub through its steps.

    At step k the sampler holds x_k = x_0 + σ_k·ε (the sigma view, schedule.py). It asks the U-Net
    (with CFG) for its guess of the clean latent D(x_k, σ_k); the noise it believes is in x_k is then
    ε̂ = (x_k − D)/σ_k, and D decoded by the VAE is the picture it is aiming at. The three panels:
      * noisy latent: x_k / sqrt(σ_k² + 1), the unit-variance x_t the U-Net is fed, as a linear preview;
      * predicted noise ε̂ (linear preview);
      * predicted clean image: D(x_k, σ_k) through the VAE decoder (A1111's "Full" live preview).
    Attributes: slider, play, noisy_image, noise_image, clean_image, text, sigmas (n+1,),
    latents (n+1, 4, h, w) (x_0 … x_n, the last one the result), denoised (n, 4, h, w), result.
    """
    _check_prompt(prompt)
    _check_steps(steps)
    spec = get_sampler(sampler)
    size = pipe.default_size
    noise = _initial_noise(pipe, seed, size, size)
    sigmas = spec.sigmas(steps, pipe.schedule)
    n = len(sigmas) - 1

    # x_k is the latent *entering* step k: the start, then whatever each step's callback reports.
    xs = [initial_latents(noise, sigmas, vp=spec.vp_start)]
    denoised = []

    def record(d):
        xs.append(d["x"].detach().float().cpu().clone())
        denoised.append(d["denoised"].detach().float().cpu().clone())

    result = pipe.txt2img(prompt, negative_prompt=negative_prompt, steps=steps, cfg_scale=cfg_scale, sampler=sampler,
                          seed=seed, width=size, height=size, latents=noise, callback=record, progress=False)
    latents = torch.cat(xs)  # (n+1, 4, h, w)
    denoised = torch.cat(denoised)  # (n, 4, h, w)

    slider = widgets.IntSlider(value=0, min=0, max=n - 1, description="step", continuous_update=True)
    play = widgets.Play(value=0, min=0, max=n - 1, interval=300, description="play")
    widgets.link((play, "value"), (slider, "value"))  # a Python-side link: also works without a browser
    noisy_image, noise_image, clean_image = (_image_widget(display_size) for _ in range(3))
    text = widgets.HTML()
    frames = {}  # step -> (noisy png, noise png, clean png), computed once when first shown

    def frame(k):
        if k not in frames:
            s = sigmas[k].item()
            x = latents[k]
            eps = (x - denoised[k]) / s  # ε̂ = (x − D(x, σ)) / σ
            frames[k] = (_png(latent_preview(pipe, x / math.sqrt(s**2 + 1)), display_size),
                         _png(latent_preview(pipe, eps), display_size),
                         _png(pipe.decode_latents(denoised[k:k + 1])[0], display_size))
        return frames[k]

    def show(change=None):
        k = slider.value
        noisy_image.value, noise_image.value, clean_image.value = frame(k)
        s, s_next = sigmas[k].item(), sigmas[k + 1].item()
        text.value = (f"<b>step {k + 1} of {n}</b> ({spec.name}) · σ = {s:.3f} → {s_next:.3f} · "
                      f"noise share of x_t: sqrt(1−ᾱ) = {s / math.sqrt(s**2 + 1):.3f}")

    slider.observe(show, names="value")
    show()
    titles = widgets.HBox([widgets.Label(t, layout=widgets.Layout(width=f"{display_size}px"))
                           for t in ("noisy latent x_t (preview)", "predicted noise ε̂ (preview)",
                                     "predicted clean image (VAE decode)")])
    box = widgets.VBox([widgets.HBox([play, slider]), text, titles,
                        widgets.HBox([noisy_image, noise_image, clean_image])])
    box.slider, box.play, box.text = slider, play, text
    box.noisy_image, box.noise_image, box.clean_image = noisy_image, noise_image, clean_image
    box.sigmas, box.latents, box.denoised, box.result = sigmas, latents, denoised, result
    return box


# ---------------------------------------------------------------------------------------------
# 2. Forward noising
# ---------------------------------------------------------------------------------------------


def forward_noising_slider(pipe, image, t=500, seed=0, display_size=DISPLAY_SIZE):
    """An image encoded to a latent x_0, noised to training timestep t, and decoded again.

    x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε (schedule.add_noise). The text shows both weights, the
    signal-to-noise ratio SNR = ᾱ_t/(1 − ᾱ_t) and σ_t = 1/sqrt(SNR), the number samplers walk down.
    Note what does *not* happen: x_t has as many numbers as x_0 at every t (noise is added, nothing
    is removed), and sqrt(ᾱ_t) never reaches 0 — at t = 999 the image is still there at ~7 % strength.
    Attributes: t_slider, seed, clean_image, noisy_image (x_t decoded), preview_image (x_t's linear
    preview), text, x0 (1, 4, h, w).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, got {type(image).__name__}; load one with PIL.Image.open(path).")
    T = pipe.schedule.num_train_timesteps
    if not isinstance(t, int) or not 0 <= t < T:
        raise ValueError(f"t must be a whole timestep in 0..{T - 1}, got {t!r}.")
    size = pipe.default_size
    image = image.convert("RGB").resize((size, size), Image.LANCZOS) if image.size != (size, size) else image.convert("RGB")
    x0 = pipe.encode_image(image).float().cpu()  # (1, 4, h, w), U-Net scale

    t_slider = widgets.IntSlider(value=t, min=0, max=T - 1, description="timestep t")
    seed_box = widgets.BoundedIntText(value=seed, min=0, max=2**32 - 1, description="seed")
    clean_image, noisy_image, preview_image = (_image_widget(display_size) for _ in range(3))
    clean_image.value = _png(pipe.decode_latents(x0)[0], display_size)
    text = widgets.HTML()

    def show(change=None):
        tk = t_slider.value
        noise = torch.randn(x0.shape[1:], generator=torch.Generator("cpu").manual_seed(seed_box.value))[None]
        x_t = add_noise(x0, noise, tk, pipe.schedule)
        noisy_image.value = _png(pipe.decode_latents(x_t)[0], display_size)
        preview_image.value = _png(latent_preview(pipe, x_t), display_size)
        a = pipe.schedule.alphas_cumprod[tk].item()  # ᾱ_t
        text.value = (f"t = {tk}: ᾱ = {a:.4f} · signal weight sqrt(ᾱ) = {math.sqrt(a):.4f} · noise weight "
                      f"sqrt(1−ᾱ) = {math.sqrt(1 - a):.4f} · SNR = ᾱ/(1−ᾱ) = {a / (1 - a):.4g} · "
                      f"σ = {math.sqrt((1 - a) / a):.3f}")

    t_slider.observe(show, names="value")
    seed_box.observe(show, names="value")
    show()
    titles = widgets.HBox([widgets.Label(s, layout=widgets.Layout(width=f"{display_size}px"))
                           for s in ("x_0 decoded (VAE round trip)", "x_t decoded", "x_t (linear preview)")])
    box = widgets.VBox([widgets.HBox([t_slider, seed_box]), text, titles,
                        widgets.HBox([clean_image, noisy_image, preview_image])])
    box.t_slider, box.seed, box.text, box.x0 = t_slider, seed_box, text, x0
    box.clean_image, box.noisy_image, box.preview_image = clean_image, noisy_image, preview_image
    return box


# ---------------------------------------------------------------------------------------------
# 3. Generation panel: a small WebUI
# ---------------------------------------------------------------------------------------------


def generation_panel(pipe, prompt="", negative_prompt="", steps=20, cfg_scale=7.0, sampler="Euler a", seed=-1,
                     init_image=None, strength=0.75, display_size=DISPLAY_SIZE):
    """A1111's txt2img / img2img tab in a notebook, on `pipe` at its native size.

    Controls carry the WebUI's names: Prompt, Negative prompt, Sampling steps, CFG Scale, Sampling
    method, Seed (-1 = random; 🎲 sets -1, ♻️ reuses the last seed) and, for img2img, an init image
    (upload, or `init_image=`) with Denoising strength. The parameters text below the image is what
    A1111 writes into its PNGs. Bad values are reported in `status` instead of raising, as the WebUI does.
    Attributes: prompt, negative_prompt, steps, cfg_scale, sampler, seed, random_seed, reuse_seed,
    use_init, upload, strength, generate, image, info, status, init_image, result.
    """
    _check_prompt(prompt)
    _check_prompt(negative_prompt, "negative_prompt")
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"sampler must be one of A1111's names {SAMPLER_NAMES}, got {sampler!r}.")
    if init_image is not None and not isinstance(init_image, Image.Image):
        raise TypeError(f"init_image must be a PIL image or None, got {type(init_image).__name__}.")

    prompt_box = widgets.Textarea(value=prompt, description="Prompt", layout=widgets.Layout(width="100%"))
    negative_box = widgets.Textarea(value=negative_prompt, description="Negative", layout=widgets.Layout(width="100%"))
    steps_slider = widgets.IntSlider(value=steps, min=1, max=150, description="Steps")
    cfg_slider = widgets.FloatSlider(value=cfg_scale, min=1.0, max=30.0, step=0.5, description="CFG Scale")
    sampler_menu = widgets.Dropdown(options=SAMPLER_NAMES, value=sampler, description="Sampler")
    seed_box = widgets.IntText(value=seed, description="Seed")
    random_seed = widgets.Button(description="🎲", tooltip="random seed (-1)", layout=widgets.Layout(width="3em"))
    reuse_seed = widgets.Button(description="♻️", tooltip="reuse the last seed", layout=widgets.Layout(width="3em"))
    use_init = widgets.Checkbox(value=init_image is not None, description="img2img from the init image")
    upload = widgets.FileUpload(accept="image/*", multiple=False, description="init image")
    strength_slider = widgets.FloatSlider(value=strength, min=0.0, max=1.0, step=0.01, description="Denoising")
    generate = widgets.Button(description="Generate", button_style="primary")
    image = _image_widget(display_size)
    init_preview = _image_widget(display_size // 2)
    info = widgets.Textarea(value="", disabled=True, layout=widgets.Layout(width="100%", height="5em"))
    status = widgets.Label()

    box = widgets.VBox()
    box.init_image = None
    box.result = None

    def set_init(img):
        box.init_image = img.convert("RGB")
        init_preview.value = _png(box.init_image, display_size // 2)
        use_init.value = True

    def on_upload(change):
        files = upload.value  # ipywidgets 8: a tuple of {"name", "type", "size", "content", ...}
        if files:
            set_init(Image.open(io.BytesIO(bytes(files[0]["content"]))))

    def on_generate(button=None):
        size = pipe.default_size
        common = dict(negative_prompt=negative_box.value, steps=steps_slider.value, cfg_scale=cfg_slider.value,
                      sampler=sampler_menu.value, seed=seed_box.value, width=size, height=size, progress=False)
        start = time.perf_counter()
        try:
            if use_init.value:
                if box.init_image is None:
                    raise ValueError("img2img is ticked but there is no init image: upload one or untick it.")
                out = pipe.img2img(box.init_image, prompt_box.value, strength=strength_slider.value, **common)
            else:
                out = pipe.txt2img(prompt_box.value, **common)
        except (ValueError, TypeError) as err:
            status.value = f"⚠ {err}"
            return
        box.result = out
        image.value = _png(out.images[0], display_size)
        info.value = out.info
        status.value = f"done in {time.perf_counter() - start:.2f} s · seed {out.seed}"

    def on_random(button=None):
        seed_box.value = -1

    def on_reuse(button=None):
        if box.result is not None:
            seed_box.value = box.result.seed

    upload.observe(on_upload, names="value")
    generate.on_click(on_generate)
    random_seed.on_click(on_random)
    reuse_seed.on_click(on_reuse)
    if init_image is not None:
        set_init(init_image)

    box.children = [
        prompt_box, negative_box,
        widgets.HBox([widgets.VBox([sampler_menu, steps_slider, cfg_slider,
                                    widgets.HBox([seed_box, random_seed, reuse_seed]),
                                    widgets.HBox([use_init, upload]), strength_slider, init_preview]),
                      widgets.VBox([generate, image, status])]),
        info,
    ]
    box.prompt, box.negative_prompt, box.steps, box.cfg_scale = prompt_box, negative_box, steps_slider, cfg_slider
    box.sampler, box.seed, box.random_seed, box.reuse_seed = sampler_menu, seed_box, random_seed, reuse_seed
    box.use_init, box.upload, box.strength, box.generate = use_init, upload, strength_slider, generate
    box.image, box.info, box.status = image, info, status
    return box


# ---------------------------------------------------------------------------------------------
# 4. Cross-attention: which latent pixels look at which prompt token
# ---------------------------------------------------------------------------------------------


class CrossAttentionMaps:
    """Running average of the U-Net's cross-attention probabilities, at the latent's resolution.

    Each attn2 call gives P = softmax(Q Kᵀ / sqrt(d)), (B, heads, T, S): for each of the T latent
    pixels of that layer, a distribution over the S context tokens. We keep the batch rows whose
    context starts with `context` (the prompt's, not the negative prompt's), average over them and
    the heads, resize the layer's (h', w') grid to the latent's (h, w) bilinearly and add it up.
    `maps()` divides by the number of calls: (S, h, w), and at every pixel the S values still sum
    to 1 (softmax rows sum to 1; averages and bilinear weights are convex combinations).
    """

    def __init__(self, latent_size, context=None):
        self.latent_size = tuple(latent_size)  # (h, w)
        self.context = context  # (1, L, D) or None: keep every batch row
        self.total = None  # (S, h, w) sum over calls
        self.calls = 0

    def _grid(self, T):
        """The layer's (h', w') for T pixel tokens: the latent's size divided by the layer's downsampling."""
        h, w = self.latent_size
        for level in range(8):
            f = 2**level
            gh, gw = -(-h // f), -(-w // f)  # stride-2 convs with padding 1 round up
            if gh * gw == T:
                return gh, gw
        raise ValueError(f"cannot place {T} attention tokens on a grid for a {h}x{w} latent; "
                         "is latent_size the size of the latent being generated?")

    @torch.no_grad()
    def hook(self, module, args, kwargs):
        x = args[0]  # (B, T, C) normalised pixel tokens
        context = args[1] if len(args) > 1 else kwargs.get("context")  # (B, S, D)
        if context is None:
            return  # a self-attention call: nothing to record
        B, T, C = x.shape
        d = C // module.heads
        q = module.to_q(x).view(B, T, module.heads, d).transpose(1, 2).float()  # (B, heads, T, d)
        k = module.to_k(context).view(B, -1, module.heads, d).transpose(1, 2).float()  # (B, heads, S, d)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (B, heads, T, S)
        if self.context is not None:
            L = self.context.shape[1]
            keep = [b for b in range(B) if context.shape[1] >= L
                    and torch.equal(context[b, :L], self.context[0].to(context))]
            if not keep:
                return  # only the negative prompt's rows in this call (e.g. a separate uncond pass)
            probs = probs[keep]
        p = probs.mean(dim=(0, 1))  # (T, S): averaged over the kept rows and the heads
        gh, gw = self._grid(T)
        p = p.T.reshape(1, -1, gh, gw)  # (1, S, h', w')
        if (gh, gw) != self.latent_size:
            p = F.interpolate(p, size=self.latent_size, mode="bilinear")
        p = p[0].cpu()  # (S, h, w)
        self.total = p if self.total is None else self.total + p
        self.calls += 1

    def maps(self) -> torch.Tensor:
        """(S, h, w): the average attention each latent pixel paid to each context token."""
        if self.calls == 0:
            raise RuntimeError("no cross-attention call was recorded: run the U-Net with this prompt's context "
                               "inside the `with capture_cross_attention(...)` block.")
        return self.total / self.calls


@contextmanager
def capture_cross_attention(unet, latent_size, context=None):
    """`with capture_cross_attention(pipe.unet, (h, w), cond) as rec:` … `rec.maps()` -> (S, h, w).

    Pre-hooks on every `attn2` module; they read the inputs and change nothing, and are removed on exit
    (even after an error), leaving the U-Net exactly as it was.
    """
    recorder = CrossAttentionMaps(latent_size, context)
    modules = [m for name, m in unet.named_modules() if name.endswith("attn2")]
    if not modules:
        raise ValueError("this model has no cross-attention (attn2) modules to capture; pass an sdlearn U-Net.")
    handles = [m.register_forward_pre_hook(recorder.hook, with_kwargs=True) for m in modules]
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


def prompt_tokens(tokenizer, prompt) -> list:
    """[(label, position in the context)] for the start token, each prompt token and the first end token of
    each 77-token chunk, laid out as A1111 encodes the prompt (guidance.chunk_prompt; emphasis brackets removed)."""
    chunks, _ = chunk_prompt(tokenizer, prompt)
    out = []
    for c, chunk in enumerate(chunks):
        base = c * len(chunk)
        for j, token in enumerate(chunk):
            if token == tokenizer.bos_token_id:
                word = "<start>"
            elif token == tokenizer.eos_token_id:
                word = "<end>"
            else:
                word = tokenizer.decode([token])
            out.append((f"{base + j}: {word}", base + j))
            if token == tokenizer.eos_token_id:
                break  # the rest of the chunk is padding
    return out


def cross_attention_explorer(pipe, prompt, negative_prompt="", steps=20, sampler="Euler a", seed=0, cfg_scale=7.0,
                             display_size=DISPLAY_SIZE):
    """Generate from `prompt` while recording the U-Net's cross-attention, then show per token where it landed.

    The maps are averaged over heads, all attn2 layers (each resized to the latent grid) and all
    steps; the heat map stretches each token's map between its own min and max (where it looks
    more), and the text gives its absolute share of attention (mean over pixels; all tokens' shares
    sum to 1). Expect the
    <start> token to take most of it, as in SD1.5 — a known "attention sink".
    Attributes: token (Dropdown of (label, position)), image, generated_image, text, maps (S, h, w),
    tokens, result.
    """
    _check_prompt(prompt)
    _check_steps(steps)
    if not prompt.strip():
        raise ValueError("give a prompt: with an empty prompt there are no tokens to look at.")
    get_sampler(sampler)  # fails early, with suggestions, for an unknown sampler
    size = pipe.default_size
    h = w = size // pipe.vae_scale
    cond = pipe.encode_prompt(prompt)  # (1, 77·chunks, D), what txt2img computes for the prompt
    with capture_cross_attention(pipe.unet, (h, w), cond) as recorder:
        result = pipe.txt2img(prompt, negative_prompt=negative_prompt, steps=steps, cfg_scale=cfg_scale,
                              sampler=sampler, seed=seed, width=size, height=size, progress=False)
    maps = recorder.maps()  # (S, h, w)
    tokens = prompt_tokens(pipe.tokenizer, prompt)
    generated = upscale(result.images[0], display_size)

    words = [pos for label, pos in tokens if not label.endswith(("<start>", "<end>"))]
    token_menu = widgets.Dropdown(options=tokens, value=words[0] if words else tokens[0][1], description="token")
    image, generated_image = _image_widget(display_size), _image_widget(display_size)
    generated_image.value = to_png(generated)
    text = widgets.HTML()

    def show(change=None):
        pos = token_menu.value
        image.value = to_png(heatmap_overlay(generated, maps[pos]))
        text.value = (f"token {token_menu.label!r}: {maps[pos].mean().item():.1%} of all cross-attention "
                      f"(peak {maps[pos].max().item():.1%} at one latent pixel), averaged over "
                      f"{recorder.calls} attn2 calls")

    token_menu.observe(show, names="value")
    show()
    box = widgets.VBox([token_menu, text, widgets.HBox([generated_image, image])])
    box.token, box.image, box.generated_image, box.text = token_menu, image, generated_image, text
    box.maps, box.tokens, box.result = maps, tokens, result
    return box


# ---------------------------------------------------------------------------------------------
# 5. Latent channels
# ---------------------------------------------------------------------------------------------


def latent_channel_viewer(pipe=None, image=None, latents=None, display_size=DISPLAY_SIZE // 2):
    """The 4 channels of a latent as grayscale images, each with its mean and std.

    Give `image` (a PIL image, encoded with `pipe`'s VAE) or `latents`: one latent (4, h, w) /
    (1, 4, h, w), or a stack (N, 4, h, w) — e.g. `denoising_explorer(...).latents` — which adds a
    step slider. Each channel is stretched to its own min..max, so compare magnitudes by the numbers.
    Attributes: step (IntSlider, disabled for a single latent), channel_images (4), labels (4), latents.
    """
    if (image is None) == (latents is None):
        raise ValueError("give exactly one of image= (with pipe=) or latents=.")
    if image is not None:
        if pipe is None:
            raise ValueError("an image must be encoded by a VAE: pass pipe= as well.")
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL image, got {type(image).__name__}.")
        latents = pipe.encode_image(image)
    if not torch.is_tensor(latents):
        raise TypeError(f"latents must be a tensor, got {type(latents).__name__}.")
    latents = latents.detach().float().cpu()
    if latents.ndim == 3:
        latents = latents[None]
    if latents.ndim != 4 or latents.shape[0] < 1:
        raise ValueError(f"latents must be (4, h, w) or (N, 4, h, w), got {tuple(latents.shape)}.")
    n, c = latents.shape[:2]

    step = widgets.IntSlider(value=0, min=0, max=max(n - 1, 0), description="step", disabled=n == 1)
    channel_images = [_image_widget(display_size) for _ in range(c)]
    labels = [widgets.Label() for _ in range(c)]

    def show(change=None):
        z = latents[step.value]
        for k, (im, (mean, std)) in enumerate(zip(latent_channels(z), latent_stats(z))):
            channel_images[k].value = _png(im, display_size)
            labels[k].value = f"channel {k}: mean {mean:+.3f}, std {std:.3f}"

    step.observe(show, names="value")
    show()
    box = widgets.VBox([step, widgets.HBox([widgets.VBox([im, lab]) for im, lab in zip(channel_images, labels)])])
    box.step, box.channel_images, box.labels, box.latents = step, channel_images, labels, latents
    return box
