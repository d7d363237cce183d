"""`python -m sdlearn "prompt"`: the command-line txt2img saves what the pipeline makes, A1111-style."""

import numpy as np
import pytest
from PIL import Image

import sdlearn
from sdlearn.__main__ import main
from sdlearn.pipeline import parse_infotext

PROMPT = "a large red circle in the middle on a blue background"


@pytest.fixture(scope="module")
def pipe():
    return sdlearn.load_pipeline("tiny")


def test_saves_the_pipelines_image_with_its_parameters(pipe, tmp_path, capsys):
    paths = main([PROMPT, "--steps", "4", "--seed", "5", "--cfg-scale", "5", "--sampler", "DPM++ 2M Karras",
                  "--outdir", str(tmp_path)])
    assert [p.name for p in paths] == ["00000-5.png"]
    saved = Image.open(paths[0])
    params = parse_infotext(saved.info["parameters"])
    assert (params["Prompt"], params["Steps"], params["Seed"], params["Sampler"], params["CFG scale"]) == \
           (PROMPT, "4", "5", "DPM++ 2M Karras", "5.0")
    expected = pipe.txt2img(PROMPT, steps=4, seed=5, cfg_scale=5, sampler="DPM++ 2M Karras", progress=False).images[0]
    assert np.abs(np.asarray(saved, dtype=int) - np.asarray(expected, dtype=int)).max() == 0
    assert str(paths[0]) in capsys.readouterr().out


def test_never_overwrites_and_numbers_on(tmp_path):
    first = main([PROMPT, "--steps", "2", "--seed", "1", "--outdir", str(tmp_path)])
    before = first[0].read_bytes()
    second = main([PROMPT, "--steps", "2", "--seed", "1", "--batch-size", "2", "--outdir", str(tmp_path)])
    assert [p.name for p in second] == ["00001-1.png", "00002-2.png"]
    assert first[0].read_bytes() == before


def test_img2img_from_a_picture_file(pipe, tmp_path):
    source = tmp_path / "mine.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(source)
    out = tmp_path / "out"
    paths = main([PROMPT, "--init-image", str(source), "--denoising-strength", "0.5", "--steps", "4", "--seed", "3",
                  "--outdir", str(out)])
    saved = Image.open(paths[0])
    assert parse_infotext(saved.info["parameters"])["Denoising strength"] == "0.5"
    expected = pipe.img2img(Image.open(source), PROMPT, strength=0.5, steps=4, seed=3, progress=False).images[0]
    assert np.abs(np.asarray(saved, dtype=int) - np.asarray(expected, dtype=int)).max() == 0
    assert Image.open(source).getpixel((0, 0)) == (200, 30, 30)     # the learner's picture is untouched


@pytest.mark.parametrize("argv, message", [
    (["--width", "100"], "multiples of 8"),
    (["--steps", "0"], "steps must be"),
    (["--batch-size", "0"], "batch_size must be"),
    (["--sampler", "Eular a"], "Eular a"),
    (["--model", "no/such/file.safetensors"], "No such file"),
    (["--init-image", "no_such_picture.png"], "no_such_picture.png"),
    (["--init-image", __file__], "cannot identify image file"),
    (["--init-image", "{picture}", "--denoising-strength", "1.5"], "between 0 and 1"),
])
def test_bad_input_exits_with_a_message_and_writes_nothing(tmp_path, capsys, argv, message):
    picture = tmp_path / "picture.png"
    Image.new("RGB", (64, 64)).save(picture)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main([PROMPT, "--outdir", str(out), *[a.replace("{picture}", str(picture)) for a in argv]])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
