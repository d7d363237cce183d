"""sdlearn's U-Net against diffusers' UNet2DConditionModel, on the same (random) weights.

Small random configs keep SD1.5's key layout (four levels, the same block types); the full SD1.5
structure is checked on the meta device (no memory, no weights).
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sdlearn.unet import UNet2DConditionModel, UNetConfig, timestep_embedding  # noqa: E402

SD15_PARAMS = 859_520_964
# conv_in sees 5 more input channels: 5 x 320 x 3 x 3 more weights.
SD15_INPAINT_PARAMS = SD15_PARAMS + 5 * 320 * 3 * 3

# SD1.5's unet/config.json as published (runwayml/stable-diffusion-v1-5), written by diffusers 0.6.
SD15_CONFIG_JSON = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# Miniature configs. All four SD1.5 levels with 2 heads of width 16/32; then 1 layer per block,
# the inpainting input, and a 2-level TinySD-like U-Net with 2-deep transformers.
SMALL = dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=2)
CONFIGS = {
    "sd15-layout": UNetConfig(**SMALL),
    "sd15-layout-1-layer": UNetConfig(**SMALL, layers_per_block=1),
    "inpaint-9ch": UNetConfig(**SMALL, in_channels=9),
    "2-level": UNetConfig(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=4,
        cross_attention_dim=24, norm_num_groups=8, transformer_layers_per_block=2,
    ),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These miniature models are too small to gain from a second thread, and on a busy machine
    # two spinning threads make this file several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_and_ours(cfg: UNetConfig):
    """diffusers' U-Net with every parameter perturbed, and ours loaded from it strictly."""
    ref = diffusers.UNet2DConditionModel(**cfg.to_diffusers()).eval()
    with torch.no_grad():
        # Norm weights start at 1 and biases at 0; noise everywhere keeps a swapped or unused
        # parameter from hiding behind a trivial value.
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = UNet2DConditionModel(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name):
    cfg = CONFIGS[name]
    ref, ours = reference_and_ours(cfg)
    # A non-square latent catches mixed-up height and width.
    x = torch.randn(2, cfg.in_channels, 8, 16)
    context = torch.randn(2, 77, cfg.cross_attention_dim)
    timesteps = [999, torch.tensor([10, 500]), 437.5, torch.tensor([3.25, 801.0]), torch.tensor(250)]
    worst = 0.0
    with torch.no_grad():
        for t in timesteps:
            expected = ref(x, t, encoder_hidden_states=context).sample
            got = ours(x, t, context)
            assert got.shape == (2, cfg.out_channels, 8, 16)
            assert expected.abs().max() > 0.1  # the comparison is not between near-zero outputs
            worst = max(worst, (got - expected).abs().max().item())
    print(f"{name}: max abs difference {worst:.2e}")
    assert worst < 1e-5


@pytest.mark.parametrize("h, w", [(9, 10), (13, 8), (5, 7)])
def test_latent_sizes_not_divisible_by_8_match_diffusers(h, w):
    """Image sides only need to be multiples of 8 (520 px -> a 65-pixel latent): the upsamplers
    produce the skip's size, as diffusers' forward_upsample_size does."""
    cfg = CONFIGS["sd15-layout"]
    ref, ours = reference_and_ours(cfg)
    x, context = torch.randn(2, 4, h, w), torch.randn(2, 77, cfg.cross_attention_dim)
    with torch.no_grad():
        expected = ref(x, 500, encoder_hidden_states=context).sample
        got = ours(x, 500, context)
    assert got.shape == (2, 4, h, w)
    assert (got - expected).abs().max().item() < 1e-5


