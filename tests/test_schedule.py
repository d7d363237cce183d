"""sdlearn.schedule vs diffusers' schedulers configured as SD1.5's scheduler_config.json."""

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       PNDMScheduler)

from sdlearn import schedule as S

SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False, "skip_prk_steps": True,
    "clip_sample": False, "trained_betas": None, "prediction_type": "epsilon",
}


def make(cls, **kwargs):
    return cls.from_config(SD15_SCHEDULER_CONFIG, **kwargs)


def test_tables_equal_diffusers_exactly():
    ref = make(DDPMScheduler)
    assert torch.equal(S.SD15.betas, ref.betas)
    assert torch.equal(S.SD15.alphas, ref.alphas)
    assert torch.equal(S.SD15.alphas_cumprod, ref.alphas_cumprod)
    euler = make(EulerDiscreteScheduler)  # before set_timesteps: all 1000 training sigmas, high to low, then 0
    assert torch.equal(S.SD15.sigmas, euler.sigmas[:-1].flip(0))
    assert S.NoiseSchedule.from_diffusers(SD15_SCHEDULER_CONFIG) == S.SD15 == S.NoiseSchedule.sd15()
    # the numbers a learner will see quoted
    assert S.SD15.sigma_min == pytest.approx(0.0292, abs=1e-4) and S.SD15.sigma_max == pytest.approx(14.615, abs=1e-3)


