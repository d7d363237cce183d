"""Samplers: the loop that turns noise into a latent, one short function per WebUI "Sampling method".

Every sampler here has k-diffusion's shape (Karras et al. 2022; Katherine Crowson's k-diffusion, which
A1111 and ComfyUI run):

    x = sample_xxx(model, x, sigmas, extra_args=None, callback=None, ...)

* `sigmas` (n+1,) runs from high to low (usually ending in 0); the sampler takes one step per pair.
* `x` is the latent in the *sigma view* x = x_0 + σ·ε (schedule.py): pure noise for txt2img is
  noise·σ_0, img2img starts at x_0 + noise·σ_k with `sigmas[k:]` (`initial_latents`).
* `model(x, sigma, **extra_args)` is a *denoiser*: it returns D(x, σ), its guess of the clean latent x_0.
  `Denoiser` builds one from SD's ε-predicting U-Net: D(x, σ) = x − σ·ε̂(x/sqrt(σ²+1), t(σ)).
* After each step `callback({"i", "x", "sigma", "sigma_next", "denoised"})` sees the new x (now at
  sigma_next) and the clean-latent guess `denoised` made at sigma — what the step-scrubbing widgets draw.
* Ancestral and SDE samplers draw fresh noise from `noise_sampler(sigma, sigma_next)` (or, if none is given,
  from `torch.randn(..., generator=generator)`), so a test can feed the same noise to diffusers.

Why the sigma view: the probability-flow ODE of Song et al. (2021) becomes dx/dσ = (x − D(x, σ)) / σ
(Karras et al. 2022, eqs. 1 and 3 with σ(t) = t), so "a sampler" is just an ODE/SDE solver walking σ down to 0.
DDIM (η=0) is exactly Euler's method on it; DDPM and DDIM with η=1 are exactly "Euler a". The tests prove
these identities numerically.

Names: A1111's labels ("Euler a", "DPM++ 2M Karras", "DDIM", ...) and ComfyUI's (`euler_ancestral`,
`dpmpp_2m` with scheduler "karras", ...) both resolve through `get_sampler`; `DIFFUSERS_EQUIVALENT` says
which diffusers scheduler does the same thing.

Where A1111, ComfyUI and diffusers differ (each difference is noted next to the sampler it affects):
* Default schedule: A1111 ≥ 1.9 gives DPM++ 2M / 2S a / SDE / DPM2 the Karras schedule and DPM++ 2M SDE
  the exponential one when "Schedule type" is Automatic; Euler, Euler a, Heun, LMS get "normal".
  diffusers' Euler-family uses the same timesteps as "normal" but interpolates σ linearly in t (not log-
  linearly); DPM-Solver/UniPC pick steps+1 linspace timesteps and drop t=0.
* Start: k-diffusion multiplies the noise by σ_max; diffusers' DDIM, DDPM, PNDM, DPM-Solver and UniPC
  (and ComfyUI at full denoise) start from unit-variance x_T, i.e. noise·sqrt(σ_max² + 1) here (`vp=True`).
* End: SD1.5's config has set_alpha_to_one=False, so diffusers' DDIM/PNDM (and A1111's DDIM/PLMS) stop at
  ᾱ_0 (σ ≈ 0.029) and decode that slightly noisy latent; sdlearn's "DDIM"/"PLMS" go on to σ = 0
  (ComfyUI's ddim_uniform), which diffusers reproduces with set_alpha_to_one=True.
"""

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .schedule import SD15, NoiseSchedule, get_sigmas, sigma_to_t


# ---------------------------------------------------------------------------------------------
# 1. From the U-Net (predicts ε at timestep t) to a denoiser D(x, σ)
# ---------------------------------------------------------------------------------------------


class Denoiser:
    """Wrap an ε-prediction network eps_model(x_in, t, **extra) -> ε̂ as D(x, σ), k-diffusion's CompVisDenoiser.

    x = x_0 + σ·ε is x_t / sqrt(ᾱ_t), so the network's input is x_t = x · c_in with c_in = 1/sqrt(σ² + 1),
    its timestep is the t whose σ_t = σ, and then x̂_0 = x − σ·ε̂.
    quantize=True rounds t to a whole timestep (k-diffusion's quantize option; diffusers' DPM-Solver, UniPC and
    KDPM2 do this with Karras sigmas). A1111's setting "Enable quantization in K samplers" controls the same thing.
    """

    def __init__(self, eps_model: Callable, schedule: NoiseSchedule = SD15, quantize: bool = False):
        self.eps_model = eps_model
        self.schedule = schedule
        self.quantize = quantize

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).float().reshape(-1)  # (B,) or (1,)
        t = sigma_to_t(sigma, self.schedule, quantize=self.quantize)  # (B,) float32, even for an fp16 x
        s = sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
        c_in = 1 / (s**2 + 1) ** 0.5
        eps = self.eps_model(x * c_in, t, **extra)  # (B, 4, h, w)
        return x - s * eps


