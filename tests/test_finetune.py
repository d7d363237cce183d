"""Fine-tuning TinySD (sdlearn.finetune) and textual-inversion embeddings (sdlearn.embeddings): each method's
loss falls on a fixed draw, leaves the base model untouched, and its saved artifact loads back to the same
numbers; embeddings from embedding_dirs change the prompt exactly where their vectors go; bad files are
refused with clear errors and nothing is overwritten by accident."""

import copy
import hashlib

import pytest
import torch
from safetensors.torch import save_file

import sdlearn
from sdlearn import finetune as ft
from sdlearn.embeddings import EmbeddingError, PromptEmbeddings, load_embedding, save_embedding
from sdlearn.guidance import chunk_prompt
from sdlearn.lora import LoRAError, applied_loras, inject_lora, load_lora, lora_targets

PROMPT = "a small pink circle on a blue background"


@pytest.fixture(scope="module")
def pipe():
    return sdlearn.load_pipeline("tiny")


@pytest.fixture(scope="module")
def data(pipe):
    return ft.prepare_data(pipe, 8, seed=1)            # 8 pink scenes: small enough to overfit in a few steps


@pytest.fixture(scope="module")
def prior(pipe):
    return ft.prepare_data(pipe, 8, seed=2, new_colour=None)


def _digest(module):
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def _contexts(pipe, data):
    with torch.no_grad():
        return pipe.text_encoder(data.input_ids)


def test_prepare_data(pipe, data, prior):
    assert data.latents.shape == (8, 4, 8, 8) and data.input_ids.shape == (8, 77)
    assert all("pink" in c for c in data.captions) and not any("pink" in c for c in prior.captions)
    assert torch.equal(ft.prepare_data(pipe, 8, seed=1).latents, data.latents)       # reproducible


# --------------------------------------------------------------------------- LoRA


def test_lora_learns_and_its_file_loads_back_to_the_same_unet(pipe, data, tmp_path):
    before_unet, before_te = _digest(pipe.unet), _digest(pipe.text_encoder)
    contexts = _contexts(pipe, data)
    loss_before = ft.eval_loss(pipe.unet, data, contexts)
    result = ft.train_lora(pipe, data, rank=4, alpha=2, steps=30, batch_size=8, lr=1e-2, caption_dropout=0.0)
    assert len(result.losses) == 30 and result.seconds > 0
    # the pipeline's own weights are untouched: adapters are removed, base weights were frozen
    assert _digest(pipe.unet) == before_unet and _digest(pipe.text_encoder) == before_te
    assert not any(type(m).__name__ == "LoRALinear" for m in pipe.unet.modules())
    with applied_loras(pipe, [(result.artifact, 1.0)]):
        loss_after = ft.eval_loss(pipe.unet, data, contexts)
    print(f"\nLoRA eval loss {loss_before:.4f} -> {loss_after:.4f}")
    assert loss_after < 0.9 * loss_before
    # reproducible from the seed
    again = ft.train_lora(pipe, data, rank=4, alpha=2, steps=30, batch_size=8, lr=1e-2, caption_dropout=0.0)
    assert all(torch.equal(result.artifact[k], again.artifact[k]) for k in result.artifact)

    # saved in kohya's layout, read back by load_lora: the merged file gives the U-Net output of the
    # adapters themselves (forward with up(down(x)), never merged)
    path = ft.save_result(tmp_path / "loras" / "pink.safetensors", result)
    lora = load_lora(path, pipe)
    assert lora.layout == "kohya" and len(lora.layers) == len(lora_targets(pipe.unet))
    assert all(k.startswith("lora_unet_") for k in result.artifact)
    adapted = copy.deepcopy(pipe.unet)
    adapters = inject_lora(adapted, lora_targets(adapted), rank=4, alpha=2)
    for name, adapter in adapters.items():
        key = "lora_unet_" + name.replace(".", "_")
        adapter.down.weight.data.copy_(result.artifact[key + ".lora_down.weight"])
        adapter.up.weight.data.copy_(result.artifact[key + ".lora_up.weight"])
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([900, 300]), contexts[:2]
    with torch.no_grad():
        in_memory = adapted(x, t, c)
        with applied_loras(pipe, [(path, 1.0)]):
            from_file = pipe.unet(x, t, c)
        plain = pipe.unet(x, t, c)
    assert (in_memory - from_file).abs().max() < 1e-5
    assert (in_memory - plain).abs().max() > 1e-3                      # the LoRA does something
    # and the WebUI way: <lora:pink:1> from lora_dirs gives the same image as applying it by hand
    pipe.lora_dirs = [tmp_path / "loras"]
    try:
        tagged = pipe.txt2img(PROMPT + " <lora:pink:1>", steps=4, sampler="Euler", seed=3, progress=False).latents
        with applied_loras(pipe, [(path, 1.0)]):
            by_hand = pipe.txt2img(PROMPT, steps=4, sampler="Euler", seed=3, progress=False).latents
    finally:
        pipe.lora_dirs = []
    assert torch.equal(tagged, by_hand)
    # never overwritten by accident
    data_before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ft.save_result(path, again)
    assert path.read_bytes() == data_before
    ft.save_result(path, again, overwrite=True)
    from sdlearn.lora import save_lora
    with pytest.raises(ValueError, match="not both"):
        save_lora(tmp_path / "both.safetensors", unet=adapted, state_dict=again.artifact)


