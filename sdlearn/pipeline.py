"""The Stable Diffusion pipeline: the four parts wired together.

A `Pipeline` holds what a checkpoint contains — tokenizer, CLIP text encoder, U-Net and VAE — and
the device and dtype they run in. Generation (txt2img, img2img, inpaint, ...) is built on top.
"""

from dataclasses import dataclass, field

import torch


@dataclass
class Pipeline:
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    source: str = ""
    # What the loader found out about the checkpoint (model family, EMA or not, ...).
    info: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device=None, dtype=None) -> "Pipeline":
        for m in (self.text_encoder, self.unet, self.vae):
            m.to(device=device, dtype=dtype)
        return self
