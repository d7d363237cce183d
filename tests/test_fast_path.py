"""The GPU fast path (Pipeline.enable_fast_path), checked on CPU against the eager path.

Channels-last is tested in full. torch.compile with its default (inductor) backend takes about three
minutes to compile even this small U-Net on a busy 2-core CPU, too slow for the test suite; here Dynamo
captures the whole U-Net as one graph (fullgraph=True, as enable_fast_path asks, with the "eager"
backend, which runs the captured graph without generating code) and its output is compared with eager.
The inductor-compiled U-Net is checked against eager at full size by benchmarks/bench_sd15.py on a GPU.
"""

import torch
from test_pipeline import PROMPT, SIZE, build

from sdlearn.unet import SpatialTransformer


def inputs():
    g = torch.Generator().manual_seed(4)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 250]), torch.randn(2, 77, 48, generator=g)


def test_channels_last_unet_equals_eager():
    _, pipe = build()
    x, t, context = inputs()
    with torch.no_grad():
        expected = pipe.unet(x, t, context)
    pipe.enable_fast_path(channels_last=True, compile=False)
    layouts = []  # the layout every spatial transformer hands on
    for m in pipe.unet.modules():
        if isinstance(m, SpatialTransformer):
            m.register_forward_hook(lambda m, a, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        got = pipe.unet(x, t, context)
    diff = (got - expected).abs().max().item()
    print(f"channels-last U-Net: max abs difference {diff:.2e} (output max {expected.abs().max():.2f})")
    assert diff < 1e-6
    assert layouts and all(layouts)  # no conversion back to channels-first inside the network
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_default_path_stays_channels_first():
    _, pipe = build()
    x, t, context = inputs()
    layouts = []
    for m in pipe.unet.modules():
        if isinstance(m, SpatialTransformer):
            m.register_forward_hook(lambda m, a, out: layouts.append(out.is_contiguous()))
    with torch.no_grad():
        pipe.unet(x, t, context)
    assert layouts and all(layouts)


def test_whole_unet_compiles_as_one_graph_and_matches_eager():
    _, pipe = build()
    x, t, context = inputs()
    with torch.no_grad():
        expected = pipe.unet(x, t, context)
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.unet.compile(backend="eager", fullgraph=True)  # fullgraph: any graph break is an error
        got = pipe.unet(x, t, context)
    torch._dynamo.reset()
    assert (got - expected).abs().max() < 1e-6


def test_fast_path_pipeline_equals_eager():
    _, pipe = build()
    kwargs = dict(steps=3, sampler="Euler", seed=5, width=SIZE, height=SIZE, progress=False)
    eager = pipe.txt2img(PROMPT, **kwargs)
    pipe.enable_fast_path(channels_last=True, compile=False)
    fast = pipe.txt2img(PROMPT, **kwargs)
    diff = (fast.latents - eager.latents).abs().max().item()
    print(f"channels-last txt2img: max abs latent difference {diff:.2e}")
    assert diff < 1e-5
    assert list(pipe.unet.state_dict()) == list(build()[1].unet.state_dict())  # keys unchanged