def test_norm_eps_match_diffusers():
    """On inputs with variance ~1e-6 a norm's eps dominates, so a wrong eps shows up clearly.

    (Inside the whole U-Net activations have variance ~1, where eps 1e-5 vs 1e-6 moves the output
    by only ~1e-5.)
    """
    ref, ours = reference_and_ours(CONFIGS["sd15-layout"])
    x = 1e-3 * torch.randn(2, 32, 8, 8)
    tokens = 1e-3 * torch.randn(2, 64, 32)
    context = torch.randn(2, 77, 32)
    temb = torch.randn(2, 128)
    with torch.no_grad():
        pairs = [
            # GroupNorm(eps=norm_eps) in the ResBlock; diffusers applies SiLU to temb inside.
            (ref.down_blocks[0].resnets[0](x, temb), ours.down_blocks[0].resnets[0](x, torch.nn.functional.silu(temb))),
            # GroupNorm(eps=1e-6) in the spatial transformer.
            (ref.down_blocks[0].attentions[0](x, encoder_hidden_states=context, return_dict=False)[0],
             ours.down_blocks[0].attentions[0](x, context)),
            # LayerNorms (eps=1e-5) in the transformer block.
            (ref.down_blocks[0].attentions[0].transformer_blocks[0](tokens, encoder_hidden_states=context),
             ours.down_blocks[0].attentions[0].transformer_blocks[0](tokens, context)),
        ]
    for expected, got in pairs:
        assert (expected - got).abs().max() < 1e-5 * expected.abs().max()


def test_output_depends_on_timestep_and_prompt():
    _, ours = reference_and_ours(CONFIGS["sd15-layout"])
    x = torch.randn(2, 4, 16, 16)
    c = torch.randn(2, 77, 32)
    with torch.no_grad():
        base = ours(x, 500, c)
        assert (ours(x, 501, c) - base).abs().max() > 1e-4
        assert (ours(x, 500, torch.randn(2, 77, 32)) - base).abs().max() > 1e-4
        # A scalar timestep is broadcast over the batch.
        torch.testing.assert_close(ours(x, torch.tensor([500, 500]), c), base, rtol=0, atol=0)
        # Any number of context tokens works (long prompts concatenate 77-token chunks).
        assert ours(x, 500, torch.randn(2, 154, 32)).shape == x.shape


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("shift", [0, 1])
def test_timestep_embedding_matches_diffusers(flip, shift):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 250, 999, 437.5])
    for dim in (320, 33):
        expected = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        torch.testing.assert_close(timestep_embedding(t, dim, flip, shift), expected, rtol=0, atol=0)


def test_timestep_embedding_layout():
    emb = timestep_embedding(torch.tensor([0.0, 1.0]), 320)  # SD1.5: [cos, sin], freq_shift 0
    assert torch.equal(emb[0], torch.cat([torch.ones(160), torch.zeros(160)]))  # t=0: cos 1, sin 0
    # t=1: the phases are the frequencies themselves, 1 down to 10000^(-159/160).
    torch.testing.assert_close(emb[1, 0], torch.cos(torch.tensor(1.0)))
    torch.testing.assert_close(emb[1, 160], torch.sin(torch.tensor(1.0)))
    torch.testing.assert_close(emb[1, 319], torch.sin(torch.tensor(10000.0 ** (-159 / 160))))


def test_runs_in_bfloat16():
    _, ours = reference_and_ours(CONFIGS["2-level"])
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 24)
    with torch.no_grad():
        full = ours(x, 999, c)
        half = ours.to(torch.bfloat16)(x.bfloat16(), 999, c.bfloat16())
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.1 * full.abs().max()


# --- SD1.5 structure, on the meta device ----------------------------------------------------


