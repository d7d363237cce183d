"""sdlearn.tokenizer against transformers' CLIPTokenizer built from the same BPE file.

The reference is built the way OpenAI and open_clip turn bpe_simple_vocab_16e6.txt.gz into a
vocabulary (vocab.json + merges.txt), written to a temporary folder together with SD1.5's own
tokenizer_config.json / special_tokens_map.json, and loaded with from_pretrained as diffusers loads
a checkpoint's tokenizer/ folder. Nothing is downloaded.
"""

import gzip
import json
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
import transformers

from reference_tokenizer import openai_vocab_and_merges, write_sd15_tokenizer_folder
from sdlearn.tokenizer import DEFAULT_VOCAB_PATH, CLIPTokenizer, bytes_to_unicode, clean_text, pre_tokenizer

PROMPTS_FILE = Path(__file__).parent / "data" / "prompts.txt"

# Characters a text file cannot hold safely (str.splitlines() and editors treat several as line
# breaks), so they are written here: CR/LF, form feed, vertical tab, the separators \x1c-\x1f
# (whitespace to Python, not to CLIP), NEL, line/paragraph separators, NUL, DEL, U+FFFD.
TRICKY = [
    "a cat\r\non a mat\n",
    "line one\rline two",
    "form\x0cfeed and vertical\x0btab",
    "file\x1cgroup\x1drecord\x1eunit\x1fseparators",
    "next\x85line, line\u2028separator, paragraph\u2029separator",
    "nul\x00byte, delete\x7fchar, replacement\ufffdchar, bell\x07",
    "\n\n  \t\r\n",
    "\x1c",
]


def read_prompts() -> list[str]:
    """One prompt per line; an empty line is the empty prompt (split on "\\n" only, not splitlines)."""
    lines = PROMPTS_FILE.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "", "prompts.txt must end with a newline"
    return lines[:-1]


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def openai_vocab():
    return openai_vocab_and_merges(DEFAULT_VOCAB_PATH)[0]


@pytest.fixture(scope="module")
def sd15_tokenizer_folder(tmp_path_factory):
    return write_sd15_tokenizer_folder(tmp_path_factory.mktemp("sd15_tokenizer") / "tokenizer")


@pytest.fixture(scope="module", params=["CLIPTokenizer", "CLIPTokenizerFast"])
def ref(request, sd15_tokenizer_folder):
    reference = getattr(transformers, request.param).from_pretrained(sd15_tokenizer_folder)
    assert reference.model_max_length == 77 and reference.pad_token_id == 49407
    return reference


