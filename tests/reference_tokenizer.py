"""The reference tokenizer: transformers' CLIPTokenizer files derived from the shipped BPE vocabulary.

Shared by test_tokenizer.py and the pipeline tests (diffusers' pipelines need a transformers tokenizer).
"""

import gzip
import json
from pathlib import Path

from sdlearn.tokenizer import DEFAULT_VOCAB_PATH


def openai_vocab_and_merges(bpe_path: Path) -> tuple[dict[str, int], list[str]]:
    """OpenAI's / open_clip's derivation, written out independently of sdlearn's code."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_symbols = [chr(c) for c in cs]  # in OpenAI's order: printable bytes first, then shifted ones
    merges = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def write_sd15_tokenizer_folder(folder: Path) -> Path:
    """A folder laid out like runwayml/stable-diffusion-v1-5/tokenizer/."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = openai_vocab_and_merges(DEFAULT_VOCAB_PATH)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")

    def added(content):
        return {"content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True}

    special = {
        "bos_token": added("<|startoftext|>"),
        "eos_token": added("<|endoftext|>"),
        "unk_token": added("<|endoftext|>"),
        "pad_token": "<|endoftext|>",  # SD1.5 pads with the end token (OpenAI's CLIP pads with "!")
    }
    config = {
        **{k: ({**v, "__type": "AddedToken"} if isinstance(v, dict) else v) for k, v in special.items()},
        "errors": "replace",
        "add_prefix_space": False,
        "do_lower_case": True,
        "model_max_length": 77,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    return folder