@pytest.mark.parametrize("in_channels, n_params", [(4, SD15_PARAMS), (9, SD15_INPAINT_PARAMS)])
def test_sd15_structure(in_channels, n_params):
    cfg = UNetConfig.sd15(in_channels=in_channels)
    with torch.device("meta"):
        ours = UNet2DConditionModel(cfg)
        ref = diffusers.UNet2DConditionModel(**cfg.to_diffusers())
    assert sum(p.numel() for p in ours.parameters()) == n_params
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes
    for key in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                "time_embedding.linear_1.weight", "up_blocks.1.upsamplers.0.conv.weight",
                "down_blocks.3.resnets.1.conv2.weight", "mid_block.attentions.0.proj_in.weight"):
        assert key in ours_shapes
    assert ours_shapes["conv_in.weight"] == (320, in_channels, 3, 3)
    assert ours_shapes["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert ours_shapes["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"] == (2560, 320)


def test_sd15_shapes_at_512px():
    """The block outputs in the module docstring's diagram, for a 64x64 latent (meta device)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(UNetConfig.sd15())
        shapes = {}

        def record(name):
            def hook(module, args, out):  # down blocks return (output, skips)
                shapes[name] = tuple((out[0] if isinstance(out, tuple) else out).shape)
            return hook

        for name in ["conv_in", "mid_block"] + [f"{s}_blocks.{i}" for s in ("down", "up") for i in range(4)]:
            unet.get_submodule(name).register_forward_hook(record(name))
        eps = unet(torch.empty(2, 4, 64, 64), 999, torch.empty(2, 77, 768))
    assert eps.shape == (2, 4, 64, 64)
    assert shapes == {
        "conv_in": (2, 320, 64, 64),
        "down_blocks.0": (2, 320, 32, 32), "down_blocks.1": (2, 640, 16, 16),
        "down_blocks.2": (2, 1280, 8, 8), "down_blocks.3": (2, 1280, 8, 8),
        "mid_block": (2, 1280, 8, 8),
        "up_blocks.0": (2, 1280, 16, 16), "up_blocks.1": (2, 1280, 32, 32),
        "up_blocks.2": (2, 640, 64, 64), "up_blocks.3": (2, 320, 64, 64),
    }


def test_sd15_config():
    assert UNetConfig.from_diffusers(SD15_CONFIG_JSON) == UNetConfig.sd15()
    assert UNetConfig.from_diffusers({**SD15_CONFIG_JSON, "in_channels": 9}) == UNetConfig.sd15(9)
    cfg = UNetConfig.sd15()
    assert cfg.downsample_factor == 8
    assert cfg.attention_head_dim == 8  # 8 heads of width 40 / 80 / 160


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trip_through_diffusers(name):
    cfg = CONFIGS[name]
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**cfg.to_diffusers())
    # diffusers' saved config lists every setting, defaults included.
    assert UNetConfig.from_diffusers(dict(ref.config)) == cfg


@pytest.mark.parametrize("key, value", [
    ("use_linear_projection", True),  # SD2.x
    ("addition_embed_type", "text_time"),  # SDXL
    ("class_embed_type", "timestep"),
    ("upcast_attention", True),
    ("time_cond_proj_dim", 256),  # LCM
    ("act_fn", "gelu"),
    ("mid_block_type", "UNetMidBlock2D"),
    ("some_future_setting", 1),
])
def test_from_diffusers_rejects_unsupported(key, value):
    with pytest.raises(ValueError, match=key):
        UNetConfig.from_diffusers({**SD15_CONFIG_JSON, key: value})


@pytest.mark.parametrize("changes, message", [
    (dict(attention_head_dim=[5, 10, 20, 20]), "attention_head_dim"),
    (dict(layers_per_block=(2, 2, 2, 2)), "layers_per_block"),
    (dict(norm_num_groups=24), "norm_num_groups"),
    (dict(attention_head_dim=3), "attention_head_dim"),
    (dict(down_block_types=("CrossAttnDownBlock2D",) * 3), "down_block_types"),
    (dict(up_block_types=("UpBlock2D", "SimpleCrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
     "SimpleCrossAttnUpBlock2D"),
])
def test_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_diffusers({**SD15_CONFIG_JSON, **changes})


# --- bad inputs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_unet():
    return UNet2DConditionModel(CONFIGS["sd15-layout"]).eval()


@pytest.mark.parametrize("x_shape, context_shape, t, message", [
    ((2, 9, 16, 16), (2, 77, 32), 1, r"expected \(B, 4, h, w\)"),
    ((4, 16, 16), (2, 77, 32), 1, r"expected \(B, 4, h, w\)"),
    ((2, 4, 16, 16), (2, 77, 768), 1, r"expected \(2, tokens, 32\)"),  # wrong text encoder width
    ((2, 4, 16, 16), (1, 77, 32), 1, r"expected \(2, tokens, 32\)"),
    ((2, 4, 16, 16), (77, 32), 1, "context has shape"),
    ((2, 4, 16, 16), (2, 77, 32), torch.tensor([1, 2, 3]), r"timestep has shape \(3,\)"),
])
def test_bad_inputs(small_unet, x_shape, context_shape, t, message):
    with pytest.raises(ValueError, match=message):
        small_unet(torch.randn(x_shape), t, torch.randn(context_shape))


def test_missing_context(small_unet):
    with pytest.raises(ValueError, match="context has shape None"):
        small_unet(torch.randn(2, 4, 16, 16), 1, None)
