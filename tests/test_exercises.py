"""The exercises: every check accepts its solution, rejects common wrong answers with the right hint, and
fails a blank learner notebook; the learner notebooks are exactly what the generator makes from the
solutions; regenerating keeps a learner's edits.

No notebook is executed here (no kernel): the code cells are exec'd in-process. CI runs the notebooks
themselves under nbval (`pytest --nbval exercises/solutions`), see exercises/README.md.
"""

import importlib.util
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from sdlearn import exercises
from sdlearn.exercises import CHECKS, ExerciseError
from sdlearn.schedule import SD15

ROOT = Path(__file__).resolve().parent.parent
EXERCISES = ROOT / "exercises"
SOLUTIONS = sorted((EXERCISES / "solutions").glob("[0-9][0-9]_*.ipynb"))
CHECK_CALL = re.compile(r"^(check_\w+)\((\w+)\)\s*$", re.M)


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_exercises", EXERCISES / "make_exercises.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_exercises = _load_generator()


def _code_cells(path: Path) -> list[str]:
    notebook = json.loads(path.read_text(encoding="utf-8"))
    return ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]


def _exercise(path: Path):
    """(check name, function name, the code cells before the check cell) of one notebook."""
    cells = _code_cells(path)
    for i, source in enumerate(cells):
        match = CHECK_CALL.search(source)
        if match:
            return match.group(1), match.group(2), cells[:i]
    raise AssertionError(f"{path.name} has no check_xxx(fn) cell")


def _learner_function(path: Path):
    """Exec a notebook's code up to its check cell (as the kernel would) and return the learner's function."""
    check, fn_name, cells = _exercise(path)
    namespace = {}
    for source in cells:
        exec(compile(source, str(path), "exec"), namespace)
    return CHECKS_BY_FUNCTION[check], namespace[fn_name]


CHECKS_BY_FUNCTION = {check.__name__: check for check in CHECKS.values()}


def test_there_are_at_least_ten_exercises_over_the_whole_arc():
    assert len(SOLUTIONS) >= 10
    used = {_exercise(path)[0] for path in SOLUTIONS}
    assert used == set(CHECKS_BY_FUNCTION), "every check has a notebook and every notebook a known check"
    for topic in ("forward_noising", "predict_x0", "ddim_step", "euler_step", "cfg", "attention",
                  "bpe_merge_step", "img2img_steps", "vae_scaling_factor", "lora_forward"):
        assert topic in CHECKS


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_the_solution_passes_its_check_with_one_deterministic_line(path, capsys):
    check, solution = _learner_function(path)
    check(solution)
    first = capsys.readouterr().out
    check(solution)
    assert first == capsys.readouterr().out  # nbval compares this text: it must not change between runs
    assert first.startswith("✓ correct: ") and first.count("\n") == 1


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_the_blank_learner_notebook_fails_its_check(path):
    check, blank = _learner_function(EXERCISES / path.name)
    with pytest.raises(ExerciseError, match="is not implemented yet"):
        check(blank)


# ---------------------------------------------------------------------------------------------
# Wrong answers, written the way a learner would write them, and the hint each must get
# ---------------------------------------------------------------------------------------------

def _abar(t):
    return SD15.alphas_cumprod[t]


def _merge(symbols, best):
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def bpe_max_rank(symbols, ranks):
    pairs = [p for p in zip(symbols, symbols[1:]) if p in ranks]
    return _merge(symbols, max(pairs, key=ranks.get)) if pairs else symbols


def bpe_first_only(symbols, ranks):
    pairs = [p for p in zip(symbols, symbols[1:]) if p in ranks]
    if not pairs:
        return symbols
    i = list(zip(symbols, symbols[1:])).index(min(pairs, key=ranks.get))
    return symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]


def bpe_str_replace(symbols, ranks):
    pairs = [p for p in zip(symbols, symbols[1:]) if p in ranks]
    if not pairs:
        return symbols
    a, b = min(pairs, key=ranks.get)
    return " ".join(symbols).replace(a + " " + b, a + b).split()


