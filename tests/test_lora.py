"""LoRA: the adapter's forward, merge/unmerge, strict loading of kohya and diffusers files, the prompt
syntax, and equivalence with diffusers' `load_lora_weights` (PEFT) on the same small random weights."""

from pathlib import PurePosixPath
from types import SimpleNamespace

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from safetensors.torch import save_file
from weights_helpers import SMALL_CLIP, SMALL_UNET, clip_state, reference_models

from sdlearn import lora as L
from sdlearn.clip import CLIPTextModel
from sdlearn.unet import UNet2DConditionModel
from sdlearn.weights import to_original_key, unet_rules

RANK, ALPHA = 4, 2.0  # kohya's common "alpha = rank / 2": scale 0.5


def small_models(refs):
    unet, _, clip = refs
    ours = SimpleNamespace(unet=UNet2DConditionModel(SMALL_UNET), text_encoder=CLIPTextModel(SMALL_CLIP))
    ours.unet.load_state_dict(unet.state_dict(), strict=True)
    ours.text_encoder.load_state_dict(clip_state(clip), strict=True)
    ours.unet.eval()
    ours.text_encoder.eval()
    return ours


@pytest.fixture(scope="module")
def refs():
    return reference_models()


@pytest.fixture()
def ours(refs):
    return small_models(refs)


