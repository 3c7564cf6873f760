"""Portable numerical comparisons for the tests (same verdict on any CPU, still catching real bugs).

Two computations of the same fp32 network (another backend, another batch size, another kernel) differ by
rounding only: the sums inside each matmul are reduced in a different order. One reordered sum of `width`
terms differs by about sqrt(width) * eps relative (a random walk of per-add roundings); the residual stream
is a running sum over blocks, so the per-block errors add up roughly linearly with depth. `fp32_rel_tol`
is that bound times a safety factor, because attention softmax and the final norm can amplify it a few times
on some inputs. A real bug (wrong layer, wrong sign, padding leaking in) moves residuals and logits by O(1)
relative, orders of magnitude above it; `tests/test_numerics_bite.py` checks that.

Greedy generations are not compared token by token: wherever two logits are within rounding of each other
(a near-tie) the argmax can flip on another CPU and the sequences part ways for good. Instead every
generated token is checked teacher-forced against a reference forward pass on the same tokens: it must be
the reference argmax, or within `logit_tol` of it (a near-tie, where either choice is correct).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7
OBSERVED: list[tuple[str, float, float]] = []  # (what, observed error, tolerance): conftest prints it on request


def fp32_rel_tol(depth: int, width: int, safety: float = 8.0) -> float:
    """Relative tolerance for fp32 activations after `depth` blocks whose widest reduction has `width` terms."""
    return safety * max(depth, 1) * math.sqrt(width) * EPS32


def smol_tol(handle, safety: float = 8.0) -> float:
    """`fp32_rel_tol` for a model handle: its depth and its widest reduction (the MLP's inner width)."""
    cfg = handle.model.config
    width = max(int(getattr(cfg, "intermediate_size", 0) or 0), int(handle.d_model))
    return fp32_rel_tol(handle.n_layers, width, safety)


def rel_err(a: Tensor, b: Tensor) -> float:
    """Largest elementwise |a - b| relative to |b|, with |b| floored at 1.

    The floor: residual entries near 0 carry absolute rounding error of the stream's scale, not their own;
    deep layers also hold a few ~2.5e4 'massive activations' whose absolute error is large but relative small.
    """
    a, b = a.double(), b.double()
    return float(((a - b).abs() / b.abs().clamp_min(1.0)).max())


def assert_rel_close(a: Tensor, b: Tensor, tol: float, what: str = "") -> float:
    """Assert rel_err(a, b) <= tol; returns the observed error (tests print it for the closing note)."""
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = rel_err(a, b)
    OBSERVED.append((what, err, tol))
    assert err <= tol, f"{what}: relative error {err:.3g} > tolerance {tol:.3g}"
    return err


def logit_tol(logits: Tensor, rel: float) -> float:
    """Absolute tolerance on logits: `rel` times their scale (the largest |logit|, floored at 1)."""
    return rel * max(float(logits.abs().max()), 1.0)


def check_greedy_tokens(ref_logits: Tensor, tokens: Sequence[int], tol: float) -> list[float]:
    """Each token must be a near-argmax of the teacher-forced reference logits at its step.

    ref_logits: [n_new, vocab], the reference's logits at the positions that predict `tokens` (n_new of them).
    Returns the per-step shortfall max(logits) - logits[token] (0 where the token is the argmax).
    Raises AssertionError at the first step where the shortfall exceeds `tol` (not a near-tie: a real
    disagreement about the next token).
    """
    assert ref_logits.shape[0] == len(tokens), (ref_logits.shape, len(tokens))
    assert len(tokens) > 0, "no generated tokens to check"
    gaps = []
    for i, t in enumerate(tokens):
        row = ref_logits[i].double()
        gap = float(row.max() - row[int(t)])
        assert gap <= tol, (f"step {i}: token {int(t)} is {gap:.3g} below the reference argmax "
                            f"{int(row.argmax())} (tolerance {tol:.3g}): not a near-tie")
        gaps.append(gap)
    OBSERVED.append(("greedy token gap", max(gaps, default=0.0), tol))
    return gaps


def top2_margin(logits: Tensor) -> Tensor:
    """[..., vocab] -> [...]: top-1 minus top-2 logit (how far a step is from a tie)."""
    top = logits.double().topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]