def initial_latents(noise: torch.Tensor, sigmas: torch.Tensor, x0: torch.Tensor = None, vp: bool = False):
    """Where sampling starts, in the sigma view.

    txt2img (x0 None): x = noise · σ_0 (k-diffusion, A1111), or noise · sqrt(σ_0² + 1) with vp=True (diffusers'
    DDIM/DDPM/PNDM/DPM-Solver/UniPC, whose x_T = noise is unit-variance; ComfyUI at full denoise).
    img2img (x0 given, the encoded image's latent): x = x0 + noise · σ_0, where sigmas = the tail of the full
    schedule the strength selects. Both conventions agree here: it is eq. (1) of schedule.py divided by sqrt(ᾱ).
    """
    sigma0 = torch.as_tensor(sigmas)[0].to(device=noise.device, dtype=noise.dtype)
    if x0 is not None:
        return x0 + noise * sigma0
    return noise * ((sigma0**2 + 1) ** 0.5 if vp else sigma0)


# ---------------------------------------------------------------------------------------------
# 2. Shared pieces
# ---------------------------------------------------------------------------------------------


def _check(x: torch.Tensor, sigmas) -> torch.Tensor:
    """Validate the sigma list; return s_in, the (B,) ones that turn a scalar σ into one per batch element."""
    if not torch.is_tensor(sigmas) or sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(
            "sigmas must be a 1-D tensor with at least 2 entries (start and end of one step), got "
            f"{getattr(sigmas, 'shape', sigmas)}. Build one with schedule.get_sigmas(scheduler, steps)."
        )
    if (sigmas[:-1] <= 0).any():
        raise ValueError("only the last sigma may be 0; every step must start from a positive noise level.")
    return torch.ones(x.shape[0], dtype=sigmas.dtype, device=x.device)  # σ keeps its own (fp32) precision


def _noise_source(x: torch.Tensor, noise_sampler, generator):
    """noise_sampler(sigma, sigma_next) -> N(0, I) like x. Default: fresh torch.randn from `generator`."""
    if noise_sampler is not None:
        return noise_sampler
    return lambda sigma, sigma_next: torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _report(callback, i, x, sigma, sigma_next, denoised):
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})


def to_d(x, sigma, denoised):
    """The probability-flow ODE's slope dx/dσ = (x − D(x, σ)) / σ — which is just the noise estimate ε̂."""
    return (x - denoised) / sigma


def ancestral_step(sigma, sigma_next, eta: float = 1.0):
    """Split a step σ → σ' into a deterministic part down to σ_down and fresh noise σ_up, σ_down² + σ_up² = σ'².
    eta=1 takes σ_up² = σ'²(σ² − σ'²)/σ², the DDPM posterior variance (Ho et al. 2020, eq. 7) in the sigma view."""
    if not eta:
        return sigma_next, torch.zeros_like(sigma_next)
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


class BrownianNoise:
    """Increments of one Brownian motion W(σ), sampled lazily: noise(σ, σ') = (W(σ') − W(σ)) / sqrt(|σ' − σ|).

    SDE samplers that look at overlapping intervals (DPM++ SDE's half step and full step) need noise that is
    consistent between them, not independent draws. k-diffusion uses torchsde's Brownian tree for this; here a new
    point is drawn from the Brownian bridge between the known points around it, which gives a Brownian motion
    with exactly the right law (not the same numbers as torchsde's tree, so not A1111's pixels for a seed).
    """

    def __init__(self, x: torch.Tensor, generator: torch.Generator = None):
        self.shape, self.dtype, self.device, self.generator = x.shape, x.dtype, x.device, generator
        self.points = {0.0: torch.zeros(x.shape, dtype=torch.float32, device=x.device)}  # σ -> W(σ)

    def _randn(self):
        return torch.randn(self.shape, generator=self.generator, dtype=torch.float32, device=self.device)

    def _w(self, s: float) -> torch.Tensor:
        if s not in self.points:
            below = max(k for k in self.points if k < s)
            above = [k for k in self.points if k > s]
            if not above:  # beyond every known point: an independent increment
                w = self.points[below] + (s - below) ** 0.5 * self._randn()
            else:  # between two known points: the Brownian bridge
                a = min(above)
                mean = self.points[below] + (s - below) / (a - below) * (self.points[a] - self.points[below])
                w = mean + ((s - below) * (a - s) / (a - below)) ** 0.5 * self._randn()
            self.points[s] = w
        return self.points[s]

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        s0, s1 = float(sigma), float(sigma_next)
        return ((self._w(s1) - self._w(s0)) / abs(s1 - s0) ** 0.5).to(self.dtype)