def bpe_every_known_pair(symbols, ranks):
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) in ranks:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def bpe_crashes_without_pairs(symbols, ranks):
    best = min((p for p in zip(symbols, symbols[1:]) if p in ranks), key=ranks.get)  # ValueError when none
    return _merge(symbols, best)


def _karras(n, lo, hi, rho=7.0, denominator=None, zero=True):
    i = torch.arange(n, dtype=torch.float64)
    s = (hi ** (1 / rho) + i / (denominator or n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]) if zero else s


def _softmax_attention(q, k, v, scale, dim=-1):
    return (q @ k.transpose(-1, -2) * scale).softmax(dim) @ v


WRONG = {
    "vae_scaling_factor": [
        (lambda z: z.std(), "the standard deviation itself"),
        (lambda z: 1 / z.var(), "divided by the variance"),
        (lambda z: 1 / z.std(dim=(0, 2, 3)), "one factor per channel"),
        (lambda z: 1 / z.abs().mean(), "mean absolute value"),
        (lambda z: 0.18215, "Expected 1 / latents.std()"),  # SD1.5's number, not these latents'
        (lambda z: [1 / z.std()], "expected one number"),
    ],
    "forward_noising": [
        (lambda x0, e, t: _abar(t) ** 0.5 * x0 + (1 - _abar(t)) * e,
         "noise term is scaled by (1 − ᾱ_t) instead of sqrt(1 − ᾱ_t)"),
        (lambda x0, e, t: _abar(t) * x0 + (1 - _abar(t)) ** 0.5 * e, "clean term is scaled by ᾱ_t instead of sqrt(ᾱ_t)"),
        (lambda x0, e, t: _abar(t) * x0 + (1 - _abar(t)) * e, "they are variances"),
        (lambda x0, e, t: SD15.alphas[t] ** 0.5 * x0 + (1 - SD15.alphas[t]) ** 0.5 * e, "not SD15.alphas[t]"),
        (lambda x0, e, t: x0 + SD15.sigmas[t] * e, "sigma view"),
        (lambda x0, e, t: (1 - _abar(t)) ** 0.5 * x0 + _abar(t) ** 0.5 * e, "coefficients are swapped"),
        (lambda x0, e, t: _abar(t - 1) ** 0.5 * x0 + (1 - _abar(t - 1)) ** 0.5 * e, "you read ᾱ at t − 1"),
        (lambda x0, e, t: _abar(t + 1) ** 0.5 * x0 + (1 - _abar(t + 1)) ** 0.5 * e, "you read ᾱ at t + 1"),
        (lambda x0, e, t: x0 + e, "Expected x_t = sqrt(ᾱ_t)·x_0"),
        (lambda x0, e, t: (_abar(t) ** 0.5 * x0)[0], "it returned shape (4, 8, 8), expected (2, 4, 8, 8)"),
        (lambda x0, e, t: None, "is the `return` missing?"),
    ],
    "predict_x0": [
        (lambda x, e, t: x - (1 - _abar(t)) ** 0.5 * e, "did not undo the shrinking"),
        (lambda x, e, t: (x - (1 - _abar(t)) ** 0.5 * e) / _abar(t), "divide by sqrt(ᾱ_t), not by ᾱ_t"),
        (lambda x, e, t: (x - (1 - _abar(t)) * e) / _abar(t) ** 0.5, "scaled by (1 − ᾱ_t) instead of sqrt(1 − ᾱ_t)"),
        (lambda x, e, t: (x + (1 - _abar(t)) ** 0.5 * e) / _abar(t) ** 0.5, "instead of subtracting it"),
        (lambda x, e, t: x - e, "as if it had std 1"),
        (lambda x, e, t: x - SD15.sigmas[t] * e, "sigma-view formula"),
    ],
    "attention": [
        (lambda q, k, v: _softmax_attention(q, k, v, 1.0), "scores are not scaled"),
        (lambda q, k, v: _softmax_attention(q, k, v, 1 / q.shape[-1]), "divided the scores by head_dim"),
        (lambda q, k, v: _softmax_attention(q, k, v, q.shape[-1] ** 0.5), "multiplied the scores by sqrt(head_dim)"),
        (lambda q, k, v: _softmax_attention(q, k, v, k.shape[2] ** -0.5), "number of keys"),
        (lambda q, k, v: _softmax_attention(q, k, v, q.shape[-1] ** -0.5, dim=2), "softmax runs over the wrong axis"),
        (lambda q, k, v: (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1), "returned the attention weights"),
        (lambda q, k, v: (q @ k.transpose(-1, -2)).softmax(-1) @ v.transpose(-1, -2), "raised RuntimeError"),
    ],
    "bpe_merge_step": [
        (bpe_max_rank, "HIGHEST rank"),
        (bpe_first_only, "only the first occurrence"),
        (bpe_str_replace, "str.replace merges across symbol boundaries"),
        (bpe_every_known_pair, "every pair that has a rank in one step"),
        (bpe_crashes_without_pairs, "raised ValueError"),
        (lambda symbols, ranks: "".join(symbols), "expected a list of symbols"),
    ],
    "ddim_step": [
        (lambda x, e, a, ap: (x - (1 - a) ** 0.5 * e) / a**0.5, "returned the predicted clean latent"),
        (lambda x, e, a, ap: ap**0.5 * (x - (1 - a) ** 0.5 * e) / a**0.5 + (1 - a) ** 0.5 * e, "uses ᾱ_t; it must use ᾱ_prev"),
        (lambda x, e, a, ap: ap**0.5 * (x - (1 - a) ** 0.5 * e) / a**0.5, "dropped the noise term"),
        (lambda x, e, a, ap: ap**0.5 * (x - (1 - a) ** 0.5 * e) / a**0.5 + (1 - ap) * e,
         "scaled by (1 − ᾱ_prev) instead of sqrt(1 − ᾱ_prev)"),
        (lambda x, e, a, ap: a**0.5 * (x - (1 - ap) ** 0.5 * e) / ap**0.5 + (1 - a) ** 0.5 * e, "are swapped"),
        (lambda x, e, a, ap: x + (ap - a) * e, "Expected x_prev = sqrt(ᾱ_prev)"),
    ],
    "euler_step": [
        (lambda x, D, s, sn: x + (s - sn) * (x - D) / s, "stepped the wrong way"),
        (lambda x, D, s, sn: x + (sn - s) * (D - x) / s, "stepped the wrong way"),
        (lambda x, D, s, sn: x + (sn - s) * (x - D), "forgot to divide by σ"),
        (lambda x, D, s, sn: D, "returned the denoiser's guess itself"),
        (lambda x, D, s, sn: x + sn * (x - D) / s, "multiplied the slope by σ_next"),
        (lambda x, D, s, sn: x + (sn - s) * (x - D) / sn, "Expected x' = x + (σ_next − σ)·d"),  # ÷σ_next: 0 at the end
    ],
    "karras_sigmas": [
        (lambda n, lo, hi, rho=7.0: _karras(n, lo, hi, rho, zero=False), "final σ = 0 is missing"),
        (lambda n, lo, hi, rho=7.0: torch.cat([_karras(n, lo, hi, rho, zero=False).flip(0), torch.zeros(1)]),
         "your sigmas go up"),
        (lambda n, lo, hi, rho=7.0: _karras(n, lo, hi, 1.0), "interpolated σ linearly"),
        (lambda n, lo, hi, rho=7.0: torch.cat([torch.linspace(hi, lo, n).log().exp(), torch.zeros(1)]),
         "interpolated σ linearly"),
        (lambda n, lo, hi, rho=7.0: torch.cat([torch.logspace(torch.tensor(hi).log10(), torch.tensor(lo).log10(), n),
                                               torch.zeros(1)]), "Exponential"),
        (lambda n, lo, hi, rho=7.0: _karras(n, lo, hi, rho, denominator=n), "i/(steps − 1), not i/steps"),
        (lambda n, lo, hi, rho=7.0: _karras(n, lo, hi, 1 / rho), "exponents are swapped"),
    ],
    "cfg": [
        (lambda u, c, s: c + s * (c - u), "you started from ε_cond"),
        (lambda u, c, s: (1 + s) * c - s * u, "you started from ε_cond"),  # the paper's form with w = cfg_scale
        (lambda u, c, s: u + s * (u - c), "pushed towards the negative prompt"),
        (lambda u, c, s: s * c + u, "weights must add up to 1"),
        (lambda u, c, s: s * c, "forgets the unconditional prediction"),
        (lambda u, c, s: (u + c) / 2, "averaging"),
    ],
    "img2img_steps": [
        (lambda n, s, mode="a1111": int(min(s, 0.999) * n) if mode == "a1111" else int(s * n),
         "A1111 runs one step more"),
        (lambda n, s, mode="a1111": int(min(s, 0.999) * n) + 1, "without A1111's + 1"),  # ignores the mode
        (lambda n, s, mode="a1111": int(s * n) + 1 if mode == "a1111" else int(s * n), "caps the strength at 0.999"),
        (lambda n, s, mode="a1111": round(min(s, 0.999) * n) + 1 if mode == "a1111" else round(s * n),
         "int() truncates, round() does not"),
        (lambda n, s, mode="a1111": math.ceil(min(s, 0.999) * n) + 1 if mode == "a1111" else math.ceil(s * n),
         "ceil rounds up"),
        (lambda n, s, mode="a1111": n - (int(min(s, 0.999) * n) + 1) if mode == "a1111" else n - int(s * n),
         "where sampling starts"),
        (lambda n, s, mode="a1111": float(int(min(s, 0.999) * n) + 1) if mode == "a1111" else float(int(s * n)),
         "return an int"),
    ],
    "lora_forward": [
        (lambda x, W, d, u, a, s: x @ W.T + s * (x @ d.T) @ u.T, "not scaled by alpha/rank"),
        (lambda x, W, d, u, a, s: x @ W.T + s * a * (x @ d.T) @ u.T, "divide it by the rank first"),
        (lambda x, W, d, u, a, s: x @ W.T + s * d.shape[0] / a * (x @ d.T) @ u.T, "upside down"),
        (lambda x, W, d, u, a, s: x @ W.T + a / d.shape[0] * (x @ d.T) @ u.T, "strength"),
        (lambda x, W, d, u, a, s: s * a / d.shape[0] * (x @ d.T) @ u.T, "returned only the LoRA branch"),
        (lambda x, W, d, u, a, s: s * (x @ W.T + a / d.shape[0] * (x @ d.T) @ u.T), "not the base layer"),
        (lambda x, W, d, u, a, s: x @ W.T + s * a / d.shape[1] * (x @ d.T) @ u.T, "not down.shape[1]"),
        (lambda x, W, d, u, a, s: x @ W.T + s * a / d.shape[0] * (x @ u.T) @ d.T, "raised RuntimeError"),
    ],
}


