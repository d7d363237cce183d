"""Conditioning: from the prompt box to the tensor the U-Net attends to, and classifier-free guidance.

Three things happen between typing a prompt and sampling:

1. **Emphasis** (A1111's prompt syntax). `(word)` multiplies that part's weight by 1.1, `[word]`
   divides it by 1.1, `(word:1.5)` sets the factor, brackets nest, and `\\(` is a literal bracket.
   ComfyUI reads the same syntax. `BREAK` starts a new 75-token chunk.
2. **Chunking.** CLIP sees at most 77 tokens: start, 75 tokens, end. A1111 splits longer prompts
   into 75-token chunks (backing up to the last comma when one is within 20 tokens, so a phrase is
   not cut in half), encodes each chunk separately and concatenates them along the sequence axis:
   a 150-token prompt becomes a (1, 154, 768) context. Cross-attention does not care how long the
   context is. diffusers instead truncates at 77 tokens; `prompt_mode="diffusers"` does the same.
3. **Weighting.** Each token's output vector is multiplied by its weight, then the whole tensor is
   rescaled so its mean is what it was before (A1111's default "Original" emphasis). Emphasis thus
   changes the *balance* between words, not the overall magnitude.

Then **classifier-free guidance** (Ho & Salimans, 2021): the U-Net predicts noise twice, with the
prompt and with the negative prompt (empty by default), and we extrapolate from the second towards
the first: ε = ε_uncond + s · (ε_cond − ε_uncond). s is the WebUI's "CFG Scale" (ComfyUI: "cfg").
"""

import re

import torch

# A1111's factors for one level of round / square brackets.
ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
CHUNK_LENGTH = 75  # tokens per chunk, plus start and end tokens = CLIP's 77
COMMA_BACKTRACK = 20  # look back this many tokens for a comma when a chunk overflows

# The lexer for emphasis syntax: escapes, brackets, ":1.5)" weight closers, plain text.
_TOKEN = re.compile(
    r"""
      \\[()\[\]\\]          # an escaped bracket or backslash: literal text
    | \\                    # a lone backslash: literal text
    | \(                    # open round
    | \[                    # open square
    | :\s*([+-]?[.\d]+)\s*\)  # ":1.5)" closes a round bracket with an explicit weight
    | \)                    # close round
    | \]                    # close square
    | [^\\()\[\]:]+         # plain text
    | :                     # a colon that is not a weight
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_emphasis(prompt: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) pieces; weight -1 marks a BREAK.

    >>> parse_emphasis("a (red:1.5) [circle]")
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('circle', 0.9090909090909091)]
    """
    pieces: list[list] = []  # [text, weight], mutable so brackets can rescale what they enclose
    open_round: list[int] = []  # index in `pieces` where each open "(" started
    open_square: list[int] = []

    def scale_from(start: int, factor: float):
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKEN.finditer(prompt):
        text, weight = match.group(0), match.group(1)
        if text.startswith("\\"):
            pieces.append([text[1:], 1.0])  # "\\(" -> "(", a lone "\\" -> "" (as A1111)
        elif text == "(":
            open_round.append(len(pieces))
        elif text == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), float(weight))
        elif text == ")" and open_round:
            scale_from(open_round.pop(), ROUND_FACTOR)
        elif text == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_FACTOR)
        else:
            # Plain text (or an unmatched closer, which A1111 keeps as text). BREAK splits it.
            for i, part in enumerate(_BREAK.split(text)):
                if i > 0:
                    pieces.append(["BREAK", -1.0])
                pieces.append([part, 1.0])

    # Brackets never closed still apply, up to the end of the prompt.
    for start in open_round:
        scale_from(start, ROUND_FACTOR)
    for start in open_square:
        scale_from(start, SQUARE_FACTOR)

    if not pieces:
        return [("", 1.0)]
    # Merge neighbours with equal weight so the tokenizer sees whole phrases.
    merged = [pieces[0]]
    for text, weight in pieces[1:]:
        if weight == merged[-1][1]:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged]