# ---------------------------------------------------------------------------------------------
# 3. The DDPM family, written in the papers' own coordinates x_t = x · sqrt(ᾱ)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, generator=None):
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2 with the posterior q(x_{t-1}|x_t, x_0) of eq. 7)."""
    extra_args, s_in = extra_args or {}, _check(x, sigmas)
    noise = _noise_source(x, noise_sampler, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        a_t, a_prev = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)  # ᾱ_t, ᾱ_{t-1}
        beta = 1 - a_t / a_prev  # β_t of this (possibly multi-timestep) jump
        x_t = x * a_t**0.5
        # eq. 7: μ̃ = sqrt(ᾱ_{t-1}) β_t / (1−ᾱ_t) · x̂_0 + sqrt(α_t) (1−ᾱ_{t-1}) / (1−ᾱ_t) · x_t
        mean = a_prev**0.5 * beta / (1 - a_t) * denoised + (1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t) * x_t
        x_prev = mean
        if sigma_next > 0:  # β̃_t = (1−ᾱ_{t-1}) / (1−ᾱ_t) · β_t
            x_prev = mean + ((1 - a_prev) / (1 - a_t) * beta) ** 0.5 * noise(sigma, sigma_next)
        x = x_prev / a_prev**0.5
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, eta=0.0, noise_sampler=None, generator=None):
    """DDIM (Song, Meng & Ermon 2021, eq. 12); eta=0 is deterministic, eta=1 is DDPM."""
    # With sigmas ending at σ_0 ≈ 0.029 instead of 0 (SD1.5's set_alpha_to_one=False), this is diffusers' DDIMScheduler
    # and A1111's DDIM; divide the result by sqrt(σ_0² + 1) to get the latent they decode.
    extra_args, s_in = extra_args or {}, _check(x, sigmas)
    noise = _noise_source(x, noise_sampler, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        eps = to_d(x, sigma, denoised)
        a_t, a_prev = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        # eq. 16: σ_η = η sqrt((1−ᾱ_{t-1}) / (1−ᾱ_t)) sqrt(1 − ᾱ_t/ᾱ_{t-1})
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        # eq. 12: x_{t-1} = sqrt(ᾱ_{t-1}) x̂_0 + sqrt(1 − ᾱ_{t-1} − σ_η²) ε̂ + σ_η z
        x_prev = a_prev**0.5 * denoised + (1 - a_prev - std**2) ** 0.5 * eps
        if eta > 0 and sigma_next > 0:
            x_prev = x_prev + std * noise(sigma, sigma_next)
        x = x_prev / a_prev**0.5
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_plms(model, x, sigmas, extra_args=None, callback=None):
    """PLMS, the pseudo linear multistep method of Liu et al. 2022 ("Pseudo Numerical Methods for Diffusion Models")."""
    # The DDIM step x' = x̂_0 + σ' ε̂ is x + (σ' − σ) ε̂ in the sigma view; PLMS feeds it a 4-step Adams–Bashforth
    # mix of the last ε̂'s. The first step uses the "pseudo improved Euler" average instead (as A1111 and diffusers'
    # PNDMScheduler(skip_prk_steps=True) do), at the cost of one extra model call.
    extra_args, s_in = extra_args or {}, _check(x, sigmas)
    old_eps = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        eps = to_d(x, sigma, denoised)
        if not old_eps:
            if sigma_next > 0:  # pseudo improved Euler: average ε̂ here and at the Euler guess for σ'
                x_euler = x + (sigma_next - sigma) * eps
                eps_next = to_d(x_euler, sigma_next, model(x_euler, sigma_next * s_in, **extra_args))
                eps_prime = (eps + eps_next) / 2
            else:
                eps_prime = eps
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x + (sigma_next - sigma) * eps_prime
        old_eps = (old_eps + [eps])[-3:]
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


# ---------------------------------------------------------------------------------------------
# 4. k-diffusion's ODE/SDE solvers in σ
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None):
    """Euler's method on the probability-flow ODE dx/dσ = (x − D)/σ (Karras et al. 2022)."""
    extra_args, s_in = extra_args or {}, _check(x, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)  # x' = x + (σ' − σ) dx/dσ
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model, x, sigmas, extra_args=None, callback=None, eta=1.0, s_noise=1.0, noise_sampler=None, generator=None
):
    """Euler ancestral, "Euler a" (k-diffusion): an Euler step down to σ_down, then fresh noise σ_up."""
    extra_args, s_in = extra_args or {}, _check(x, sigmas)
    noise = _noise_source(x, noise_sampler, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        if sigma_up > 0:  # no noise into the final σ=0, nor at η=0
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None):
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1); the last step to σ=0 is plain Euler."""
    extra_args, s_in = extra_args or {}, _check(x, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        d = to_d(x, sigma, denoised)
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
        else:  # trapezoid: average the slope at both ends
            d_next = to_d(x_euler, sigma_next, model(x_euler, sigma_next * s_in, **extra_args))
            x = x + (d + d_next) / 2 * (sigma_next - sigma)
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None):
    """DPM-Solver-2 in k-diffusion's form (Lu et al. 2022, Algorithm 1 with r=1/2, midpoint in log σ)."""
    extra_args, s_in = extra_args or {}, _check(x, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        d = to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:  # slope at the geometric midpoint σ_mid = sqrt(σ σ'), used for the whole step
            sigma_mid = (sigma.log() + sigma_next.log()).div(2).exp()
            x_mid = x + d * (sigma_mid - sigma)
            d_mid = to_d(x_mid, sigma_mid, model(x_mid, sigma_mid * s_in, **extra_args))
            x = x + d_mid * (sigma_next - sigma)
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(
    model, x, sigmas, extra_args=None, callback=None, eta=1.0, s_noise=1.0, noise_sampler=None, generator=None
):
    """DPM-Solver-2 down to σ_down, then fresh noise σ_up ("DPM2 a", k-diffusion)."""
    extra_args, s_in = extra_args or {}, _check(x, sigmas)
    noise = _noise_source(x, noise_sampler, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        d = to_d(x, sigma, denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            sigma_mid = (sigma.log() + sigma_down.log()).div(2).exp()
            x_mid = x + d * (sigma_mid - sigma)
            d_mid = to_d(x_mid, sigma_mid, model(x_mid, sigma_mid * s_in, **extra_args))
            x = x + d_mid * (sigma_down - sigma)
            if sigma_up > 0:
                x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


def lms_coefficient(sigmas: np.ndarray, i: int, j: int, order: int) -> float:
    """∫_{σ_i}^{σ_i+1} ℓ_j(σ) dσ, ℓ_j the Lagrange polynomial through σ_i, σ_{i-1}, ... that is 1 at σ_{i-j}.
    The integrand has degree order−1, so Gauss–Legendre with `order` nodes is exact (k-diffusion uses scipy quad)."""
    nodes, weights = np.polynomial.legendre.leggauss(order)
    a, b = float(sigmas[i]), float(sigmas[i + 1])
    tau = (b - a) / 2 * nodes + (a + b) / 2
    ell = np.ones_like(tau)
    for k in range(order):
        if k != j:
            ell *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
    return float((b - a) / 2 * np.sum(weights * ell))


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, order=4):
    """Linear multistep (Adams–Bashforth in σ, k-diffusion's sample_lms; Karras et al. 2022 call it "LMS")."""
    extra_args, s_in = extra_args or {}, _check(x, sigmas)
    sigmas_np = sigmas.detach().cpu().double().numpy()
    ds = []  # the last `order` slopes, oldest first
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        ds = (ds + [to_d(x, sigma, denoised)])[-order:]
        cur_order = min(i + 1, order)
        coeffs = [lms_coefficient(sigmas_np, i, j, cur_order) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))  # x' = x + Σ_j c_j d_{i-j}
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


# DPM-Solver++ works in λ = log(α/σ_vp) = −log σ: over one step h = λ' − λ the exact solution is
# x' = (σ'/σ) x + (1 − e^{−h}) D, if the denoised estimate D were constant; higher orders correct D.


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): 2nd order from the previous step's denoised estimate."""
    # diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint) is the same update, including the last
    # step (first order to σ=0, i.e. x = D; forced by its final_sigmas_type="zero"). With final_sigmas_type="sigma_min"
    # it stops at σ_min instead and never takes that last denoising step — unlike A1111.
    extra_args, s_in = extra_args or {}, _check(x, sigmas)
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if sigma_next == 0:
            x = denoised  # h = ∞: the exact step lands on D
        else:
            h = sigma.log() - sigma_next.log()  # λ' − λ
            D = denoised
            if old_denoised is not None:  # D ≈ D + (h / 2h_last)(D − D_old): the midpoint value of D
                r = h_last / h
                D = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - torch.expm1(-h) * D
            h_last = h
        old_denoised = denoised
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    model, x, sigmas, extra_args=None, callback=None, eta=1.0, s_noise=1.0, noise_sampler=None, generator=None
):
    """Ancestral DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1 with r=1/2, plus k-diffusion's ancestral noise)."""
    extra_args, s_in = extra_args or {}, _check(x, sigmas)
    noise = _noise_source(x, noise_sampler, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = denoised  # Euler step to σ=0
        else:  # single step with a midpoint s in λ: σ_s = sqrt(σ σ_down)
            h = sigma.log() - sigma_down.log()
            sigma_s = (sigma.log() - h / 2).exp()
            x_s = (sigma_s / sigma) * x - torch.expm1(-h / 2) * denoised
            denoised_s = model(x_s, sigma_s * s_in, **extra_args)
            x = (sigma_down / sigma) * x - torch.expm1(-h) * denoised_s
        if sigma_up > 0:  # no noise into the final σ=0, nor at η=0
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    model, x, sigmas, extra_args=None, callback=None, eta=1.0, s_noise=1.0, r=0.5, noise_sampler=None, generator=None
):
    """DPM-Solver++ (stochastic), "DPM++ SDE": k-diffusion's 2-stage SDE solver with ancestral noise at both stages."""
    # Default noise: one Brownian motion (BrownianNoise), because the half step and the full step must see consistent
    # noise; k-diffusion/A1111/diffusers' DPMSolverSDEScheduler use torchsde's Brownian tree (other numbers, same law).
    extra_args, s_in = extra_args or {}, _check(x, sigmas)
    noise = noise_sampler if noise_sampler is not None else BrownianNoise(x, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if sigma_next == 0:
            x = denoised  # Euler step to σ=0
        else:
            h = sigma.log() - sigma_next.log()
            sigma_s = (sigma.log() - r * h).exp()  # the intermediate point, a fraction r of the way in λ
            # stage 1: to σ_s (ancestrally: down to sd, then noise su)
            sd, su = ancestral_step(sigma, sigma_s, eta)
            x_s = (sd / sigma) * x - torch.expm1(sd.log() - sigma.log()) * denoised
            if su > 0:
                x_s = x_s + noise(sigma, sigma_s) * s_noise * su
            denoised_s = model(x_s, sigma_s * s_in, **extra_args)
            # stage 2: to σ', with D mixed from both stages (fac = 1/(2r))
            sd, su = ancestral_step(sigma, sigma_next, eta)
            fac = 1 / (2 * r)
            D = (1 - fac) * denoised + fac * denoised_s
            x = (sd / sigma) * x - torch.expm1(sd.log() - sigma.log()) * D
            if su > 0:
                x = x + noise(sigma, sigma_next) * s_noise * su
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model, x, sigmas, extra_args=None, callback=None, eta=1.0, s_noise=1.0, solver_type="midpoint",
    noise_sampler=None, generator=None,
):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, the SDE variant of Algorithm 2; k-diffusion's sample_dpmpp_2m_sde)."""
    # diffusers: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++") — the same update with i.i.d. noise per
    # step. A1111/ComfyUI default to a Brownian-tree noise source; pass noise_sampler=BrownianNoise(x) for that law.
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}.")
    extra_args, s_in = extra_args or {}, _check(x, sigmas)
    noise = _noise_source(x, noise_sampler, generator)
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if sigma_next == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            eta_h = eta * h
            # x' = (σ'/σ) e^{−ηh} x + (1 − e^{−(1+η)h}) D  [+ 2nd-order term] + σ' sqrt(1 − e^{−2ηh}) z
            x = (sigma_next / sigma) * torch.exp(-eta_h) * x - torch.expm1(-h - eta_h) * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (-torch.expm1(-h - eta_h) / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x - 0.5 * torch.expm1(-h - eta_h) * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise(sigma, sigma_next) * sigma_next * (-torch.expm1(-2 * eta_h)) ** 0.5 * s_noise
            h_last = h
        old_denoised = denoised
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


# ---------------------------------------------------------------------------------------------
# 5. UniPC: a predictor and a corrector that reuses the next model call
# ---------------------------------------------------------------------------------------------


def _unipc_coefficients(rks, h, order, variant):
    """UniPC's linear system R ρ = b: row j holds r_k^j for the earlier points r_k = (λ_k − λ_i)/h (and 1 for the new
    point), b_j = j!·φ_{j+1}(−h)/B(h) with the φ-functions of exponential integrators; B(h) = −h ("bh1") or e^{−h} − 1
    ("bh2"). Returns R, b (float64) and the scalars φ_1(−h)·(−h) = e^{−h} − 1 and B(h)."""
    hh = -h  # data prediction (x0) form
    h_phi_1 = math.expm1(hh)
    B_h = hh if variant == "bh1" else math.expm1(hh)
    phi_k, fact = h_phi_1 / hh - 1, 1
    R, b = [], []
    for j in range(1, order + 1):
        R.append([rk ** (j - 1) for rk in rks])
        b.append(phi_k * fact / B_h)
        fact *= j + 1
        phi_k = phi_k / hh - 1 / fact
    return torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), h_phi_1, B_h


