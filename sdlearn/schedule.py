"""The noise schedule: how much noise Stable Diffusion 1.5 mixes into a latent at each training step.

SD1.5 was trained as a DDPM (Ho et al. 2020) with T = 1000 steps. At step t the training code adds
noise with variance β_t, and after t steps the clean latent x_0 has been shrunk and noised to

    x_t = sqrt(ᾱ_t) · x_0 + sqrt(1 − ᾱ_t) · ε,        ε ~ N(0, I),   ᾱ_t = Π_{s≤t} (1 − β_s)      (1)

(the "forward process" q(x_t | x_0)). Everything a sampler needs is a rewriting of ᾱ_t:

    signal-to-noise ratio   SNR_t = ᾱ_t / (1 − ᾱ_t)
    sigma                   σ_t   = sqrt((1 − ᾱ_t) / ᾱ_t) = 1 / sqrt(SNR_t)

Divide (1) by sqrt(ᾱ_t) and it becomes x_t / sqrt(ᾱ_t) = x_0 + σ_t · ε: a *scaled* latent that is the
clean latent plus noise of standard deviation σ. This is the "sigma view" of Karras et al. (2022),
k-diffusion, AUTOMATIC1111 (A1111) and ComfyUI: the sampler works on x = x_0 + σ·ε, σ runs from
σ_max ≈ 14.6 down to 0, and the U-Net, which was trained on unit-variance inputs x_t, is fed
x · 1/sqrt(σ² + 1) together with the timestep t that has that σ (`sigma_to_t`).

Noise does not "reduce" anything: σ_max ≈ 14.6 means the noise is ~15× stronger than the latent,
yet the latent is still all there, shrunk to sqrt(ᾱ_999) ≈ 0.068 of its size inside x_t.

What a learner moves in the WebUI lives here:
  * "Sampling steps" picks `steps` σ values out of the 1000 (`get_sigmas`, `timesteps`).
  * "Schedule type" (A1111 ≥ 1.9) / "scheduler" (ComfyUI) is how they are spread:
    normal, karras, exponential, sgm_uniform, simple, ddim_uniform (`SCHEDULERS`).
  * "Denoising strength" (重绘幅度) in img2img starts part-way down the same list (see samplers.py).

The tables follow diffusers bit for bit (float32 `linspace`, float32 `cumprod`), so every number can
be checked against `diffusers` configured with SD1.5's scheduler_config.json. The original CompVis
code computes the same betas in float64; the difference is below 1e-6 relative.
"""

import difflib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch


