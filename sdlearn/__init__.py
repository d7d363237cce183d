"""sdlearn — Stable Diffusion 1.5 written from scratch, annotated for learners.

The four parts of SD1.5 each live in one module that reads top to bottom:
tokenizer.py (CLIP BPE), clip.py (text encoder), vae.py (pixels <-> latents),
unet.py (noise prediction). weights.py puts real checkpoints into them, and
load_pipeline() is the front door:

    pipe = sdlearn.load_pipeline("tiny")                       # the shipped TinySD
    pipe = sdlearn.load_pipeline("v1-5-pruned-emaonly.safetensors")
"""

__version__ = "0.1.0"


def load_pipeline(source, device=None, dtype=None, **kwargs):
    """Load a Stable Diffusion pipeline; see sdlearn.weights.load_pipeline for the options."""
    from .weights import load_pipeline as _load_pipeline

    return _load_pipeline(source, device=device, dtype=dtype, **kwargs)
