"""sdlearn.clip against transformers' CLIPTextModel on the same (random) weights."""

import pytest
import torch
import transformers

from sdlearn.clip import END_OF_TEXT, CLIPTextConfig, CLIPTextModel

# Small, but with the real vocabulary size so the start/end ids 49406/49407 are valid tokens.
SMALL = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4)
TOL = 1e-5


def _file_layout(ref_state_dict):
    """transformers' CLIPTextModel keys as stored in SD1.5 files (`text_model.` prefix).

    transformers 4.x has that prefix in memory too; transformers 5 keeps the modules at the top level
    and strips the prefix when it loads such a file. Anything else is a layout we do not know.
    """
    keys = list(ref_state_dict)
    if all(k.startswith("text_model.") for k in keys):
        return dict(ref_state_dict)
    assert not any(k.startswith("text_model.") for k in keys), keys[:5]
    return {"text_model." + k: v for k, v in ref_state_dict.items()}


def _pair(hidden_act="quick_gelu", eos_token_id=END_OF_TEXT):
    """An sdlearn model and a transformers model holding the same random weights."""
    cfg = CLIPTextConfig(**SMALL, hidden_act=hidden_act)
    ref_kwargs = cfg.to_transformers()
    ref_kwargs["eos_token_id"] = eos_token_id
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**ref_kwargs)).eval()
    ours = CLIPTextModel(cfg).eval()
    ours.load_state_dict(_file_layout(ref.state_dict()), strict=True)
    return ours, ref


def _final_layer_norm(ref):
    return (ref.text_model if hasattr(ref, "text_model") else ref).final_layer_norm


def _ids(seed=0):
    """A batch the way the tokenizer makes it: start, prompt, end, then end-token padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((4, 77), END_OF_TEXT, dtype=torch.long)
    for row, n in enumerate((5, 20, 75, 0)):  # prompt lengths: short, medium, full window, empty
        ids[row, 0] = 49406
        ids[row, 1 : 1 + n] = torch.randint(0, 49406, (n,), generator=g)
    return ids


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_matches_transformers(hidden_act):
    ours, ref = _pair(hidden_act)
    ids = _ids()
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        last = ours(ids)
        skip2 = ours(ids, clip_skip=2)
        ref_skip2 = _final_layer_norm(ref)(out.hidden_states[-2])
    d_last = (last - out.last_hidden_state).abs().max().item()
    d_skip2 = (skip2 - ref_skip2).abs().max().item()
    d_pool = (ours.pooled(last, ids) - out.pooler_output).abs().max().item()
    print(f"\n[{hidden_act}] max|diff| last_hidden_state {d_last:.2e}  clip_skip=2 {d_skip2:.2e}  pooled {d_pool:.2e}")
    assert last.shape == (4, 77, 64)
    assert d_last < TOL and d_skip2 < TOL and d_pool < TOL
    # clip skip really changes the output (a wrong layer index would still pass a shape check)
    assert (skip2 - last).abs().max() > 1e-2


def test_clip_skip_k_is_hidden_states_minus_k():
    ours, ref = _pair()
    ids = _ids(1)
    with torch.no_grad():
        hs = ref(ids, output_hidden_states=True).hidden_states  # embeddings + one per layer
        for k in (1, 2, 3):
            want = _final_layer_norm(ref)(hs[-k])
            assert (ours(ids, clip_skip=k) - want).abs().max() < TOL


def test_pooled_is_first_end_token_and_legacy_argmax_rule_agrees():
    # SD1.5's own config.json has eos_token_id=2, which selects transformers' legacy argmax pooling.
    ours, ref = _pair(eos_token_id=2)
    ids = _ids(2)
    with torch.no_grad():
        out = ref(ids)
    pooled = ours.pooled(out.last_hidden_state, ids)
    assert (pooled - out.pooler_output).abs().max() < TOL
    # the vector really is the one at the first end token (row 0: start + 5 tokens -> position 6)
    assert torch.equal(pooled[0], out.last_hidden_state[0, 6])
    assert torch.equal(pooled[3], out.last_hidden_state[3, 1])


def test_causal_padding_does_not_change_prompt_tokens():
    ours, _ = _pair()
    ids = _ids(3)[:1]
    with torch.no_grad():
        full = ours(ids)
        short = ours(ids[:, :10])
    assert (full[:, :10] - short).abs().max() < TOL


def test_sd15_structure_on_meta():
    cfg = CLIPTextConfig.sd15()
    with torch.device("meta"):
        ours = CLIPTextModel(cfg)
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg.to_transformers()))
    assert sum(p.numel() for p in ours.parameters()) == 123_060_480
    ours_sd, ref_sd = ours.state_dict(), _file_layout(ref.state_dict())
    assert set(ours_sd) == set(ref_sd)
    assert all(ours_sd[k].shape == ref_sd[k].shape for k in ref_sd)
    assert "text_model.embeddings.token_embedding.weight" in ours_sd


def test_from_transformers_reads_sd15_config_json():
    # SD1.5's text_encoder/config.json (runwayml/stable-diffusion-v1-5), as shipped.
    d = {
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
        "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
        "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
        "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
    }
    assert CLIPTextConfig.from_transformers(d) == CLIPTextConfig.sd15()
    # and a round trip through transformers' own config class
    small = CLIPTextConfig(**SMALL)
    assert CLIPTextConfig.from_transformers(transformers.CLIPTextConfig(**small.to_transformers()).to_dict()) == small


def test_bad_config_and_inputs_are_rejected_clearly():
    with pytest.raises(ValueError, match="hidden_act='gelu_new' is not implemented"):
        CLIPTextConfig.from_transformers({"hidden_act": "gelu_new"})
    with pytest.raises(ValueError, match="divisible"):
        CLIPTextConfig(hidden_size=64, num_attention_heads=5)
    with pytest.raises(ValueError, match="text_config"):
        CLIPTextConfig.from_transformers({"text_config": {}, "vision_config": {}})
    with pytest.raises(ValueError, match="attention_dropout"):
        CLIPTextConfig.from_transformers({"attention_dropout": 0.1})
    model = CLIPTextModel(CLIPTextConfig(**SMALL))
    ids = _ids()
    with pytest.raises(ValueError, match="clip_skip"):
        model(ids, clip_skip=0)
    with pytest.raises(ValueError, match="CLIPSetLastLayer -2 is clip_skip=2"):
        model(ids, clip_skip=-2)
    with pytest.raises(ValueError, match="clip_skip"):
        model(ids, clip_skip=4)  # only 3 layers
    with pytest.raises(ValueError, match="77-token"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, tokens\)"):
        model(ids[0])
    with pytest.raises(ValueError, match="end-of-text"):
        model.pooled(torch.zeros(1, 5, 64), torch.tensor([[49406, 1, 2, 3, 4]]))


def test_our_state_dict_is_a_folder_transformers_loads(tmp_path):
    """Saved as a diffusers-style text_encoder/ folder, our weights load into transformers with every
    key used and none missing, and give the same outputs: the key layout is SD1.5's file layout."""
    from safetensors.torch import save_file

    ours = CLIPTextModel(CLIPTextConfig(**SMALL)).eval()
    save_file(ours.state_dict(), tmp_path / "model.safetensors")
    transformers.CLIPTextConfig(**ours.config.to_transformers()).save_pretrained(tmp_path)
    ref, info = transformers.CLIPTextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = _ids(4)
    with torch.no_grad():
        assert (ours(ids) - ref.eval()(ids).last_hidden_state).abs().max() < TOL