@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, order=3, variant="bh1"):
    """UniPC (Zhao et al. 2023): predictor UniP-p and corrector UniC-p in data-prediction form."""
    # diffusers' UniPCMultistepScheduler (default order 2, "bh2"; A1111 and ComfyUI use order 3, "bh1").
    # UniC corrects the point the predictor just reached using the model call made there anyway, so the
    # correction is free; the corrected x is where the next predictor starts.
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}.")
    extra_args, s_in = extra_args or {}, _check(x, sigmas)
    n = len(sigmas) - 1
    lam = [-math.log(float(s)) if s > 0 else math.inf for s in sigmas]  # λ = −log σ, in float64
    Ds = []  # denoised estimates at steps 0..i
    x_start, last_order = None, None  # where the previous predictor started, and its order
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if x_start is not None:  # UniC: correct x_i with the model output just computed at x_i
            p = last_order
            h = lam[i] - lam[i - 1]
            m0 = Ds[-1]
            rks = [(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, p)] + [1.0]
            R, b, h_phi_1, B_h = _unipc_coefficients(rks, h, p, variant)
            rhos = torch.tensor([0.5]) if p == 1 else torch.linalg.solve(R, b)
            corr = sum(rhos[k - 1].item() * (Ds[-1 - k] - m0) / rks[k - 1] for k in range(1, p))
            corr = corr + rhos[-1].item() * (denoised - m0)
            x = (sigma / sigmas[i - 1]) * x_start - h_phi_1 * m0 - B_h * corr
        Ds.append(denoised)
        if sigma_next == 0:
            x = denoised  # λ' = ∞: the first-order step lands on D
        else:  # UniP: predict x_{i+1}, order growing to `order` at the start and shrinking at the end
            p = min(order, i + 1, n - i)
            h = lam[i + 1] - lam[i]
            rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)] + [1.0]
            R, b, h_phi_1, B_h = _unipc_coefficients(rks, h, p, variant)
            x_start, last_order = x, p
            x = (sigma_next / sigma) * x - h_phi_1 * denoised  # the DPM-Solver++ first-order step ...
            if p >= 2:
                rhos = torch.tensor([0.5]) if p == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
                pred = sum(rhos[k - 1].item() * (Ds[-1 - k] - denoised) / rks[k - 1] for k in range(1, p))
                x = x - B_h * pred  # ... plus UniP's higher-order correction from earlier D's
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


