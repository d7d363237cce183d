"""CLIP's text transformer: how a prompt becomes the (77, 768) table the U-Net reads.

Stable Diffusion 1.5 borrows the text half of OpenAI's CLIP ViT-L/14 (Radford et al. 2021,
"Learning Transferable Visual Models From Natural Language Supervision") and keeps it frozen.
CLIP was trained to put a caption and its image close together; SD1.5 does not use that final
"one vector per caption" though. It takes the whole sequence of per-token vectors and lets the
U-Net's cross-attention look at every one of them (that is what "conditioning" means in ComfyUI).

The network is a GPT-2-style transformer:

    token ids (B, 77) --token embedding + learned position embedding--> (B, 77, 768)
      12 x [ x = x + SelfAttention(LayerNorm(x))     causal: token i sees tokens 0..i only
             x = x + MLP(LayerNorm(x)) ]              MLP: 768 -> 3072 -> quick-GELU -> 768
      final LayerNorm                               -> (B, 77, 768), the U-Net's `context`

Three details matter for matching the real weights number for number:

* **Causal mask, no padding mask.** Every token only attends to itself and the tokens before it
  (CLIP's text tower was trained that way, like a language model). SD1.5 passes no padding mask:
  the padding tokens after the prompt (49407, the end-of-text id, repeated) are real inputs whose
  outputs the U-Net sees. Because attention is causal, padding never changes the prompt's tokens.
* **quick-GELU**, `x * sigmoid(1.702 x)`: the cheap GELU approximation OpenAI trained CLIP with.
  Using the exact GELU here would make every output slightly wrong.
* **Clip skip** (A1111 "Clip skip", ComfyUI "CLIPSetLastLayer"): instead of the last layer's output
  take an earlier layer's, still passed through the final LayerNorm. Clip skip 2 (ComfyUI -2) is the
  penultimate layer; many anime models were trained with it. Note that diffusers'
  `StableDiffusionPipeline.__call__(clip_skip=k)` counts *skipped* layers: its 1 is A1111's 2.

State-dict keys are those of transformers' `CLIPTextModel` as stored in every SD1.5 file,
`text_model.embeddings.token_embedding.weight`, `text_model.encoder.layers.0.self_attn.q_proj.weight`,
..., so a diffusers `text_encoder/model.safetensors` loads with a strict `load_state_dict`.
Two version notes: transformers 5 keeps these modules at the top level in memory (its state_dict
lacks the `text_model.` prefix; it strips it when loading such files and saves without it), and
checkpoints saved by transformers before 4.31 also carry `text_model.embeddings.position_ids`, a
constant 0..76 that sdlearn computes instead of storing (`weights.py` drops that key).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The CLIP tokenizer's end-of-text id. SD1.5's tokenizer also pads with it.
END_OF_TEXT = 49407


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408  # BPE vocabulary (49406 = start-of-text, 49407 = end-of-text)
    max_position_embeddings: int = 77  # the 77-token window
    hidden_size: int = 768  # width D of every token vector
    intermediate_size: int = 3072  # MLP width (4 D)
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"  # "quick_gelu" (CLIP) or "gelu" (exact, erf-based)
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"CLIPTextConfig: hidden_act={self.hidden_act!r} is not implemented; "
                f"sdlearn supports {sorted(_ACTIVATIONS)} (SD1.5 uses 'quick_gelu')."
            )
        for name in ("vocab_size", "max_position_embeddings", "hidden_size", "intermediate_size",
                     "num_hidden_layers", "num_attention_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"CLIPTextConfig: {name} must be a positive integer, got {getattr(self, name)}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIPTextConfig: hidden_size={self.hidden_size} must be divisible by "
                f"num_attention_heads={self.num_attention_heads} (each head gets hidden_size / heads channels)."
            )

    @classmethod
    def sd15(cls) -> "CLIPTextConfig":
        """openai/clip-vit-large-patch14's text tower, as in SD1.5's `text_encoder/`: 123,060,480 parameters."""
        return cls()

    @classmethod
    def from_transformers(cls, d: dict) -> "CLIPTextConfig":
        """Read a transformers `CLIPTextConfig` dict (a `text_encoder/config.json`)."""
        if "text_config" in d:
            raise ValueError(
                "from_transformers got a full CLIPModel config (text + vision); "
                "pass its text part instead: CLIPTextConfig.from_transformers(d['text_config'])."
            )
        if d.get("model_type", "clip_text_model") != "clip_text_model":
            raise ValueError(
                f"from_transformers expects a CLIP text model config, got model_type={d['model_type']!r}."
            )
        # Dropout only acts in training and SD1.5's is 0; a non-zero value would be silently ignored.
        for name in ("attention_dropout", "dropout"):
            if d.get(name, 0.0) not in (0, 0.0, None):
                raise ValueError(f"from_transformers: {name}={d[name]} is not implemented (sdlearn's CLIP has no dropout).")
        defaults = cls()
        kwargs = {name: d.get(name, getattr(defaults, name)) for name in cls.__dataclass_fields__}
        # transformers' "gelu" is the exact erf GELU, the same as ours; `__post_init__` rejects the rest.
        return cls(**kwargs)

    def to_transformers(self) -> dict:
        """Keyword arguments for transformers' `CLIPTextConfig` building the same network."""
        return dict(
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
            attention_dropout=0.0,
            bos_token_id=49406,
            eos_token_id=END_OF_TEXT,  # makes transformers' pooler use the first end token, like `pooled`
        )


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU(x) ~ x * sigmoid(1.702 x), the approximation CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention: softmax(Q K^T / sqrt(d) + causal mask) V."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        # (B, T, D) -> (B, heads, T, head_dim)
        q = self.q_proj(x).view(B, T, self.heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.heads, -1).transpose(1, 2)
        # is_causal: position i attends to positions 0..i only. Scale 1/sqrt(head_dim) is the default.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, D)  # heads side by side again
        return self.out_proj(y)