def test_lora_on_the_text_encoder_too(pipe, data):
    result = ft.train_lora(pipe, data, rank=2, text_encoder=True, steps=3, batch_size=4)
    assert any(k.startswith("lora_te_") for k in result.artifact)
    assert len(load_lora(result.artifact, pipe).targets("text_encoder")) == 4 * 6   # 4 layers x q,k,v,out,fc1,fc2
    assert not any(type(m).__name__ == "LoRALinear" for m in pipe.text_encoder.modules())


# --------------------------------------------------------------------------- textual inversion


def test_textual_inversion_learns_only_its_vectors(pipe, data):
    before_unet, before_te = _digest(pipe.unet), _digest(pipe.text_encoder)
    result = ft.train_textual_inversion(pipe, data, n_vectors=2, steps=30, batch_size=8, lr=5e-2)
    emb = result.artifact
    assert emb.name == "pink" and emb.vectors.shape == (2, 64)
    assert _digest(pipe.unet) == before_unet and _digest(pipe.text_encoder) == before_te
    ids = ft.caption_ids_with_embedding(pipe.tokenizer, data.captions, "pink", 2, 49408)
    red = pipe.text_encoder.text_model.embeddings.token_embedding.weight[pipe.tokenizer.encode("red")[0]]
    with torch.no_grad():
        start = pipe.text_encoder(ids, extra_tokens=red.expand(2, -1))      # the initial vectors ("red")
        learnt = pipe.text_encoder(ids, extra_tokens=emb.vectors)
    loss_before, loss_after = ft.eval_loss(pipe.unet, data, start), ft.eval_loss(pipe.unet, data, learnt)
    print(f"\ntextual inversion eval loss {loss_before:.4f} -> {loss_after:.4f}")
    assert loss_after < 0.95 * loss_before
    again = ft.train_textual_inversion(pipe, data, n_vectors=2, steps=30, batch_size=8, lr=5e-2)
    assert torch.equal(again.artifact.vectors, emb.vectors)
    with pytest.raises(ValueError, match="trigger word"):
        ft.train_textual_inversion(pipe, ft.prepare_data(pipe, 2, seed=0, new_colour=None), steps=1)


