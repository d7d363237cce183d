"""sdlearn.train: each model learns (a few steps on tiny configs), the decoder fine-tune moves only the decoder,
runs are reproducible from the seed, the scaling factor is 1/std of the latents, the saved folder loads, a
U-Net-only run, a decoder fine-tune and the U-Net's second cycle from saved folders match the full run, and a
trained model is never overwritten."""

import json
import re

import numpy as np
import pytest
import torch

import sdlearn
from sdlearn import shapes, train
from sdlearn.clip import CLIPTextConfig
from sdlearn.tokenizer import CLIPTokenizer
from sdlearn.unet import UNetConfig
from sdlearn.vae import VAEConfig
from sdlearn.weights import TensorFile


@pytest.fixture(scope="module")
def data():
    images, captions = shapes.dataset(64, seed=0, size=32)  # 32x32: 4x4 latents, cheap
    return images, captions, CLIPTokenizer()(captions)


def tiny_vae():
    return VAEConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, scaling_factor=1.0)


def tiny_clip():
    return CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def tiny_unet():
    return UNetConfig(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=2,
                      cross_attention_dim=16, norm_num_groups=8, sample_size=4)


def falls(losses, k=5, ratio=0.8):
    """Mean of the last k losses clearly below (ratio times) the mean of the first k."""
    first, last = np.mean(losses[:k]), np.mean(losses[-k:])
    return last < ratio * first, (first, last)


def test_vae_loss_falls(data):
    images, _, _ = data
    _, losses = train.train_vae(images, tiny_vae(), steps=40, batch_size=8, lr=3e-3, seed=0, log=None)
    ok, (first, last) = falls(losses)
    assert ok, f"VAE loss did not fall: {first:.3f} -> {last:.3f}"


def test_decoder_finetune_moves_only_the_decoder(data):
    images, _, _ = data
    vae, _ = train.train_vae(images, tiny_vae(), steps=2, batch_size=8, seed=0, log=None)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    losses = train.finetune_decoder(vae, images, steps=40, batch_size=8, lr=3e-3, seed=0, log=None)
    ok, (first, last) = falls(losses, ratio=0.9)     # 0.67 -> 0.58: a decoder alone, on a barely trained encoder
    assert ok, f"decoder loss did not fall: {first:.3f} -> {last:.3f}"
    after = vae.state_dict()
    moved = {k.split(".")[0] for k in after if not torch.equal(after[k], before[k])}
    assert moved == {"decoder", "post_quant_conv"}     # encoder and quant_conv (the latents) untouched
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training


def test_clip_loss_falls_and_encoder_is_frozen(data):
    images, _, ids = data
    text_encoder, pair, losses = train.train_clip(images, ids, tiny_clip(), steps=40, batch_size=16, lr=3e-3,
                                                  seed=0, log=None)
    ok, (first, last) = falls(losses)
    assert ok, f"contrastive loss did not fall: {first:.3f} -> {last:.3f}"
    assert first == pytest.approx(np.log(16), rel=0.2)  # chance level: -log(1/B) for a batch of B
    assert not any(p.requires_grad for p in text_encoder.parameters())


def test_counterfactual_caption_swaps_exactly_one_attribute():
    """A hard negative is a valid caption of the world that differs from the original in one attribute."""
    _, captions = shapes.dataset(200, seed=5)
    rng = np.random.default_rng(0)
    kinds_seen = set()
    for caption in captions:
        swapped = train.counterfactual_caption(caption, rng)
        try:
            changed = shapes.parse_caption(swapped)       # still the world's grammar ...
            assert changed != shapes.parse_caption(caption), (caption, swapped)
        except shapes.CaptionError as e:                 # ... though a swapped count may ask for 4 objects
            assert "objects; the shapes world has at most" in str(e), (caption, swapped)
        words_a, words_b = caption.split(), swapped.split()
        differing = [(a, b) for a, b in zip(words_a, words_b) if a != b]
        # One word changed, or one position phrase ("on the left" -> "at the top right"), plus its article.
        assert len(differing) <= 3 or len(words_a) != len(words_b), (caption, swapped)
        for a, b in differing:
            kinds_seen.update(k for k, words in train._SWAPS.items() if b in words or any(b in w.split() for w in words))
    assert {"colour", "shape", "shapes", "size", "count", "position"} <= kinds_seen
    assert train.counterfactual_caption("an orange circle on a red background", np.random.default_rng(1),
                                        kinds=("position",)) is None
    # The article follows the new word: never "a orange", never "an red".
    swaps = [train.counterfactual_caption("a red circle on a blue background", np.random.default_rng(i), ("colour",))
             for i in range(40)]
    assert any(s.startswith("an orange") for s in swaps)
    assert not any("a orange" in s or "an red" in s for s in swaps)