def random_lora(models, seed=1, rank=RANK, te_rank=2):
    """{target: (down, up)} on every U-Net "all linear" layer (proj_in/out are 1x1 convs) and every CLIP layer."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for component, suffixes, r in (("unet", L.UNET_ALL_LINEAR, rank), ("text_encoder", L.TEXT_ENCODER_ALL, te_rank)):
        model = getattr(models, component)
        for name in L.lora_targets(model, suffixes):
            w = model.get_submodule(name).weight
            down = torch.randn(r, *w.shape[1:], generator=g) * 0.3  # (r, in[, 1, 1])
            up = torch.randn(w.shape[0], r, *w.shape[2:], generator=g) * 0.3  # (out, r[, 1, 1])
            out[f"{component}.{name}"] = (down, up)
    return out


def kohya_file(lora, alpha=ALPHA, original_names=False):
    sd, rules = {}, unet_rules(SMALL_UNET.to_diffusers())
    for target, (down, up) in lora.items():
        component, _, name = target.partition(".")
        if component == "unet":
            name = to_original_key(name + ".weight", rules)[:-7] if original_names else name
            key = "lora_unet_" + name.replace(".", "_")
        else:
            key = "lora_te_" + name.replace(".", "_")
        sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = down, up
        sd[key + ".alpha"] = torch.tensor(alpha)
    return sd


def diffusers_file(lora, a="lora_A.weight", b="lora_B.weight"):
    sd = {}
    for target, (down, up) in lora.items():
        sd[f"{target}.{a}"], sd[f"{target}.{b}"] = down, up
    return sd


def inputs(seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, SMALL_UNET.cross_attention_dim, generator=g)
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    return x, context, ids


@torch.no_grad()
def outputs(models, x, context, ids):
    return models.unet(x, 500, context), models.text_encoder(ids)


# ------------------------------------------------------------------------------ the adapter


def test_lora_forward_is_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    adapter = L.LoRALinear(base, rank=3, alpha=6.0, strength=0.7)
    x = torch.randn(5, 12)
    assert torch.equal(adapter(x), base(x))  # up starts at zero: a fresh adapter changes nothing
    torch.nn.init.normal_(adapter.up.weight)
    A, B = adapter.down.weight, adapter.up.weight  # (3, 12), (10, 3)
    expected = x @ base.weight.T + base.bias + 0.7 * (6.0 / 3) * (x @ A.T @ B.T)
    assert (adapter(x) - expected).abs().max() < 1e-5
    assert (adapter(x) - base(x)).abs().max() > 0.1
    # A 1x1 conv (SD1.5's proj_in) is the same matrix applied at every pixel.
    conv = torch.nn.Conv2d(12, 10, 1)
    cadapter = L.LoRALinear(conv, rank=3, alpha=6.0, strength=0.7)
    cadapter.down.weight.data = A.detach()[:, :, None, None].clone()
    cadapter.up.weight.data = B.detach()[:, :, None, None].clone()
    img = torch.randn(2, 12, 4, 4)
    as_tokens = img.permute(0, 2, 3, 1) @ (0.7 * 2.0 * (B @ A)).T.detach()  # (2, 4, 4, 10)
    assert (cadapter(img) - conv(img) - as_tokens.permute(0, 3, 1, 2)).abs().max() < 1e-5


def test_merge_equals_wrapper_and_unmerge_restores(ours):
    x, context, ids = inputs()
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    base_out = ours.unet(x, 500, context)
    ours.unet.requires_grad_(False)
    adapters = L.inject_lora(ours.unet, L.lora_targets(ours.unet, L.UNET_ALL_LINEAR), rank=4, alpha=8, strength=0.6)
    assert len(adapters) == 16 * 12  # SD1.5's 16 spatial transformers (6 down, 1 mid, 9 up), 12 layers each
    trainable = [n for n, p in ours.unet.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 16 * 12 and all(n.endswith((".down.weight", ".up.weight")) for n in trainable)
    for a in adapters.values():
        torch.nn.init.normal_(a.up.weight, std=0.3)
    wrapped = ours.unet(x, 500, context)
    for a in adapters.values():
        a.merge()
    merged = ours.unet(x, 500, context)
    diff = (merged - wrapped).abs().max().item()
    print(f"merged vs wrapper U-Net output: max abs difference {diff:.1e}")
    for a in adapters.values():
        a.unmerge()
    L.remove_lora(ours.unet)
    restored = max((ours.unet.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    print(f"merge then unmerge: max abs weight difference {restored:.1e}")
    assert restored < 1e-6
    assert (wrapped - base_out).abs().max() > 1e-2  # the LoRA changed the output...
    assert diff < 1e-5  # ...and merging gives the wrapper's output
    with pytest.raises(RuntimeError, match="not merged"):
        next(iter(adapters.values())).unmerge()


def test_save_load_round_trip_kohya(ours, refs, tmp_path):
    """Adapters injected for training, saved as a kohya file, loaded into a fresh model and merged."""
    x, context, ids = inputs()
    L.inject_lora(ours.unet, L.lora_targets(ours.unet), rank=2, alpha=1)
    L.inject_lora(ours.text_encoder, L.lora_targets(ours.text_encoder, L.TEXT_ENCODER_ALL), rank=2)
    for m in (ours.unet, ours.text_encoder):
        for module in m.modules():
            if isinstance(module, L.LoRALinear):  # as if trained: both factors non-zero
                torch.nn.init.normal_(module.down.weight, std=0.5)
                torch.nn.init.normal_(module.up.weight, std=0.5)
    expected = outputs(ours, x, context, ids)
    path = L.save_lora(tmp_path / "mine.safetensors", ours.unet, ours.text_encoder)
    fresh = small_models(refs)
    base = outputs(fresh, x, context, ids)
    lora = L.load_lora(path, fresh)
    assert lora.layout == "kohya" and len(lora.targets("unet")) == 16 * 8 and len(lora.targets("text_encoder")) == 12
    with L.applied_loras(fresh, [(path, 1.0)]):
        got = outputs(fresh, x, context, ids)
    for g, e, b in zip(got, expected, base):
        assert (g - e).abs().max() < 1e-5 and (e - b).abs().max() > 1e-3  # the LoRA moves outputs by >= 1e-3
    # remove_lora(merge=True) bakes the adapters in: the plain model then gives the same output.
    L.remove_lora(ours.unet, merge=True)
    assert not any(isinstance(m, L.LoRALinear) for m in ours.unet.modules())
    assert (ours.unet(x, 500, context) - expected[0]).abs().max() < 1e-5


# ------------------------------------------------------------------------------ equivalence with diffusers


@pytest.fixture(scope="module")
def diffusers_results(refs, tmp_path_factory):
    """diffusers' outputs for a kohya file and a diffusers file, strengths 1 and 0.5 (module-scoped: PEFT is slow)."""
    d = tmp_path_factory.mktemp("lora")
    models = small_models(refs)
    lora = random_lora(models)
    files = {"kohya": d / "kohya.safetensors", "diffusers": d / "pytorch_lora_weights.safetensors"}
    save_file(kohya_file(lora), str(files["kohya"]))
    save_file(diffusers_file(lora), str(files["diffusers"]))
    unet, vae, clip = reference_models()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=clip, tokenizer=None, unet=unet,
                                   scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    x, context, ids = inputs()
    with torch.no_grad():
        results = {"base": (unet(x, 500, context).sample, clip(ids).last_hidden_state)}
    for layout, path in list(files.items()):
        pipe.load_lora_weights(str(path), adapter_name=layout)
        for strength in (1.0, 0.5):
            pipe.set_adapters([layout], adapter_weights=[strength])  # the U-Net and the text encoder
            with torch.no_grad():
                results[layout, strength] = (unet(x, 500, context).sample, clip(ids).last_hidden_state)
        if layout == "kohya":  # a file as diffusers itself writes it, alpha in its metadata
            from peft.utils import get_peft_model_state_dict

            files["diffusers (saved by diffusers)"] = d / "saved" / "pytorch_lora_weights.safetensors"
            StableDiffusionPipeline.save_lora_weights(
                d / "saved", unet_lora_layers=get_peft_model_state_dict(unet, adapter_name="kohya"),
                text_encoder_lora_layers=get_peft_model_state_dict(clip, adapter_name="kohya"),
                unet_lora_adapter_metadata=unet.peft_config["kohya"].to_dict(),
                text_encoder_lora_adapter_metadata=clip.peft_config["kohya"].to_dict())
        pipe.delete_adapters(layout)
    return files, results


