"""Textual-inversion embeddings: a new word for the text encoder, as A1111's embeddings/ folder uses it.

Textual inversion (Gal et al. 2022, "An Image is Worth One Word") teaches a model a concept without
changing a single weight. It learns one to a few new token vectors — the rows a word would have in
CLIP's token table — so that a prompt using the trigger word steers the frozen text encoder and U-Net
towards the concept. The file holds only those vectors: a few KB.

    "a small pink circle"   tokens  [start, a, small, pink, circle, end, ...]
    with pink.safetensors   vectors [start, a, small, v1, v2, circle, end, ...]    (a 2-vector embedding)

How A1111 (and ComfyUI's `embedding:name`) use them, and what this module does the same way:

* **The file name is the word.** Every file in the embeddings folder (A1111 `embeddings/`, ComfyUI
  `models/embeddings/`) defines a trigger word: its name without extension. `pipe.embedding_dirs`
  lists such folders; `pipe.embeddings` holds embeddings already in memory ({word: vectors}).
* **Matched on tokens.** The trigger word is tokenized and looked for in the prompt's tokens; where it
  occurs, its tokens are replaced by the embedding's n vectors (the prompt gets n - 1 tokens longer).
  An embedding is never split across two 75-token chunks. Emphasis applies: `(pink:1.3)` weights
  every vector of the embedding by 1.3.
* **Added token ids.** The vectors enter the text encoder as ids past the vocabulary (49408, 49409,
  ...) whose rows are given by `CLIPTextModel(..., extra_tokens=...)` — what diffusers'
  `load_textual_inversion` does by growing the tokenizer and the token table.

Files (read strictly: every entry used, shapes checked, the family named when the width is wrong):

    A1111 .safetensors   {"emb_params": (n, D)}
    A1111 .pt            {"string_to_param": {"*": (n, D)}, "string_to_token": {"*": 265}, "name": ..., "step": ...}
    diffusers .bin       {"<token>": (D,)}                        (learned_embeds.bin)
    SDXL                 {"clip_l": (n, 768), "clip_g": (n, 1280)}   -> rejected: an embedding for SDXL

D is the text encoder's width: 768 for SD1.x, 1024 for SD2.x, 64 for TinySD.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .weights import CheckpointError, TensorFile


class EmbeddingError(CheckpointError):
    """An embedding could not be read or used. The message says what was wrong and what to do."""


EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")
# Text-encoder width -> the model family whose embeddings have it.
WIDTH_FAMILY = {768: "SD1.x (CLIP ViT-L)", 1024: "SD2.x (OpenCLIP ViT-H)", 1280: "SDXL's second text encoder",
                64: "TinySD"}
# Entries A1111's .pt embeddings carry next to the vectors (written by its Train tab).
A1111_PT_KEYS = {"string_to_param", "string_to_token", "name", "step", "sd_checkpoint", "sd_checkpoint_name",
                 "hash"}
MAX_VECTORS = 75  # one 75-token chunk


@dataclass
class Embedding:
    name: str  # the trigger word
    vectors: torch.Tensor  # (n_vectors, D)
    source: str = ""

    @property
    def n_vectors(self) -> int:
        return self.vectors.shape[0]


# ---------------------------------------------------------------------------------------------
# 1. Reading and writing files
# ---------------------------------------------------------------------------------------------


def load_embedding(source, hidden_size: int | None = None, name: str | None = None) -> Embedding:
    """Read an embedding file (A1111 .safetensors / .pt, diffusers .bin) or take an (n, D) tensor.

    hidden_size: the text encoder's width D (pipe.text_encoder.config.hidden_size); a file of another
    width is refused with the family it was made for. name: the trigger word (default: the file name).
    """
    if isinstance(source, Embedding):
        vectors, where, default_name = source.vectors, source.source or source.name, source.name
    elif isinstance(source, torch.Tensor):
        vectors, where, default_name = source, "embedding tensor", None
    elif isinstance(source, (str, Path)):
        path = Path(source)
        vectors, where, default_name = _vectors_from_file(path), str(path), path.stem
    else:
        raise TypeError(f"an embedding is a file path or an (n_vectors, width) tensor, got {type(source).__name__}.")
    name = name or default_name
    if not name:
        raise ValueError("an embedding given as a tensor needs a name: the trigger word used in prompts.")
    vectors = _check_vectors(vectors, where, hidden_size)
    return Embedding(name, vectors, where)


def _vectors_from_file(path: Path) -> torch.Tensor:
    tf = TensorFile.open(path)  # safetensors, or torch.load(weights_only=True): never runs code
    keys, top = tf.keys(), tf.top_level
    if not keys and "string_to_param" in top:  # A1111 .pt
        unknown = sorted(set(top) - A1111_PT_KEYS)
        if unknown:
            raise EmbeddingError(f"{path}: unknown entries {unknown} next to string_to_param; an A1111 embedding "
                                 f"has only {sorted(A1111_PT_KEYS)}.")
        params = top["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{path}: string_to_param must hold exactly one tensor (A1111 saves {{'*': vectors}}), "
                                 f"got {list(params) if isinstance(params, dict) else type(params).__name__}.")
        return next(iter(params.values()))
    if not keys:
        raise EmbeddingError(f"{path} holds no tensors sdlearn can read as an embedding (entries: {sorted(top)[:8]}).")
    if {"clip_l", "clip_g"} & set(keys):
        raise EmbeddingError(f"{path} is an SDXL embedding (it has clip_l/clip_g vectors for SDXL's two text "
                             "encoders); it cannot be used with an SD1.x model. Use an embedding made for SD1.5.")
    if keys == ["emb_params"]:  # A1111 .safetensors
        return tf["emb_params"]
    if len(keys) == 1 and tf[keys[0]].ndim in (1, 2) and tf[keys[0]].numel() <= MAX_VECTORS * 4096:
        return tf[keys[0]]  # diffusers' learned_embeds.bin: {"<token>": (D,)}
    raise EmbeddingError(f"{path} is not a textual-inversion embedding: expected emb_params (A1111 .safetensors), "
                         f"string_to_param (A1111 .pt) or one token's vector (diffusers), found keys "
                         f"{sorted(keys)[:6]}{' ...' if len(keys) > 6 else ''}. (A LoRA goes in the LoRA folder.)")


def _check_vectors(vectors, where, hidden_size) -> torch.Tensor:
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point():
        raise EmbeddingError(f"{where}: the embedding's vectors must be a float tensor, got "
                             f"{getattr(vectors, 'dtype', type(vectors).__name__)}.")
    if vectors.ndim == 1:
        vectors = vectors[None]  # one vector (diffusers' files)
    if vectors.ndim != 2 or not 1 <= vectors.shape[0] <= MAX_VECTORS:
        raise EmbeddingError(f"{where}: expected vectors of shape (n_vectors, width) with 1 to {MAX_VECTORS} vectors, "
                             f"got {tuple(vectors.shape)}.")
    if hidden_size is not None and vectors.shape[1] != hidden_size:
        made_for = WIDTH_FAMILY.get(vectors.shape[1], f"a model whose text encoder is {vectors.shape[1]} wide")
        this = WIDTH_FAMILY.get(hidden_size, f"{hidden_size}-wide")
        raise EmbeddingError(f"{where}: its vectors are {vectors.shape[1]} wide, so it was made for {made_for}; this "
                             f"model's text encoder is {hidden_size} wide ({this}). Use an embedding made for this model.")
    if not bool(torch.isfinite(vectors).all()):
        raise EmbeddingError(f"{where}: the embedding holds NaN or inf values; the file is damaged or training diverged.")
    return vectors.detach().float().cpu().contiguous()


def save_embedding(path, vectors: torch.Tensor, name: str | None = None, overwrite: bool = False,
                   step: int | None = None, model_name: str = "") -> Path:
    """Write (n, D) vectors as an A1111 embedding: .safetensors ({"emb_params"}) or .pt (string_to_param).

    The file name is the trigger word, so name defaults to it. An existing file is replaced only with
    overwrite=True; the file is written next to the target and renamed, so it is never half-written.
    """
    path = Path(path)
    name = name or path.stem
    vectors = _check_vectors(vectors, str(path), None)
    if path.suffix not in (".safetensors", ".pt"):
        raise ValueError(f"save embeddings as .safetensors (safe to share) or .pt (A1111's own), got {path.name}.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it (or choose another name: "
                              "the file name is the word used in prompts).")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"emb_params": vectors}, str(tmp),
                  metadata={"name": name, "step": str(step or 0), "sd_checkpoint_name": model_name,
                            "made_with": "sdlearn"})
    else:
        # A1111's layout; 265 is the id of "*", the placeholder token A1111 records.
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": name,
                    "step": step or 0, "sd_checkpoint": None, "sd_checkpoint_name": model_name}, tmp)
    os.replace(tmp, path)
    return path


def find_embeddings(folders) -> dict[str, list[Path]]:
    """{trigger word: [files]} for every embedding file in `folders` and their subfolders."""
    folders = [Path(f) for f in ([folders] if isinstance(folders, (str, Path)) else folders)]
    found: dict = {}
    for folder in folders:
        if folder.is_dir():
            for path in sorted(folder.rglob("*")):
                if path.suffix.lower() in EMBEDDING_EXTENSIONS and path.is_file():
                    found.setdefault(path.stem, []).append(path)
    return found


# ---------------------------------------------------------------------------------------------
# 2. Putting embeddings into a prompt's tokens
# ---------------------------------------------------------------------------------------------


@dataclass
class PromptEmbeddings:
    """The embeddings a prompt may use, ready for tokenization.

    triggers: (token ids of the word, first added id, n_vectors), longest word first, so that a
    two-token name wins over a one-token name that starts it. extra_tokens: (N, D), every embedding's
    vectors one after another; added id vocab_size + k reads row k.
    """
    triggers: list
    extra_tokens: torch.Tensor
    first_id: int  # the vocabulary size: ids from here on are added tokens

    @classmethod
    def build(cls, tokenizer, embeddings: dict, vocab_size: int) -> "PromptEmbeddings | None":
        """From {word: Embedding or (n, D) tensor}; None when there are none."""
        if not embeddings:
            return None
        triggers, rows, next_id = [], [], vocab_size
        for word, emb in embeddings.items():
            vectors = emb.vectors if isinstance(emb, Embedding) else emb
            ids = tuple(tokenizer.encode(word))
            if not ids:
                raise EmbeddingError(f"the embedding name {word!r} has no tokens; rename the file to a word.")
            triggers.append((ids, next_id, vectors.shape[0]))
            rows.append(vectors)
            next_id += vectors.shape[0]
        triggers.sort(key=lambda t: -len(t[0]))
        return cls(triggers, torch.cat(rows), vocab_size)

    def units(self, tokens: list[int]) -> list[list[int]]:
        """Group a piece's token ids into units: [id] for a plain token, [V+k, ..., V+k+n-1] for an embedding."""
        out, i = [], 0
        while i < len(tokens):
            for ids, first, n in self.triggers:
                if tuple(tokens[i:i + len(ids)]) == ids:
                    out.append(list(range(first, first + n)))
                    i += len(ids)
                    break
            else:
                out.append([tokens[i]])
                i += 1
        return out


def embeddings_in_prompt(prompt: str, names) -> list[str]:
    """The names that may occur in the prompt (a cheap text test before any file is read)."""
    text = prompt.lower()
    return [name for name in names if re.search(re.escape(name.lower()), text)]