def ref_window(ref, prompts, max_length=77):
    """What diffusers' StableDiffusionPipeline.encode_prompt asks the tokenizer for."""
    batch = ref(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return batch.input_ids


# ---- vocabulary --------------------------------------------------------------------------------


def test_bytes_to_unicode_gives_256_printable_symbols():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    symbols = list(table.values())
    assert len(set(symbols)) == 256
    assert all(s.isprintable() and not s.isspace() for s in symbols)
    assert all(table[b] == chr(b) for b in range(ord("!"), ord("~") + 1))  # printable ASCII is itself
    assert table[ord(" ")] == "Ġ" and table[0] == "Ā" and table[0xAD] == "Ń"  # moved past Latin-1


def test_vocabulary_is_openai_vocabulary(tok, openai_vocab):
    assert tok.vocab == openai_vocab  # every token at OpenAI's id
    assert tok.vocab_size == len(tok.id_to_token) == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.id_to_token[49406] == "<|startoftext|>" and tok.id_to_token[49407] == "<|endoftext|>"


def test_default_vocab_path_is_the_shipped_file():
    assert DEFAULT_VOCAB_PATH.is_file()
    assert CLIPTokenizer(vocab_path=str(DEFAULT_VOCAB_PATH)).vocab == CLIPTokenizer().vocab


# ---- hand-checked ids ----------------------------------------------------------------------------


def test_hand_checked_ids(tok):
    assert tok.vocab["!"] == 0 and tok.vocab["a"] == 64 and tok.vocab["a</w>"] == 320
    assert tok.vocab["in"] == 512  # the first merge learned, "i n"
    assert tok.encode("a") == [320]
    assert tok.encode("A photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tok.encode("masterpiece") == [12066]
    assert tok.encode("A photo of an astronaut, masterpiece") == [320, 1125, 539, 550, 18376, 267, 12066]
    assert tok.tokenize("Oil painting") == ["oil</w>", "painting</w>"]
    assert tok.tokenize("photorealistic") == ["photo", "realistic</w>"]  # no </w>: the word goes on
    assert tok.tokenize("1024") == ["1</w>", "0</w>", "2</w>", "4</w>"]   # one digit per piece
    assert tok.tokenize("it's") == ["it</w>", "'s</w>"]
    assert tok.tokenize("猫") == ["ç", "Į", "«</w>"]                      # three UTF-8 bytes e7 8c ab
    assert tok.tokenize("a<|endoftext|>b") == ["a</w>", "<|endoftext|>", "b</w>"]


def test_clean_text():
    assert clean_text("  A\t\tCAT \n") == " a cat "
    assert clean_text("Cafe\u0301") == "café"              # NFC composes e + combining acute
    assert clean_text("ΟΔΟΣ") == "οδοσ"                   # no word-final "ς", unlike str.lower()
    assert clean_text("x\x1cy\u3000z\xa0w") == "x\x1cy z w"  # \x1c is not whitespace to CLIP
    assert clean_text("&amp; ＡＢＣ") == "&amp; ａｂｃ"     # no HTML unescape, no width folding (no ftfy)


def test_pre_tokenizer_pieces():
    assert pre_tokenizer().findall("a (cat:1.2), ((dog)) 一只猫 🐱🐱 it's") == [
        "a", "(", "cat", ":", "1", ".", "2", "),", "((", "dog", "))", "一只猫", "🐱🐱", "it", "'s",
    ]


# ---- equality with transformers --------------------------------------------------------------------


def test_corpus_is_varied():
    prompts = read_prompts()
    assert len(prompts) >= 500 and len(set(prompts)) == len(prompts)
    assert "" in prompts
    assert any(p != p.strip() for p in prompts) and any("\t" in p for p in prompts)
    assert any("\u4e00" <= c <= "\u9fff" for p in prompts for c in p)  # CJK ideographs
    assert any("\uac00" <= c <= "\ud7a3" for p in prompts for c in p)  # Hangul
    assert any("\u0600" <= c <= "\u06ff" for p in prompts for c in p)  # Arabic
    assert any("\u0400" <= c <= "\u04ff" for p in prompts for c in p)  # Cyrillic
    assert any(ord(c) >= 0x1F300 for p in prompts for c in p)          # emoji
    assert any("&amp;" in p for p in prompts) and any("<lora:" in p for p in prompts)
    assert any("BREAK" in p for p in prompts) and any("\\(" in p for p in prompts)


def test_encode_matches_transformers_on_corpus(tok, ref):
    prompts = read_prompts() + TRICKY
    ours = [tok.encode(p) for p in prompts]
    theirs = ref(prompts, add_special_tokens=False).input_ids
    mismatches = [(p, a, b) for p, a, b in zip(prompts, ours, theirs) if a != b]
    assert not mismatches, f"{len(mismatches)} prompts differ, first: {mismatches[0]}"
    assert sum(len(ids) > 75 for ids in ours) >= 20  # the corpus does exercise truncation


def test_77_token_windows_match_transformers_on_corpus(tok, ref):
    prompts = read_prompts() + TRICKY
    windows = tok(prompts)
    assert windows.dtype == torch.long and windows.shape == (len(prompts), 77)
    assert torch.equal(windows, ref_window(ref, prompts))


@pytest.mark.parametrize("max_length", [2, 3, 10, 100])
def test_other_window_lengths_match_transformers(tok, ref, max_length):
    prompts = read_prompts()[::10]
    assert torch.equal(tok(prompts, max_length=max_length), ref_window(ref, prompts, max_length))


def test_decode_matches_transformers_on_corpus(tok, ref):
    windows = tok(read_prompts() + TRICKY)
    for skip in (False, True):
        ours = [tok.decode(row, skip_special_tokens=skip) for row in windows]
        assert ours == ref.batch_decode(windows, skip_special_tokens=skip)


def test_cleaning_and_splitting_match_transformers_on_all_of_unicode(sd15_tokenizer_folder):
    """Every code point assigned in Python's Unicode database, through the normalizer and the
    pre-tokenizer (one long string: a character in the wrong class would move a piece boundary)."""
    backend = transformers.CLIPTokenizerFast.from_pretrained(sd15_tokenizer_folder).backend_tokenizer
    assigned = (chr(cp) for cp in range(sys.maxunicode + 1))
    chars = [c for c in assigned if unicodedata.category(c) not in ("Cn", "Co", "Cs")]
    assert len(chars) > 140_000
    assert clean_text("\n".join(chars)) == backend.normalizer.normalize_str("\n".join(chars))
    byte_symbol = bytes_to_unicode()
    pieces = pre_tokenizer().findall("".join(chars))
    ours = ["".join(byte_symbol[b] for b in piece.encode("utf-8")) for piece in pieces]
    theirs = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str("".join(chars))]
    assert ours == theirs


# ---- the window ------------------------------------------------------------------------------------


def test_empty_prompt(tok):
    assert tok.encode("") == [] and tok.tokenize("   ") == []
    assert tok("").tolist() == [[49406] + [49407] * 76]


def test_window_layout_and_truncation(tok):
    long_prompt = ", ".join(["a red apple on a wooden table"] * 20)
    ids = tok.encode(long_prompt)
    assert len(ids) > 75
    row = tok(long_prompt)[0].tolist()
    assert row == [49406, *ids[:75], 49407]  # start, the first 75 tokens, end last
    short = tok(["a cat", long_prompt])
    assert short.shape == (2, 77)
    assert short[0].tolist() == [49406, 320, 2368] + [49407] * 74
    assert tok([]).shape == (0, 77)


def test_decode_round_trip_on_plain_text(tok):
    for text in ["a photo of an astronaut riding a horse", "Oil Painting  of a   Lighthouse",
                 "一只可爱的猫", "красивый пейзаж", "café crème brûlée", "photorealistic portrait"]:
        expected = " ".join(text.lower().split())
        assert tok.decode(tok.encode(text)) == expected
        assert tok.decode(tok(text)[0], skip_special_tokens=True) == expected
    assert tok.decode([320, 2368, 267]) == "a cat ,"  # punctuation that ended a word gets its space


def test_bpe_results_are_cached(tok):
    tok.encode("a hummingbirdish teacup")
    cached = tok.cache["hummingbirdish"]
    assert tok.bpe("hummingbirdish") is cached
    assert "".join(cached) == "hummingbirdish</w>" and len(cached) > 1


# ---- bad input ------------------------------------------------------------------------------------


def test_bad_vocab_path_gives_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab_path"):
        CLIPTokenizer(vocab_path=tmp_path / "missing.txt.gz")
    not_gzip = tmp_path / "vocab.json"
    not_gzip.write_text("{}")
    with pytest.raises(ValueError, match="not a gzip"):
        CLIPTokenizer(vocab_path=not_gzip)
    too_short = tmp_path / "short.txt.gz"
    with gzip.open(too_short, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(ValueError, match="CLIP's BPE merges"):
        CLIPTokenizer(vocab_path=too_short)


def test_bad_input_gives_clear_error(tok):
    with pytest.raises(TypeError, match="str"):
        tok(123)
    with pytest.raises(TypeError, match="str"):
        tok(["a cat", None])
    with pytest.raises(TypeError, match="str"):
        tok.encode(["a cat"])
    with pytest.raises(ValueError, match="max_length"):
        tok("a cat", max_length=1)
    with pytest.raises(ValueError, match="one row"):
        tok.decode(tok(["a", "b"]))
    with pytest.raises(ValueError, match="outside CLIP's vocabulary"):
        tok.decode([320, 49408])