def test_binding_caption_moves_position_phrases_between_objects():
    rng = np.random.default_rng(0)
    assert train.binding_caption("a red circle at the top left and a blue square", rng) == \
        "a red circle and a blue square at the top left"                   # moved to the object that had none
    assert train.binding_caption("a red circle on the left and a blue square on the right, white background", rng) \
        == "a red circle on the right and a blue square on the left, white background"   # exchanged
    assert train.binding_caption("a small red circle at the top left on a blue background", rng) is None
    assert train.binding_caption("two red circles and a blue square", rng) is None   # no phrase to move
    _, captions = shapes.dataset(500, seed=0, split="train")
    swapped = [(c, train.binding_caption(c, rng)) for c in captions]
    swapped = [(c, b) for c, b in swapped if b is not None]
    assert len(swapped) > 50
    for caption, negative in swapped:        # the same words, a different scene
        assert sorted(re.findall(r"\w+", caption)) == sorted(re.findall(r"\w+", negative))
        assert shapes.parse_caption(negative) != shapes.parse_caption(caption)


def test_hard_negatives_without_binding_are_the_old_recipe():
    # Share 0 draws exactly what the shipped model's text encoder was trained on.
    _, captions = shapes.dataset(200, seed=0, split="train")
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    assert train.hard_negatives(captions, rng_a, 0.0) == [train.counterfactual_caption(c, rng_b) for c in captions]
    # Share 1: a binding swap wherever the caption has one, a one-word swap elsewhere (a single object, say).
    mixed = train.hard_negatives(captions, np.random.default_rng(3), 1.0)
    same_words = [sorted(re.findall(r"\w+", c)) == sorted(re.findall(r"\w+", n)) for c, n in zip(captions, mixed)]
    assert 0 < sum(same_words) < len(captions)


def test_binding_negatives_come_on_top_of_the_one_word_swaps():
    _, captions = shapes.dataset(200, seed=0, split="train")
    tokenizer = CLIPTokenizer()
    old = train.text_encoder_negatives(captions, tokenizer, seed=0, binding_share=0.0)
    assert old.shape == (200, 77)
    assert torch.equal(old, tokenizer(train.hard_negatives(captions, np.random.default_rng(3))))
    both = train.text_encoder_negatives(captions, tokenizer, seed=0, binding_share=1.0)
    assert both.shape == (2, 200, 77) and torch.equal(both[0], old)     # the one-word swaps stay, draw for draw
    # The second negative: a binding swap (the caption's own tokens, reordered) wherever the caption has one.
    same_tokens = [torch.equal(a.sort().values, b.sort().values) for a, b in zip(tokenizer(captions), both[1])]
    has_swap = [train.binding_caption(c, np.random.default_rng(0)) is not None for c in captions]
    assert same_tokens == has_swap and 0 < sum(has_swap) < len(captions)


def test_clip_with_hard_negatives(data):
    images, captions, ids = data
    rng = np.random.default_rng(0)
    negatives = CLIPTokenizer()([train.counterfactual_caption(c, rng) for c in captions])
    _, pair, losses = train.train_clip(images, ids, tiny_clip(), steps=40, batch_size=16, lr=3e-3,
                                       negative_ids=negatives, seed=0, log=None)
    ok, (first, last) = falls(losses)
    assert ok, f"contrastive loss with hard negatives did not fall: {first:.3f} -> {last:.3f}"
    # Image -> caption picks among 2B captions, caption -> image among B images: chance is the mean of the two.
    assert first == pytest.approx((np.log(32) + np.log(16)) / 2, rel=0.2)
    scores = train.counterfactual_accuracy(pair, images, captions, CLIPTokenizer())
    assert set(scores) == {"colour", "shape", "size", "count", "position"}
    assert all(0 <= v <= 1 for v in scores.values())

    # Two negatives per caption (one-word and binding swaps): each image picks among 3B captions.
    lines = []
    train.train_clip(images, ids, tiny_clip(), steps=1, batch_size=16, negative_ids=torch.stack([negatives] * 2),
                     seed=0, log=lines.append, log_every=1)
    assert "of 48" in lines[0], lines