@pytest.mark.parametrize("layout", ["kohya", "diffusers", "diffusers (saved by diffusers)"])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_equals_diffusers_load_lora_weights(ours, diffusers_results, layout, strength):
    files, results = diffusers_results
    reference = results["kohya" if layout == "diffusers (saved by diffusers)" else layout, strength]
    base = results["base"]
    x, context, ids = inputs()
    lora = L.load_lora(files[layout], ours)
    assert len(lora.targets("unet")) == 16 * 12 and len(lora.targets("text_encoder")) == 2 * 6
    with L.applied_loras(ours, [(lora, strength)]):
        got = outputs(ours, x, context, ids)
    for part, g, r, b in zip(("U-Net", "text encoder"), got, reference, base):
        diff = (g - r).abs().max().item()
        print(f"{layout}, strength {strength}: {part} max abs difference to diffusers {diff:.1e} "
              f"(the LoRA moves it by {(r - b).abs().max().item():.2f})")
        assert diff < 1e-5 and (r - b).abs().max() > 1e-3


def test_layouts_give_identical_weights(ours, tmp_path):
    """kohya (diffusers names and original LDM names), PEFT, the older diffusers layouts, and a .pt file agree."""
    lora = random_lora(ours)
    old_processor = diffusers_file(lora, "lora.down.weight", "lora.up.weight")
    te_old = {k: v for k, v in diffusers_file(lora, "lora_linear_layer.down.weight",
                                              "lora_linear_layer.up.weight").items()
              if k.startswith("text_encoder.")}
    procs = {k.replace(".attn1.to_q.lora_A.weight", ".attn1.processor.to_q_lora.down.weight")
              .replace(".attn1.to_q.lora_B.weight", ".attn1.processor.to_q_lora.up.weight")
              .replace(".attn2.to_out.0.lora_A.weight", ".attn2.processor.to_out_lora.down.weight")
              .replace(".attn2.to_out.0.lora_B.weight", ".attn2.processor.to_out_lora.up.weight"): v
             for k, v in diffusers_file(lora).items()}
    assert sum("processor" in k for k in procs) == 2 * 2 * 16  # (down, up) x (to_q, to_out) x 16
    torch.save(kohya_file(lora), tmp_path / "k.pt")
    sources = {"kohya": kohya_file(lora), "kohya LDM names": kohya_file(lora, original_names=True),
               "kohya .pt": tmp_path / "k.pt", "peft": diffusers_file(lora), "lora.down": old_processor,
               "text encoder lora_linear_layer": te_old, "attention processors": procs}
    for name, source in sources.items():
        loaded = L.load_lora(source, ours)
        assert set(loaded.layers) == (set(lora) if name not in ("text encoder lora_linear_layer",)
                                      else {t for t in lora if t.startswith("text_encoder.")}), name
        for target, layer in loaded.layers.items():
            down, up = lora[target]
            # kohya: scale alpha/rank (the text encoder's rank is 2); diffusers without metadata: scale 1.
            scale = ALPHA / down.shape[0] if name.startswith("kohya") else 1.0
            expected = scale * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[:1] + down.shape[1:])
            assert (layer.delta(expected.shape) - expected).abs().max() < 1e-6, (name, target)


