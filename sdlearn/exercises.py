"""Checks for the course exercises: run a learner's function and say precisely what is wrong with it.

Each notebook in `exercises/` asks for one small function — add noise, take a DDIM step, combine
two noise predictions with the CFG scale, ... — and ends with a check cell:

    from sdlearn.exercises import check_forward_noising
    check_forward_noising(q_sample)

A check

1. calls the learner's function on a few random inputs (from a fixed seed, so the same inputs every
   run) and on the edge cases that matter (t = 0 and 999, σ_next = 0, strength 1, ...);
2. compares each answer with sdlearn's own implementation — the code the rest of the course runs
   and the tests prove equal to diffusers — or, where sdlearn has no function of that shape, with
   the reference formula written out below;
3. prints one line "✓ correct: ..." when every answer matches. The line never contains a number
   that was computed, so it is the same on every machine and nbval can compare it;
4. otherwise raises `ExerciseError` (an `AssertionError`) with a hint. To make the hint specific,
   each check also knows the answers of the common mistakes — the noise scaled by (1 − ᾱ) instead of
   sqrt(1 − ᾱ), the Euler step taken in the wrong direction, A1111's "+1" step forgotten — computes
   them on the same inputs, and when the learner's output equals one of them, says which mistake it is.

A function that still raises NotImplementedError (the blank learner notebook) is reported as
"not implemented yet", so a notebook whose exercise is not done fails under nbval.

Tolerances: rtol 1e-5, atol 1e-6 (float32 rounding; a float64 answer passes too), except where an
exercise says why it needs another.
"""

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable

import torch
import torch.nn.functional as F

from . import guidance, samplers, schedule
from .schedule import SD15, NoiseSchedule

RTOL = 1e-5
ATOL = 1e-6


class ExerciseError(AssertionError):
    """The learner's answer is missing or wrong; the message says how, and what to try."""


# ---------------------------------------------------------------------------------------------
# 1. The machinery every check shares
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One set of inputs: `args` for the learner's function, `label` to name them in a message."""

    args: tuple
    label: str


@dataclass
class Mistake:
    """A common wrong answer: `answer` has the learner's signature and computes what the mistake gives."""

    hint: str
    answer: Callable


def _copy(value):
    # The learner's function gets its own copies, so an in-place `x0 *= ...` cannot change the reference's inputs.
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, list):
        return list(value)
    return value


def _call(fn: Callable, case: Case):
    """The learner's answer for one case; their exceptions become hints."""
    name = getattr(fn, "__name__", "your function")
    try:
        return fn(*[_copy(a) for a in case.args])
    except NotImplementedError:
        raise ExerciseError(
            f"✗ {name} is not implemented yet: replace `raise NotImplementedError(...)` with your code, "
            "run that cell, then run this check again."
        ) from None
    except ExerciseError:
        raise
    except Exception as error:  # a bug in the learner's code: show it together with the inputs that caused it
        raise ExerciseError(
            f"✗ {name}({case.label}) raised {type(error).__name__}: {error}. Check the shapes: {_shapes(case.args)}."
        ) from error


def _shapes(args) -> str:
    parts = []
    for a in args:
        if torch.is_tensor(a):
            parts.append(f"tensor of shape {tuple(a.shape)}")
        elif isinstance(a, (list, tuple)) and len(a) > 8:
            parts.append(f"{type(a).__name__} of {len(a)} items")
        elif isinstance(a, (dict, MappingProxyType)):
            parts.append(f"dict of {len(a)} entries")
        else:
            parts.append(repr(a))
    return ", ".join(parts)


def _difference(out, expected, rtol: float = RTOL) -> str | None:
    """None when `out` equals `expected` (within the tolerance); otherwise what differs, in words."""
    if out is None:
        return "it returned None — is the `return` missing?"
    if torch.is_tensor(expected):
        if not torch.is_tensor(out):
            try:
                out = torch.as_tensor(out)
            except Exception:
                return f"it returned a {type(out).__name__}, expected a tensor of shape {tuple(expected.shape)}"
        if out.shape != expected.shape:
            return f"it returned shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
        out, expected = out.detach().double().cpu(), expected.detach().double()
        if not torch.isfinite(out).all():
            return "it contains NaN or inf"
        if torch.allclose(out, expected, rtol=rtol, atol=ATOL):
            return None
        return f"the shape is right but the values are not: max |yours − expected| = {(out - expected).abs().max():.4g}"
    if isinstance(expected, int):
        if isinstance(out, torch.Tensor) and out.numel() == 1 and not out.is_floating_point():
            out = int(out)
        if not isinstance(out, int) or isinstance(out, bool):
            if hasattr(out, "__index__"):  # numpy integers
                out = int(out)
            else:
                return f"it returned {out!r} ({type(out).__name__}); a number of steps is a whole number: return an int"
        return None if out == expected else f"it returned {out}, expected {expected}"
    if isinstance(expected, float):
        if torch.is_tensor(out):
            if out.numel() != 1:
                return f"it returned a tensor of shape {tuple(out.shape)}; expected one number"
            out = float(out)
        if not isinstance(out, (int, float)):
            return f"it returned a {type(out).__name__}; expected one number"
        return None if math.isclose(out, expected, rel_tol=rtol) else f"it returned {out:.6g}, expected {expected:.6g}"
    if isinstance(expected, list):
        if not isinstance(out, (list, tuple)):
            return f"it returned a {type(out).__name__}; expected a list of symbols"
        return None if list(out) == expected else f"it returned {list(out)}, expected {expected}"
    raise TypeError(f"no comparison for expected values of type {type(expected).__name__}")  # a bug in this module