# ---------------------------------------------------------------------------------------------
# 6. The registry: WebUI names -> (function, schedule, options)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerSpec:
    """What a WebUI sampler name means: the function, the sigma schedule and the options it runs with."""

    name: str  # A1111's label, e.g. "DPM++ 2M Karras"
    function: Callable
    scheduler: str  # a schedule.SCHEDULERS name
    options: dict = field(default_factory=dict)  # extra keyword arguments for `function`
    stochastic: bool = False  # draws fresh noise (takes noise_sampler / generator)
    # A1111 computes steps+1 sigmas and drops the second-to-last for DPM2 / DPM2 a: their midpoint at the
    # tiny σ_min step is wasted, so it takes one bigger last step instead.
    discard_penultimate_sigma: bool = False
    # A1111 and diffusers run this sampler in DDPM coordinates from x_T = noise, i.e. noise·sqrt(σ²+1) here.
    vp_start: bool = False

    def sigmas(self, steps: int, schedule: NoiseSchedule = SD15) -> torch.Tensor:
        """The (steps+1,) sigma list this sampler walks for `steps` sampling steps."""
        if self.discard_penultimate_sigma:
            s = get_sigmas(self.scheduler, steps + 1, schedule)
            return torch.cat([s[:-2], s[-1:]])
        return get_sigmas(self.scheduler, steps, schedule)


