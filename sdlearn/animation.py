"""Animation: walking through latent space (what Deforum-style "seed travel" and "prompt travel" do).

Two walks, each one txt2img per frame with everything else held fixed:

* **Seed walk** — interpolate the *initial noise* between two seeds. Noise vectors are Gaussian in
  4·h·w dimensions, so they all lie near a sphere of radius sqrt(4·h·w); a straight line between two
  of them passes through the inside: at the midpoint the noise is only 0.71 times as long, the sampler
  takes it for a less noisy start, and the middle frames lose objects and contrast (notebook 12
  measures by how much).
  Spherical interpolation (slerp, Shoemake 1985) stays on the sphere.
* **Prompt walk** — interpolate the *text conditioning* (the (1, 77, 768) context the U-Net
  attends to) linearly between two prompts, with the same noise for every frame.

A deterministic sampler (DPM++ 2M Karras by default) keeps neighbouring frames consistent; an
ancestral one ("Euler a") adds fresh noise at every step and makes the animation flicker.
"""

from pathlib import Path

import torch

from .pipeline import _noise


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between two noise tensors: t=0 gives a, t=1 gives b."""
    a_flat, b_flat = a.flatten().double(), b.flatten().double()
    cos = torch.dot(a_flat / a_flat.norm(), b_flat / b_flat.norm()).clamp(-1, 1)
    omega = torch.arccos(cos)  # the angle between them
    if omega.abs() < 1e-4:  # (nearly) parallel: the straight line is the arc
        return (1 - t) * a + t * b
    wa, wb = torch.sin((1 - t) * omega) / torch.sin(omega), torch.sin(t * omega) / torch.sin(omega)
    return (wa * a.double() + wb * b.double()).to(a.dtype)


def seed_walk(pipe, prompt: str, seeds: list, frames_per_seed: int = 8, sampler="DPM++ 2M Karras", **kwargs):
    """Frames that morph from seeds[0] to seeds[1] to ... (each pair slerped in `frames_per_seed` frames)."""
    if len(seeds) < 2 or frames_per_seed < 1:
        raise ValueError("give at least two seeds and frames_per_seed >= 1.")
    width, height = pipe._size(kwargs.pop("width", None), kwargs.pop("height", None))
    shape = (4, height // pipe.vae_scale, width // pipe.vae_scale)
    frames = []
    for s0, s1 in zip(seeds[:-1], seeds[1:]):
        n0, n1 = _noise([s0], shape), _noise([s1], shape)
        for k in range(frames_per_seed):
            noise = slerp(n0, n1, k / frames_per_seed)
            frames += pipe.txt2img(prompt, latents=noise, seed=s0, sampler=sampler, width=width, height=height,
                                   progress=False, **kwargs).images
    frames += pipe.txt2img(prompt, seed=seeds[-1], sampler=sampler, width=width, height=height, progress=False,
                           **kwargs).images
    return frames


def prompt_walk(pipe, prompt_a: str, prompt_b: str, frames: int = 8, seed: int = 0, negative_prompt: str = "",
                sampler="DPM++ 2M Karras", clip_skip: int = 1, **kwargs):
    """Frames whose conditioning goes linearly from prompt_a's context to prompt_b's, same seed throughout."""
    if frames < 2:
        raise ValueError("a prompt walk needs at least 2 frames (the two prompts).")
    a, b = pipe.encode_prompt(prompt_a, clip_skip), pipe.encode_prompt(prompt_b, clip_skip)
    if a.shape != b.shape:  # different numbers of 75-token chunks: pad with the empty prompt
        from .guidance import pad_to_same_length

        a, b = pad_to_same_length(a, b, empty=pipe.encode_prompt("", clip_skip))
    out = []
    for k in range(frames):
        t = k / (frames - 1)
        out += pipe.txt2img((1 - t) * a + t * b, negative_prompt=negative_prompt, seed=seed, sampler=sampler,
                            clip_skip=clip_skip, progress=False, **kwargs).images
    return out


def save_animation(frames: list, path, fps: int = 8, overwrite: bool = False) -> Path:
    """Write frames as .gif (Pillow) or .mp4 (needs the imageio and imageio-ffmpeg packages). Never overwrites."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; sdlearn never overwrites a file. Pick another name or pass overwrite=True.")
    if not frames:
        raise ValueError("no frames to save.")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    elif path.suffix.lower() == ".mp4":
        try:
            import imageio.v3 as iio
        except ImportError as e:
            raise ImportError("saving .mp4 needs `pip install imageio imageio-ffmpeg`; or save a .gif.") from e
        import numpy as np

        iio.imwrite(path, np.stack([np.asarray(f.convert("RGB")) for f in frames]), fps=fps, codec="libx264")
    else:
        raise ValueError(f"save animations as .gif or .mp4, not {path.suffix or 'a name without extension'}.")
    return path