def test_every_check_has_wrong_answers_listed():
    assert set(WRONG) == set(CHECKS)
    assert all(len(answers) >= 5 for answers in WRONG.values())


@pytest.mark.parametrize("name,index", [(n, i) for n, answers in WRONG.items() for i in range(len(answers))],
                         ids=lambda x: str(x))
def test_a_wrong_answer_is_rejected_with_its_hint(name, index, capsys):
    answer, hint = WRONG[name][index]
    with pytest.raises(ExerciseError) as error:
        CHECKS[name](answer)
    assert hint in str(error.value), f"expected the hint {hint!r}, got: {error.value}"
    assert str(error.value).startswith("✗ ")
    assert "✓" not in capsys.readouterr().out  # no success line printed before the failure


def test_a_check_needs_the_function_itself():
    with pytest.raises(ExerciseError, match="pass your function itself"):
        exercises.check_cfg(None)


def test_a_correct_alternative_form_is_accepted(capsys):
    # Other ways of writing the same thing pass: CFG as a weighted sum, Euler via denoised + σ'·d, merged LoRA.
    exercises.check_cfg(lambda u, c, s: s * c + (1 - s) * u)
    exercises.check_euler_step(lambda x, D, s, sn: D + sn * (x - D) / s)
    exercises.check_lora_forward(lambda x, W, d, u, a, s: x @ (W + s * a / d.shape[0] * u @ d).T)
    exercises.check_forward_noising(lambda x0, e, t: _abar(t).double().sqrt() * x0.double()  # float64 is fine
                                    + (1 - _abar(t).double()).sqrt() * e.double())
    assert capsys.readouterr().out.count("✓ correct") == 4