# Every sampler with its A1111 ≥ 1.9 default ("Automatic") schedule.
_BASE = {
    spec.name: spec
    for spec in [
        SamplerSpec("Euler", sample_euler, "normal"),
        SamplerSpec("Euler a", sample_euler_ancestral, "normal", stochastic=True),
        SamplerSpec("Heun", sample_heun, "normal"),
        SamplerSpec("LMS", sample_lms, "normal"),
        SamplerSpec("DPM2", sample_dpm_2, "karras", discard_penultimate_sigma=True),
        SamplerSpec("DPM2 a", sample_dpm_2_ancestral, "karras", stochastic=True, discard_penultimate_sigma=True),
        SamplerSpec("DPM++ 2S a", sample_dpmpp_2s_ancestral, "karras", stochastic=True),
        SamplerSpec("DPM++ 2M", sample_dpmpp_2m, "karras"),
        SamplerSpec("DPM++ SDE", sample_dpmpp_sde, "karras", stochastic=True),
        SamplerSpec("DPM++ 2M SDE", sample_dpmpp_2m_sde, "exponential", stochastic=True),
        SamplerSpec("DPM++ 2M SDE Heun", sample_dpmpp_2m_sde, "exponential", {"solver_type": "heun"}, stochastic=True),
        SamplerSpec("DDPM", sample_ddpm, "ddim_uniform", stochastic=True, vp_start=True),
        SamplerSpec("DDIM", sample_ddim, "ddim_uniform", vp_start=True),
        SamplerSpec("PLMS", sample_plms, "ddim_uniform", vp_start=True),
        SamplerSpec("UniPC", sample_unipc, "normal", {"order": 3, "variant": "bh1"}, vp_start=True),
    ]
}

