"""sdlearn.weights: every source loads the exact reference tensors; bad inputs fail clearly.

The original-layout files here are written by running the loader's rules backwards; to break that
circle, diffusers' own converters (single_file_utils.convert_ldm_*) must turn the same files back
into the reference state dicts, and real SD1.5 key names are checked to exist in the full-size layout.
"""

import hashlib
import os
import pickle
import shutil

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel as DiffusersUNet
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint)
from safetensors.torch import save_file
from weights_helpers import (SMALL_CLIP, SMALL_UNET, SMALL_VAE, clip_state, diffusers_folder, original_checkpoint,
                             original_vae, reference_models, save_ckpt, save_safetensors, schedule_buffers)

from sdlearn import weights
from sdlearn.clip import CLIPTextConfig, CLIPTextModel
from sdlearn.unet import UNet2DConditionModel, UNetConfig
from sdlearn.vae import AutoencoderKL, VAEConfig
from sdlearn.weights import (CLIP, UNET, VAE, CheckpointError, TensorFile, ema_key, load_pipeline, to_original_key,
                             unet_config_from_shapes, unet_rules, vae_rules)

UCFG, VCFG = SMALL_UNET.to_diffusers(), SMALL_VAE.to_diffusers()


@pytest.fixture(scope="module")
def ref():
    unet, vae, clip = reference_models(seed=0)
    ema = {k: v + 0.5 for k, v in unet.state_dict().items()}  # a distinguishable "EMA copy"
    return dict(unet=unet, vae=vae, clip=clip, unet_sd=unet.state_dict(), vae_sd=vae.state_dict(),
                clip_sd=clip_state(clip), ema_sd=ema)


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    args = (ref["unet_sd"], ref["vae_sd"], ref["clip_sd"], UCFG, VCFG)
    plain = original_checkpoint(*args)
    with_ema = original_checkpoint(*args, ema_state=ref["ema_sd"])
    return dict(
        dir=d, plain_sd=plain, ema_sd=with_ema,
        safetensors=save_safetensors(plain, d / "model.safetensors"),
        ckpt_ema=save_ckpt(with_ema, d / "model-ema.ckpt"),
        safetensors_ema=save_safetensors(with_ema, d / "model-ema.safetensors"),
        old_clip=save_ckpt(original_checkpoint(*args, text_model_prefix=False), d / "old-clip.ckpt", wrap=False),
        fp16=save_safetensors({k: v.half() if v.is_floating_point() else v for k, v in plain.items()},
                              d / "model-fp16.safetensors"),
        folder=diffusers_folder(d / "diffusers", ref["unet"], ref["vae"], ref["clip"]),
    )


def assert_same_tensors(module, expected: dict):
    got = module.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def assert_pipe_equals(pipe, ref, unet_sd=None, dtype=torch.float32):
    conv = (lambda sd: {k: v.to(dtype) for k, v in sd.items()})
    assert_same_tensors(pipe.unet, conv(unet_sd if unet_sd is not None else ref["unet_sd"]))
    assert_same_tensors(pipe.vae, conv(ref["vae_sd"]))
    assert_same_tensors(pipe.text_encoder, conv(ref["clip_sd"]))


# --- the rules agree with diffusers' converters --------------------------------------------------


def test_rules_match_diffusers_converters(ref, files):
    sd = files["ema_sd"]
    for extract_ema, expected in ((False, ref["unet_sd"]), (True, ref["ema_sd"])):
        unet = convert_ldm_unet_checkpoint(sd, dict(UCFG), extract_ema=extract_ema)
        assert set(unet) == set(expected)
        assert all(torch.equal(unet[k], expected[k]) for k in expected)
    vae = convert_ldm_vae_checkpoint(sd, dict(VCFG))
    assert set(vae) == set(ref["vae_sd"]) and all(torch.equal(vae[k], v) for k, v in ref["vae_sd"].items())
    clip = convert_ldm_clip_checkpoint(sd)
    clip.pop("text_model.embeddings.position_ids")
    assert set(clip) == set(ref["clip_sd"]) and all(torch.equal(clip[k], v) for k, v in ref["clip_sd"].items())