# ------------------------------------------------------------------------------ applying for one generation


def test_applied_loras_restores_the_model_exactly(ours):
    x, context, ids = inputs()
    lora = kohya_file(random_lora(ours))
    before = {c: {k: v.clone() for k, v in getattr(ours, c).state_dict().items()} for c in L.COMPONENTS}
    base = outputs(ours, x, context, ids)

    def unchanged():
        return all(torch.equal(getattr(ours, c).state_dict()[k], v) for c in L.COMPONENTS for k, v in before[c].items())

    with L.applied_loras(ours, [(lora, 0.8)]):
        inside = outputs(ours, x, context, ids)
        assert not unchanged()
    assert unchanged() and all(torch.equal(a, b) for a, b in zip(outputs(ours, x, context, ids), base))
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(inside, base))
    # An error during the generation still restores the weights.
    with pytest.raises(KeyboardInterrupt):
        with L.applied_loras(ours, [(lora, 1.0), (lora, -0.5)]):
            raise KeyboardInterrupt
    assert unchanged()
    # A bad LoRA later in the list fails before anything is merged.
    with pytest.raises(L.LoRAError):
        with L.applied_loras(ours, [(lora, 1.0), ({"lora_te1_x.lora_down.weight": torch.zeros(1, 1)}, 1.0)]):
            pass
    assert unchanged()


def test_strength_model_and_strength_clip(ours):
    """ComfyUI's LoraLoader: strength_model scales the U-Net's update, strength_clip the text encoder's."""
    x, context, ids = inputs()
    lora = L.load_lora(kohya_file(random_lora(ours)), ours)
    base = outputs(ours, x, context, ids)
    with L.applied_loras(ours, [(lora, 0.0, 1.0)]):
        unet_out, te_out = outputs(ours, x, context, ids)
    assert torch.equal(unet_out, base[0]) and (te_out - base[1]).abs().max() > 1e-2
    with L.applied_loras(ours, [(lora, 0.7, 0.0)]):
        unet_out, te_out = outputs(ours, x, context, ids)
    assert torch.equal(te_out, base[1]) and (unet_out - base[0]).abs().max() > 1e-3
    # Two strengths add up: 0.3 + 0.4 merged equals 0.7 merged (the update is linear in strength).
    with L.applied_loras(ours, [(lora, 0.3), (lora, 0.4)]):
        twice = outputs(ours, x, context, ids)
    with L.applied_loras(ours, [(lora, 0.7)]):
        once = outputs(ours, x, context, ids)
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(twice, once))


# ------------------------------------------------------------------------------ the prompt syntax


def test_extract_lora_tags():
    prompt, tags = L.extract_lora_tags("a fox, <lora:paper_cut:0.8> in snow <lora:ink style>")
    assert prompt == "a fox,  in snow " and tags == [("paper_cut", 0.8), ("ink style", 1.0)]
    assert L.extract_lora_tags("no tags (here:1.2)") == ("no tags (here:1.2)", [])
    assert L.extract_lora_tags("<lora:neg:-0.5>") == ("", [("neg", -0.5)])
    for bad, message in (("<lora:x:strong>", "not a number"), ("<lora::0.5>", "no LoRA name"),
                         ("<lora:x:0.5:1>", "strength_model")):
        with pytest.raises(ValueError, match=message):
            L.extract_lora_tags(bad)