# ComfyUI's sampler names (its KSampler's scheduler defaults to "normal") and k-diffusion/A1111 aliases.
_ALIASES = {
    "euler": ("Euler", "normal"), "euler_ancestral": ("Euler a", "normal"), "heun": ("Heun", "normal"),
    "lms": ("LMS", "normal"), "dpm_2": ("DPM2", "normal"), "dpm_2_ancestral": ("DPM2 a", "normal"),
    "dpmpp_2s_ancestral": ("DPM++ 2S a", "normal"), "dpmpp_2m": ("DPM++ 2M", "normal"),
    "dpmpp_sde": ("DPM++ SDE", "normal"), "dpmpp_2m_sde": ("DPM++ 2M SDE", "normal"),
    "dpmpp_2m_sde_heun": ("DPM++ 2M SDE Heun", "normal"), "ddpm": ("DDPM", "normal"),
    # ComfyUI's "ddim" is sample_euler with its scheduler; DDIM(η=0) and Euler are the same method.
    "ddim": ("DDIM", "ddim_uniform"), "plms": ("PLMS", "ddim_uniform"),
    "uni_pc": ("UniPC", "normal"), "uni_pc_bh2": ("UniPC", "normal", {"variant": "bh2"}),
    "k_euler": ("Euler", None), "k_euler_a": ("Euler a", None), "k_euler_ancestral": ("Euler a", None),
    "k_heun": ("Heun", None), "k_lms": ("LMS", None), "k_dpm_2": ("DPM2", None), "k_dpm_2_a": ("DPM2 a", None),
    "k_dpmpp_2s_a": ("DPM++ 2S a", None), "k_dpmpp_2m": ("DPM++ 2M", None), "k_dpmpp_sde": ("DPM++ SDE", None),
    "k_dpmpp_2m_sde": ("DPM++ 2M SDE", None), "euler ancestral": ("Euler a", None),
}

# A1111's "<sampler> <Schedule>" labels from before 1.9, e.g. "DPM++ 2M Karras", "DPM++ 2M SDE Exponential".
_SUFFIXES = {"karras": "karras", "exponential": "exponential"}


def _canonical(name: str) -> str:
    return " ".join(str(name).strip().lower().split())


def _scheduler_key(scheduler: str) -> str:
    """A schedule.SCHEDULERS key for a scheduler name (raises, with suggestions, for an unknown one)."""
    get_sigmas(scheduler, 1)  # validates
    key = _canonical(scheduler).replace(" ", "_").replace("-", "_")
    return {"uniform": "normal", "ddim": "ddim_uniform"}.get(key, key)


def get_sampler(name: str, scheduler: str = None) -> SamplerSpec:
    """Resolve an A1111 name ("Euler a", "DPM++ 2M Karras"), a ComfyUI name ("dpmpp_2m") or a k-diffusion alias
    ("k_euler_a") to a SamplerSpec. `scheduler` (ComfyUI's second menu, A1111's "Schedule type") overrides the
    default schedule; None or "Automatic" keeps the sampler's own default."""
    key = _canonical(name)
    bases = {_canonical(b): b for b in _BASE}
    aliases = {_canonical(a): v for a, v in _ALIASES.items()}
    options, implied, suffixed = {}, None, False
    if key in bases:
        base = bases[key]
    elif key in aliases:
        base, implied, *extra = aliases[key]
        options = dict(extra[0]) if extra else {}
    elif any(key.endswith(" " + sfx) and key[: -len(sfx) - 1] in bases for sfx in _SUFFIXES):
        sfx = next(sfx for sfx in _SUFFIXES if key.endswith(" " + sfx) and key[: -len(sfx) - 1] in bases)
        base, implied, suffixed = bases[key[: -len(sfx) - 1]], _SUFFIXES[sfx], True
    else:
        known = {_canonical(k): k for k in reversed(list(SAMPLER_NAMES) + list(_ALIASES))}  # A1111 spelling wins
        close = [known[c] for c in difflib.get_close_matches(key, list(known), n=4, cutoff=0.5)]
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown sampler {name!r}.{hint} Known samplers: {', '.join(_BASE)} "
            "(and ComfyUI names such as 'euler_ancestral', 'dpmpp_2m', 'uni_pc')."
        )
    spec = _BASE[base]
    sched = implied or spec.scheduler
    if scheduler is not None and _canonical(scheduler) != "automatic":
        wanted = _scheduler_key(scheduler)
        if suffixed and wanted != implied:
            raise ValueError(
                f"sampler {name!r} already names the {implied!r} schedule but scheduler={scheduler!r} was given; "
                f"pass {base!r} with scheduler={scheduler!r} instead."
            )
        sched = wanted
    label = base if sched == spec.scheduler and not suffixed else f"{base} {sched.replace('_', ' ').title()}"
    return dataclasses.replace(spec, name=label, scheduler=sched, options={**spec.options, **options})


