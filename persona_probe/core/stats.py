"""The one statistics module: intervals, two-proportion tests, correlations, separation, bootstrap.

Thin wrappers over statsmodels and scipy that fix the project's conventions (n == 0 gives the
uninformative interval, undefined statistics are NaN rather than errors). Tensor inputs are accepted
anywhere a sequence of numbers is (duck-typed: this module does not import torch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint, proportions_ztest

Z95 = float(sps.norm.ppf(0.975))  # 1.959963984540054
FISHER_MIN_COUNT = 5  # below this many in any cell the z-test's normal approximation is poor: add Fisher's p


def _arr(x: Any) -> Any:
    """A float64 array from a list, an array or a (CPU/GPU, any-dtype) tensor, same shape."""
    if hasattr(x, "detach"):
        x = x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _vec(x: Any) -> np.ndarray:
    return _arr(x).ravel()


# ----------------------------------------------------------------------------- proportions


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n ((0, 1) when n == 0)."""
    if n == 0:
        return (0.0, 1.0)
    lo, hi = proportion_confint(k, n, alpha=2 * sps.norm.sf(z), method="wilson")
    return (max(0.0, float(lo)), min(1.0, float(hi)))


def fisher_exact(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided Fisher exact p on the 2x2 table [[k1, n1-k1], [k2, n2-k2]]."""
    return min(1.0, float(sps.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]]).pvalue))


def two_proportion_test(k1: int, n1: int, k2: int, n2: int) -> dict[str, float]:
    """Two-sided pooled z-test for p1 != p2, plus Fisher's exact p when any cell count is small.

    {"z", "p_value", "diff"[, "fisher_p_value"]}; all NaN when a side is empty; z = 0, p = 1 when both
    sides are all-0 or all-1 (no variance: no evidence of a difference)."""
    if n1 == 0 or n2 == 0:
        return {"z": float("nan"), "p_value": float("nan"), "diff": float("nan")}
    pooled = (k1 + k2) / (n1 + n2)
    if 0.0 < pooled < 1.0:
        z, p = proportions_ztest([k1, k2], [n1, n2], value=0, alternative="two-sided", prop_var=False)
        z, p = float(z), float(p)
    else:
        z, p = 0.0, 1.0
    out = {"z": z, "p_value": p, "diff": k1 / n1 - k2 / n2}
    if min(k1, k2, n1 - k1, n2 - k2) < FISHER_MIN_COUNT:
        out["fisher_p_value"] = fisher_exact(k1, n1, k2, n2)
    return out


# ----------------------------------------------------------------------------- association / separation


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation over the pairs where neither value is NaN (NaN when < 3 pairs or a side is constant)."""
    a, b = _vec(x), _vec(y)
    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok], b[ok]
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(sps.pearsonr(a, b).statistic)


def auroc_columns(pos: Any, neg: Any) -> np.ndarray:
    """Per-column AUROC: pos [n_pos, k], neg [n_neg, k] -> [k]. AUROC = P(pos > neg) + 0.5 P(tie) = Mann-Whitney
    U / (n_pos n_neg) (scipy, vectorised over columns: one call for many random directions)."""
    p, n = _arr(pos), _arr(neg)
    if len(p) == 0 or len(n) == 0:
        return np.full(p.shape[1:] if p.ndim > 1 else (), np.nan)
    u = sps.mannwhitneyu(p, n, axis=0, method="asymptotic").statistic  # the p-value is not used
    return np.asarray(u, dtype=np.float64) / (len(p) * len(n))


def auroc(pos: Any, neg: Any) -> float:
    """AUROC of all of `pos` against all of `neg` (flattened); NaN when a side is empty."""
    return float(auroc_columns(_vec(pos), _vec(neg)))


def cohens_d(pos: Any, neg: Any) -> float:
    """(mean_pos - mean_neg) / pooled sample std; NaN with fewer than 2 values on a side."""
    p, n = _vec(pos), _vec(neg)
    if len(p) < 2 or len(n) < 2:
        return float("nan")
    pooled = math.sqrt(((len(p) - 1) * p.var(ddof=1) + (len(n) - 1) * n.var(ddof=1)) / (len(p) + len(n) - 2))
    return float((p.mean() - n.mean()) / max(pooled, 1e-12))


# ----------------------------------------------------------------------------- bootstrap


def bootstrap_idx(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] resampling indices (with replacement), seeded. Reuse one matrix for paired statistics."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def percentile_ci(samples: Any, level: float = 0.95) -> list[float]:
    """Percentile interval [lo, hi] of bootstrap replicates."""
    tail = round(50 * (1 - level), 10)  # 2.5 exactly for 0.95
    lo, hi = np.percentile(_vec(samples), [tail, 100 - tail])
    return [float(lo), float(hi)]