def test_every_known_mistake_differs_from_the_reference_on_the_first_case():
    # A known-mistake answer equal to the right one would turn a correct solution's check into a false hint.
    for mistakes, cases, reference in [
        (exercises.FORWARD_NOISING_MISTAKES, exercises._noising_cases(2), exercises.schedule.add_noise),
        (exercises.DDIM_MISTAKES, exercises._ddim_cases(), exercises._ddim_reference),
        (exercises.EULER_MISTAKES, exercises._euler_cases(), exercises._euler_reference),
        (exercises.CFG_MISTAKES, exercises._cfg_cases(), exercises.guidance.cfg_combine),
        (exercises.LORA_MISTAKES, exercises._lora_cases(), exercises._lora_reference),
    ]:
        expected = reference(*cases[0].args)
        for mistake in mistakes:
            assert exercises._difference(mistake.answer(*cases[0].args), expected) is not None, mistake.hint


def test_the_lora_reference_is_sdlearn_lora_and_equals_the_formula():
    for case in exercises._lora_cases():
        torch.testing.assert_close(exercises._lora_reference(*case.args), exercises.lora_forward_formula(*case.args),
                                   rtol=1e-5, atol=1e-6)


def test_the_img2img_reference_counts_as_the_pipeline_does():
    # A1111 at 20 steps, strength 0.75: 16 steps; diffusers: 15. Strength 0: A1111 still runs 1, diffusers 0.
    ref = exercises.img2img_steps_reference
    assert (ref(20, 0.75), ref(20, 0.75, "diffusers"), ref(20, 0.0), ref(20, 0.0, "diffusers")) == (16, 15, 1, 0)
    assert (ref(20, 1.0), ref(20, 1.0, "diffusers")) == (20, 20)
    source = (ROOT / "sdlearn" / "pipeline.py").read_text()
    assert "t_enc = int(min(strength, 0.999) * steps)" in source and "n = min(int(steps * strength), steps)" in source


