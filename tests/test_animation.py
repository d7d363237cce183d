"""Seed walks (slerp of the initial noise) and prompt walks (interpolated conditioning), saved as GIF/MP4."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline import build

from sdlearn.animation import prompt_walk, save_animation, seed_walk, slerp
from sdlearn.pipeline import _noise


@pytest.fixture(scope="module")
def pipe():
    return build()[1]


def test_slerp_endpoints_and_norm():
    a, b = _noise([1], (4, 8, 8)), _noise([2], (4, 8, 8))
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    mid_slerp, mid_lerp = slerp(a, b, 0.5), 0.5 * (a + b)
    # Gaussian noise lives near a sphere; slerp stays on it, the straight line dips inside (by ~1/sqrt 2).
    assert abs(mid_slerp.norm() / a.norm() - 1) < 0.05
    assert mid_lerp.norm() / a.norm() < 0.8


def test_seed_walk_starts_and_ends_on_the_seeds(pipe):
    frames = seed_walk(pipe, "a red circle", seeds=[3, 4], frames_per_seed=3, steps=3)
    assert len(frames) == 4 and all(f.size == (64, 64) for f in frames)
    first = pipe.txt2img("a red circle", seed=3, steps=3, sampler="DPM++ 2M Karras", progress=False).images[0]
    last = pipe.txt2img("a red circle", seed=4, steps=3, sampler="DPM++ 2M Karras", progress=False).images[0]
    assert np.array_equal(np.asarray(frames[0]), np.asarray(first))
    assert np.array_equal(np.asarray(frames[-1]), np.asarray(last))


def test_prompt_walk_ends_on_the_prompts(pipe):
    frames = prompt_walk(pipe, "a red circle", "a blue square", frames=3, seed=1, steps=3)
    start = pipe.txt2img("a red circle", seed=1, steps=3, sampler="DPM++ 2M Karras", progress=False).images[0]
    end = pipe.txt2img("a blue square", seed=1, steps=3, sampler="DPM++ 2M Karras", progress=False).images[0]
    assert len(frames) == 3
    assert np.array_equal(np.asarray(frames[0]), np.asarray(start))
    assert np.array_equal(np.asarray(frames[-1]), np.asarray(end))


def test_save_gif_and_mp4_never_overwrite(tmp_path):
    frames = [Image.new("RGB", (64, 64), (i * 40, 0, 0)) for i in range(4)]
    gif = save_animation(frames, tmp_path / "walk.gif", fps=4)
    assert Image.open(gif).n_frames == 4
    mp4 = save_animation(frames, tmp_path / "walk.mp4", fps=4)
    assert mp4.stat().st_size > 0
    with pytest.raises(FileExistsError):
        save_animation(frames, gif)
    with pytest.raises(ValueError, match=".gif or .mp4"):
        save_animation(frames, tmp_path / "walk.avi")