def test_find_lora_in_folders(ours, tmp_path):
    lora_dir = tmp_path / "models" / "Lora"
    (lora_dir / "styles").mkdir(parents=True)
    save_file(kohya_file(random_lora(ours)), str(lora_dir / "paper_cut.safetensors"))
    torch.save(kohya_file(random_lora(ours, seed=2)), lora_dir / "styles" / "ink.pt")
    (lora_dir / "notes.txt").write_text("not a LoRA")
    assert L.find_lora("paper_cut", [tmp_path / "elsewhere", lora_dir]) == lora_dir / "paper_cut.safetensors"
    assert L.find_lora("ink", lora_dir) == lora_dir / "styles" / "ink.pt"
    with pytest.raises(L.LoRAError, match=r"no LoRA called 'watercolor'.*Available LoRAs: ink, paper_cut\."):
        L.find_lora("watercolor", lora_dir)
    prompt, loras = L.loras_from_prompt("a fox <lora:paper_cut:0.6><lora:ink>", [lora_dir])
    assert prompt == "a fox "
    assert loras == [(lora_dir / "paper_cut.safetensors", 0.6), (lora_dir / "styles" / "ink.pt", 1.0)]
    with L.applied_loras(ours, loras):
        pass
    torch.save(kohya_file(random_lora(ours)), lora_dir / "paper_cut.ckpt")
    with pytest.raises(L.LoRAError, match="matches several files"):
        L.find_lora("paper_cut", lora_dir)


# ------------------------------------------------------------------------------ strict loading


def _kohya(ours, **changes):
    sd = kohya_file(random_lora(ours))
    for key, value in changes.items():
        if value is None:
            del sd[key]
        else:
            sd[key] = value
    return sd


TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@pytest.mark.parametrize("make, message", [
    (lambda o: {**_kohya(o), "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 48)},
     r"LoRA for SDXL \(it has two text encoders"),
    (lambda o: _kohya(o, **{TO_K + ".lora_down.weight": torch.zeros(4, 2048)}),
     TO_K + r".lora_down.weight does not fit .*2048-wide text vectors: it is a LoRA for SDXL"),
    (lambda o: _kohya(o, **{TO_K + ".lora_down.weight": torch.zeros(4, 1024)}), "it is a LoRA for SD2.x"),
    (lambda o: {"lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight": torch.zeros(4, 640)},
     "SDXL"),
    (lambda o: {**_kohya(o), TO_K + ".hada_w1_a": torch.zeros(4, 4)}, "LyCORIS.*not support"),
    (lambda o: {"lora_unet_x.lokr_w1": torch.zeros(4, 4)}, "LyCORIS.*not support"),
    (lambda o: {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}, "full model checkpoint"),
    (lambda o: dict(o.unet.state_dict()), "full model checkpoint"),
    (lambda o: {"emb_params": torch.zeros(2, 768)}, "textual-inversion embedding"),
    (lambda o: {"lora_transformer_single_blocks_0_attn_to_q.lora_down.weight": torch.zeros(4, 3072)}, "Flux"),
    (lambda o: _kohya(o, **{"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_z.lora_down.weight":
                            torch.zeros(4, 32)}), r"key lora_unet_.*attn1_to_z.lora_down.weight names no layer"),
    (lambda o: _kohya(o, **{TO_K + ".lora_up.weight": None}), TO_K + r".* has no matching up tensor"),
    (lambda o: _kohya(o, **{TO_K + ".lora_up.weight": torch.zeros(99, 4)}), r"does not fit .*attn2.to_k.*up \(99, 4\)"),
    (lambda o: _kohya(o, **{TO_K + ".scale": torch.zeros(1)}), r"\.scale is not a kohya LoRA tensor"),
    (lambda o: {"unet.mid_block.attentions.0.proj_in.lora_B.bias": torch.zeros(4)}, "lora_bias is not supported"),
    (lambda o: {"controlnet.x.lora_A.weight": torch.zeros(4, 4)}, "not a LoRA tensor sdlearn knows"),
    (lambda o: {**{k: v for k, v in diffusers_file(random_lora(o)).items()},
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight": torch.zeros(4, 32)},
     "both the down tensor"),
])
def test_bad_files_get_clear_errors(ours, make, message):
    with pytest.raises(L.LoRAError, match=message):
        L.load_lora(make(ours), ours)


def test_file_checks(ours, tmp_path):
    """Metadata naming another family; pickles that hold code are refused unrun."""
    path = tmp_path / "xl.safetensors"
    save_file(kohya_file(random_lora(ours)), str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(L.LoRAError, match="LoRA for SDXL"):
        L.load_lora(path, ours)
    evil = tmp_path / "evil.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1), "payload": PurePosixPath("/")}, evil)
    with pytest.raises(L.CheckpointError, match="refused"):
        L.load_lora(evil, ours)