# ---------------------------------------------------------------------------------------------
# The learner notebooks and the generator
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_the_learner_notebook_is_what_the_generator_makes(path):
    learner = EXERCISES / path.name
    assert learner.read_bytes() == make_exercises.learner_bytes(path), "run: python exercises/make_exercises.py"
    notebook = json.loads(learner.read_text(encoding="utf-8"))
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_the_learner_notebook_holds_no_solution_code(path):
    learner_text = "".join(_code_cells(EXERCISES / path.name))
    assert "BEGIN SOLUTION" not in learner_text and "END SOLUTION" not in learner_text
    assert 'raise NotImplementedError("your code here")' in learner_text
    solution_lines = []
    for source in _code_cells(path):
        block = re.findall(r"### BEGIN SOLUTION\n(.*?)### END SOLUTION", source, re.S)
        solution_lines += [line.strip() for text in block for line in text.splitlines() if line.strip()]
    assert solution_lines, f"{path.name} has no marked solution"
    leaked = [line for line in solution_lines if line in {l.strip() for l in learner_text.splitlines()}]
    assert not leaked, f"solution lines in the learner notebook: {leaked}"


def test_the_solution_notebooks_are_committed_with_their_outputs():
    for path in SOLUTIONS:
        notebook = json.loads(path.read_text(encoding="utf-8"))
        counts = [c["execution_count"] for c in notebook["cells"] if c["cell_type"] == "code"]
        assert counts == list(range(1, len(counts) + 1)), f"{path.name}: run in order in a fresh kernel"
        check_cell = next(c for c in notebook["cells"] if c["cell_type"] == "code" and CHECK_CALL.search("".join(c["source"])))
        text = "".join("".join(o.get("text", "")) for o in check_cell["outputs"])
        assert text.startswith("✓ correct: "), path.name


