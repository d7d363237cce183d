"""sdlearn.samplers vs diffusers' schedulers, step by step, with the same model, sigmas and noise.

The "U-Net" is a fixed small conv net ε(x_in, t) on a (1, 4, 8, 8) latent; diffusers drives it the diffusers way
(scale_model_input, model at the scheduler's timestep, scheduler.step) and sdlearn through Denoiser. Both get the
same sigma grid (read off the diffusers scheduler), the same starting noise, and the same per-step noise (diffusers'
randn_tensor is patched to hand out the tensors sdlearn's noise_sampler hands out). Every step's latent is compared
in unit-variance coordinates x / sqrt(σ² + 1), i.e. the x_t the U-Net sees (diffusers' own latents for DDIM, DPM-Solver,
UniPC, ...). Measured max abs differences over all steps (fp32; `pytest -s` prints them) are 2e-6 to 9.5e-6 for the
ODE samplers and 1.2e-5 for DPM++ 2M SDE. That is fp32 rounding of the same arithmetic: sdlearn in fp32 differs from
sdlearn in fp64 by up to 1.4e-5 on the same SDE cases, diffusers from sdlearn-fp64 by 0.9e-5. A wrong coefficient,
sigma or noise scale shows up as 1e-3 or more. The bound asserted is 2e-5.
"""

import inspect
import sys

import diffusers
import pytest
import torch

from sdlearn import samplers as S
from sdlearn.schedule import SD15, get_sigmas, sigma_to_t, t_to_sigma

SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False, "skip_prk_steps": True,
    "clip_sample": False, "trained_betas": None, "prediction_type": "epsilon",
}
TOL = 2e-5