# ---------------------------------------------------------------------------------------------
# 1. The schedule itself: betas -> alphas -> ᾱ -> σ
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseSchedule:
    """The DDPM training schedule, as in SD1.5's scheduler_config.json."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    # diffusers' "leading" spacing adds this to every timestep (SD1.5: 1 → timesteps 951, 901, ..., 1).
    steps_offset: int = 1

    def __post_init__(self):
        if self.beta_schedule not in ("scaled_linear", "linear"):
            raise ValueError(
                f"beta_schedule={self.beta_schedule!r} is not implemented; sdlearn knows SD1.5's "
                "'scaled_linear' (and plain 'linear')."
            )
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}.")

    @classmethod
    def sd15(cls) -> "NoiseSchedule":
        return cls()

    @classmethod
    def from_diffusers(cls, d: dict) -> "NoiseSchedule":
        """Read a diffusers scheduler_config.json dict, refusing what this module does not implement."""
        if d.get("trained_betas") is not None:
            raise ValueError("trained_betas is not supported: sdlearn builds betas from beta_start/beta_end.")
        if d.get("rescale_betas_zero_snr", False):
            raise ValueError("rescale_betas_zero_snr=True (zero terminal SNR) is not implemented in sdlearn.")
        if d.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(
                f"prediction_type={d['prediction_type']!r}: sdlearn's samplers expect an ε-prediction "
                "model (SD1.x). v-prediction models (SD2.x 768) are not supported."
            )
        return cls(
            num_train_timesteps=d.get("num_train_timesteps", 1000),
            beta_start=d.get("beta_start", 0.00085),
            beta_end=d.get("beta_end", 0.012),
            beta_schedule=d.get("beta_schedule", "scaled_linear"),
            steps_offset=d.get("steps_offset", 1),
        )

    @cached_property
    def betas(self) -> torch.Tensor:
        """β_t, t = 0..T-1, (T,) float32. "scaled_linear": linear in sqrt(β), then squared."""
        T = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=torch.float32) ** 2
        return torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float32)

    @cached_property
    def alphas(self) -> torch.Tensor:
        """α_t = 1 − β_t: the fraction of signal *variance* one training step keeps."""
        return 1.0 - self.betas

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t = Π_{s≤t} α_s, (T,) float32: the signal variance left after t+1 steps (ᾱ_0 ≈ 0.99915, ᾱ_999 ≈ 0.0047)."""
        return torch.cumprod(self.alphas, dim=0)

    @cached_property
    def sigmas(self) -> torch.Tensor:
        """σ_t = sqrt((1 − ᾱ_t) / ᾱ_t), (T,) float32, rising with t: σ_0 ≈ 0.0292, σ_999 ≈ 14.61."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    @cached_property
    def log_sigmas(self) -> torch.Tensor:
        """log σ_t in float64 — the axis on which k-diffusion and diffusers interpolate between timesteps."""
        return self.sigmas.double().log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])


SD15 = NoiseSchedule()


# ---------------------------------------------------------------------------------------------
# 2. The forward process and its inverse, in DDPM coordinates x_t
# ---------------------------------------------------------------------------------------------


def _per_sample(values: torch.Tensor, t, like: torch.Tensor) -> torch.Tensor:
    """Look up a (T,) table at integer timesteps t (int or (B,)) and shape it (B, 1, 1, 1) to broadcast over `like`."""
    t = torch.as_tensor(t, device=values.device)
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise ValueError(
                f"timesteps must be whole numbers 0..{len(values) - 1} here, got {t.tolist()}; "
                "for a point between timesteps work in sigmas (t_to_sigma) instead."
            )
        t = t.long()
    if t.min() < 0 or t.max() >= len(values):
        raise ValueError(f"timesteps must lie in 0..{len(values) - 1}, got {t.tolist()}.")
    v = values[t].to(device=like.device, dtype=like.dtype).flatten()
    return v.view(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t, schedule: NoiseSchedule = SD15) -> torch.Tensor:
    """q(x_t | x_0), eq. (1): x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε. x0, noise: (B, C, H, W); t: int or (B,)."""
    a = _per_sample(schedule.alphas_cumprod, t, x0)  # (B, 1, 1, 1)
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, t, schedule: NoiseSchedule = SD15) -> torch.Tensor:
    """Eq. (1) solved for x_0, given the U-Net's noise estimate ε̂: x̂_0 = (x_t − sqrt(1 − ᾱ_t) ε̂) / sqrt(ᾱ_t)."""
    a = _per_sample(schedule.alphas_cumprod, t, x_t)
    return (x_t - (1 - a) ** 0.5 * eps) / a**0.5


def snr(t, schedule: NoiseSchedule = SD15) -> torch.Tensor:
    """Signal-to-noise ratio SNR_t = ᾱ_t / (1 − ᾱ_t) = 1/σ_t² at integer timesteps t."""
    a = schedule.alphas_cumprod[torch.as_tensor(t).long()]
    return a / (1 - a)


# ---------------------------------------------------------------------------------------------
# 3. Moving between a timestep t and its sigma
# ---------------------------------------------------------------------------------------------


def t_to_sigma(t, schedule: NoiseSchedule = SD15) -> torch.Tensor:
    """σ at a possibly fractional timestep t: interpolate log σ linearly between the two neighbouring timesteps
    (k-diffusion's DiscreteSchedule.t_to_sigma; A1111 and ComfyUI use it for their "normal" schedule)."""
    t = torch.as_tensor(t).detach().cpu().double().clamp(0, schedule.num_train_timesteps - 1)
    low = t.floor().long()
    high = t.ceil().long()
    w = t - low  # fractional part
    log_sigma = (1 - w) * schedule.log_sigmas[low] + w * schedule.log_sigmas[high]
    return log_sigma.exp().float()