def _run(fn, cases, reference, mistakes, formula: str, success: str | None = None, rtol: float = RTOL):
    """Compare fn with the reference on every case; on the first wrong answer name the mistake or give the formula.
    When all agree, print the success line (if one is given)."""
    if not callable(fn):
        raise ExerciseError(
            f"✗ pass your function itself to the check (e.g. check(my_function), no parentheses), got {fn!r}."
        )
    name = getattr(fn, "__name__", "your function")
    for case in cases:
        out = _call(fn, case)
        problem = _difference(out, reference(*case.args), rtol)
        if problem is None:
            continue
        for mistake in mistakes:
            try:
                wrong = mistake.answer(*[_copy(a) for a in case.args])
            except Exception:  # the mistake is impossible for these inputs (an index past the table, ...)
                continue
            if _difference(out, wrong, rtol) is None:
                raise ExerciseError(f"✗ {name}({case.label}): {mistake.hint}")
        raise ExerciseError(f"✗ {name}({case.label}): {problem}. Expected {formula}")
    if success:
        print(f"✓ correct: {success}")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# 2. Pixels vs latents: the VAE's scaling factor          (WebUI: the "VAE" setting; ComfyUI: VAE Decode)
# ---------------------------------------------------------------------------------------------
# SD1.5's U-Net was trained on latents multiplied by 0.18215: one over the standard deviation the
# authors measured on the VAE's latents of their images, so that the U-Net sees unit-variance inputs,
# the same variance as the noise it is mixed with. One number for all four channels.


def _vae_scaling_cases():
    g = _generator(1)
    cases = []
    for shape, means, stds in [
        ((8, 4, 32, 32), (0.9, -1.4, 2.1, 0.3), (6.0, 4.5, 5.2, 5.9)),  # roughly SD1.5's latents: std ≈ 5.5
        ((4, 4, 32, 64), (0.0, 0.5, -0.5, 1.0), (1.0, 2.0, 3.0, 0.5)),
    ]:
        m = torch.tensor(means).view(1, 4, 1, 1)
        s = torch.tensor(stds).view(1, 4, 1, 1)
        z = m + s * torch.randn(shape, generator=g)
        cases.append(Case((z,), f"latents of shape {shape}"))
    return cases


def _vae_scaling_reference(latents):
    return float(1 / latents.std())


VAE_SCALING_MISTAKES = [
    Mistake("you returned the standard deviation itself. The factor is 1/std: it *shrinks* SD's latents "
            "(std ≈ 5.5) to std 1, which is why SD1.5's number, 0.18215, is smaller than 1.",
            lambda z: float(z.std())),
    Mistake("you divided by the variance (std²). The factor must make the std 1, so divide by the std.",
            lambda z: float(1 / z.var())),
    Mistake("you returned one factor per channel. SD1.5 uses one number for all four latent channels "
            "(0.18215): take the std over the whole tensor.",
            lambda z: 1 / z.std(dim=(0, 2, 3))),
    Mistake("you divided by the mean absolute value, not the standard deviation (latents.std()).",
            lambda z: float(1 / z.abs().mean())),
    Mistake("you divided by the root mean square (it includes the mean); the std subtracts the mean first: latents.std().",
            lambda z: float(1 / z.pow(2).mean().sqrt())),
]