def test_unet_learns_and_ema_lags(data):
    torch.manual_seed(0)
    latents = torch.randn(32, 4, 4, 4) * 0.5 + torch.linspace(-1, 1, 4)[None, :, None, None]
    contexts = torch.randn(32, 77, 16)
    empty = torch.zeros(1, 77, 16)
    # A fixed evaluation batch: same t and noise before and after training.
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (32,), generator=g)
    eps = torch.randn(latents.shape, generator=g)
    x_t = sdlearn.schedule.add_noise(latents, eps, t)

    def eval_loss(unet):
        with torch.no_grad():
            return torch.nn.functional.mse_loss(unet(x_t, t, contexts), eps).item()

    init, _, _ = train.train_unet(latents, contexts, empty, tiny_unet(), steps=0, seed=0, log=None)
    unet, ema, losses = train.train_unet(latents, contexts, empty, tiny_unet(), steps=60, batch_size=16, lr=2e-3,
                                         seed=0, log=None)
    assert len(losses) == 60
    assert eval_loss(unet) < 0.7 * eval_loss(init), (eval_loss(init), eval_loss(unet))
    # The EMA copy is a different set of weights, lagging behind the trained ones.
    assert not torch.equal(ema.conv_in.weight, unet.conv_in.weight)
    assert eval_loss(ema) < eval_loss(init)


def test_unet_training_can_start_from_a_trained_unet(data):
    latents, contexts, empty = torch.randn(16, 4, 4, 4), torch.randn(16, 77, 16), torch.zeros(1, 77, 16)
    first, _, _ = train.train_unet(latents, contexts, empty, tiny_unet(), steps=3, batch_size=8, seed=0, log=None)
    before = {k: v.clone() for k, v in first.state_dict().items()}
    again, _, _ = train.train_unet(latents, contexts, empty, steps=0, seed=5, log=None, init=first)
    assert again is not first and all(torch.equal(v, before[k]) for k, v in again.state_dict().items())
    more, _, losses = train.train_unet(latents, contexts, empty, steps=2, batch_size=8, seed=5, log=None, init=first)
    assert len(losses) == 2 and not torch.equal(more.conv_in.weight, before["conv_in.weight"])
    assert all(torch.equal(v, before[k]) for k, v in first.state_dict().items())    # the start is left as it was


def test_ema_update_is_the_moving_average():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = 0.9 * a.weight.detach().clone() + 0.1 * b.weight.detach()
    train.ema_update(a, b, 0.9)
    torch.testing.assert_close(a.weight.detach(), expected)


def test_caption_dropout_uses_the_empty_context(data):
    # With dropout 1.0 every caption is replaced: contexts that are NaN can then never reach the U-Net.
    latents = torch.randn(8, 4, 4, 4)
    contexts = torch.full((8, 77, 16), float("nan"))
    _, _, losses = train.train_unet(latents, contexts, torch.zeros(1, 77, 16), tiny_unet(), steps=3, batch_size=4,
                                    caption_dropout=1.0, seed=0, log=None)
    assert np.isfinite(losses).all()
    _, _, losses = train.train_unet(latents, contexts, torch.zeros(1, 77, 16), tiny_unet(), steps=3, batch_size=4,
                                    caption_dropout=0.0, seed=0, log=None)
    assert not np.isfinite(losses).any()


def test_trim_padding_keeps_what_pooled_reads(data):
    _, _, ids = data
    trimmed = train.trim_padding(ids[:8])
    assert trimmed.shape[1] < 77
    clip = sdlearn.clip.CLIPTextModel(tiny_clip()).eval()
    with torch.no_grad():
        full = clip.pooled(clip(ids[:8]), ids[:8])
        short = clip.pooled(clip(trimmed), trimmed)
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-6)


def test_scaling_factor_is_one_over_latent_std(data):
    images, _, _ = data
    vae = sdlearn.vae.AutoencoderKL(tiny_vae()).eval()
    g = torch.Generator().manual_seed(0)
    sf = train.scaling_factor(vae, images, g)
    latents = train.encode_latents(vae, images, sf, generator=torch.Generator().manual_seed(0))
    assert latents.std().item() == pytest.approx(1.0, rel=1e-5)


