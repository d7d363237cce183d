"""sdlearn.vae against diffusers' AutoencoderKL on the same (random) weights."""

import diffusers
import pytest
import torch

from sdlearn.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

TOL = 1e-5


def _pair(**overrides):
    """An sdlearn VAE and a diffusers VAE holding the same random weights (small, SD1.5's key layout)."""
    cfg = VAEConfig(**{**dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=8, layers_per_block=1), **overrides})
    ref = diffusers.AutoencoderKL(**cfg.to_diffusers()).eval()
    # Random weights make the outputs too tame to catch small mistakes; give the norms random affines too.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize(
    "overrides, size",
    [
        (dict(), (32, 48)),  # non-square, to catch a swapped H/W
        (dict(layers_per_block=2, norm_num_groups=16), (32, 32)),
    ],
)
def test_matches_diffusers(overrides, size):
    ours, ref = _pair(**overrides)
    x = torch.rand(2, 3, *size) * 2 - 1  # images in [-1, 1]
    with torch.no_grad():
        q_ref = ref.encode(x).latent_dist
        q = ours.encode(x)
        z_ref = q_ref.sample(generator=torch.Generator().manual_seed(42))
        z = q.sample(generator=torch.Generator().manual_seed(42))
        img_ref = ref.decode(z_ref).sample
        img = ours.decode(z)
    diffs = {
        "mean": (q.mean - q_ref.mean).abs().max().item(),
        "logvar": (q.logvar - q_ref.logvar).abs().max().item(),
        "std": (q.std - q_ref.std).abs().max().item(),
        "sample": (z - z_ref).abs().max().item(),
        "kl": ((q.kl() - q_ref.kl()).abs() / q_ref.kl().abs()).max().item(),  # relative: a sum of many terms
        "decode": (img - img_ref).abs().max().item(),
    }
    print(f"\n{overrides} {size}: max|diff| " + "  ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert q.mean.shape == (2, 4, size[0] // 8, size[1] // 8)
    assert img.shape == x.shape
    assert all(v < TOL for v in diffs.values()), diffs
    assert torch.equal(q.mode(), q.mean)
    # the sample really used the noise (it is not the mean) and the generator decides it
    assert (z - q.mean).abs().max() > 1e-3
    assert not torch.equal(z, q.sample(generator=torch.Generator().manual_seed(43)))


def test_diagonal_gaussian_clamps_and_kl_formula():
    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), -100.0)], dim=1)
    q = DiagonalGaussian(moments)
    assert torch.equal(q.logvar, torch.full((1, 4, 2, 2), -30.0))
    assert torch.allclose(q.std, torch.exp(torch.tensor(-15.0)))
    # N(0, 1) has zero KL to the prior; N(1, 1) per value costs 1/2 * 1^2, over 16 values -> 8
    standard = DiagonalGaussian(torch.cat([torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)], dim=1))
    assert torch.allclose(standard.kl(), torch.tensor([8.0]))


def test_sd15_structure_on_meta():
    cfg = VAEConfig.sd15()
    assert cfg.downsample_factor == 8 and cfg.scaling_factor == 0.18215
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
        ref = diffusers.AutoencoderKL(**cfg.to_diffusers())
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert set(ours_sd) == set(ref_sd)
    assert all(ours_sd[k].shape == ref_sd[k].shape for k in ref_sd)
    assert "encoder.mid_block.attentions.0.to_q.weight" in ours_sd


def test_from_diffusers_reads_sd15_config_json():
    # SD1.5's vae/config.json (runwayml/stable-diffusion-v1-5), as shipped.
    d = {
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
        "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
    assert VAEConfig.from_diffusers(d) == VAEConfig.sd15()
    # and a round trip through diffusers' own config
    small = VAEConfig(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1, scaling_factor=0.5)
    assert VAEConfig.from_diffusers(dict(diffusers.AutoencoderKL(**small.to_diffusers()).config)) == small
    assert small.downsample_factor == 2


def test_bad_config_and_inputs_are_rejected_clearly():
    sd15 = VAEConfig.sd15().to_diffusers()
    with pytest.raises(ValueError, match="act_fn='relu'"):
        VAEConfig.from_diffusers({**sd15, "act_fn": "relu"})
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        VAEConfig.from_diffusers({**sd15, "down_block_types": ["AttnDownEncoderBlock2D"] * 4})
    with pytest.raises(ValueError, match="use_quant_conv=False"):
        VAEConfig.from_diffusers({**sd15, "use_quant_conv": False})
    with pytest.raises(ValueError, match="shift_factor"):
        VAEConfig.from_diffusers({**sd15, "shift_factor": 0.0609})
    with pytest.raises(ValueError, match="divisible by norm_num_groups=32"):
        VAEConfig(block_out_channels=(32, 48))
    vae = AutoencoderKL(VAEConfig(block_out_channels=(32, 64, 64, 64), norm_num_groups=8, layers_per_block=1))
    with pytest.raises(ValueError, match=r"100x64 \(width x height\) is not a multiple of 8"):
        vae.encode(torch.zeros(1, 3, 64, 100))
    with pytest.raises(ValueError, match="scaled to"):
        vae.encode(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="scaling factor"):
        vae.decode(torch.zeros(1, 3, 8, 8))