def test_regenerating_keeps_an_edited_learner_notebook(tmp_path):
    solutions, out = tmp_path / "solutions", tmp_path / "out"
    solutions.mkdir()
    for path in SOLUTIONS[:2]:
        shutil.copy(path, solutions / path.name)
    first, second = SOLUTIONS[0].name, SOLUTIONS[1].name
    log = []
    assert make_exercises.generate(solutions, out, log.append) == {first: "written", second: "written"}
    assert make_exercises.generate(solutions, out, log.append) == {first: "unchanged", second: "unchanged"}

    # The learner works on the first notebook; then both solutions change and the generator runs again.
    edited = (out / first).read_bytes().replace(b'raise NotImplementedError(\\"your code here\\")', b"return 42")
    assert edited != (out / first).read_bytes()
    (out / first).write_bytes(edited)
    for name in (first, second):
        notebook = json.loads((solutions / name).read_text(encoding="utf-8"))
        notebook["cells"][0]["source"].append("\n\nA new paragraph.")
        (solutions / name).write_text(json.dumps(notebook, indent=1), encoding="utf-8")
    log.clear()
    status = make_exercises.generate(solutions, out, log.append)
    assert status == {first: "kept (edited)", second: "updated"}
    assert (out / first).read_bytes() == edited  # the learner's work is untouched
    assert b"A new paragraph." in (out / second).read_bytes()
    assert any("kept" in line and first in line for line in log)
    # Once the learner deletes their copy, the new version is written.
    (out / first).unlink()
    assert make_exercises.generate(solutions, out, log.append)[first] == "written"
    assert b"A new paragraph." in (out / first).read_bytes()


def test_a_learner_file_the_generator_never_wrote_is_kept(tmp_path):
    solutions, out = tmp_path / "solutions", tmp_path / "out"
    solutions.mkdir()
    out.mkdir()
    shutil.copy(SOLUTIONS[0], solutions / SOLUTIONS[0].name)
    (out / SOLUTIONS[0].name).write_text("my own notes")  # no manifest entry: not ours to overwrite
    assert make_exercises.generate(solutions, out, lambda line: None) == {SOLUTIONS[0].name: "kept (edited)"}
    assert (out / SOLUTIONS[0].name).read_text() == "my own notes"


def test_solution_markers_must_pair_up():
    with pytest.raises(make_exercises.MarkerError, match="never closed"):
        make_exercises.strip_solutions("def f():\n    ### BEGIN SOLUTION\n    return 1\n", "x")
    with pytest.raises(make_exercises.MarkerError, match="without a"):
        make_exercises.strip_solutions("### END SOLUTION\n", "x")
    with pytest.raises(make_exercises.MarkerError, match="nothing for the learner"):
        make_exercises.learner_notebook({"cells": [{"cell_type": "code", "source": ["x = 1"], "metadata": {},
                                                    "outputs": [], "execution_count": 1}]})
    code, blocks = make_exercises.strip_solutions("def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION", "x")
    assert (code, blocks) == ('def f():\n    raise NotImplementedError("your code here")', 1)


def test_blank_learner_notebooks_fail_their_checks_under_nbval():
    """CI proof that the learner versions are not already solved: nbval fails each one's check cell."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    learner = sorted((root / "exercises").glob("[0-9][0-9]_*.ipynb"))
    run = subprocess.run([sys.executable, "-m", "pytest", "--nbval", "-q", "-p", "no:cacheprovider", "-rf",
                          *[str(p.relative_to(root)) for p in learner]],
                         cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stdout[-3000:]
    for path in learner:
        assert f"FAILED exercises/{path.name}::" in run.stdout, f"{path.name} passed nbval while blank"
    assert run.stdout.count("is not implemented yet") >= len(learner)