def test_lr_schedule():
    lrs = [train.lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # warmup, then only down
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


# --- the command: reproducible, loadable, never overwrites -------------------------------------------

ARGS = ["--seed", "3", "--scenes", "64", "--vae-steps", "2", "--clip-steps", "2", "--decoder-steps", "2",
        "--unet-steps", "2", "--more-unet-steps", "2", "--threads", "1"]


def weights(folder):
    out = {}
    for part, name in (("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
                       ("text_encoder", "model.safetensors")):
        tf = TensorFile.open(folder / part / name)
        out.update({f"{part}.{k}": tf[k] for k in tf.keys()})
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "tinysd"
    train.main(["--out", str(folder)] + ARGS)
    return folder


def test_command_writes_a_loadable_folder(trained):
    pipe = sdlearn.load_pipeline(trained)
    assert pipe.default_size == 64
    assert pipe.vae.config.scaling_factor != 1.0     # measured, not the placeholder
    assert pipe.unet.conv_in.weight.dtype == torch.float32   # stored as fp16, loaded as fp32
    out = pipe.txt2img("a red circle", steps=2, sampler="DPM++ 2M Karras", seed=0, progress=False)
    assert out.images[0].size == (64, 64)
    assert all(t.dtype == torch.float16 for t in weights(trained).values())
    record = json.loads((trained / "training.json").read_text())
    assert record["machine"].endswith("(VAE and text encoder: one each, side by side)")


def test_same_seed_same_model(trained, tmp_path):
    again = tmp_path / "again"
    train.main(["--out", str(again)] + ARGS)
    a, b = weights(trained), weights(again)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_unet_only_run_matches_the_full_run(trained, tmp_path):
    # Keeping the VAE and text encoder of a finished run and training only the U-Net gives that run's U-Net:
    # the full run rounds both to fp16 (as saved) before it computes the U-Net's latents and contexts.
    unet_only = tmp_path / "unet_only"
    train.main(["--out", str(unet_only), "--vae-and-text-encoder-from", str(trained),
                "--seed", "3", "--scenes", "64", "--unet-steps", "2", "--more-unet-steps", "2", "--threads", "1"])
    a, b = weights(trained), weights(unet_only)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    record = json.loads((unet_only / "training.json").read_text())
    assert record["vae_and_text_encoder_from"]["folder"] == str(trained)
    assert record["steps"] == {"vae": 2, "clip": 2, "decoder": 2, "unet": 2, "more_unet": 2}
    assert record["machine"].endswith("(VAE and text encoder loaded, not trained)")
    card = (unet_only / "README.md").read_text()     # names both commands, the full run's first
    assert card.index(f"--out {trained} ") < card.index(f"--vae-and-text-encoder-from {trained}")


def test_vae_from_run_matches_the_full_run(tmp_path):
    # With binding negatives: the full run, then a new text encoder and U-Net on its VAE (--vae-from) with the
    # same seed and steps, give the same weights; without binding negatives the text encoder differs.
    full = tmp_path / "full"
    train.main(["--out", str(full), "--binding-negatives", "0.5"] + ARGS)
    vae_from = tmp_path / "vae_from"
    args = list(ARGS)
    for flag in ("--vae-steps", "--decoder-steps"):
        i = args.index(flag)
        del args[i:i + 2]
    train.main(["--out", str(vae_from), "--vae-from", str(full), "--binding-negatives", "0.5"] + args)
    a, b = weights(full), weights(vae_from)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    record = json.loads((vae_from / "training.json").read_text())
    assert record["vae_from"]["folder"] == str(full) and record["binding_negatives"] == 0.5
    assert record["steps"] == {"vae": 2, "decoder": 2, "clip": 2, "unet": 2, "more_unet": 2}
    assert record["machine"].endswith("(VAE loaded; text encoder: one thread)")
    card = (vae_from / "README.md").read_text()
    assert card.index(f"--out {full} ") < card.index(f"--vae-from {full}")
    plain = tmp_path / "plain"
    train.main(["--out", str(plain), "--vae-from", str(full)] + args)
    c = weights(plain)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("text_encoder."))
    assert all(torch.equal(a[k], c[k]) for k in a if k.startswith("vae."))


def test_vae_from_and_binding_negatives_refuse_bad_requests(trained, tmp_path, capsys):
    out = tmp_path / "x"
    for argv, message in (
            (["--vae-from", str(trained), "--vae-steps", "5"], "--vae-steps"),
            (["--vae-from", str(trained), "--vae-and-text-encoder-from", str(trained)], "not allowed with"),
            (["--vae-and-text-encoder-from", str(trained), "--binding-negatives", "0.5"], "--binding-negatives"),
            (["--binding-negatives", "2"], "from 0 to 1")):
        with pytest.raises(SystemExit):
            train.main(["--out", str(out)] + argv)
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_decoder_finetune_of_a_folder_matches_the_full_run(trained, tmp_path):
    # A full run without the decoder stage, then --finetune-decoder-of on its folder, gives the full run's
    # weights (the full run rounds its VAE to fp16 before the decoder stage, as the saved folder is).
    plain, args = tmp_path / "plain", list(ARGS)
    args[args.index("--decoder-steps") + 1] = "0"
    train.main(["--out", str(plain)] + args)
    finetuned = tmp_path / "finetuned"
    train.main(["--out", str(finetuned), "--finetune-decoder-of", str(plain), "--decoder-steps", "2", "--threads", "1"])
    a, b, c = weights(trained), weights(finetuned), weights(plain)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert {k.split(".")[1] for k in a if not torch.equal(b[k], c[k])} == {"decoder", "post_quant_conv"}
    record = json.loads((finetuned / "training.json").read_text())
    assert record["decoder_finetuned_from"]["folder"] == str(plain)
    assert record["steps"] == {"vae": 2, "clip": 2, "decoder": 2, "unet": 2, "more_unet": 2}
    card = (finetuned / "README.md").read_text()     # names both commands, the full run's first
    assert card.index(f"--out {plain} ") < card.index(f"--finetune-decoder-of {plain}")


def test_decoder_finetune_refuses_bad_requests(trained, tmp_path, capsys):
    out = tmp_path / "x"
    for extra, message in ((["--unet-steps", "5"], "--unet-steps"), (["--seed", "1"], "--seed"),
                           (["--vae-and-text-encoder-from", str(trained)], "not allowed with")):
        with pytest.raises(SystemExit):
            train.main(["--out", str(out), "--finetune-decoder-of", str(trained)] + extra)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:      # trained's decoder already had its fine-tune
        train.main(["--out", str(out), "--finetune-decoder-of", str(trained)])
    assert exit_info.value.code == 2
    assert "already fine-tuned" in capsys.readouterr().err
    assert not out.exists()


def test_continue_unet_of_a_folder_matches_the_full_run(trained, tmp_path):
    # A run without the second U-Net cycle, then --continue-unet-of on its folder, gives the full run's weights
    # (the full run starts the second cycle from its EMA weights rounded to fp16, as the saved folder holds them).
    plain, args = tmp_path / "plain", list(ARGS)
    args[args.index("--more-unet-steps") + 1] = "0"
    train.main(["--out", str(plain)] + args)
    more = tmp_path / "more"
    train.main(["--out", str(more), "--continue-unet-of", str(plain), "--more-unet-steps", "2", "--threads", "1"])
    a, b, c = weights(trained), weights(more), weights(plain)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert {k.split(".")[0] for k in a if not torch.equal(b[k], c[k])} == {"unet"}
    assert json.loads((plain / "training.json").read_text())["steps"] == {"vae": 2, "clip": 2, "decoder": 2,
                                                                          "unet": 2}
    record = json.loads((more / "training.json").read_text())
    assert record["unet_continued_from"]["folder"] == str(plain)
    assert record["steps"] == {"vae": 2, "clip": 2, "decoder": 2, "unet": 2, "more_unet": 2}
    assert record["seed"] == 3 and record["final_losses"]["more_unet"] > 0
    card = (more / "README.md").read_text()          # names both commands, the first run's first
    assert card.index(f"--out {plain} ") < card.index(f"--continue-unet-of {plain}")
    assert "2 steps, then 2 more" in card


def test_continue_unet_refuses_bad_requests(trained, tmp_path, capsys):
    out = tmp_path / "x"
    for extra, message in ((["--seed", "1"], "nothing else"), (["--unet-steps", "5"], "nothing else"),
                           (["--vae-from", str(trained)], "not allowed with")):
        with pytest.raises(SystemExit):
            train.main(["--out", str(out), "--continue-unet-of", str(trained)] + extra)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:      # trained's U-Net already had its second cycle
        train.main(["--out", str(out), "--continue-unet-of", str(trained)])
    assert exit_info.value.code == 2
    assert "already been trained 2 steps more" in capsys.readouterr().err
    assert not out.exists()


def test_unet_only_run_needs_a_trained_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path / "x"), "--vae-and-text-encoder-from", str(tmp_path), "--vae-steps", "5"])
    assert "--vae-steps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--out", str(tmp_path / "x"), "--vae-and-text-encoder-from", str(tmp_path)] + ARGS[:4])
    assert exit_info.value.code == 2
    assert "has no training.json" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_another_seed_another_model(data):
    images, _, _ = data
    runs = [train.train_vae(images, tiny_vae(), steps=1, batch_size=4, seed=s, log=None)[0] for s in (0, 0, 1)]
    w = [vae.encoder.conv_in.weight for vae in runs]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])


def test_never_overwrites_without_flag(trained, capsys):
    before = {p: p.stat().st_mtime_ns for p in trained.rglob("*")}
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--out", str(trained)] + ARGS)
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in trained.rglob("*")} == before
    with pytest.raises(FileExistsError, match="--overwrite"):
        train.save_tinysd(trained, None, None, None)