@pytest.fixture(scope="module")
def sd15_meta():
    """SD1.5's three networks at full size on the meta device, and their original-layout key set."""
    with torch.device("meta"):
        models = (UNet2DConditionModel(UNetConfig.sd15()), AutoencoderKL(VAEConfig.sd15()),
                  CLIPTextModel(CLIPTextConfig.sd15()))
    unet, vae, clip = (m.state_dict() for m in models)
    ucfg, vcfg = UNetConfig.sd15().to_diffusers(), VAEConfig.sd15().to_diffusers()
    original = original_checkpoint(unet, vae, clip, ucfg, vcfg, ema_state=unet, schedule=False)
    return dict(unet=unet, vae=vae, clip=clip, ucfg=ucfg, vcfg=vcfg, original=original)


def test_full_size_sd15_key_sets_map_exactly(sd15_meta):
    m, orig = sd15_meta, sd15_meta["original"]
    # Real names from v1-5-pruned-emaonly.safetensors.
    for name in ["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                 "model.diffusion_model.output_blocks.2.1.conv.weight",
                 "model.diffusion_model.output_blocks.5.2.conv.weight",
                 "model.diffusion_model.input_blocks.3.0.op.weight",
                 "model.diffusion_model.middle_block.1.proj_in.weight",
                 "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
                 "model.diffusion_model.time_embed.2.bias", "model.diffusion_model.out.2.weight",
                 "model_ema.diffusion_modelinput_blocks00weight",
                 "first_stage_model.encoder.down.0.block.0.norm1.weight",
                 "first_stage_model.decoder.mid.attn_1.q.weight",
                 "first_stage_model.decoder.up.3.upsample.conv.weight",
                 "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
                 "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight",
                 "cond_stage_model.transformer.text_model.final_layer_norm.weight"]:
        assert name in orig, name
    assert orig["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in orig  # full resolution: no upsampler
    # diffusers' converters turn exactly this key set into exactly sdlearn's key sets, tensor for tensor.
    for converted, ours in ((convert_ldm_unet_checkpoint(orig, dict(m["ucfg"])), m["unet"]),
                            (convert_ldm_unet_checkpoint(orig, dict(m["ucfg"]), extract_ema=True), m["unet"]),
                            (convert_ldm_vae_checkpoint(orig, dict(m["vcfg"])), m["vae"])):
        assert set(converted) == set(ours)
        assert all(converted[k].shape == ours[k].shape for k in ours)
    clip = convert_ldm_clip_checkpoint(orig)
    clip.pop("text_model.embeddings.position_ids")
    assert set(clip) == set(m["clip"])
    counts = {p: sum(k.startswith(p) for k in orig) for p in (UNET, "model_ema.", VAE, CLIP)}
    assert counts == {UNET: 686, "model_ema.": 688, VAE: 248, CLIP: 197}
    # The flattened EMA names stay distinct, so the dot-removal loses nothing for SD1.5.
    assert len({ema_key(UNET + k) for k in orig if k.startswith(UNET)}) == 686


def test_full_size_config_is_read_from_shapes(sd15_meta):
    tf = TensorFile("sd15-meta", tensors=sd15_meta["original"])
    assert UNetConfig.from_diffusers(unet_config_from_shapes(tf)) == UNetConfig.sd15()
    assert VAEConfig.from_diffusers(weights.vae_config_from_shapes(tf, VAE)) == VAEConfig.sd15()
    assert CLIPTextConfig.from_transformers(weights.clip_config_from_shapes(tf, CLIP + "text_model.")) \
        == CLIPTextConfig.sd15()
    inpaint = dict(sd15_meta["original"])
    inpaint[UNET + "input_blocks.0.0.weight"] = torch.empty(320, 9, 3, 3, device="meta")
    cfg = unet_config_from_shapes(TensorFile("inpaint", tensors=inpaint))
    assert UNetConfig.from_diffusers(cfg) == UNetConfig.sd15(in_channels=9)


# --- single files ---------------------------------------------------------------------------------


def test_single_file_safetensors_no_ema(ref, files):
    pipe = load_pipeline(files["safetensors"])
    assert_pipe_equals(pipe, ref)
    assert pipe.info["unet_weights"].startswith("model.diffusion_model.*")
    assert pipe.info["schedule"].startswith("SD1.5")
    assert pipe.info["model"] == "SD1.5" and pipe.device.type == "cpu" and pipe.dtype == torch.float32


@pytest.mark.parametrize("name", ["ckpt_ema", "safetensors_ema"])
def test_single_file_ema_default_and_opt_out(ref, files, name):
    pipe = load_pipeline(files[name])
    assert_pipe_equals(pipe, ref, unet_sd=ref["ema_sd"])
    assert pipe.info["unet_weights"] == "EMA (model_ema.*)"
    pipe = load_pipeline(files[name], use_ema=False)
    assert_pipe_equals(pipe, ref)
    assert pipe.info["unet_weights"].startswith("non-EMA")


def test_single_file_old_clip_names_and_fp16(ref, files):
    assert_pipe_equals(load_pipeline(files["old_clip"]), ref)  # cond_stage_model.transformer.embeddings.*
    pipe = load_pipeline(files["fp16"], dtype=torch.float16)
    assert_pipe_equals(pipe, ref, dtype=torch.float16)
    assert pipe.dtype == torch.float16 and pipe.info["dtype"] == "float16"
    assert_pipe_equals(load_pipeline(files["fp16"], dtype="fp32"), {k: {kk: vv.half() for kk, vv in v.items()}
                                                                    for k, v in ref.items() if k.endswith("_sd")})


def test_loaded_modules_compute_what_diffusers_and_transformers_compute(ref, files):
    pipe = load_pipeline(files["ckpt_ema"], use_ema=False)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 48, generator=g)
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    ids = pipe.tokenizer(["a red circle", "a small blue square at the top left"])
    with torch.no_grad():
        diffs = {
            "unet": (pipe.unet(x, torch.tensor([10, 700]), ctx) - ref["unet"](x, torch.tensor([10, 700]), ctx).sample),
            "vae.encode": pipe.vae.encode(img).mean - ref["vae"].encode(img).latent_dist.mean,
            "vae.decode": pipe.vae.decode(x[:1]) - ref["vae"].decode(x[:1]).sample,
            "clip": pipe.text_encoder(ids) - ref["clip"](ids).last_hidden_state,
        }
    worst = {k: d.abs().max().item() for k, d in diffs.items()}
    assert all(v < 1e-5 for v in worst.values()), worst