class EpsModel(torch.nn.Module):
    """A deterministic stand-in for the U-Net: depends on x and (smoothly) on the timestep."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        self.weight = torch.nn.Parameter(torch.randn(4, 4, 3, 3, generator=g) * 0.2, requires_grad=False)
        self.bias = torch.nn.Parameter(torch.randn(4, generator=g) * 0.1, requires_grad=False)

    def forward(self, x, t):
        tt = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1) / 1000  # scalar or (B,)
        h = torch.nn.functional.conv2d(x, self.weight, self.bias, padding=1)
        return torch.tanh(h) * (0.5 + 0.5 * tt) + 0.6 * x * tt + 0.05 * torch.sin(4 * tt)


EPS = EpsModel()


def noise_list(n, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 4, 8, 8, generator=g) for _ in range(n)]


def unit(x, sigma):
    return x / (float(sigma) ** 2 + 1) ** 0.5


def run_diffusers(monkeypatch, cls_name, kwargs, steps, x_T, noises, step_kwargs=None, setup=None):
    """Drive a diffusers scheduler with EPS; return (scheduler, latents after every .step())."""
    sched = getattr(diffusers, cls_name).from_config(SD15_SCHEDULER_CONFIG, **kwargs)
    sched.set_timesteps(steps)
    if setup is not None:
        setup(sched)
    it = iter(noises)
    module = sys.modules[type(sched).__module__]
    if hasattr(module, "randn_tensor"):  # deterministic schedulers do not import it
        monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: next(it).clone())
    latents = x_T * sched.init_noise_sigma
    out = []
    for t in sched.timesteps:
        eps = EPS(sched.scale_model_input(latents, t), t)
        latents = sched.step(eps, t, latents, **(step_kwargs or {})).prev_sample
        out.append(latents)
    return sched, out


def run_sdlearn(fn, sigmas, x, noises, quantize=False, **kwargs):
    it = iter(noises)
    if "noise_sampler" not in kwargs and "noise_sampler" in inspect.signature(fn).parameters:
        kwargs["noise_sampler"] = lambda s, sn: next(it).clone()
    xs = []
    record = lambda d: xs.append((d["x"], d["sigma_next"]))  # noqa: E731
    out = fn(S.Denoiser(EPS, quantize=quantize), x, sigmas, callback=record, **kwargs)
    assert torch.equal(out, xs[-1][0])
    return xs


def grid_from_timesteps(ts, final_sigma):
    return torch.cat([t_to_sigma(ts.double()), torch.tensor([final_sigma], dtype=torch.float32)])


def compare(ours, theirs, theirs_vp):
    """Max |difference| over all steps, in unit-variance coordinates."""
    assert len(ours) == len(theirs), (len(ours), len(theirs))
    worst = 0.0
    for (x, sigma_next), y in zip(ours, theirs):
        y = y if theirs_vp else unit(y, sigma_next)
        worst = max(worst, (unit(x, sigma_next) - y).abs().max().item())
    return worst


# name: (diffusers class, kwargs, steps, sdlearn function, sdlearn kwargs, how to read the sigma grid, quantize)
# grid "sigmas": the scheduler's own .sigmas (duplicates of 2-stage schedulers removed); "ddim": σ at its timesteps.
CASES = {
    "Euler": ("EulerDiscreteScheduler", {}, 10, S.sample_euler, {}, "sigmas", False),
    "Euler Karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, 10, S.sample_euler, {}, "sigmas", False),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}, 10, S.sample_euler_ancestral, {}, "sigmas", False),
    "Heun": ("HeunDiscreteScheduler", {}, 10, S.sample_heun, {}, "sigmas", False),
    "LMS": ("LMSDiscreteScheduler", {}, 10, S.sample_lms, {}, "sigmas", False),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}, 10, S.sample_lms, {}, "sigmas", False),
    "DPM2": ("KDPM2DiscreteScheduler", {}, 10, S.sample_dpm_2, {}, "sigmas", False),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}, 10, S.sample_dpm_2_ancestral, {}, "sigmas", False),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}, 16, S.sample_dpmpp_2m, {}, "sigmas", False),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, 10, S.sample_dpmpp_2m, {},
                        "sigmas", True),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, 10, S.sample_dpmpp_2m_sde,
                     {}, "sigmas", False),
    "DPM++ 2M SDE Heun Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", "use_karras_sigmas": True},
        10, S.sample_dpmpp_2m_sde, {"solver_type": "heun"}, "sigmas", True),
    "DDPM": ("DDPMScheduler", {}, 10, S.sample_ddpm, {}, "ddim", False),
    "DDIM": ("DDIMScheduler", {}, 10, S.sample_ddim, {}, "ddim", False),
    "DDIM alpha_to_one": ("DDIMScheduler", {"set_alpha_to_one": True}, 10, S.sample_ddim, {}, "ddim", False),
    "DDIM eta=0.5": ("DDIMScheduler", {}, 10, S.sample_ddim, {"eta": 0.5}, "ddim", False),
    "PLMS": ("PNDMScheduler", {}, 8, S.sample_plms, {}, "ddim", False),
    "PLMS alpha_to_one": ("PNDMScheduler", {"set_alpha_to_one": True}, 8, S.sample_plms, {}, "ddim", False),
    "UniPC bh1 order 3": ("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh1"}, 10, S.sample_unipc,
                          {"order": 3, "variant": "bh1"}, "sigmas", False),
    "UniPC bh2 order 2": ("UniPCMultistepScheduler", {}, 10, S.sample_unipc, {"order": 2, "variant": "bh2"},
                          "sigmas", False),
    "UniPC bh2 order 3 Karras": ("UniPCMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}, 12,
                                 S.sample_unipc, {"order": 3, "variant": "bh2"}, "sigmas", True),
}
VP_SCHEDULERS = {"DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
                 "UniPCMultistepScheduler", "DPMSolverSinglestepScheduler"}
MEASURED = {}


@pytest.mark.parametrize("case", list(CASES))
def test_sampler_matches_diffusers_step_by_step(case, monkeypatch):
    cls_name, kwargs, steps, fn, fn_kwargs, grid, quantize = CASES[case]
    noises = noise_list(3 * steps + 2)
    x_T = noises.pop(0)
    sched, theirs = run_diffusers(monkeypatch, cls_name, kwargs, steps, x_T, noises, step_kwargs=(
        {"eta": fn_kwargs["eta"]} if "eta" in fn_kwargs else None))
    vp = cls_name in VP_SCHEDULERS
    if grid == "sigmas":
        sigmas = torch.unique_consecutive(sched.sigmas.float())
        if sigmas[-1] != 0:  # KDPM2 repeats the trailing 0
            sigmas = torch.cat([sigmas, torch.zeros(1)])
    else:
        ts = torch.as_tensor(sched._timesteps if cls_name == "PNDMScheduler" else sched.timesteps)
        ts = ts.sort(descending=True).values
        final_alpha = sched.final_alpha_cumprod if hasattr(sched, "final_alpha_cumprod") else torch.tensor(1.0)
        sigmas = grid_from_timesteps(ts, float(((1 - final_alpha) / final_alpha) ** 0.5))
    assert len(sigmas) == steps + 1
    x = S.initial_latents(x_T, sigmas, vp=vp)
    ours = run_sdlearn(fn, sigmas, x, noises, quantize=quantize, **fn_kwargs)
    # Two-stage schedulers report the half step too; PNDM spends its first two calls on step 1.
    if cls_name in ("HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"):
        theirs = [theirs[2 * k + 1] for k in range(steps - 1)] + [theirs[-1]]
    elif cls_name == "PNDMScheduler":
        theirs = theirs[1:]
    err = compare(ours, theirs, vp)
    MEASURED[case] = err
    assert err < TOL, f"{case}: max |sdlearn − diffusers| = {err:.2e}"


# ---- DPM++ 2S a and DPM++ SDE: no diffusers twin --------------------------------------------------------------
# With η=0 both are DPM-Solver++(2S) with the midpoint r=1/2. diffusers' DPMSolverSinglestepScheduler(solver_order=2)
# alternates a 1st-order step to the next grid point and a 2nd-order step from the point before it, so on a grid with
# each step's midpoint sqrt(σ σ') inserted it performs exactly our steps. The ancestral/SDE noise is checked below
# against the exact answer on Gaussian data.


@pytest.mark.parametrize("fn", [S.sample_dpmpp_2s_ancestral, S.sample_dpmpp_sde])
def test_dpmpp_2s_and_sde_at_eta0_match_diffusers_singlestep_on_midpoint_grid(fn, monkeypatch):
    steps = 8
    sigmas = get_sigmas("karras", steps)
    grid = [sigmas[0]]
    for s, s_next in zip(sigmas[:-2], sigmas[1:-1]):
        grid += [(s * s_next) ** 0.5, s_next]
    grid = torch.stack(grid + [sigmas[-1]]).float()  # (2·steps,)
    ts = sigma_to_t(grid[:-1])

    def setup(sched):
        sched.sigmas, sched.timesteps = grid.clone(), ts.clone()

    x_T = noise_list(1)[0]
    _, theirs = run_diffusers(monkeypatch, "DPMSolverSinglestepScheduler", {"solver_order": 2}, len(grid) - 1,
                              x_T, [], setup=setup)
    ours = run_sdlearn(fn, sigmas, S.initial_latents(x_T, sigmas, vp=True), [], eta=0.0,
                       noise_sampler=lambda s, sn: pytest.fail("η=0 must not draw noise"))
    theirs = [theirs[2 * k + 1] for k in range(steps - 1)] + [theirs[-1]]
    err = compare(ours, theirs, theirs_vp=True)
    MEASURED[f"{fn.__name__} eta=0"] = err
    assert err < TOL


# ---- identities: DDIM(η=0) is Euler, DDIM(η=1) and DDPM are Euler a ----------------------------------------------


def test_ddim_is_euler_and_ddpm_is_euler_ancestral():
    sigmas = get_sigmas("ddim_uniform", 12)
    x = S.initial_latents(noise_list(1)[0], sigmas)
    model = S.Denoiser(EPS)
    euler = S.sample_euler(model, x, sigmas)
    assert (S.sample_ddim(model, x, sigmas) - euler).abs().max() < 1e-5
    noises = noise_list(12, seed=3)
    ea = S.sample_euler_ancestral(model, x, sigmas, noise_sampler=lambda s, sn, it=iter(noises): next(it))
    ddim1 = S.sample_ddim(model, x, sigmas, eta=1.0, noise_sampler=lambda s, sn, it=iter(noises): next(it))
    ddpm = S.sample_ddpm(model, x, sigmas, noise_sampler=lambda s, sn, it=iter(noises): next(it))
    assert (ddim1 - ea).abs().max() < 1e-5
    assert (ddpm - ea).abs().max() < 1e-5
    assert (ea - euler).abs().max() > 0.1  # the noise did something


# ---- stochastic samplers on Gaussian data, where the right answer is known -----------------------------------------
# Data x_0 ~ N(μ, s²) per element; the exact denoiser is D(x, σ) = μ + s²/(s² + σ²)(x − μ). Starting from the exact
# noisy marginal, a correct sampler must end with mean ≈ μ and std ≈ s; a wrong noise scale or step shows up at once.

MU, S_DATA = 0.5, 0.5
# 32,000 samples: below torch's intra-op parallel grain (32,768), so 300 steps stay fast on a busy 2-core machine.


def gaussian_denoiser(x, sigma):
    s2 = S_DATA**2
    sigma = sigma.view(-1, *([1] * (x.ndim - 1)))
    return MU + s2 / (s2 + sigma**2) * (x - MU)


# First-order methods converge like 1/steps (Euler a: std 0.445 after 30 steps, 0.494 after 300), so they get more.
STEPS = {"Euler a": 300, "DDPM": 300, "Euler": 300, "DDIM": 300}


def gaussian_start(sigmas):
    g = torch.Generator().manual_seed(0)
    return MU + (S_DATA**2 + sigmas[0] ** 2) ** 0.5 * torch.randn(2, 1, 125, 128, generator=g), g  # exact x_T


@pytest.mark.parametrize("name", ["Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DDPM"])
def test_stochastic_sampler_reaches_the_data_distribution(name):
    spec = S.get_sampler(name, "karras")
    sigmas = spec.sigmas(STEPS.get(name, 30))
    x, g = gaussian_start(sigmas)
    out = spec.function(gaussian_denoiser, x, sigmas, generator=g, **spec.options)
    assert abs(out.mean().item() - MU) < 0.01, name
    assert abs(out.std().item() - S_DATA) < 0.015, (name, out.std().item())  # measured: 0.494 to 0.509


@pytest.mark.parametrize("name", ["Euler", "DDIM", "Heun", "DPM2", "LMS", "PLMS", "DPM++ 2M", "UniPC"])
def test_ode_sampler_follows_the_exact_solution(name):
    """The probability-flow ODE maps x_T to μ + s/sqrt(s² + σ_T²)·(x_T − μ); the last step (D at σ_min) alone is
    off by σ_min²/2s² ≈ 0.17%, so 3e-3 is the floor. Measured max errors: 1.5e-2 (Euler, 300 steps), ≤ 1e-2 (30 steps)."""
    spec = S.get_sampler(name, "karras")
    sigmas = spec.sigmas(STEPS.get(name, 30))
    x, _ = gaussian_start(sigmas)
    exact = MU + S_DATA / (S_DATA**2 + sigmas[0] ** 2) ** 0.5 * (x - MU)
    out = spec.function(gaussian_denoiser, x, sigmas, **spec.options)
    assert (out - exact).abs().max() < 0.02, (name, (out - exact).abs().max().item())


def test_ancestral_noise_scale_matters():
    """The distribution test can fail: Euler a with doubled noise ends far too wide."""
    sigmas = get_sigmas("karras", 30)
    x, g = gaussian_start(sigmas)
    out = S.sample_euler_ancestral(gaussian_denoiser, x, sigmas, s_noise=2.0, generator=g)
    assert out.std().item() > S_DATA + 0.1


def test_brownian_noise_has_brownian_correlations():
    x = torch.zeros(200_000)
    bm = S.BrownianNoise(x, torch.Generator().manual_seed(0))
    a, b, c = torch.tensor(10.0), torch.tensor(4.0), torch.tensor(1.0)
    full, half, rest = bm(a, c), bm(a, b), bm(b, c)  # queried out of order on purpose
    for z in (full, half, rest):
        assert abs(z.std().item() - 1) < 0.01 and abs(z.mean().item()) < 0.01
    # W(c) − W(a) = (W(b) − W(a)) + (W(c) − W(b)): increments add up, and disjoint ones are independent
    assert torch.allclose(full * 3, half * 6**0.5 + rest * 3**0.5, atol=1e-4)
    assert abs(torch.corrcoef(torch.stack([half, rest]))[0, 1].item()) < 0.01
    assert torch.equal(bm(a, c), full)  # asking again gives the same path


# ---- registry, names and errors -------------------------------------------------------------------------------


def test_names_resolve():
    assert S.get_sampler("Euler a").function is S.sample_euler_ancestral
    assert S.get_sampler("euler_ancestral").function is S.sample_euler_ancestral
    assert S.get_sampler("k_euler_a").function is S.sample_euler_ancestral
    spec = S.get_sampler("DPM++ 2M Karras")
    assert (spec.function, spec.scheduler, spec.name) == (S.sample_dpmpp_2m, "karras", "DPM++ 2M Karras")
    assert S.get_sampler("dpmpp_2m").scheduler == "normal"  # ComfyUI's default scheduler
    assert S.get_sampler("dpmpp_2m", "karras").scheduler == "karras"
    assert S.get_sampler("DPM++ 2M", "Automatic").scheduler == "karras"  # A1111 ≥ 1.9's automatic choice
    assert S.get_sampler("DPM++ 2M SDE Exponential").scheduler == "exponential"
    assert S.get_sampler("  dpm++ 2m karras ").name == "DPM++ 2M Karras"
    assert S.get_sampler("uni_pc_bh2").options == {"order": 3, "variant": "bh2"}
    assert S.get_sampler("ddim").function is S.sample_ddim and S.get_sampler("ddim").scheduler == "ddim_uniform"
    for name, fn in [("lms", S.sample_lms), ("heun", S.sample_heun), ("dpm_2", S.sample_dpm_2),
                     ("dpm_2_ancestral", S.sample_dpm_2_ancestral), ("dpmpp_2s_ancestral", S.sample_dpmpp_2s_ancestral),
                     ("dpmpp_sde", S.sample_dpmpp_sde), ("dpmpp_2m_sde", S.sample_dpmpp_2m_sde),
                     ("uni_pc", S.sample_unipc), ("ddpm", S.sample_ddpm), ("PLMS", S.sample_plms),
                     ("UniPC", S.sample_unipc)]:
        assert S.get_sampler(name).function is fn, name
    assert S.get_sampler("DPM2").sigmas(20).shape == (21,)  # one sigma more computed, the penultimate dropped
    full = get_sigmas("karras", 21)
    assert torch.equal(S.get_sampler("DPM2").sigmas(20), torch.cat([full[:-2], full[-1:]]))


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ValueError, match="DPM\\+\\+ 2M Karras"):
        S.get_sampler("DPM++ 2M Karas")
    with pytest.raises(ValueError, match="euler_ancestral"):
        S.get_sampler("euler_ancestrall")
    with pytest.raises(ValueError, match="karras"):
        S.get_sampler("Euler", scheduler="karas")
    with pytest.raises(ValueError, match="already names"):
        S.get_sampler("DPM++ 2M Karras", scheduler="exponential")


def test_bad_steps_and_sigmas_are_refused():
    model = S.Denoiser(EPS)
    for steps in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps"):
            S.sample("Euler", model, torch.zeros(1, 4, 8, 8), steps)
    with pytest.raises(ValueError, match="at least 2"):
        S.sample_euler(model, torch.zeros(1, 4, 8, 8), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="only the last sigma"):
        S.sample_euler(model, torch.zeros(1, 4, 8, 8), torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="start_step"):
        S.sample("Euler", model, torch.zeros(1, 4, 8, 8), 10, start_step=10)


def test_every_sampler_has_a_diffusers_answer():
    assert set(S.DIFFUSERS_EQUIVALENT) == set(S.SAMPLERS)
    for name, entry in S.DIFFUSERS_EQUIVALENT.items():
        if entry is None:
            assert name.startswith("DPM++ 2S a") and name.split(" Karras")[0] in S.DIFFUSERS_NOTES
            continue
        cls_name, kwargs = entry
        if cls_name == "DPMSolverSDEScheduler":  # needs torchsde, which is not installed here
            continue
        sched = getattr(diffusers, cls_name).from_config(SD15_SCHEDULER_CONFIG, **kwargs)
        for k, v in kwargs.items():
            assert sched.config[k] == v, (name, k)


# ---- img2img: any tail of a schedule ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_every_sampler_runs_on_a_tail(name):
    spec = S.SAMPLERS[name]
    sigmas = spec.sigmas(10)
    x0 = torch.randn(1, 4, 8, 8)
    for k in (1, 5, 9):
        tail = sigmas[k:]
        out = spec.function(S.Denoiser(EPS), S.initial_latents(torch.randn(1, 4, 8, 8), tail, x0=x0), tail,
                            **spec.options)
        assert out.shape == x0.shape and torch.isfinite(out).all(), (name, k)


@pytest.mark.parametrize("fn", [S.sample_euler, S.sample_heun, S.sample_dpm_2, S.sample_ddim])
def test_single_step_samplers_can_stop_and_resume(fn):
    """A one-step method has no memory: sigmas[:k+1] then sigmas[k:] is the same run as sigmas (img2img's premise)."""
    sigmas = get_sigmas("karras", 10)
    x = S.initial_latents(noise_list(1)[0], sigmas)
    model = S.Denoiser(EPS)
    whole = fn(model, x, sigmas)
    split = fn(model, fn(model, x, sigmas[:5]), sigmas[4:])
    assert torch.equal(whole, split)


def test_sample_helper_img2img_start_and_callback():
    model = S.Denoiser(EPS)
    noise, x0 = noise_list(2)
    seen = []
    out = S.sample("Euler", model, noise, 10, x0=x0, start_step=4, callback=seen.append)
    sigmas = S.get_sampler("Euler").sigmas(10)[4:]
    assert [d["i"] for d in seen] == list(range(6))
    assert torch.equal(seen[0]["sigma"], sigmas[0]) and torch.equal(seen[-1]["sigma_next"], sigmas[-1])
    assert set(seen[0]) == {"i", "x", "sigma", "sigma_next", "denoised"}
    assert torch.equal(out, S.sample_euler(model, x0 + noise * sigmas[0], sigmas))
    # txt2img: k-diffusion starts at noise·σ_max; DDIM-family (vp_start) at noise·sqrt(σ_max² + 1)
    assert torch.equal(S.initial_latents(noise, sigmas), noise * sigmas[0])
    ddim = S.get_sampler("DDIM")
    assert ddim.vp_start and torch.allclose(
        S.initial_latents(noise, ddim.sigmas(10), vp=True), noise * (ddim.sigmas(10)[0] ** 2 + 1) ** 0.5)


def test_denoiser_feeds_the_unet_like_diffusers():
    seen = {}

    def eps_model(x_in, t):
        seen["x_in"], seen["t"] = x_in, t
        return torch.ones_like(x_in)

    x = torch.randn(2, 4, 8, 8)
    sigma = t_to_sigma(torch.tensor([951.0, 1.0]))
    out = S.Denoiser(eps_model)(x, sigma)
    assert torch.allclose(seen["t"], torch.tensor([951.0, 1.0]), atol=1e-3)
    assert torch.allclose(seen["x_in"], x / (sigma.view(2, 1, 1, 1) ** 2 + 1) ** 0.5)
    assert torch.allclose(out, x - sigma.view(2, 1, 1, 1))
    # the x_in the U-Net sees is diffusers' x_t: the DDIM latent
    assert torch.allclose(seen["x_in"][1], x[1] * SD15.alphas_cumprod[1] ** 0.5, atol=1e-6)


def test_report_measured_differences():
    """Runs last: print the per-sampler figures (pytest -s shows them)."""
    for k, v in sorted(MEASURED.items()):
        print(f"{k:32s} max|Δ| = {v:.1e}")
