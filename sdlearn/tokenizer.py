"""CLIP's tokenizer: how a prompt becomes the 77 numbers Stable Diffusion reads.

Stable Diffusion 1.5 never sees your prompt as text. CLIP's text encoder reads a row of 77
integers, each the index of a row in a 49,408-row embedding table. This module turns text into
that row, the way OpenAI's CLIP did (Radford et al. 2021, "Learning Transferable Visual Models
From Natural Language Supervision", which borrowed GPT-2's byte-level BPE):

    "A photo of an astronaut, masterpiece"
      1. clean        -> "a photo of an astronaut, masterpiece"        (Unicode NFC, spaces, lower case)
      2. pre-tokenize -> ["a", "photo", "of", "an", "astronaut", ",", "masterpiece"]   (a regex)
      3. bytes        -> each piece as UTF-8 bytes, each byte one printable symbol
      4. BPE          -> ["a</w>", "photo</w>", "of</w>", "an</w>", "astronaut</w>", ",</w>",
                          "masterpiece</w>"]                        (merge the best-ranked pair, repeat)
      5. ids          -> [320, 1125, 539, 550, 18376, 267, 12066]
      6. window       -> [49406, 320, ..., 12066, 49407, 49407, ...]   (77 ids: start, text, end, padding)

A token is not a word. Common words are one token ("photo</w>"); rarer ones are split into
pieces learned from data ("photorealistic" -> "photo", "realistic</w>"; "Rutkowski" -> "rut",
"kowski</w>"); "1024" is four tokens because every digit stands alone; a Chinese character is
two or three byte tokens. That is why A1111's token counter ("n/75" at the corner of the prompt
box) usually reads more than the number of words.

Everything here is built from one file, `bpe_simple_vocab_16e6.txt.gz`, the ranked list of
merges that OpenAI learned (shipped in sdlearn's `assets/clip/`, from the MIT-licensed
open_clip). The tests prove that for 500+ prompts (emoji, CJK, A1111 syntax, 200-token prompts)
the ids equal those of transformers' CLIPTokenizer configured as SD1.5's — the tokenizer that
diffusers, ComfyUI and A1111 call.
"""

from __future__ import annotations

import functools
import gzip
import itertools
import math
import re
import sys
import unicodedata
from pathlib import Path

import torch

DEFAULT_VOCAB_PATH = Path(__file__).resolve().parent.parent / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz"

START_OF_TEXT = "<|startoftext|>"  # id 49406: every prompt window begins with it
END_OF_TEXT = "<|endoftext|>"      # id 49407: ends the text, and SD1.5 also pads with it
END_OF_WORD = "</w>"               # marks a word's last symbol: "cat</w>" ends a word, "cat" begins "cathedral"

# CLIP's vocabulary is 49,152 entries of text pieces plus the two specials = 49,408:
# 256 single bytes + the same 256 ending a word + 48,894 merges + 2 specials.
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 256 + 256 + NUM_MERGES + 2

# The text encoder has 77 position embeddings, so a prompt window holds 77 tokens:
# start + 75 prompt tokens + end. That is A1111's "75" in its token counter; longer prompts
# are cut here, or chunked into several windows by sdlearn.guidance (A1111's long prompts, BREAK).
CONTEXT_LENGTH = 77


# --------------------------------------------------------------------------------------------
# 1. Bytes as printable symbols
# --------------------------------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """Give each of the 256 byte values its own printable character: {byte: symbol}.

    BPE works on UTF-8 *bytes*, not characters, so any text (any script, any emoji) can be spelled
    with 256 base symbols and nothing is ever "unknown". But the merges are stored as text, one
    per line, two symbols separated by a space ("p aint</w>"), so each byte needs a character that
    is visible, is not whitespace and is not a control code. The 188 bytes that already print as
    themselves ("!".."~", "¡".."¬", "®".."ÿ") keep their character; the other 68 (control codes,
    space, DEL, no-break space, soft hyphen) are moved past Latin-1 to chr(256), chr(257), ...
    That is why byte-level vocabularies are full of odd letters: the space byte becomes "Ġ", and
    "猫" (bytes e7 8c ab) is spelled "çĮ«".
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {}
    moved = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + moved)
            moved += 1
    return table