def test_inpainting_unet_is_detected(tmp_path):
    unet, vae, clip = reference_models(seed=3, unet_config=UNetConfig(**{**UCFG, "in_channels": 9}))
    sd = original_checkpoint(unet.state_dict(), vae.state_dict(), clip_state(clip),
                             {**UCFG, "in_channels": 9}, VCFG)
    pipe = load_pipeline(save_safetensors(sd, tmp_path / "inpaint.safetensors"))
    assert pipe.unet.config.in_channels == 9 and pipe.info["model"].startswith("SD1.5 inpainting")
    assert_same_tensors(pipe.unet, unet.state_dict())


# --- diffusers folders, hub ids, "tiny" -----------------------------------------------------------


def test_diffusers_folder_safetensors_bin_and_fp16_variant(ref, files, tmp_path):
    pipe = load_pipeline(files["folder"])
    assert_pipe_equals(pipe, ref)
    assert pipe.info["files"] == {"unet": "diffusion_pytorch_model.safetensors",
                                  "vae": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors"}
    binary = diffusers_folder(tmp_path / "bin", ref["unet"], ref["vae"], ref["clip"], safe=False)
    pipe = load_pipeline(binary)
    assert_pipe_equals(pipe, ref)
    assert pipe.info["files"]["unet"] == "diffusion_pytorch_model.bin"
    # The fp16 variant next to the fp32 files: taken for dtype=fp16 only.
    both = shutil.copytree(files["folder"], tmp_path / "both")
    diffusers_folder(both, ref["unet"], ref["vae"], ref["clip"], variant="fp16")
    assert (both / "text_encoder" / "model.safetensors").exists() is False  # replaced by the fp16 text encoder
    pipe = load_pipeline(both, dtype=torch.float16)
    assert pipe.info["files"]["unet"] == "diffusion_pytorch_model.fp16.safetensors"
    assert_pipe_equals(pipe, ref, dtype=torch.float16)
    assert load_pipeline(both).info["files"]["unet"] == "diffusion_pytorch_model.safetensors"


def test_folder_non_ema_variant_with_use_ema_false(ref, files, tmp_path):
    folder = shutil.copytree(files["folder"], tmp_path / "f")
    save_file(ref["ema_sd"], str(folder / "unet" / "diffusion_pytorch_model.non_ema.safetensors"))
    assert_pipe_equals(load_pipeline(folder, use_ema=False), ref, unet_sd=ref["ema_sd"])
    assert_pipe_equals(load_pipeline(folder), ref)


def test_tiny_loads_through_the_folder_path(ref, files, monkeypatch, tmp_path):
    monkeypatch.setattr(weights, "TINY_DIR", tmp_path / "missing")
    with pytest.raises(CheckpointError, match="TinySD weights are not in assets/ yet"):
        load_pipeline("tiny")
    monkeypatch.setattr(weights, "TINY_DIR", files["folder"])
    pipe = load_pipeline("tiny")
    assert_pipe_equals(pipe, ref)
    assert pipe.info["model"] == "TinySD"


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="needs the network.*local path"):
        load_pipeline("sdlearn-tests/no-such-model")
    # Online but no connection: the same advice.
    import huggingface_hub

    def no_connection(*a, **k):
        raise OSError("Connection refused")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", no_connection)
    with pytest.raises(CheckpointError, match="needs the network.*local path"):
        load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_hub_download_asks_only_for_needed_files(ref, files, monkeypatch):
    import huggingface_hub

    listing = ["model_index.json", "v1-5-pruned.safetensors", "tokenizer/vocab.json"] + [
        f"{c}/{n}" for c in ("unet", "vae") for n in ("config.json", "diffusion_pytorch_model.safetensors",
                                                      "diffusion_pytorch_model.fp16.safetensors",
                                                      "diffusion_pytorch_model.bin")] + [
        "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors"]
    asked = {}
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id: listing)

    def fake_snapshot(repo_id, allow_patterns, **kw):
        asked[repo_id] = sorted(allow_patterns)
        return str(files["folder"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    pipe = load_pipeline("org/sd15", dtype=torch.float16)
    assert asked["org/sd15"] == sorted(["model_index.json", "tokenizer/vocab.json", "unet/config.json",
                                        "vae/config.json", "text_encoder/config.json",
                                        "unet/diffusion_pytorch_model.fp16.safetensors",
                                        "vae/diffusion_pytorch_model.fp16.safetensors",
                                        "text_encoder/model.fp16.safetensors"])
    assert pipe.info["format"].startswith("hub repo org/sd15")
    load_pipeline("org/sd15b")
    assert "unet/diffusion_pytorch_model.safetensors" in asked["org/sd15b"]


# --- a separate VAE file --------------------------------------------------------------------------


def test_separate_vae_file_in_every_layout(ref, files, tmp_path):
    _, other_vae, _ = reference_models(seed=7)
    other = other_vae.state_dict()
    layouts = {
        "vae-ft-mse-840000-ema-pruned.safetensors": save_safetensors(original_vae(other, VCFG, prefix=""),
                                                                     tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors"),
        "prefixed.ckpt with loss.*": save_ckpt({**original_vae(other, VCFG), "loss.logvar": torch.zeros(()),
                                                "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4)},
                                               tmp_path / "vae.ckpt"),
        "diffusers": save_safetensors(other, tmp_path / "diffusion_pytorch_model.safetensors"),
    }
    for name, path in layouts.items():
        vae, vae_info = weights.load_vae_file(path, torch.float32)
        assert_same_tensors(vae, other)
        assert sum(vae_info["ignored"].values()) == (2 if "loss" in name else 0), name
    pipe = load_pipeline(files["safetensors"], vae=layouts["prefixed.ckpt with loss.*"])
    assert_same_tensors(pipe.vae, other)
    assert_same_tensors(pipe.unet, ref["unet_sd"])
    assert pipe.info["vae"] == f"separate file {layouts['prefixed.ckpt with loss.*']}"
    assert pipe.info["vae_ignored"] == {"the VAE's training loss (discriminator, LPIPS) saved in some VAE files": 2}
    # A diffusers folder without vae/ is fine when a VAE file is given.
    folder = shutil.copytree(files["folder"], tmp_path / "novae")
    shutil.rmtree(folder / "vae")
    assert_same_tensors(load_pipeline(folder, vae=layouts["diffusers"]).vae, other)
    with pytest.raises(CheckpointError, match=r"no vae/.*vae="):
        load_pipeline(folder)


# --- bad input ------------------------------------------------------------------------------------


def _save(tmp_path, name, sd):
    return save_safetensors(sd, tmp_path / name)


def test_damaged_and_foreign_files(files, tmp_path):
    data = files["safetensors"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "cuthead.safetensors").write_bytes(data[:20])
    ck = files["ckpt_ema"].read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(ck[: len(ck) // 2])
    (tmp_path / "image.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    (tmp_path / "notes.ckpt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    cases = {"cut.safetensors": "truncated", "cuthead.safetensors": "damaged .safetensors",
             "cut.ckpt": "damaged .ckpt", "image.safetensors": "not a checkpoint: it is a PNG image",
             "notes.ckpt": "not a checkpoint: it is a text file", "empty.ckpt": "empty"}
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            load_pipeline(tmp_path / name)
    with pytest.raises(CheckpointError, match="No such file or folder"):
        load_pipeline(tmp_path / "nowhere" / "model.safetensors")
    with pytest.raises(CheckpointError, match="No such file"):
        load_pipeline(files["safetensors"], vae=tmp_path / "missing-vae.safetensors")


def test_other_model_families_are_named(files, tmp_path):
    plain = files["plain_sd"]
    t = torch.zeros(2)
    cases = {
        "sdxl": ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": t, **plain}, "SDXL"),
        "sd2": ({"cond_stage_model.model.token_embedding.weight": t, **plain}, "2.x"),
        "sd3": ({"model.diffusion_model.joint_blocks.0.x_block.mlp.fc1.weight": t}, "SD3 / Flux"),
        "flux": ({"double_blocks.0.img_attn.norm.key_norm.scale": t}, "SD3 / Flux"),
        "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": t}, "is a LoRA"),
        "ti": ({"emb_params": torch.zeros(2, 768)}, "textual-inversion embedding"),
        "vae-only": ({k[len(VAE):]: v for k, v in plain.items() if k.startswith(VAE)}, r"VAE on its own.*vae="),
        "no-text-encoder": ({k: v for k, v in plain.items() if not k.startswith(CLIP)}, "no text encoder"),
        "diffusers-unet": ({"down_blocks.0.resnets.0.conv1.weight": t}, "one component of a diffusers folder"),
        "random": ({"foo.bar": t}, "not a Stable Diffusion 1.x checkpoint"),
    }
    for name, (sd, message) in cases.items():
        with pytest.raises(CheckpointError, match=message):
            load_pipeline(_save(tmp_path, f"{name}.safetensors", sd))
    torch.save({"string_to_param": {"*": torch.zeros(2, 768)}, "name": "style", "step": 3000}, tmp_path / "ti.pt")
    with pytest.raises(CheckpointError, match="textual-inversion embedding"):
        load_pipeline(tmp_path / "ti.pt")


def test_unet_input_channels(files, tmp_path):
    for channels, message in ((8, "InstructPix2Pix"), (6, "6 input channels")):
        sd = dict(files["plain_sd"])
        w = sd[UNET + "input_blocks.0.0.weight"]
        sd[UNET + "input_blocks.0.0.weight"] = torch.zeros(w.shape[0], channels, 3, 3)
        with pytest.raises(CheckpointError, match=message):
            load_pipeline(_save(tmp_path, f"in{channels}.safetensors", sd))


def test_strictness_names_the_key(files, tmp_path):
    plain = files["plain_sd"]
    q = "first_stage_model.decoder.mid.attn_1.q.weight"
    missing = {k: v for k, v in plain.items() if k != q}
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*decoder\.mid\.attn_1\.q\.weight.*mid_block\.attentions\.0\.to_q"):
        load_pipeline(_save(tmp_path, "missing.safetensors", missing))
    extra = {**plain, "control_model.input_hint_block.0.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"belong to no part.*control_model\.input_hint_block"):
        load_pipeline(_save(tmp_path, "extra.safetensors", extra))
    k = CLIP + "text_model.encoder.layers.0.mlp.fc1.bias"
    wrong = {**plain, k: torch.zeros(95)}
    with pytest.raises(CheckpointError, match=r"mlp\.fc1\.bias has shape \(95,\)"):
        load_pipeline(_save(tmp_path, "wrong.safetensors", wrong))
    # An EMA copy missing one tensor is an incomplete file, whichever copy is used.
    ema = {k: v for k, v in files["ema_sd"].items() if k != "model_ema.diffusion_modelout2weight"}
    for use_ema in (True, False):
        with pytest.raises(CheckpointError, match="out2weight|out.2.weight"):
            load_pipeline(_save(tmp_path, "ema-missing.safetensors", ema), use_ema=use_ema)


class _WritesAFile:
    """Unpickling this calls open(path, "w"): the kind of code a malicious .ckpt would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused_without_running(files, tmp_path):
    # A torch.save zip and a bare pickle, each hiding a call next to real weights.
    zipped, bare = tmp_path / "evil.ckpt", tmp_path / "evil-bare.ckpt"
    torch.save({"state_dict": {**files["plain_sd"], "x": _WritesAFile(tmp_path / "pwned-1")}}, zipped)
    with open(bare, "wb") as f:
        pickle.dump({"state_dict": {"x": _WritesAFile(tmp_path / "pwned-2")}}, f, protocol=2)
    for path in (zipped, bare):
        with pytest.raises(CheckpointError, match=r"refused: this \.ckpt contains code.*Use the \.safetensors"):
            load_pipeline(path)
        with pytest.raises(CheckpointError, match="refused"):
            load_pipeline(files["safetensors"], vae=path)
    assert not (tmp_path / "pwned-1").exists() and not (tmp_path / "pwned-2").exists()
    # The plants are real: plain unpickling does write the file.
    with open(bare, "rb") as f:
        pickle.load(f)
    assert (tmp_path / "pwned-2").exists()


def test_user_files_are_never_modified(files):
    paths = [files["ckpt_ema"], files["safetensors"]] + sorted(p for p in files["folder"].rglob("*") if p.is_file())
    listing = sorted(files["dir"].rglob("*"))
    before = {p: (hashlib.sha256(p.read_bytes()).hexdigest(), os.stat(p).st_mtime_ns) for p in paths}
    load_pipeline(files["ckpt_ema"])
    load_pipeline(files["folder"], dtype=torch.float16)
    after = {p: (hashlib.sha256(p.read_bytes()).hexdigest(), os.stat(p).st_mtime_ns) for p in paths}
    assert before == after and sorted(files["dir"].rglob("*")) == listing  # nothing changed, nothing added


def test_folder_with_foreign_tokenizer_or_pipeline_is_refused(files, tmp_path):
    folder = shutil.copytree(files["folder"], tmp_path / "f")
    (folder / "tokenizer" / "vocab.json").write_text('{"a": 0}')
    with pytest.raises(CheckpointError, match="1 tokens, CLIP's has 49408"):
        load_pipeline(folder)
    shutil.rmtree(folder / "tokenizer")
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(CheckpointError, match="StableDiffusionXLPipeline"):
        load_pipeline(folder)


def test_bad_device_and_dtype_arguments(files):
    with pytest.raises(ValueError, match="dtype"):
        load_pipeline(files["safetensors"], dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            load_pipeline(files["safetensors"], device="cuda")


def test_schedule_buffers_are_checked(files, tmp_path):
    sd = {**files["plain_sd"], **schedule_buffers(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))}
    with pytest.warns(UserWarning, match="differs from SD1.5"):
        pipe = load_pipeline(_save(tmp_path, "linear.safetensors", sd))
    assert pipe.info["schedule"].startswith("differs")


def test_sd15_from_env_says_what_is_missing(files, monkeypatch, capsys):
    from sdlearn.weights import SD15_ENV, sd15_from_env

    monkeypatch.delenv(SD15_ENV, raising=False)
    assert sd15_from_env() is None
    assert SD15_ENV in capsys.readouterr().out
    monkeypatch.setenv(SD15_ENV, str(files["safetensors"]))
    assert sd15_from_env(device="cpu") is None  # no GPU: skipped with a reason
    assert "no CUDA GPU" in capsys.readouterr().out
    pipe = sd15_from_env(device="cpu", allow_cpu=True)
    assert pipe.source == str(files["safetensors"]) and pipe.dtype == torch.float32
