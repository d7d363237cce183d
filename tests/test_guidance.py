"""Prompt emphasis, 75-token chunking and classifier-free guidance, A1111's way.

The emphasis cases are the examples A1111 documents for its prompt parser (modules/prompt_parser.py);
the chunking rules are A1111's (75 tokens per chunk, back up to a comma within 20 tokens, BREAK).
"""

import pytest
import torch

from sdlearn.clip import CLIPTextConfig, CLIPTextModel
from sdlearn.guidance import (
    CHUNK_LENGTH,
    cfg_combine,
    chunk_prompt,
    encode_prompt,
    pad_to_same_length,
    parse_emphasis,
)
from sdlearn.tokenizer import CLIPTokenizer

BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4)).eval()


@pytest.mark.parametrize("prompt, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("[blurry]", [("blurry", 1 / 1.1)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("", [("", 1.0)]),
    ("ratio 16:9", [("ratio 16:9", 1.0)]),
])
def test_parse_emphasis_matches_a1111(prompt, expected):
    got = parse_emphasis(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_short_prompt_is_one_window_like_the_plain_tokenizer(tok):
    chunks, weights = chunk_prompt(tok, "a red circle")
    assert len(chunks) == 1 and len(chunks[0]) == 77
    assert chunks[0] == tok("a red circle")[0].tolist()
    assert weights == [[1.0] * 77]


def test_empty_prompt_is_one_window(tok):
    chunks, _ = chunk_prompt(tok, "")
    assert chunks == [[BOS] + [EOS] * 76]


def test_weights_follow_their_tokens(tok):
    chunks, weights = chunk_prompt(tok, "a (red:1.5) circle")
    ids = tok.encode("a") + tok.encode("red") + tok.encode("circle")
    assert chunks[0][1:4] == ids
    assert weights[0][1:4] == [1.0, 1.5, 1.0]


def test_long_prompts_split_into_75_token_chunks(tok):
    words = " ".join(f"w{i}" for i in range(200))
    n = len(tok.encode(words))
    chunks, _ = chunk_prompt(tok, words)
    assert len(chunks) == -(-n // CHUNK_LENGTH)
    assert all(len(c) == 77 and c[0] == BOS and c[-1] == EOS for c in chunks)
    body = [t for c in chunks for t in c[1:-1] if t != EOS]
    assert body == tok.encode(words)  # nothing lost, nothing reordered


def test_chunk_breaks_at_a_recent_comma(tok):
    # 70 single-token words, a comma, then 10 more: the comma is 5 tokens from the end of the first
    # chunk, so the words after it move to the second chunk whole.
    first = " ".join(["cat"] * 70)
    prompt = first + ", " + " ".join(["dog"] * 10)
    chunks, _ = chunk_prompt(tok, prompt)
    comma = tok.encode(",")[0]
    assert len(chunks) == 2
    assert chunks[0][1:72] == tok.encode("cat") * 70 + [comma]
    assert chunks[0][72:] == [EOS] * 5  # padded after the comma
    assert chunks[1][1:11] == tok.encode("dog") * 10


def test_break_starts_a_new_chunk(tok):
    chunks, _ = chunk_prompt(tok, "a red circle BREAK a blue square")
    assert len(chunks) == 2
    assert chunks[1][1:4] == tok.encode("a blue square")


def test_emphasis_rescales_words_but_keeps_the_mean(tok, encoder):
    plain = encode_prompt(tok, encoder, "a red circle")
    strong = encode_prompt(tok, encoder, "a (red:1.5) circle")
    assert plain.shape == strong.shape == (1, 77, 32)
    assert torch.allclose(plain.mean(), strong.mean(), atol=1e-6)
    changed = (plain - strong).abs().amax(dim=-1)[0]  # (77,)
    assert changed.max() > 1e-3
    # The emphasised token is scaled ×1.5 relative to the others (after the common mean correction).
    ratio = strong[0, 2] / plain[0, 2]
    other = strong[0, 1] / plain[0, 1]
    assert torch.allclose(ratio / other, torch.full_like(ratio, 1.5), rtol=1e-4)


def test_long_prompt_context_has_one_window_per_chunk(tok, encoder):
    words = " ".join(f"w{i}" for i in range(120))
    context = encode_prompt(tok, encoder, words)
    assert context.shape[1] == 77 * len(chunk_prompt(tok, words)[0]) and context.shape[1] > 77
    truncated = encode_prompt(tok, encoder, words, mode="diffusers")
    assert truncated.shape == (1, 77, 32)
    with pytest.raises(ValueError, match="prompt mode"):
        encode_prompt(tok, encoder, words, mode="comfy")


def test_cond_and_uncond_padded_to_the_same_length(tok, encoder):
    cond = encode_prompt(tok, encoder, " ".join(["cat"] * 160))  # 3 chunks
    uncond = encode_prompt(tok, encoder, "")
    empty = encode_prompt(tok, encoder, "")
    c, u = pad_to_same_length(cond, uncond, empty=empty)
    assert c.shape == u.shape == (1, 3 * 77, 32)
    assert torch.equal(u[:, 77:154], empty[:, :77])


def test_cfg_combine():
    uncond, cond = torch.zeros(2, 4), torch.ones(2, 4)
    assert torch.equal(cfg_combine(uncond, cond, 1.0), cond)  # scale 1: the conditional prediction
    assert torch.equal(cfg_combine(uncond, cond, 0.0), uncond)
    assert torch.equal(cfg_combine(uncond, cond, 7.0), torch.full((2, 4), 7.0))  # extrapolates past cond