# --------------------------------------------------------------------------------------------
# 2. Cleaning the text
# --------------------------------------------------------------------------------------------
# Why this and not OpenAI's cleaning: OpenAI's CLIP runs ftfy.fix_text (repairs mojibake, turns
# curly quotes straight and full-width letters narrow, ...), html.unescape twice, collapses
# whitespace and lower-cases. What SD1.5 users actually run is transformers' CLIPTokenizer:
# diffusers loads it from the checkpoint's tokenizer/ folder, ComfyUI and A1111 construct it too.
# Since transformers 5 (and in the "Fast" tokenizer before it) its cleaning is exactly three steps,
# with no ftfy and no HTML unescaping, so "&amp;" stays "&", "amp", ";". We implement those
# three steps and the tests prove identical ids; ftfy is not needed. (transformers 4's slow
# tokenizer used ftfy when installed, as it is in A1111's environment through open_clip, and
# otherwise a BERT-style cleaner that split CJK ideographs apart. For ordinary prompts every
# route gives the same ids; they differ on HTML entities, curly quotes, full-width forms, CJK.)

# Unicode's White_Space characters (a regex character-class body): what the regex engine inside
# transformers' tokenizer (Oniguruma, in the `tokenizers` library) means by \s. Python's
# str.isspace() and re's \s also count the separators \x1c-\x1f, which transformers keeps as symbols.
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WHITESPACE_RUN = re.compile(f"[{WHITESPACE}]+")


def clean_text(text: str) -> str:
    """Normalize a prompt the way transformers' CLIPTokenizer does before splitting it."""
    text = unicodedata.normalize("NFC", text)  # "e" + combining acute -> "é", one character
    text = _WHITESPACE_RUN.sub(" ", text)      # tabs, newlines, runs of spaces -> one space
    # Lower-case one character at a time: str.lower() on a whole string turns a word-final
    # Greek "Σ" into "ς", but transformers' tokenizer always gives "σ".
    return "".join(char.lower() for char in text)


# --------------------------------------------------------------------------------------------
# 3. The pre-tokenizer: cutting text into pieces that BPE never merges across
# --------------------------------------------------------------------------------------------
# CLIP's pattern is
#     <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
# findall() returns the pieces; whatever no alternative matches (whitespace) is dropped, so a
# space only matters as a boundary. \p{L} (any letter, any script) and \p{N} (any number) are not
# in Python's `re`, so we list the characters of those Unicode categories ourselves.

def _category_class(major: str) -> str:
    """Regex character-class ranges for every code point whose Unicode category starts with `major`."""
    in_category = (unicodedata.category(chr(cp))[0] == major for cp in range(sys.maxunicode + 1))
    ranges = []
    cp = 0
    for inside, run in itertools.groupby(in_category):
        length = sum(1 for _ in run)
        if inside:
            ranges.append(f"\\U{cp:08x}-\\U{cp + length - 1:08x}")
        cp += length
    return "".join(ranges)


@functools.cache
def pre_tokenizer() -> re.Pattern:
    """CLIP's pre-tokenizer regex, built once (scanning all of Unicode takes ~0.2 s)."""
    letter, number = _category_class("L"), _category_class("N")
    return re.compile(
        r"<\|startoftext\|>|<\|endoftext\|>"   # the special tokens' spelling is one piece
        r"|'s|'t|'re|'ve|'m|'ll|'d"            # English contractions: "it's" -> "it", "'s"
        rf"|[{letter}]+"                       # a word: a run of letters, any script ("一只猫" is one)
        rf"|[{number}]"                        # ONE digit: "1024" -> "1", "0", "2", "4"
        rf"|[^{WHITESPACE}{letter}{number}]+"  # a run of anything else: "(((", ":", "🎨", "<"
    )


# --------------------------------------------------------------------------------------------
# 4. The vocabulary: ranked merges and the token table built from them
# --------------------------------------------------------------------------------------------