def sigma_to_t(sigma, schedule: NoiseSchedule = SD15, quantize: bool = False) -> torch.Tensor:
    """The (fractional) timestep whose σ is `sigma`: the inverse of t_to_sigma, linear in log σ
    (k-diffusion's DiscreteSchedule.sigma_to_t, diffusers' _sigma_to_t). quantize=True rounds to the
    nearest whole timestep, as diffusers' DPM-Solver/UniPC/KDPM2 do with Karras sigmas and as
    k-diffusion's CompVisDenoiser(quantize=True) does. sigma: float or tensor; returns float32, same shape."""
    sigma = torch.as_tensor(sigma)
    log_sigma = sigma.detach().cpu().double().clamp(min=1e-10).log()  # float64 on the CPU (MPS has no float64)
    log_sigmas = schedule.log_sigmas  # (T,) ascending
    # Index of the last table entry at or below log σ, kept one short of the end so that high = low + 1 exists.
    low = (log_sigma.reshape(1, -1) >= log_sigmas.reshape(-1, 1)).sum(0) - 1
    low = low.clamp(0, len(log_sigmas) - 2)  # (N,)
    high = low + 1
    w = (log_sigmas[low] - log_sigma.reshape(-1)) / (log_sigmas[low] - log_sigmas[high])
    t = (1 - w.clamp(0, 1)) * low + w.clamp(0, 1) * high
    if quantize:
        t = t.round()
    return t.reshape(sigma.shape).float().to(sigma.device)


# ---------------------------------------------------------------------------------------------
# 4. Which timesteps a sampler visits: diffusers' "timestep_spacing"
# ---------------------------------------------------------------------------------------------

SPACINGS = ("leading", "trailing", "linspace")


def _check_steps(steps, schedule: NoiseSchedule) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a whole number ≥ 1, got {steps!r}.")
    if steps > schedule.num_train_timesteps:
        raise ValueError(
            f"steps={steps} is more than the {schedule.num_train_timesteps} timesteps the model was trained on."
        )
    return int(steps)


def timesteps(steps: int, spacing: str = "leading", schedule: NoiseSchedule = SD15) -> torch.Tensor:
    """The `steps` timesteps, high to low, that diffusers' DDIM/Euler-family schedulers visit (float32).

    leading  — every T//steps-th timestep from 0, plus steps_offset: SD1.5 with 20 steps → 951, 901, ..., 1.
               The original DDIM code and A1111's DDIM/PLMS use exactly these ("uniform" discretisation).
    trailing — count back from the last timestep: 999, 949, ..., 49 (Lin et al. 2023, "Common diffusion
               noise schedules and sample steps are flawed"): the first step starts from real σ_max.
    linspace — evenly spaced including both ends: 999, 946.42, ..., 0 (fractional, as EulerDiscreteScheduler;
               DDIM/PNDM/DDPM round these; DPM-Solver/UniPC take linspace over steps+1 points and drop 0).
    """
    steps = _check_steps(steps, schedule)
    T = schedule.num_train_timesteps
    if spacing == "leading":
        ratio = T // steps
        ts = np.arange(0, steps)[::-1] * ratio + schedule.steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, steps)[::-1]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}.")
    return torch.from_numpy(ts.astype(np.float32).copy())


def sigmas_from_timesteps(ts, final_sigma: float = 0.0, schedule: NoiseSchedule = SD15) -> torch.Tensor:
    """σ at each timestep (log-linear between whole timesteps), plus the final σ the sampler ends at. (len(ts)+1,)"""
    return torch.cat([t_to_sigma(ts, schedule), torch.tensor([final_sigma], dtype=torch.float32)])


# ---------------------------------------------------------------------------------------------
# 5. Sigma schedules: A1111's "Schedule type" / ComfyUI's "scheduler"
# ---------------------------------------------------------------------------------------------
# Each returns steps+1 sigmas, high to low, the last one 0: a sampler takes one step per neighbouring pair.


def normal_sigmas(steps: int, schedule: NoiseSchedule = SD15) -> torch.Tensor:
    """A1111's default / ComfyUI "normal": timesteps evenly spaced from T−1 down to 0, then σ(t), then 0.
    diffusers' EulerDiscreteScheduler visits the same timesteps but interpolates σ linearly instead of
    log-linearly between whole timesteps, so its sigmas differ in the 4th digit at fractional t."""
    steps = _check_steps(steps, schedule)
    ts = torch.linspace(schedule.num_train_timesteps - 1, 0, steps, dtype=torch.float64)
    return sigmas_from_timesteps(ts, schedule=schedule)