def test_from_diffusers_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="v-prediction"):
        S.NoiseSchedule.from_diffusers({**SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction"})
    with pytest.raises(ValueError, match="zero terminal SNR"):
        S.NoiseSchedule.from_diffusers({**SD15_SCHEDULER_CONFIG, "rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="squaredcos"):
        S.NoiseSchedule.from_diffusers({**SD15_SCHEDULER_CONFIG, "beta_schedule": "squaredcos_cap_v2"})


def test_add_noise_and_predict_x0():
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    ours = S.add_noise(x0, noise, t)
    assert (ours - make(DDPMScheduler).add_noise(x0, noise, t)).abs().max() < 1e-6
    assert (ours - make(DDIMScheduler).add_noise(x0, noise, t)).abs().max() < 1e-6
    assert (S.predict_x0(ours, noise, t) - x0).abs().max() < 1e-4  # at t=999 x0 is scaled by 0.068, so ~1e-5
    # the sigma view: x_t / sqrt(ᾱ_t) = x0 + σ_t ε
    a = S.SD15.alphas_cumprod[t].view(3, 1, 1, 1)
    assert (ours / a**0.5 - (x0 + S.SD15.sigmas[t].view(3, 1, 1, 1) * noise)).abs().max() < 1e-5
    assert torch.equal(S.add_noise(x0[1:2], noise[1:2], 500), ours[1:2])  # a plain int works
    with pytest.raises(ValueError, match="whole numbers"):
        S.add_noise(x0, noise, torch.tensor([1.5, 2.0, 3.0]))
    with pytest.raises(ValueError, match="0..999"):
        S.add_noise(x0, noise, torch.tensor([0, 1, 1000]))


def test_snr_and_sigma_are_the_same_information():
    t = torch.arange(0, 1000, 37)
    assert torch.allclose(S.snr(t), 1 / S.SD15.sigmas[t] ** 2, rtol=1e-5)
    ac = S.SD15.alphas_cumprod[t]
    assert torch.allclose(S.snr(t), ac / (1 - ac))


@pytest.mark.parametrize("steps", [1, 7, 20, 50])
def test_timesteps_per_spacing_match_diffusers(steps):
    for spacing in S.SPACINGS:
        euler = make(EulerDiscreteScheduler, timestep_spacing=spacing)
        euler.set_timesteps(steps)
        assert torch.equal(S.timesteps(steps, spacing), euler.timesteps), spacing
        ddim = make(DDIMScheduler, timestep_spacing=spacing)
        ddim.set_timesteps(steps)
        ours = S.timesteps(steps, spacing)
        ours = ours.round() if spacing == "linspace" else ours  # DDIM rounds linspace timesteps
        assert torch.equal(ours.long(), ddim.timesteps), spacing
    assert S.timesteps(20).tolist()[:3] == [951, 901, 851] and S.timesteps(20)[-1] == 1


def test_t_sigma_conversions():
    t = torch.arange(1000.0)
    assert torch.equal(S.t_to_sigma(t), S.SD15.sigmas)  # whole timesteps: the table itself
    assert torch.equal(S.sigma_to_t(S.SD15.sigmas), t)  # and back, exactly
    frac = torch.tensor([0.25, 10.5, 500.75, 998.9])
    assert torch.allclose(S.sigma_to_t(S.t_to_sigma(frac)), frac, atol=1e-3)
    # log-linear in between: σ(10.5) is the geometric mean of σ(10) and σ(11)
    assert torch.allclose(S.t_to_sigma(10.5), (S.SD15.sigmas[10] * S.SD15.sigmas[11]) ** 0.5)
    # the same t diffusers computes for arbitrary sigmas, beyond both ends included
    sig = np.array([0.001, 0.03, 0.5, 1.0, 3.3, 14.0, 20.0])
    euler = make(EulerDiscreteScheduler)
    ref = euler._sigma_to_t(sig, np.log(S.SD15.sigmas.numpy()))
    assert np.allclose(S.sigma_to_t(torch.tensor(sig)).numpy(), ref, atol=1e-4)
    assert torch.equal(S.sigma_to_t(torch.tensor(sig), quantize=True), torch.tensor(ref).round().float())


def test_karras_and_exponential_match_diffusers():
    # (not steps=1: diffusers' Euler then "spaces" one timestep at t=0 and its Karras list collapses to σ_min;
    # k-diffusion and sdlearn give [σ_max, 0])
    assert torch.equal(S.get_sigmas("karras", 1), torch.tensor([S.SD15.sigma_max, 0.0]))
    for steps in (2, 10, 25):
        for flag, name in (("use_karras_sigmas", "karras"), ("use_exponential_sigmas", "exponential")):
            euler = make(EulerDiscreteScheduler, **{flag: True})
            euler.set_timesteps(steps)
            ours = S.get_sigmas(name, steps)
            assert ours.shape == (steps + 1,) and ours[-1] == 0
            assert torch.allclose(ours, euler.sigmas, rtol=1e-6, atol=0), (name, steps)
    dpm = make(DPMSolverMultistepScheduler, use_karras_sigmas=True)
    dpm.set_timesteps(20)
    assert torch.allclose(S.get_sigmas("Karras", 20), dpm.sigmas, rtol=1e-6, atol=0)


def test_normal_is_a1111s_and_close_to_diffusers_linspace():
    sig = S.get_sigmas("normal", 20)
    ts = np.linspace(999, 0, 20)
    log_table = np.log(S.SD15.sigmas.double().numpy())
    expected = np.exp(np.interp(ts, np.arange(1000), log_table))  # k-diffusion's get_sigmas, written independently
    assert np.allclose(sig[:-1].numpy(), expected, rtol=1e-6, atol=0) and sig[-1] == 0
    euler = make(EulerDiscreteScheduler)
    euler.set_timesteps(20)
    # same timesteps; diffusers interpolates σ linearly instead of log-linearly: equal at whole t, ~1.5e-5 apart between
    rel = (euler.sigmas[:-1] / sig[:-1] - 1).abs()
    assert rel.max() < 5e-5 and rel[0] < 1e-6 and rel[-1] < 1e-6
    assert torch.equal(S.get_sigmas("Uniform", 20), sig)


def test_comfyui_schedulers():
    steps = 20
    ddim = make(DDIMScheduler)
    ddim.set_timesteps(steps)
    du = S.get_sigmas("ddim_uniform", steps)
    assert torch.equal(du[:-1], S.SD15.sigmas[ddim.timesteps]) and du[-1] == 0
    pndm = make(PNDMScheduler)
    pndm.set_timesteps(steps)
    assert torch.equal(du[:-1], S.SD15.sigmas[torch.as_tensor(pndm._timesteps[::-1].copy())])
    simple = S.get_sigmas("simple", steps)
    assert torch.equal(simple[:-1], S.SD15.sigmas[[999 - 50 * i for i in range(steps)]]) and simple[-1] == 0
    sgm = S.get_sigmas("sgm_uniform", steps)
    assert torch.allclose(sgm[:-1], S.t_to_sigma(torch.linspace(999, 0, steps + 1)[:-1].double())) and sgm[-1] == 0
    for name in S.SCHEDULERS:
        s = S.get_sigmas(name, steps)
        assert s.shape == (steps + 1,) and s.dtype == torch.float32 and (s[:-1] > s[1:]).all(), name


def test_bad_input_errors():
    for steps in (0, -1, 2.5, True, 1001):
        with pytest.raises(ValueError, match="steps"):
            S.get_sigmas("karras", steps)
    with pytest.raises(ValueError, match="karras"):
        S.get_sigmas("karas", 10)
    with pytest.raises(ValueError, match="leading"):
        S.timesteps(10, "lead")