class CLIPMLP(nn.Module):
    """Position-wise feed-forward: fc2(act(fc1(x))), D -> 4D -> D."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """One pre-LayerNorm transformer block: normalise, transform, add back (the residual stream)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))  # tokens exchange information
        x = x + self.mlp(self.layer_norm2(x))  # each token processed on its own
        return x


class CLIPEmbeddings(nn.Module):
    """Token id -> vector, plus a learned vector per position 0..76 (CLIP has no sinusoids)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, extra_tokens: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        if extra_tokens is None:
            tokens = self.token_embedding(input_ids)  # (B, T, D)
        else:
            # Added tokens (textual inversion): ids V, V+1, ... past the vocabulary V read the rows of
            # extra_tokens (N, D) instead of the table, which stays untouched. Equal to growing the table
            # to V + N rows (transformers' resize_token_embeddings) without copying its 49408 rows, and
            # gradients reach extra_tokens: that is how an embedding is trained.
            V = self.token_embedding.num_embeddings
            added = input_ids >= V  # (B, T)
            tokens = torch.where(added[..., None],
                                 extra_tokens.to(self.token_embedding.weight)[(input_ids - V).clamp(min=0)],
                                 self.token_embedding(input_ids.clamp(max=V - 1)))  # (B, T, D)
        # Positions are always 0..T-1, so the first T rows of the position table are the lookup.
        return tokens + self.position_embedding.weight[:T]  # (B, T, D)


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPTransformer(nn.Module):
    """Holds the parts under the names transformers uses (`text_model.embeddings...`)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """The SD1.5 text encoder. `forward(input_ids, clip_skip=1) -> (B, T, D)`."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTransformer(config)

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1, extra_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> token vectors (B, T, D), the U-Net's cross-attention `context`.

        clip_skip=1: the last layer's output after the final LayerNorm (transformers' last_hidden_state).
        clip_skip=k: the output of layer L-k+1 of L (A1111 "Clip skip" k, ComfyUI CLIPSetLastLayer -k),
        also passed through the final LayerNorm, as A1111 and ComfyUI do. The skipped layers are not run.
        extra_tokens: (N, D) vectors for the added token ids vocab_size .. vocab_size+N-1 — the vectors
        of textual-inversion embeddings (sdlearn.embeddings puts their ids into the prompt).
        """
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must have shape (batch, tokens), got {tuple(input_ids.shape)}; "
                "for a single prompt use ids[None] or the tokenizer's output as is."
            )
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"{input_ids.shape[1]} tokens do not fit CLIP's {cfg.max_position_embeddings}-token window; "
                "split longer prompts into 77-token chunks and encode each (see sdlearn.guidance)."
            )
        if not isinstance(clip_skip, int) or not 1 <= clip_skip <= cfg.num_hidden_layers:
            raise ValueError(
                f"clip_skip must be an integer from 1 (use the last layer) to {cfg.num_hidden_layers}, "
                f"got {clip_skip!r}. ComfyUI's CLIPSetLastLayer -2 is clip_skip=2."
            )
        n_extra = 0 if extra_tokens is None else extra_tokens.shape[0]
        if extra_tokens is not None and (extra_tokens.ndim != 2 or extra_tokens.shape[1] != cfg.hidden_size):
            raise ValueError(f"extra_tokens must have shape (N, {cfg.hidden_size}), got {tuple(extra_tokens.shape)}.")
        if input_ids.numel() and (int(input_ids.max()) >= cfg.vocab_size + n_extra or int(input_ids.min()) < 0):
            raise ValueError(
                f"token id {int(input_ids.max())} is outside the vocabulary (0..{cfg.vocab_size - 1})"
                + (f" and the {n_extra} added tokens" if n_extra else "; ids past it are added tokens "
                   "(textual-inversion embeddings) and need their vectors in extra_tokens") + "."
            )
        tm = self.text_model
        x = tm.embeddings(input_ids, extra_tokens)  # (B, T, D)
        for layer in tm.encoder.layers[: cfg.num_hidden_layers - (clip_skip - 1)]:
            x = layer(x)
        return tm.final_layer_norm(x)  # (B, T, D)

    def pooled(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """One vector per prompt: the hidden vector at the first end-of-text token (B, T, D) -> (B, D).

        Because attention is causal, the end-of-text token is the first position that has seen the
        whole prompt; CLIP's contrastive training projects this vector to compare with images.

        transformers' `pooler_output` uses the same rule when the config's eos_token_id is 49407.
        SD1.5's shipped `text_encoder/config.json` still says eos_token_id=2 (written before
        transformers PR #24773), which switches transformers to the legacy rule "position of the
        largest token id" (`input_ids.argmax(-1)`). With the stock vocabulary the two agree, since
        49407 is the largest id and argmax returns its first occurrence; they differ once added
        tokens (textual-inversion embeddings, ids >= 49408) appear in a prompt.
        """
        is_end = input_ids == END_OF_TEXT  # (B, T)
        if not bool(is_end.any(dim=1).all()):
            raise ValueError(
                f"pooled() needs an end-of-text token ({END_OF_TEXT}) in every row of input_ids; "
                "encode prompts with sdlearn's CLIPTokenizer, which adds it."
            )
        first_end = is_end.int().argmax(dim=1)  # (B,) argmax returns the first maximum
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first_end]  # (B, D)