def test_embedding_files_round_trip_and_embedding_dirs_use_them(pipe, tmp_path):
    vectors = torch.randn(2, 64) * 0.3
    st = save_embedding(tmp_path / "emb" / "pink.safetensors", vectors)
    pt = save_embedding(tmp_path / "other" / "pink.pt", vectors, step=12)
    for path in (st, pt):
        emb = load_embedding(path, hidden_size=64)
        assert emb.name == "pink" and torch.equal(emb.vectors, vectors)
    assert set(torch.load(pt, weights_only=True)) >= {"string_to_param", "string_to_token", "name", "step"}

    plain = pipe.encode_prompt(PROMPT)                                          # (1, 77, 64)
    pipe.embedding_dirs = [tmp_path / "emb"]
    try:
        used = pipe.encode_prompt(PROMPT)
        unrelated = pipe.encode_prompt("a small red circle on a blue background")
        emphasised = pipe.encode_prompt("a small (pink:1.3) circle on a blue background")
    finally:
        pipe.embedding_dirs = []
    # by hand: "pink" (one token, position 3) becomes the two added ids 49408, 49409
    tok = pipe.tokenizer
    words = tok.encode(PROMPT)
    assert words[2] == tok.encode("pink")[0]
    ids = [tok.bos_token_id] + words[:2] + [49408, 49409] + words[3:]
    ids = torch.tensor([ids + [tok.eos_token_id] * (77 - len(ids))])
    with torch.no_grad():
        by_hand = pipe.text_encoder(ids, extra_tokens=vectors)
    assert torch.allclose(used, by_hand, atol=1e-6)
    # causal attention: the tokens before the trigger word are exactly as before; from it on, changed
    assert torch.equal(used[0, :3], plain[0, :3])
    assert (used[0, 3:] - plain[0, 3:]).abs().amax(-1).min() > 1e-4
    # a prompt without the word is untouched; emphasis weights the embedding's vectors too
    assert torch.equal(unrelated, pipe.encode_prompt("a small red circle on a blue background"))
    assert not torch.allclose(emphasised, used)
    # in memory (pipe.embeddings) is the same as from the folder, and a generation uses it
    pipe.embeddings["pink"] = vectors
    try:
        assert torch.allclose(pipe.encode_prompt(PROMPT), used, atol=1e-6)
        with_emb = pipe.txt2img(PROMPT, steps=3, sampler="Euler", seed=1, progress=False).latents
    finally:
        pipe.embeddings.clear()
    assert not torch.equal(with_emb, pipe.txt2img(PROMPT, steps=3, sampler="Euler", seed=1, progress=False).latents)


def test_an_embedding_is_never_split_across_chunks(pipe):
    table = PromptEmbeddings.build(pipe.tokenizer, {"pink": torch.zeros(3, 64)}, 49408)
    prompt = "red " * 74 + "pink circle"                        # 74 tokens, then 3 vectors: they go to chunk 2
    chunks, weights = chunk_prompt(pipe.tokenizer, prompt, embeddings=table)
    assert len(chunks) == 2 and chunks[0][75] == 49407           # chunk 1 ends after the 74 "red"s
    assert chunks[1][1:4] == [49408, 49409, 49410]
    # without embeddings "pink" is the plain word it always was
    assert chunk_prompt(pipe.tokenizer, "a pink circle")[0][0][2] == pipe.tokenizer.encode("pink")[0]