def load_merges(path: str | Path) -> list[tuple[str, str]]:
    """Read CLIP's ranked merges from bpe_simple_vocab_16e6.txt.gz: [("i", "n"), ("t", "h"), ...].

    Line 0 is a version header; line 1 is the merge learned first (rank 0), and so on. The file
    holds 262,144 merges, but CLIP uses only the first 48,894, to fit a 49,408-row table.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP BPE vocabulary not found: {path}. Pass vocab_path= pointing to "
            "bpe_simple_vocab_16e6.txt.gz (in sdlearn's assets/clip/; open_clip and OpenAI's CLIP "
            "package ship the same file)."
        )
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not a gzip-compressed UTF-8 text file ({error}); CLIPTokenizer needs "
            "bpe_simple_vocab_16e6.txt.gz as shipped in sdlearn's assets/clip/."
        ) from error
    merges = [tuple(line.split(" ")) for line in lines[1 : 1 + NUM_MERGES]]
    if len(merges) < NUM_MERGES or any(len(merge) != 2 for merge in merges):
        raise ValueError(
            f"{path} does not look like CLIP's BPE merges file: expected a header line and then "
            f"at least {NUM_MERGES} lines of two symbols separated by one space."
        )
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> list[str]:
    """The token table, in id order: the list index of a symbol is its token id.

    The order is OpenAI's: the 256 byte symbols (in code point order, so "!" is 0 and "a" is 64),
    the same 256 ending a word ("a</w>" is 256 + 64 = 320), one entry per merge in rank order
    (the merged symbol "in" is 512), then the two specials at 49406 and 49407.
    """
    byte_symbols = sorted(bytes_to_unicode().values())
    return [
        *byte_symbols,
        *(symbol + END_OF_WORD for symbol in byte_symbols),
        *(left + right for left, right in merges),
        START_OF_TEXT,
        END_OF_TEXT,
    ]


# --------------------------------------------------------------------------------------------
# 5. The tokenizer
# --------------------------------------------------------------------------------------------

class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer, as SD1.5 uses it.

    >>> tok = CLIPTokenizer()
    >>> tok.tokenize("A photorealistic cat")
    ['a</w>', 'photo', 'realistic</w>', 'cat</w>']
    >>> tok.encode("A photorealistic cat")
    [320, 1153, 16157, 2368]
    >>> tok(["a cat", "a dog"]).shape
    torch.Size([2, 77])
    """

    bos_token_id = VOCAB_SIZE - 2  # 49406, <|startoftext|>
    eos_token_id = VOCAB_SIZE - 1  # 49407, <|endoftext|>
    pad_token_id = VOCAB_SIZE - 1  # 49407: SD1.5 pads with <|endoftext|> (OpenAI's CLIP pads with 0, "!")
    vocab_size = VOCAB_SIZE        # 49408
    model_max_length = CONTEXT_LENGTH

    def __init__(self, vocab_path: str | Path | None = None):
        self.vocab_path = Path(vocab_path) if vocab_path is not None else DEFAULT_VOCAB_PATH
        merges = load_merges(self.vocab_path)
        # rank of each merge: the lower, the earlier BPE learned it, the more frequent the pair was
        self.merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.id_to_token = build_vocab(merges)
        self.vocab = {token: i for i, token in enumerate(self.id_to_token)}  # symbol -> id
        if len(self.vocab) != VOCAB_SIZE:
            raise ValueError(
                f"{self.vocab_path} gives {len(self.vocab)} distinct tokens, not CLIP's {VOCAB_SIZE}: "
                "it is not CLIP's BPE merges file."
            )
        self.byte_encoder = bytes_to_unicode()                                   # byte -> symbol
        self.byte_decoder = {symbol: byte for byte, symbol in self.byte_encoder.items()}
        self.pattern = pre_tokenizer()
        self.cache: dict[str, list[str]] = {}  # piece -> BPE symbols; prompts repeat words a lot

    # ---- byte-pair encoding of one piece ---------------------------------------------------

    def bpe(self, piece: str) -> list[str]:
        """Split one pre-tokenized piece into vocabulary symbols: "painting" -> ["painting</w>"].

        Start from single byte symbols, the last one marked as ending the word, then repeatedly
        merge the adjacent pair with the LOWEST rank (the pair BPE learned earliest, the most
        frequent pair in CLIP's training text at that point of training), every occurrence of
        it, until no adjacent pair is a known merge. Replaying the merges in training order
        splits a word the way training would have:

            p a i n t i n g</w>
            rank    0  (i, n)           p a in t in g</w>
            rank    7  (in, g</w>)      p a in t ing</w>      ("ing" ending a word: rank 7;
            rank  182  (t, ing</w>)     p a in ting</w>        "ing" inside one: rank 141)
            rank  253  (p, a)           pa in ting</w>
            rank 1629  (pa, in)         pain ting</w>
            rank 2574  (pain, ting</w>) painting</w>
        """
        if piece in self.cache:
            return self.cache[piece]
        symbols = [self.byte_encoder[byte] for byte in piece.encode("utf-8")]
        symbols[-1] += END_OF_WORD  # "cat" -> c, a, t</w>: "t</w>" is a different symbol than "t"
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda pair: self.merge_ranks.get(pair, math.inf))
            if best not in self.merge_ranks:
                break  # no adjacent pair was ever merged in training: done
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence of `best`, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self.cache[piece] = symbols
        return symbols

    # ---- text -> symbols -> ids --------------------------------------------------------------

    def tokenize(self, text: str) -> list[str]:
        """The BPE symbols of a prompt, e.g. "Oil painting" -> ["oil</w>", "painting</w>"].

        Non-ASCII text shows in byte-symbol spelling ("猫" -> ["ç", "Į", "«</w>"], its three UTF-8
        bytes, which CLIP never merged); `decode` turns ids back into readable text.
        """
        if not isinstance(text, str):
            raise TypeError(f"tokenize() takes one prompt as a str, got {type(text).__name__}.")
        symbols = []
        # The special tokens typed literally are cut out before cleaning, as transformers does,
        # so "a<|endoftext|>b" gives a, 49407, b.
        for segment in re.split(f"({re.escape(START_OF_TEXT)}|{re.escape(END_OF_TEXT)})", text):
            if segment in (START_OF_TEXT, END_OF_TEXT):
                symbols.append(segment)
                continue
            for piece in self.pattern.findall(clean_text(segment)):
                if piece in (START_OF_TEXT, END_OF_TEXT):
                    # Another spelling, lower-cased: "<|EndOfText|>". OpenAI's CLIP looked this
                    # piece up as the special token; transformers re-splits it into "<|",
                    # "endoftext", "|>" and encodes them as plain text, and so do we. (Loaded with
                    # SD1.5's config files, transformers does map "<|StartOfText|>" in any case
                    # to 49406, a side effect of its added-token settings that we do not copy.)
                    for part in ("<|", piece[2:-2], "|>"):
                        symbols.extend(self.bpe(part))
                else:
                    symbols.extend(self.bpe(piece))
        return symbols

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, without the start and end tokens: "a cat" -> [320, 2368]."""
        return [self.vocab[symbol] for symbol in self.tokenize(text)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text back from ids (list or 1-D tensor); word ends become spaces.

        Cleaning is not undone: the text comes back lower-cased, NFC, single-spaced, and with a
        space after punctuation that ended a word ("a cat , red"). Padding decodes as repeated
        <|endoftext|> unless skip_special_tokens=True.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(
                    f"decode() takes one row of ids; got a tensor of shape {tuple(ids.shape)}. "
                    "Decode rows one at a time."
                )
            ids = ids.tolist()
        symbols = []
        for i in ids:
            if not 0 <= i < VOCAB_SIZE:
                raise ValueError(f"token id {i} is outside CLIP's vocabulary (0 to {VOCAB_SIZE - 1}).")
            if not (skip_special_tokens and i >= self.bos_token_id):
                symbols.append(self.id_to_token[i])
        # Every character of every symbol (specials and "</w>" included) is a byte symbol, so map
        # back to bytes, then UTF-8 decode; a cut-off multi-byte character becomes "�".
        raw = bytes(self.byte_decoder[char] for char in "".join(symbols))
        return raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    # ---- the 77-token window the text encoder reads ------------------------------------------

    def __call__(self, text: str | list[str], max_length: int = CONTEXT_LENGTH) -> torch.Tensor:
        """Prompt(s) -> LongTensor (B, max_length): start, ids, end, then padding with end tokens.

        A prompt longer than max_length - 2 tokens is cut, keeping the end token last: CLIP simply
        never sees the rest (A1111 instead splits long prompts into several 75-token chunks).
        """
        prompts = [text] if isinstance(text, str) else text
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(prompt, str) for prompt in prompts):
            raise TypeError("CLIPTokenizer takes a prompt (str) or a list of prompts (list of str).")
        if max_length < 2:
            raise ValueError(
                f"max_length={max_length} leaves no room for the start and end tokens; "
                "use at least 2 (SD1.5 uses 77)."
            )
        rows = []
        for prompt in prompts:
            ids = self.encode(prompt)[: max_length - 2]  # truncate, leaving room for start + end
            row = [self.bos_token_id, *ids, self.eos_token_id]
            rows.append(row + [self.pad_token_id] * (max_length - len(row)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), max_length)  # (B, 77)