def check_vae_scaling_factor(fn):
    """fn(latents (N, 4, h, w)) -> the number that scales them to unit variance, as 0.18215 does for SD1.5."""
    _run(fn, _vae_scaling_cases(), _vae_scaling_reference, VAE_SCALING_MISTAKES,
         formula="1 / latents.std(): one number over all samples, channels and pixels.",
         success="1/std of the latents. Multiplying by it gives the U-Net unit-variance latents, "
                 "as SD1.5's 0.18215 does (its VAE's latents have std ≈ 5.5).",
         # The population std (÷N) and the sample std (÷(N−1)) differ by about 1/(2N) ≈ 2e-5 here; both are right.
         rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# 3. Forward noising q(x_t | x_0)                          (WebUI: what "Denoising strength" adds back)
# ---------------------------------------------------------------------------------------------


def _noising_cases(seed: int):
    g = _generator(seed)
    cases = []
    for t, shape in [(500, (2, 4, 8, 8)), (999, (1, 4, 8, 8)), (0, (2, 4, 8, 8)), (250, (3, 4, 4, 6)), (37, (1, 4, 8, 8))]:
        a = torch.randn(shape, generator=g)
        b = torch.randn(shape, generator=g)
        cases.append(Case((a, b, t), f"t={t}, tensors of shape {shape}"))
    return cases


def _abar(t, table=None):
    return (SD15.alphas_cumprod if table is None else table)[t]


FORWARD_NOISING_MISTAKES = [
    Mistake("your x_t has the right shape but the noise term is scaled by (1 − ᾱ_t) instead of sqrt(1 − ᾱ_t). "
            "(1 − ᾱ_t) is the noise's *variance*; the noise is multiplied by its standard deviation sqrt(1 − ᾱ_t).",
            lambda x0, e, t: _abar(t).sqrt() * x0 + (1 - _abar(t)) * e),
    Mistake("the clean term is scaled by ᾱ_t instead of sqrt(ᾱ_t): ᾱ_t is the signal's variance, "
            "x_0 is multiplied by its square root.",
            lambda x0, e, t: _abar(t) * x0 + (1 - _abar(t)).sqrt() * e),
    Mistake("you used ᾱ_t and (1 − ᾱ_t) as the coefficients; they are variances — take their square roots: "
            "sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε.",
            lambda x0, e, t: _abar(t) * x0 + (1 - _abar(t)) * e),
    Mistake("you used α_t = 1 − β_t, the signal kept by ONE training step, instead of ᾱ_t, the product over all "
            "steps up to t: use SD15.alphas_cumprod[t], not SD15.alphas[t].",
            lambda x0, e, t: SD15.alphas[t].sqrt() * x0 + (1 - SD15.alphas[t]).sqrt() * e),
    Mistake("that is the sigma view x_0 + σ_t·ε that k-diffusion, A1111 and ComfyUI sample in — it equals "
            "x_t / sqrt(ᾱ_t). The DDPM x_t asked for here is sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε.",
            lambda x0, e, t: x0 + SD15.sigmas[t] * e),
    Mistake("the two coefficients are swapped: x_0 gets sqrt(ᾱ_t) (close to 1 at small t), the noise sqrt(1 − ᾱ_t).",
            lambda x0, e, t: (1 - _abar(t)).sqrt() * x0 + _abar(t).sqrt() * e),
    Mistake("off by one: you read ᾱ at t − 1. The table is indexed by t itself: SD15.alphas_cumprod[t].",
            lambda x0, e, t: _abar(t - 1).sqrt() * x0 + (1 - _abar(t - 1)).sqrt() * e),
    Mistake("off by one: you read ᾱ at t + 1. The table is indexed by t itself: SD15.alphas_cumprod[t].",
            lambda x0, e, t: _abar(t + 1).sqrt() * x0 + (1 - _abar(t + 1)).sqrt() * e),
    Mistake("x_0 + ε·sqrt(1 − ᾱ_t) forgets to shrink the clean latent: x_0 is multiplied by sqrt(ᾱ_t) too.",
            lambda x0, e, t: x0 + (1 - _abar(t)).sqrt() * e),
]


def check_forward_noising(fn):
    """fn(x0, noise, t) -> x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·noise, checked against sdlearn.schedule.add_noise."""
    _run(fn, _noising_cases(2), schedule.add_noise, FORWARD_NOISING_MISTAKES,
         formula="x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε with ᾱ_t = SD15.alphas_cumprod[t].",
         success="x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε, equal to sdlearn.schedule.add_noise at t = 0, 37, 250, 500 and 999.")


# ---------------------------------------------------------------------------------------------
# 4. The clean latent from the U-Net's noise prediction    (the "denoised" preview of every step)
# ---------------------------------------------------------------------------------------------

PREDICT_X0_MISTAKES = [
    Mistake("you removed the noise but did not undo the shrinking of x_0: divide by sqrt(ᾱ_t) at the end.",
            lambda x, e, t: x - (1 - _abar(t)).sqrt() * e),
    Mistake("divide by sqrt(ᾱ_t), not by ᾱ_t: x_0 was multiplied by sqrt(ᾱ_t) when the noise was added.",
            lambda x, e, t: (x - (1 - _abar(t)).sqrt() * e) / _abar(t)),
    Mistake("the noise removed is scaled by (1 − ᾱ_t) instead of sqrt(1 − ᾱ_t): the noise inside x_t was "
            "multiplied by its standard deviation, sqrt(1 − ᾱ_t).",
            lambda x, e, t: (x - (1 - _abar(t)) * e) / _abar(t).sqrt()),
    Mistake("you added the noise estimate instead of subtracting it: x̂_0 = (x_t − sqrt(1 − ᾱ_t)·ε̂) / sqrt(ᾱ_t).",
            lambda x, e, t: (x + (1 - _abar(t)).sqrt() * e) / _abar(t).sqrt()),
    Mistake("x_t − ε̂ treats the noise as if it had std 1 inside x_t; it was scaled by sqrt(1 − ᾱ_t), and "
            "x_0 by sqrt(ᾱ_t): x̂_0 = (x_t − sqrt(1 − ᾱ_t)·ε̂) / sqrt(ᾱ_t).",
            lambda x, e, t: x - e),
    Mistake("x − σ·ε̂ is the sigma-view formula; it needs the sigma-view x = x_t / sqrt(ᾱ_t) first.",
            lambda x, e, t: x - SD15.sigmas[t] * e),
    Mistake("you used α_t (one step) instead of ᾱ_t (all steps up to t): SD15.alphas_cumprod[t].",
            lambda x, e, t: (x - (1 - SD15.alphas[t]).sqrt() * e) / SD15.alphas[t].sqrt()),
]


def check_predict_x0(fn):
    """fn(x_t, eps, t) -> x̂_0 = (x_t − sqrt(1 − ᾱ_t)·ε̂) / sqrt(ᾱ_t), checked against sdlearn.schedule.predict_x0."""
    _run(fn, _noising_cases(3), schedule.predict_x0, PREDICT_X0_MISTAKES,
         formula="x̂_0 = (x_t − sqrt(1 − ᾱ_t)·ε̂) / sqrt(ᾱ_t) with ᾱ_t = SD15.alphas_cumprod[t].",
         success="x̂_0 = (x_t − sqrt(1 − ᾱ_t)·ε̂) / sqrt(ᾱ_t), equal to sdlearn.schedule.predict_x0 at t = 0, 37, 250, 500 and 999.")


# ---------------------------------------------------------------------------------------------
# 5. Scaled dot-product attention                          (the U-Net's self- and cross-attention)
# ---------------------------------------------------------------------------------------------


def _attention_cases():
    g = _generator(4)
    cases = []
    # (B, heads, T queries, S keys, head_dim): cross-attention of 16 pixels to 77 prompt tokens with SD1.5's
    # head_dim 40, then self-attention (S = T), then a single query.
    for B, h, T, S, d in [(2, 2, 16, 77, 40), (1, 4, 24, 24, 8), (1, 1, 1, 5, 16)]:
        q = torch.randn(B, h, T, d, generator=g)
        k = torch.randn(B, h, S, d, generator=g)
        v = torch.randn(B, h, S, d, generator=g)
        kind = "cross-attention" if S != T else "self-attention"
        cases.append(Case((q, k, v), f"{kind}: q {tuple(q.shape)}, k and v {tuple(k.shape)}"))
    return cases


def _scores(q, k, scale):
    return q @ k.transpose(-1, -2) * scale  # (B, heads, T, S)


ATTENTION_MISTAKES = [
    Mistake("the scores are not scaled: divide q·kᵀ by sqrt(head_dim) before the softmax, or the softmax "
            "saturates on one token as head_dim grows.",
            lambda q, k, v: _scores(q, k, 1.0).softmax(-1) @ v),
    Mistake("you divided the scores by head_dim; divide by its square root, sqrt(head_dim) = sqrt(q.shape[-1]).",
            lambda q, k, v: _scores(q, k, 1 / q.shape[-1]).softmax(-1) @ v),
    Mistake("you multiplied the scores by sqrt(head_dim); divide by it.",
            lambda q, k, v: _scores(q, k, q.shape[-1] ** 0.5).softmax(-1) @ v),
    Mistake("you scaled by the number of keys (sequence length); the scale is 1/sqrt(head_dim), the last axis of q.",
            lambda q, k, v: _scores(q, k, k.shape[-2] ** -0.5).softmax(-1) @ v),
    Mistake("the softmax runs over the wrong axis: each query's weights over the keys must sum to 1, so "
            "take the softmax over the last axis (dim=-1) of the (…, T, S) scores.",
            lambda q, k, v: _scores(q, k, q.shape[-1] ** -0.5).softmax(-2) @ v),
    Mistake("you returned the attention weights; multiply them by v to get each query's mix of values.",
            lambda q, k, v: _scores(q, k, q.shape[-1] ** -0.5).softmax(-1)),
]


def check_attention(fn):
    """fn(q, k, v) -> softmax(q kᵀ / sqrt(head_dim)) v, checked against F.scaled_dot_product_attention (sdlearn.unet's)."""
    _run(fn, _attention_cases(), F.scaled_dot_product_attention, ATTENTION_MISTAKES,
         formula="softmax(q·kᵀ / sqrt(head_dim), over the keys) · v, shape (B, heads, T, head_dim).",
         success="softmax(q·kᵀ / sqrt(head_dim))·v, equal to F.scaled_dot_product_attention (what sdlearn.unet "
                 "runs) for cross-attention to 77 prompt tokens and for self-attention.")


# ---------------------------------------------------------------------------------------------
# 6. One BPE merge step                                    (the WebUI's "n/75" token counter)
# ---------------------------------------------------------------------------------------------


def bpe_merge_step_reference(symbols: list, merge_ranks) -> list:
    """One step of CLIPTokenizer.bpe: merge every occurrence (left to right) of the adjacent pair of lowest rank.
    Unchanged (a copy) when no adjacent pair is a known merge."""
    pairs = set(zip(symbols, symbols[1:]))
    known = [pair for pair in pairs if pair in merge_ranks]
    if not known:
        return list(symbols)
    return _merge_all(symbols, min(known, key=merge_ranks.__getitem__))


def _merge_all(symbols, best):
    """Every occurrence of the pair `best` merged, left to right, without overlaps: a a a -> aa a."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _bpe_highest_rank(symbols, ranks):
    known = [p for p in set(zip(symbols, symbols[1:])) if p in ranks]
    return _merge_all(symbols, max(known, key=ranks.__getitem__)) if known else list(symbols)


def _bpe_first_occurrence_only(symbols, ranks):
    known = [p for p in set(zip(symbols, symbols[1:])) if p in ranks]
    if not known:
        return list(symbols)
    best = min(known, key=ranks.__getitem__)
    i = list(zip(symbols, symbols[1:])).index(best)
    return symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]


def _bpe_leftmost_known(symbols, ranks):
    for pair in zip(symbols, symbols[1:]):
        if pair in ranks:
            return _merge_all(symbols, pair)
    return list(symbols)


def _bpe_string_replace(symbols, ranks):
    known = [p for p in set(zip(symbols, symbols[1:])) if p in ranks]
    if not known:
        return list(symbols)
    a, b = min(known, key=ranks.__getitem__)
    return " ".join(symbols).replace(f"{a} {b}", f"{a}{b}").split(" ")


def _bpe_all_known_pairs(symbols, ranks):
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) in ranks:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _bpe_right_to_left(symbols, ranks):
    known = [p for p in set(zip(symbols, symbols[1:])) if p in ranks]
    if not known:
        return list(symbols)
    best = min(known, key=ranks.__getitem__)
    out, i = [], len(symbols) - 1  # walk backwards, pairing (symbols[i-1], symbols[i])
    while i >= 0:
        if i >= 1 and (symbols[i - 1], symbols[i]) == best:
            out.append(symbols[i - 1] + symbols[i])
            i -= 2
        else:
            out.append(symbols[i])
            i -= 1
    return out[::-1]


BPE_MISTAKES = [
    Mistake("you merged the pair with the HIGHEST rank. The rank is the order in which BPE learned the merges: "
            "merge the pair with the lowest rank (learned first, most frequent) — min, not max.",
            _bpe_highest_rank),
    Mistake("you merged only the first occurrence of the best pair; merge every occurrence of it in this step "
            "(left to right, without overlaps).",
            _bpe_first_occurrence_only),
    Mistake("you merged the leftmost pair that has a rank; BPE merges the pair with the lowest rank wherever it is.",
            _bpe_leftmost_known),
    Mistake("joining the symbols into a string and using str.replace merges across symbol boundaries: "
            "'a a</w>' contains 'a a', but its pair is ('a', 'a</w>'), not ('a', 'a'). Compare pairs of symbols.",
            _bpe_string_replace),
    Mistake("you merged every pair that has a rank in one step; one step merges only the single best pair "
            "(all its occurrences), then the ranks are looked at again.",
            _bpe_all_known_pairs),
    Mistake("overlapping occurrences are paired from the right; go left to right: a a a → aa a, not a aa.",
            _bpe_right_to_left),
]


def _bpe_cases():
    toy = MappingProxyType({("a", "n"): 0, ("b", "an"): 1, ("an", "an"): 2, ("n", "a</w>"): 3, ("an", "a</w>"): 4,
                            ("a", "a"): 5, ("l", "o"): 6, ("lo", "w</w>"): 7, ("o", "w</w>"): 8, ("e", "r</w>"): 9,
                            ("w", "e"): 10})
    return [
        Case((["b", "a", "n", "a", "n", "a</w>"], toy), "['b','a','n','a','n','a</w>'], toy ranks"),
        Case((["l", "o", "w", "e", "r</w>"], toy), "['l','o','w','e','r</w>'], toy ranks"),
        Case((["l", "o", "w</w>"], toy), "['l','o','w</w>'], toy ranks"),
        Case((["a", "a", "a", "a</w>"], toy), "['a','a','a','a</w>'], toy ranks"),
        Case((["a", "a", "a", "x</w>"], toy), "['a','a','a','x</w>'], toy ranks"),
        Case((["x", "y</w>"], toy), "['x','y</w>'] (no known pair), toy ranks"),
        Case((["q</w>"], toy), "['q</w>'] (a single symbol), toy ranks"),
    ]


def _bpe_word_symbols(word: str, byte_encoder) -> list:
    symbols = [byte_encoder[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    return symbols


def check_bpe_merge_step(fn, words=("painting", "photorealistic", "rutkowski", "masterpiece")):
    """fn(symbols, merge_ranks) -> symbols after one merge step. Checked on toy ranks against the reference step,
    then repeated to the end on real words with CLIP's 48,894 ranked merges against sdlearn's CLIPTokenizer.bpe."""
    from .tokenizer import CLIPTokenizer

    _run(fn, _bpe_cases(), bpe_merge_step_reference, BPE_MISTAKES,
         formula="the pair of adjacent symbols with the lowest rank merged everywhere, left to right "
                 "(the list unchanged when no pair has a rank).")
    tokenizer = CLIPTokenizer()
    ranks = MappingProxyType(tokenizer.merge_ranks)
    for word in words:
        symbols = _bpe_word_symbols(word, tokenizer.byte_encoder)
        for _ in range(len(symbols)):
            step = bpe_merge_step_reference(symbols, ranks)
            _run(fn, [Case((symbols, ranks), f"{symbols}, CLIP's merges")], lambda *args: step, BPE_MISTAKES,
                 formula=f"{step}: the lowest-ranked pair merged (CLIPTokenizer.bpe's next step).")
            if step == symbols:
                break
            symbols = step
        if symbols != tokenizer.bpe(word):  # the reference step replays sdlearn's tokenizer; a bug here is ours
            raise RuntimeError(f"sdlearn: the reference BPE step disagrees with CLIPTokenizer.bpe on {word!r}")
    print("✓ correct: one BPE merge step. Repeated until nothing merges, it splits 'photorealistic' into "
          "['photo', 'realistic</w>'] and 'rutkowski' into ['rut', 'kowski</w>'], as sdlearn's CLIPTokenizer does.")


# ---------------------------------------------------------------------------------------------
# 7. Samplers: one DDIM step, one Euler step, the Karras schedule   (WebUI: "Sampling method", "Schedule type")
# ---------------------------------------------------------------------------------------------


def _ddim_cases():
    g = _generator(5)
    cases = []
    for t, t_prev in [(951, 901), (501, 451), (51, 1), (999, 0), (261, 1)]:
        a_t, a_prev = float(SD15.alphas_cumprod[t]), float(SD15.alphas_cumprod[t_prev])
        x_t = torch.randn(2, 4, 8, 8, generator=g)
        eps = torch.randn(2, 4, 8, 8, generator=g)
        cases.append(Case((x_t, eps, a_t, a_prev), f"x_t, eps, ᾱ at t={t} and t_prev={t_prev}"))
    return cases


def _ddim_reference(x_t, eps, a_t, a_prev):
    """sdlearn.samplers.sample_ddim for one step, moved into and out of its sigma view x = x_t / sqrt(ᾱ).
    In float64: the round trip ᾱ -> σ -> ᾱ would cost float32 a few 1e-6 near t = 0."""
    sigmas = torch.tensor([((1 - a_t) / a_t) ** 0.5, ((1 - a_prev) / a_prev) ** 0.5], dtype=torch.float64)
    eps = eps.double()
    denoiser = lambda x, sigma: x - sigma.view(-1, 1, 1, 1) * eps  # noqa: E731  D(x, σ) = x − σ·ε̂
    x = samplers.sample_ddim(denoiser, x_t.double() / a_t**0.5, sigmas)
    return x * a_prev**0.5


def _x0(x_t, eps, a):
    return (x_t - (1 - a) ** 0.5 * eps) / a**0.5


DDIM_MISTAKES = [
    Mistake("you returned the predicted clean latent x̂_0. A DDIM step goes on to re-noise it to the previous "
            "timestep: x_prev = sqrt(ᾱ_prev)·x̂_0 + sqrt(1 − ᾱ_prev)·ε̂.",
            lambda x, e, a, ap: _x0(x, e, a)),
    Mistake("the noise term uses ᾱ_t; it must use ᾱ_prev: the step lands at the previous timestep's noise level, "
            "sqrt(1 − ᾱ_prev)·ε̂.",
            lambda x, e, a, ap: ap**0.5 * _x0(x, e, a) + (1 - a) ** 0.5 * e),
    Mistake("you dropped the noise term sqrt(1 − ᾱ_prev)·ε̂ (the paper's \"direction pointing to x_t\"); without "
            "it every step jumps to a clean latent and the next one has nothing to denoise.",
            lambda x, e, a, ap: ap**0.5 * _x0(x, e, a)),
    Mistake("the noise term is scaled by (1 − ᾱ_prev) instead of sqrt(1 − ᾱ_prev).",
            lambda x, e, a, ap: ap**0.5 * _x0(x, e, a) + (1 - ap) * e),
    Mistake("ᾱ_t and ᾱ_prev are swapped: x̂_0 comes from x_t with ᾱ_t; the result is built with ᾱ_prev.",
            lambda x, e, a, ap: a**0.5 * _x0(x, e, ap) + (1 - a) ** 0.5 * e),
    Mistake("the clean term is scaled by ᾱ_prev instead of sqrt(ᾱ_prev).",
            lambda x, e, a, ap: ap * _x0(x, e, a) + (1 - ap) ** 0.5 * e),
    Mistake("x̂_0 is wrong inside your step: x̂_0 = (x_t − sqrt(1 − ᾱ_t)·ε̂) / sqrt(ᾱ_t) (exercise 03); you did "
            "not divide by sqrt(ᾱ_t).",
            lambda x, e, a, ap: ap**0.5 * (x - (1 - a) ** 0.5 * e) + (1 - ap) ** 0.5 * e),
]


def check_ddim_step(fn):
    """fn(x_t, eps, alpha_bar_t, alpha_bar_prev) -> x_prev of deterministic DDIM (η = 0), against samplers.sample_ddim."""
    _run(fn, _ddim_cases(), _ddim_reference, DDIM_MISTAKES,
         formula="x_prev = sqrt(ᾱ_prev)·x̂_0 + sqrt(1 − ᾱ_prev)·ε̂, x̂_0 = (x_t − sqrt(1 − ᾱ_t)·ε̂) / sqrt(ᾱ_t).",
         success="one DDIM step (η = 0), equal to a step of sdlearn.samplers.sample_ddim, from t = 999 down to t = 0.")


def _euler_cases():
    g = _generator(6)
    sig = schedule.get_sigmas("karras", 10)
    cases = []
    for i in (0, 4, 8, 9):  # 9: the last step, to σ_next = 0
        x = torch.randn(2, 4, 8, 8, generator=g) * float(sig[i])
        d = torch.randn(2, 4, 8, 8, generator=g)
        s, s_next = float(sig[i]), float(sig[i + 1])
        cases.append(Case((x, d, s, s_next), f"x, denoised, sigma={s:.4g}, sigma_next={s_next:.4g}"))
    return cases


def _euler_reference(x, denoised, sigma, sigma_next):
    """sdlearn.samplers.sample_euler for one step with a model whose guess is `denoised`."""
    sigmas = torch.tensor([sigma, sigma_next], dtype=torch.float32)
    return samplers.sample_euler(lambda x_, s: denoised, x, sigmas)


EULER_MISTAKES = [
    # (σ − σ_next)·d and (σ_next − σ)·(−d) are the same wrong answer, so one hint names both signs.
    Mistake("you stepped the wrong way, adding noise instead of removing it: the slope is d = (x − denoised)/σ "
            "(the noise estimate ε̂) and the step size (σ_next − σ) is negative — σ goes DOWN towards 0 — "
            "so x' = x + (σ_next − σ)·d. One of your two signs is flipped.",
            lambda x, D, s, sn: x + (x - D) / s * (s - sn)),
    Mistake("you forgot to divide by σ: the slope dx/dσ is (x − denoised) / σ.",
            lambda x, D, s, sn: x + (x - D) * (sn - s)),
    Mistake("you returned the denoiser's guess itself. That is where the step lands only when σ_next = 0; "
            "in general x' = x + (σ_next − σ)·(x − denoised)/σ.",
            lambda x, D, s, sn: D.clone()),
    Mistake("you multiplied the slope by σ_next; multiply it by the step size (σ_next − σ).",
            lambda x, D, s, sn: x + (x - D) / s * sn),
    Mistake("you multiplied the slope by −σ: that always jumps to `denoised`. Multiply by (σ_next − σ).",
            lambda x, D, s, sn: x - (x - D) / s * s),
]


def check_euler_step(fn):
    """fn(x, denoised, sigma, sigma_next) -> x + (σ_next − σ)·(x − denoised)/σ, against samplers.sample_euler."""
    _run(fn, _euler_cases(), _euler_reference, EULER_MISTAKES,
         formula="x' = x + (σ_next − σ)·d with d = (x − denoised)/σ.",
         success="one Euler step on dx/dσ = (x − D(x, σ))/σ, equal to a step of sdlearn.samplers.sample_euler "
                 "(A1111's \"Euler\", ComfyUI's euler), the last step to σ = 0 included.")


_DDPM_LINEAR = NoiseSchedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)  # Ho et al.'s original


def _karras_cases():
    return [
        Case((20, SD15.sigma_min, SD15.sigma_max), f"steps=20, sigma_min={SD15.sigma_min:.4f}, sigma_max={SD15.sigma_max:.3f}"),
        Case((7, SD15.sigma_min, SD15.sigma_max), "steps=7, SD1.5's sigma_min and sigma_max"),
        Case((2, SD15.sigma_min, SD15.sigma_max), "steps=2, SD1.5's sigma_min and sigma_max"),
        Case((12, _DDPM_LINEAR.sigma_min, _DDPM_LINEAR.sigma_max),
             f"steps=12, sigma_min={_DDPM_LINEAR.sigma_min:.4f}, sigma_max={_DDPM_LINEAR.sigma_max:.2f}"),
    ]


def _karras_reference(steps, sigma_min, sigma_max, rho=7.0):
    for table in (SD15, _DDPM_LINEAR):
        if (sigma_min, sigma_max) == (table.sigma_min, table.sigma_max):
            return schedule.karras_sigmas(steps, table, rho)
    raise ValueError("no sdlearn schedule has these sigmas")  # the cases above only use the two tables


def _karras(steps, lo, hi, rho, denominator, append_zero=True):
    i = torch.arange(steps, dtype=torch.float64)
    s = (hi ** (1 / rho) + i / denominator * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]) if append_zero else s


KARRAS_MISTAKES = [
    Mistake("the final σ = 0 is missing: the list has steps + 1 entries, the last one 0, so the last step "
            "removes all the noise.",
            lambda n, lo, hi, rho=7.0: _karras(n, lo, hi, rho, n - 1, append_zero=False)),
    Mistake("your sigmas go up; a sampler walks them from σ_max DOWN to σ_min, then 0.",
            lambda n, lo, hi, rho=7.0: torch.cat([_karras(n, lo, hi, rho, n - 1, False).flip(0), torch.zeros(1)])),
    Mistake("you interpolated σ linearly (that is ρ = 1). Karras et al. interpolate σ^(1/ρ) with ρ = 7 and raise "
            "the result to the power ρ, which crowds the steps at small σ.",
            lambda n, lo, hi, rho=7.0: _karras(n, lo, hi, 1.0, n - 1)),
    Mistake("you spaced log σ evenly — that is the \"Exponential\" schedule type; Karras spaces σ^(1/ρ) evenly.",
            lambda n, lo, hi, rho=7.0: torch.cat([torch.linspace(math.log(hi), math.log(lo), n, dtype=torch.float64).exp(),
                                                  torch.zeros(1, dtype=torch.float64)])),
    Mistake("the ramp should reach σ_min exactly at the last step: use i/(steps − 1), not i/steps.",
            lambda n, lo, hi, rho=7.0: _karras(n, lo, hi, rho, n)),
    Mistake("the exponents are swapped: interpolate σ^(1/ρ), then raise to the power ρ.",
            lambda n, lo, hi, rho=7.0: _karras(n, lo, hi, 1 / rho, n - 1)),
]


def check_karras_sigmas(fn):
    """fn(steps, sigma_min, sigma_max, rho=7.0) -> (steps + 1,) sigmas, against sdlearn.schedule.karras_sigmas."""
    _run(fn, _karras_cases(), _karras_reference, KARRAS_MISTAKES,
         formula="σ_i = (σ_max^(1/ρ) + i/(steps−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ for i = 0..steps−1, then 0.",
         success="the Karras schedule (A1111's Schedule type \"Karras\", ComfyUI's scheduler karras), equal to "
                 "sdlearn.schedule.karras_sigmas for SD1.5's σ range and for DDPM's linear schedule.")


# ---------------------------------------------------------------------------------------------
# 8. Classifier-free guidance                               (WebUI: "CFG Scale"; ComfyUI: KSampler cfg)
# ---------------------------------------------------------------------------------------------


def _cfg_cases():
    g = _generator(7)
    cases = []
    for s in (7.5, 3.0, 1.0, 0.0, 12.0):
        u = torch.randn(2, 4, 8, 8, generator=g)
        c = torch.randn(2, 4, 8, 8, generator=g)
        cases.append(Case((u, c, s), f"eps_uncond, eps_cond, cfg_scale={s}"))
    return cases


CFG_MISTAKES = [
    Mistake("you started from ε_cond: cond + s·(cond − uncond) is the paper's (1 + w)·ε_cond − w·ε_uncond with "
            "w = s. The WebUI's CFG Scale is s = 1 + w: start from ε_uncond, ε_uncond + s·(ε_cond − ε_uncond), "
            "so that scale 1 gives the plain prompt-conditioned prediction.",
            lambda u, c, s: c + s * (c - u)),
    Mistake("you pushed towards the negative prompt: the direction to extrapolate along is (ε_cond − ε_uncond).",
            lambda u, c, s: u + s * (u - c)),
    Mistake("the roles of the two predictions are swapped: ε_uncond + s·(ε_cond − ε_uncond).",
            lambda u, c, s: c + s * (u - c)),
    Mistake("s·ε_cond + ε_uncond: the weights must add up to 1 — s·ε_cond + (1 − s)·ε_uncond.",
            lambda u, c, s: s * c + u),
    Mistake("s·ε_cond alone forgets the unconditional prediction: ε_uncond + s·(ε_cond − ε_uncond).",
            lambda u, c, s: s * c),
    Mistake("averaging the two ignores the CFG scale: ε_uncond + s·(ε_cond − ε_uncond).",
            lambda u, c, s: (u + c) / 2),
]


def check_cfg(fn):
    """fn(eps_uncond, eps_cond, cfg_scale) -> guided ε, against sdlearn.guidance.cfg_combine."""
    _run(fn, _cfg_cases(), guidance.cfg_combine, CFG_MISTAKES,
         formula="ε = ε_uncond + s·(ε_cond − ε_uncond).",
         success="ε_uncond + s·(ε_cond − ε_uncond), equal to sdlearn.guidance.cfg_combine; scale 1 gives ε_cond, "
                 "scale 0 gives ε_uncond (the negative prompt alone).")


# ---------------------------------------------------------------------------------------------
# 9. img2img: how many steps the denoising strength runs    (WebUI: "Denoising strength" 重绘幅度; ComfyUI: denoise)
# ---------------------------------------------------------------------------------------------
# sdlearn.pipeline.Pipeline._from_latent does this inside img2img; the counting is written out here.


def img2img_steps_reference(steps: int, strength: float, mode: str = "a1111") -> int:
    """Steps actually run out of `steps` at this denoising strength; sampling starts at sigmas[steps − n].

    A1111: t_enc = int(min(strength, 0.999)·steps), then t_enc + 1 steps (at least one, even at strength 0).
    diffusers: int(strength·steps) steps (none at strength 0: the image comes back through the VAE)."""
    if mode == "a1111":
        return int(min(strength, 0.999) * steps) + 1
    if mode == "diffusers":
        return min(int(steps * strength), steps)
    raise ValueError(f"mode must be 'a1111' or 'diffusers', got {mode!r}")


def _img2img_cases():
    cases = []
    # Ordered so that each common mistake first fails on a case where no other mistake gives the same number:
    # 0.31·20 = 6.2 tells ceil from int, 0.5·7 = 3.5 tells round from int, strength 1 needs A1111's 0.999 cap.
    for steps, strength in [(20, 0.75), (20, 0.31), (7, 0.5), (100, 0.29), (20, 1.0), (20, 0.0), (30, 0.3),
                            (50, 0.999), (1, 0.6)]:
        for mode in ("a1111", "diffusers"):
            cases.append(Case((steps, strength, mode), f"steps={steps}, strength={strength}, mode={mode!r}"))
    return cases


def _by_mode(a1111, diffusers):
    return lambda n, s, mode="a1111": a1111(n, s) if mode == "a1111" else diffusers(n, s)


_A1111 = lambda n, s: int(min(s, 0.999) * n) + 1  # noqa: E731
_DIFFUSERS = lambda n, s: min(int(n * s), n)  # noqa: E731

IMG2IMG_MISTAKES = [
    Mistake("A1111 runs one step more than int(strength·steps): t_enc = int(min(strength, 0.999)·steps), "
            "then t_enc + 1 steps (int(strength·steps) is diffusers' count).",
            _by_mode(lambda n, s: int(min(s, 0.999) * n), _DIFFUSERS)),
    Mistake("diffusers runs int(strength·steps) steps, without A1111's + 1.",
            _by_mode(_A1111, lambda n, s: int(n * s) + 1)),
    Mistake("at strength 1 A1111 would run steps + 1 steps: it caps the strength at 0.999 first, "
            "int(min(strength, 0.999)·steps) + 1.",
            _by_mode(lambda n, s: int(s * n) + 1, _DIFFUSERS)),
    Mistake("int() truncates, round() does not: 0.29·100 is 28.999999999999996 in floating point, and A1111 and "
            "diffusers both truncate it to 28. Use int(...), as they do.",
            _by_mode(lambda n, s: round(min(s, 0.999) * n) + 1, lambda n, s: min(round(n * s), n))),
    Mistake("ceil rounds up; A1111 and diffusers truncate with int(...).",
            _by_mode(lambda n, s: math.ceil(min(s, 0.999) * n) + 1, lambda n, s: min(math.ceil(n * s), n))),
    Mistake("you returned where sampling starts in the sigma list (steps − n); return how many steps run, n.",
            _by_mode(lambda n, s: n - _A1111(n, s), lambda n, s: n - _DIFFUSERS(n, s))),
]


def check_img2img_steps(fn):
    """fn(steps, strength, mode) -> how many of the steps img2img runs, A1111's and diffusers' way."""
    _run(fn, _img2img_cases(), img2img_steps_reference, IMG2IMG_MISTAKES,
         formula="A1111: int(min(strength, 0.999)·steps) + 1; diffusers: int(strength·steps).",
         success="A1111 runs int(min(strength, 0.999)·steps) + 1 steps (16 of 20 at strength 0.75), diffusers "
                 "int(strength·steps) (15 of 20), as sdlearn.pipeline's img2img does in each mode.")


# ---------------------------------------------------------------------------------------------
# 10. LoRA forward                                          (A1111: <lora:name:0.8>; ComfyUI: LoraLoader)
# ---------------------------------------------------------------------------------------------


def _lora_cases():
    g = _generator(8)
    cases = []
    # (tokens, in, out, rank, alpha, strength): kohya's usual alpha = rank/2, alpha = rank, alpha = 1; the first
    # case has alpha, alpha/rank, rank/alpha and 1 all different, so each scaling mistake is told apart.
    for n, d_in, d_out, rank, alpha, strength in [(5, 24, 16, 8, 4.0, 0.8), (3, 10, 12, 8, 8.0, 1.0),
                                                  (7, 16, 16, 2, 1.0, -0.5), (2, 12, 20, 4, 4.0, 0.0)]:
        x = torch.randn(n, d_in, generator=g)
        W = torch.randn(d_out, d_in, generator=g) / d_in**0.5
        down = torch.randn(rank, d_in, generator=g)
        up = torch.randn(d_out, rank, generator=g)
        cases.append(Case((x, W, down, up, alpha, strength),
                          f"x {tuple(x.shape)}, W {tuple(W.shape)}, down {tuple(down.shape)}, up {tuple(up.shape)}, "
                          f"alpha={alpha}, strength={strength}"))
    return cases


def _lora_reference(x, W, down, up, alpha, strength):
    """sdlearn.lora.LoRALinear around an nn.Linear holding W, with these down/up weights."""
    from .lora import LoRALinear

    base = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    layer = LoRALinear(base, rank=down.shape[0], alpha=alpha, strength=strength)
    with torch.no_grad():
        base.weight.copy_(W)
        layer.down.weight.copy_(down)
        layer.up.weight.copy_(up)
        return layer(x)


def lora_forward_formula(x, W, down, up, alpha, strength):
    """y = x Wᵀ + strength·(alpha/rank)·(x downᵀ) upᵀ — the formula LoRALinear implements (the tests compare them)."""
    rank = down.shape[0]
    return x @ W.T + strength * (alpha / rank) * (x @ down.T) @ up.T


def _lora(scale_fn, base=True):
    def answer(x, W, down, up, alpha, strength):
        branch = (x @ down.T) @ up.T * scale_fn(alpha, down.shape[0], strength)
        return x @ W.T + branch if base else branch
    return answer


LORA_MISTAKES = [
    Mistake("the LoRA branch is not scaled by alpha/rank. Multiply up(down(x)) by strength·alpha/rank "
            "(kohya's network_alpha over the rank; rank = down.shape[0]).",
            _lora(lambda a, r, s: s)),
    Mistake("you scaled by alpha; divide it by the rank first: strength·(alpha/rank), rank = down.shape[0].",
            _lora(lambda a, r, s: s * a)),
    Mistake("the scale is upside down: alpha/rank, not rank/alpha.",
            _lora(lambda a, r, s: s * r / a)),
    Mistake("the strength (the 0.8 in <lora:name:0.8>, ComfyUI's strength_model) is missing: it multiplies the "
            "LoRA branch.",
            _lora(lambda a, r, s: a / r)),
    Mistake("you returned only the LoRA branch; the frozen layer's own output x·Wᵀ is added to it.",
            _lora(lambda a, r, s: s * a / r, base=False)),
    Mistake("the strength multiplies only the LoRA branch, not the base layer: at strength 0 the layer must be "
            "unchanged, x·Wᵀ.",
            lambda x, W, d, u, a, s: s * (x @ W.T + a / d.shape[0] * (x @ d.T) @ u.T)),
    Mistake("the rank is down.shape[0] (the thin side of the matrices), not down.shape[1] (the layer's input width).",
            lambda x, W, d, u, a, s: x @ W.T + s * a / d.shape[1] * (x @ d.T) @ u.T),
]


def check_lora_forward(fn):
    """fn(x, W, down, up, alpha, strength) -> x Wᵀ + strength·(alpha/rank)·up(down(x)), against sdlearn.lora.LoRALinear."""
    _run(fn, _lora_cases(), _lora_reference, LORA_MISTAKES,
         formula="y = x·Wᵀ + strength·(alpha/rank)·(x·downᵀ)·upᵀ with rank = down.shape[0].",
         success="x·Wᵀ + strength·(alpha/rank)·(x·downᵀ)·upᵀ, equal to sdlearn.lora.LoRALinear at strengths 0.8, 1, "
                 "−0.5 and 0.")


# ---------------------------------------------------------------------------------------------
# 11. The list the course and its tests walk through
# ---------------------------------------------------------------------------------------------

CHECKS: dict[str, Callable] = {
    "vae_scaling_factor": check_vae_scaling_factor,
    "forward_noising": check_forward_noising,
    "predict_x0": check_predict_x0,
    "attention": check_attention,
    "bpe_merge_step": check_bpe_merge_step,
    "ddim_step": check_ddim_step,
    "euler_step": check_euler_step,
    "karras_sigmas": check_karras_sigmas,
    "cfg": check_cfg,
    "img2img_steps": check_img2img_steps,
    "lora_forward": check_lora_forward,
}

__all__ = ["ExerciseError", "CHECKS", *(f.__name__ for f in CHECKS.values())]