def karras_sigmas(steps: int, schedule: NoiseSchedule = SD15, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. (5): σ_i = (σ_max^(1/ρ) + i/(n−1) · (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, ρ = 7.
    Steps crowd towards small σ, where the fine detail is decided."""
    steps = _check_steps(steps, schedule)
    ramp = np.linspace(0, 1, steps)
    lo, hi = schedule.sigma_min ** (1 / rho), schedule.sigma_max ** (1 / rho)
    s = (hi + ramp * (lo - hi)) ** rho
    return torch.from_numpy(np.append(s, 0.0).astype(np.float32))


def exponential_sigmas(steps: int, schedule: NoiseSchedule = SD15) -> torch.Tensor:
    """log σ evenly spaced from log σ_max to log σ_min (k-diffusion's get_sigmas_exponential)."""
    steps = _check_steps(steps, schedule)
    s = np.exp(np.linspace(np.log(schedule.sigma_max), np.log(schedule.sigma_min), steps))
    return torch.from_numpy(np.append(s, 0.0).astype(np.float32))


def sgm_uniform_sigmas(steps: int, schedule: NoiseSchedule = SD15) -> torch.Tensor:
    """ComfyUI "sgm_uniform": like normal, but steps+1 evenly spaced timesteps with the last (t=0) replaced by σ=0."""
    steps = _check_steps(steps, schedule)
    ts = torch.linspace(schedule.num_train_timesteps - 1, 0, steps + 1, dtype=torch.float64)[:-1]
    return sigmas_from_timesteps(ts, schedule=schedule)


def simple_sigmas(steps: int, schedule: NoiseSchedule = SD15) -> torch.Tensor:
    """ComfyUI "simple": every (T/steps)-th training sigma counted back from the last one (999, 949, ... for 20)."""
    steps = _check_steps(steps, schedule)
    T = schedule.num_train_timesteps
    ts = torch.tensor([T - 1 - int(i * T / steps) for i in range(steps)], dtype=torch.float64)
    return sigmas_from_timesteps(ts, schedule=schedule)


def ddim_uniform_sigmas(steps: int, schedule: NoiseSchedule = SD15) -> torch.Tensor:
    """ComfyUI "ddim_uniform": the DDIM paper's uniform timesteps ("leading" + offset: 951, ..., 1), then 0.
    A1111's DDIM/PLMS and diffusers' DDIMScheduler (set_alpha_to_one=False, as in SD1.5's config) visit the same
    timesteps but end at ᾱ_0 — σ_0 ≈ 0.029 — instead of 0; see samplers.sample_ddim."""
    return sigmas_from_timesteps(timesteps(steps, "leading", schedule), schedule=schedule)


SCHEDULERS = {
    "normal": normal_sigmas,
    "karras": karras_sigmas,
    "exponential": exponential_sigmas,
    "sgm_uniform": sgm_uniform_sigmas,
    "simple": simple_sigmas,
    "ddim_uniform": ddim_uniform_sigmas,
}


def get_sigmas(scheduler: str, steps: int, schedule: NoiseSchedule = SD15) -> torch.Tensor:
    """The sigma list (steps+1,) float32 for a scheduler name: "normal", "karras", "exponential", "sgm_uniform",
    "simple" or "ddim_uniform". A1111's labels ("Karras", "Exponential", "SGM Uniform", "Uniform", "DDIM") work too;
    A1111's "Automatic" means "the sampler's own default" and is resolved by samplers.get_sampler."""
    key = str(scheduler).strip().lower().replace(" ", "_").replace("-", "_")
    # A1111's "Uniform" is k-diffusion's get_sigmas, the same list as "Normal"; its "DDIM" is ComfyUI's ddim_uniform.
    key = {"uniform": "normal", "ddim": "ddim_uniform"}.get(key, key)
    if key not in SCHEDULERS:
        close = difflib.get_close_matches(key, list(SCHEDULERS), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {list(SCHEDULERS)}.{hint}")
    return SCHEDULERS[key](steps, schedule)