# Every A1111 label: the 1.9+ names (schedule chosen separately) and the older "<sampler> Karras"-style ones.
SAMPLER_NAMES = list(_BASE) + [
    "LMS Karras", "DPM2 Karras", "DPM2 a Karras", "DPM++ 2S a Karras", "DPM++ 2M Karras", "DPM++ SDE Karras",
    "DPM++ 2M SDE Karras", "DPM++ 2M SDE Exponential",
]
SAMPLERS = {n: get_sampler(n) for n in SAMPLER_NAMES}


def sample(
    name, model, noise, steps, scheduler=None, x0=None, start_step=0, extra_args=None, callback=None,
    generator=None, noise_sampler=None, schedule: NoiseSchedule = SD15, **options,
):
    """Run sampler `name` for `steps` steps: txt2img from `noise` (x0 None), or img2img from the clean latent x0,
    starting `start_step` steps into the schedule (the first start_step sigmas are skipped). Returns the latent."""
    spec = get_sampler(name, scheduler)
    sigmas = spec.sigmas(steps, schedule)
    if not 0 <= start_step < len(sigmas) - 1:
        raise ValueError(f"start_step must be in 0..{len(sigmas) - 2} for {steps} steps, got {start_step}.")
    sigmas = sigmas[start_step:].to(noise.device)
    x = initial_latents(noise, sigmas, x0=x0, vp=spec.vp_start and x0 is None and start_step == 0)
    kwargs = {**spec.options, **options}
    if spec.stochastic:
        kwargs.update(noise_sampler=noise_sampler, generator=generator)
    return spec.function(model, x, sigmas, extra_args=extra_args, callback=callback, **kwargs)


# ---------------------------------------------------------------------------------------------
# 7. The diffusers scheduler that does the same thing (for SD1.5's scheduler_config.json)
# ---------------------------------------------------------------------------------------------
# Build it with  getattr(diffusers, cls).from_config(pipe.scheduler.config, **kwargs).
# Same method, same sigmas → same latents (tests/test_samplers.py checks every one step by step). The sigmas
# themselves can differ from sdlearn's defaults: see the module docstring and the notes below.

_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_DPMPP_2M_SDE = {"algorithm_type": "sde-dpmsolver++"}
_KARRAS, _EXPONENTIAL = {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}

DIFFUSERS_EQUIVALENT = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", _KARRAS),
    "DPM2": ("KDPM2DiscreteScheduler", _KARRAS),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", _KARRAS),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", _KARRAS),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", _KARRAS),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {**_DPMPP_2M, **_KARRAS}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {**_DPMPP_2M, **_KARRAS}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {**_DPMPP_2M_SDE, **_EXPONENTIAL}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {**_DPMPP_2M_SDE, **_KARRAS}),
    "DPM++ 2M SDE Exponential": ("DPMSolverMultistepScheduler", {**_DPMPP_2M_SDE, **_EXPONENTIAL}),
    "DPM++ 2M SDE Heun": ("DPMSolverMultistepScheduler", {**_DPMPP_2M_SDE, "solver_type": "heun", **_EXPONENTIAL}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", _KARRAS),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", _KARRAS),
    "DPM++ 2S a": None,
    "DPM++ 2S a Karras": None,
    "DDPM": ("DDPMScheduler", {}),
    "DDIM": ("DDIMScheduler", {"set_alpha_to_one": True}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True, "set_alpha_to_one": True}),
    "UniPC": ("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh1"}),
}

DIFFUSERS_NOTES = {
    "Euler": "Same timesteps as A1111's 'normal' schedule; diffusers interpolates σ linearly between whole "
    "timesteps (A1111 log-linearly), a 1e-5 relative difference. Pass sigmas= to set_timesteps for exact sigmas.",
    "DPM2": "A1111 drops the second-to-last sigma of DPM2/DPM2 a (discard_next_to_last_sigma); diffusers does not. "
    "With Karras sigmas diffusers rounds the main timesteps but not the midpoints'.",
    "DPM++ 2M": "diffusers picks steps+1 linspace timesteps and drops t=0 for the non-Karras schedule; with "
    "use_karras_sigmas the sigmas are A1111's, the model's timesteps are rounded (Denoiser(quantize=True)). "
    "It starts from unit-variance x_T (initial_latents(..., vp=True)).",
    "DPM++ SDE": "Needs torchsde. Its noise is a Brownian tree: same law as sdlearn's BrownianNoise, other numbers.",
    "DPM++ 2S a": "No diffusers scheduler. DPMSolverSinglestepScheduler(solver_order=2) is its η=0 version on a grid "
    "with each step's midpoint inserted (tested that way).",
    "DDIM": "SD1.5's own config (set_alpha_to_one=False) stops at ᾱ_0 (σ≈0.029), as A1111 does; sdlearn goes to σ=0.",
    "PLMS": "Same final-step note as DDIM.",
    "UniPC": "diffusers' default is order 2 with 'bh2' (ComfyUI: 'uni_pc_bh2'); A1111/ComfyUI 'uni_pc' use order 3, "
    "'bh1'. A1111 also picks its own time-uniform steps.",
}