def test_extra_tokens_equal_transformers_with_a_grown_vocabulary():
    """Textual inversion's added tokens: ids past the vocabulary read `extra_tokens`, exactly as
    transformers does after resize_token_embeddings and writing the new rows (what diffusers'
    load_textual_inversion does); the state dict keeps its keys and shapes."""
    ours, ref = _pair()
    keys_before = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    extra = torch.randn(3, 64)
    V = ours.config.vocab_size
    ref.resize_token_embeddings(V + 3)
    with torch.no_grad():
        ref.get_input_embeddings().weight[V:] = extra
    ids = _ids()
    ids[0, 2:5] = torch.tensor([V, V + 1, V + 2])        # a 3-vector embedding in the first prompt
    ids[1, 7] = V + 1
    with torch.no_grad():
        out = ours(ids, extra_tokens=extra)
        expected = ref(ids).last_hidden_state
        plain = ours(_ids())
    assert (out - expected).abs().max().item() < TOL
    # rows without added ids are unchanged; the first prompt changes from position 2 on (causal)
    assert torch.equal(out[2:], plain[2:]) and torch.equal(out[0, :2], plain[0, :2])
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == keys_before
    # gradients reach the extra vectors only where they are used
    extra.requires_grad_(True)
    ours(ids, extra_tokens=extra).sum().backward()
    assert extra.grad.abs().sum(1).gt(0).all()
    with pytest.raises(ValueError, match="added tokens"):
        ours(ids)                                            # ids past the vocabulary need their vectors
    with pytest.raises(ValueError, match=r"shape \(N, 64\)"):
        ours(ids, extra_tokens=torch.zeros(3, 768))