def test_bad_embedding_files_are_refused_clearly(tmp_path):
    def st(name, tensors):
        path = tmp_path / name
        save_file(tensors, str(path))
        return path

    cases = [
        (st("sd15.safetensors", {"emb_params": torch.zeros(2, 768)}), "768 wide.*SD1.x"),
        (st("sd2.safetensors", {"emb_params": torch.zeros(1, 1024)}), "SD2.x"),
        (st("xl.safetensors", {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}), "SDXL embedding"),
        (st("two.safetensors", {"emb_params": torch.zeros(1, 64), "extra": torch.zeros(3)}), "not a textual-inversion"),
        (st("nan.safetensors", {"emb_params": torch.full((1, 64), float("nan"))}), "NaN"),
        (st("int.safetensors", {"emb_params": torch.zeros(1, 64, dtype=torch.int64)}), "float tensor"),
        (st("lora.safetensors", {"lora_unet_x.lora_down.weight": torch.zeros(4, 64),
                                 "lora_unet_x.lora_up.weight": torch.zeros(64, 4)}), "LoRA goes in the LoRA folder"),
    ]
    torch.save({"string_to_param": {"*": torch.zeros(1, 64)}, "name": "x", "surprise": 1}, tmp_path / "odd.pt")
    torch.save({"string_to_param": {"*": torch.zeros(1, 64), "+": torch.zeros(1, 64)}}, tmp_path / "multi.pt")
    cases += [(tmp_path / "odd.pt", r"unknown entries \['surprise'\]"), (tmp_path / "multi.pt", "exactly one tensor")]
    for path, message in cases:
        with pytest.raises(EmbeddingError, match=message):
            load_embedding(path, hidden_size=64)
    # a LoRA loader handed an embedding says where it belongs
    pipe_like = type("P", (), {})()
    with pytest.raises(LoRAError, match="embedding_dirs"):
        torch.save({"string_to_param": {"*": torch.zeros(1, 64)}}, tmp_path / "emb.pt")
        load_lora(tmp_path / "emb.pt", pipe_like)
    # saving never overwrites without overwrite=True, and never leaves a partial file
    path = save_embedding(tmp_path / "pink.safetensors", torch.ones(1, 64))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_embedding(path, torch.zeros(1, 64))
    assert torch.equal(load_embedding(path).vectors, torch.ones(1, 64))
    save_embedding(path, torch.zeros(1, 64), overwrite=True)
    assert torch.equal(load_embedding(path).vectors, torch.zeros(1, 64))
    assert sorted(p.name for p in tmp_path.glob("*.partial")) == []
    with pytest.raises(ValueError, match="safetensors"):
        save_embedding(tmp_path / "pink.bin", torch.ones(1, 64))


def test_a_used_embedding_of_the_wrong_width_fails_when_the_prompt_uses_it(pipe, tmp_path):
    save_file({"emb_params": torch.zeros(1, 768)}, str(tmp_path / "pink.safetensors"))
    pipe.embedding_dirs = [tmp_path]
    try:
        pipe.encode_prompt("a red circle")                         # not used: not read
        with pytest.raises(EmbeddingError, match="made for SD1.x"):
            pipe.encode_prompt(PROMPT)
    finally:
        pipe.embedding_dirs = []


# --------------------------------------------------------------------------- DreamBooth


def test_dreambooth_learns_keeps_the_base_model_and_saves_a_loadable_folder(pipe, data, prior, tmp_path):
    before = _digest(pipe.unet)
    contexts = _contexts(pipe, data)
    loss_before = ft.eval_loss(pipe.unet, data, contexts)
    result = ft.train_dreambooth(pipe, data, prior, steps=30, batch_size=8, lr=2e-4, caption_dropout=0.0)
    loss_after = ft.eval_loss(result.artifact, data, contexts)
    print(f"\nDreamBooth eval loss {loss_before:.4f} -> {loss_after:.4f}")
    assert loss_after < 0.9 * loss_before
    assert _digest(pipe.unet) == before and result.settings["prior_scenes"] == 8
    folder = ft.save_result(tmp_path / "tinysd-pink", result, pipe)
    loaded = sdlearn.load_pipeline(folder)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([700, 50])
    with torch.no_grad():
        assert torch.equal(loaded.unet(x, t, contexts[:2]), result.artifact(x, t, contexts[:2]))
    assert (folder / "finetune.json").exists()
    with pytest.raises(FileExistsError):
        ft.save_result(folder, result, pipe)
    # without prior preservation the same run is another model (the prior batch really is trained on)
    no_prior = ft.train_dreambooth(pipe, data, None, steps=2, batch_size=4)
    assert no_prior.settings["prior_scenes"] == 0


# --------------------------------------------------------------------------- measuring


def test_judge_pipeline_scores_generations(pipe):
    captions = ft.eval_captions(2, seed=5)
    assert all("pink" in c for c in captions) and not any("pink" in c for c in ft.eval_captions(5, 5, None))
    acc = ft.judge_pipeline(pipe, captions, steps=4)
    assert acc["n"] == 2 and 0.0 <= acc["overall"] <= 1.0