def chunk_prompt(tokenizer, prompt: str, emphasis: bool = True, embeddings=None) -> tuple[list[list[int]], list[list[float]]]:
    """Tokenize a prompt into 77-token windows the way A1111 does.

    Returns (chunks, weights): each chunk is [start, 75 tokens (end-padded), end], with a weight
    per token. An empty prompt gives one chunk of start + end padding. embeddings (a
    sdlearn.embeddings.PromptEmbeddings): each trigger word's tokens become its embedding's added ids,
    kept together in one chunk (A1111 starts a new chunk rather than split an embedding).
    """
    comma = tokenizer.encode(",")[0]
    pieces = parse_emphasis(prompt) if emphasis else [(prompt, 1.0)]

    chunks, weights = [], []
    tokens, mults, last_comma = [], [], -1

    def close_chunk():
        nonlocal tokens, mults, last_comma
        pad = CHUNK_LENGTH - len(tokens)
        chunks.append([tokenizer.bos_token_id] + tokens + [tokenizer.eos_token_id] * pad + [tokenizer.eos_token_id])
        weights.append([1.0] + mults + [1.0] * pad + [1.0])
        tokens, mults, last_comma = [], [], -1

    for text, weight in pieces:
        if weight == -1:  # BREAK
            close_chunk()
            continue
        for unit in (embeddings.units(tokenizer.encode(text)) if embeddings else
                     [[t] for t in tokenizer.encode(text)]):
            if len(unit) > 1 or (embeddings and unit[0] >= embeddings.first_id):   # an embedding's vectors
                if len(tokens) + len(unit) > CHUNK_LENGTH:
                    close_chunk()
                tokens += unit
                mults += [weight] * len(unit)
                continue
            token = unit[0]
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK_LENGTH and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                # Full chunk, and a comma not long ago: move the words after it to the next chunk.
                keep = last_comma + 1
                moved_tokens, moved_mults = tokens[keep:], mults[keep:]
                tokens, mults = tokens[:keep], mults[:keep]
                close_chunk()
                tokens, mults = moved_tokens, moved_mults
            if len(tokens) == CHUNK_LENGTH:
                close_chunk()
            tokens.append(token)
            mults.append(weight)

    if tokens or not chunks:
        close_chunk()
    return chunks, weights


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, prompt: str, clip_skip: int = 1, mode: str = "a1111",
                  embeddings: dict | None = None) -> torch.Tensor:
    """Prompt text -> U-Net context (1, 77·chunks, D).

    mode="a1111": emphasis, 75-token chunks, mean-restoring weighting (A1111's defaults).
    mode="diffusers": the plain 77-token window, longer prompts truncated (StableDiffusionPipeline).
    embeddings: {trigger word: (n, D) vectors or Embedding} — textual inversion (sdlearn.embeddings).
    """
    from .embeddings import PromptEmbeddings

    device = next(text_encoder.parameters()).device
    table = PromptEmbeddings.build(tokenizer, embeddings, text_encoder.config.vocab_size) if embeddings else None
    # Added tokens' vectors go in only when there are some (any text encoder taking ids works without).
    extra = {} if table is None else {"extra_tokens": table.extra_tokens.to(device)}
    if mode == "diffusers":
        if table is None:
            ids = tokenizer(prompt).to(device)  # (1, 77), truncated
        else:
            tokens = [t for unit in table.units(tokenizer.encode(prompt)) for t in unit][:CHUNK_LENGTH]
            pad = CHUNK_LENGTH - len(tokens)
            ids = torch.tensor([[tokenizer.bos_token_id] + tokens + [tokenizer.eos_token_id] * (pad + 1)], device=device)
        return text_encoder(ids, clip_skip=clip_skip, **extra)
    if mode != "a1111":
        raise ValueError(f"prompt mode must be 'a1111' or 'diffusers', got {mode!r}")

    chunks, weights = chunk_prompt(tokenizer, prompt, embeddings=table)
    ids = torch.tensor(chunks, device=device)  # (chunks, 77)
    w = torch.tensor(weights, device=device)  # (chunks, 77)
    z = text_encoder(ids, clip_skip=clip_skip, **extra)  # (chunks, 77, D)
    # Emphasis: scale each token's vector, then restore the chunk's mean (A1111 "Original").
    original_mean = z.float().mean(dim=(1, 2), keepdim=True)
    z = z * w[..., None].to(z.dtype)
    z = z * (original_mean / z.float().mean(dim=(1, 2), keepdim=True)).to(z.dtype)
    return z.reshape(1, -1, z.shape[-1])  # chunks side by side: (1, 77·chunks, D)


def pad_to_same_length(*contexts: torch.Tensor, empty: torch.Tensor) -> list:
    """Give prompt and negative prompt (and every prompt of a batch) the same number of chunks, padding
    with the empty prompt's chunk `empty` (1, 77, D).

    Classifier-free guidance runs both in one batch, so their contexts must be equally long. A1111
    does the same ("Pad prompt/negative prompt to be same length", on by default since 1.6).
    """
    n = max(c.shape[1] for c in contexts)

    def pad(c):
        missing = (n - c.shape[1]) // empty.shape[1]
        return torch.cat([c] + [empty] * missing, dim=1)

    return [pad(c) for c in contexts]


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance: ε = ε_uncond + s·(ε_cond − ε_uncond). s = 1 is the plain conditional model."""
    return eps_uncond + cfg_scale * (eps_cond - eps_uncond)
