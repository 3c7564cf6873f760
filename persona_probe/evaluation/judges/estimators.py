"""EM rates that account for the judge's error.

* `rogan_gladen`: the judge's apparent EM rate corrected with its measured sensitivity and specificity,
  p = (p_app + spec - 1) / (sens + spec - 1), with a Monte-Carlo interval that draws the apparent rate,
  the sensitivity and the specificity from their Jeffreys Beta posteriors (so the uncertainty of the
  validation counts, not only the sample's), clipped to [0, 1].
* `ppi_mean`: prediction-powered inference for a hybrid run (`ppi_py`, Angelopoulos et al. 2023; power-tuned
  PPI++ by default): a cheap judge scores all N answers, a strong (gold) judge a random subset of n of them.
  theta = lambda mean_N(cheap) + mean_n(gold - lambda cheap) is unbiased for any fixed lambda whatever the
  cheap judge's errors; lambda is tuned so a weak cheap judge cannot widen the interval beyond the gold labels'.

Both are checked for ~95 % coverage on simulated judges with known prevalence (tests/test_estimators.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from persona_probe.core.stats import Z95


@dataclass
class Estimate:
    """A corrected rate with its 95 % interval and how it was made."""

    rate: float | None
    ci95: tuple[float, float]
    method: str
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JudgeErrorRates:
    """A judge's measured sensitivity and specificity on the EM label, as counts (they carry the n)."""

    tp: int
    fn: int
    tn: int
    fp: int
    source: str = ""  # where they were measured (the `judge validate` command)

    @property
    def sensitivity(self) -> float:
        return self.tp / max(self.tp + self.fn, 1)

    @property
    def specificity(self) -> float:
        return self.tn / max(self.tn + self.fp, 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JudgeErrorRates":
        return cls(int(d["tp"]), int(d["fn"]), int(d["tn"]), int(d["fp"]), str(d.get("source", "")))


def rogan_gladen(k: int, n: int, err: JudgeErrorRates, draws: int = 20000, seed: int = 0) -> Estimate:
    """Correct an apparent rate k/n for the judge's sensitivity/specificity.

    Returns rate None when the judge is no better than chance (sens + spec <= 1), or when k/n lies outside
    [1 - spec, sens] (then those error rates do not describe these answers: use a gold judge instead).
    """
    if n == 0:
        return Estimate(None, (0.0, 1.0), "rogan-gladen", 0)
    se, sp = err.sensitivity, err.specificity
    youden = se + sp - 1
    if youden <= 0:
        return Estimate(None, (0.0, 1.0), "rogan-gladen (judge at chance: no correction)", n)
    raw = (k / n + sp - 1) / youden
    if not 0.0 <= raw <= 1.0:
        # the apparent rate lies outside [1 - spec, sens]: the judge's measured error rates cannot have produced
        # it, so they do not describe these answers and no correction is meaningful (clipping would claim 0 or 1
        # with certainty)
        return Estimate(None, (0.0, 1.0), f"rogan-gladen: apparent rate {k / n:.3f} outside the judge's "
                        f"[1 - specificity, sensitivity] = [{1 - sp:.3f}, {se:.3f}]; not corrected", n)
    point = float(raw)
    rng = np.random.default_rng(seed)
    p_app = rng.beta(k + 0.5, n - k + 0.5, draws)
    se_d = rng.beta(err.tp + 0.5, err.fn + 0.5, draws)
    sp_d = rng.beta(err.tn + 0.5, err.fp + 0.5, draws)
    j = se_d + sp_d - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(j > 0, (p_app + sp_d - 1) / j, np.nan)
    p = np.clip(p[np.isfinite(p)], 0.0, 1.0)
    lo, hi = (float(x) for x in np.quantile(p, [0.025, 0.975]))
    return Estimate(point, (lo, hi), "rogan-gladen, Jeffreys-Beta Monte Carlo interval", n)


def ppi_mean(cheap_all: Sequence[float], cheap_gold: Sequence[float], gold: Sequence[float],
             power_tuning: bool = True) -> Estimate:
    """Prediction-powered estimate of a mean (e.g. the EM rate: 0/1 labels).

    cheap_all:  [N] the cheap judge's labels on every answer
    cheap_gold: [n] the cheap judge's labels on the gold subset (a uniformly random subset of the N)
    gold:       [n] the gold judge's labels on the same subset

    theta = lambda mean_N(cheap) + mean_n(gold - lambda cheap): unbiased for any fixed lambda whatever the cheap
    judge's errors, and the exact share of these N answers when the cheap judge is perfect. Its variance, with
    the subset inside the N, is Var(gold) / N + Var(gold - lambda cheap) (1/n - 1/N) (never negative); the 95 %
    interval is the normal one, with Agresti-Coull pseudo rows so rare rates are covered too.

    power_tuning (PPI++, Angelopoulos, Duchi & Zrnic 2023): lambda = Cov(gold, cheap) / Var(cheap) on the gold
    rows, clipped to [0, 1], minimises that variance (for a subset inside the N; `ppi_py` tunes for a disjoint unlabelled set,
    hence not used here). Plain PPI (lambda = 1) is *wider* than the gold labels alone whenever
    Var(gold - cheap) > Var(gold) — a judge with kappa ~0.3 on real answers is such a judge — while the tuned
    estimate stays near gold-only for a weak judge and narrows as the judge improves; cheap labels that never
    vary carry no information (lambda = 0: the gold labels' own interval).
    """
    f = np.asarray(cheap_all, dtype=float)
    fg = np.asarray(cheap_gold, dtype=float)
    y = np.asarray(gold, dtype=float)
    N, n = len(f), len(y)
    if n != len(fg):
        raise ValueError("cheap_gold and gold must be paired (same length)")
    if n < 2 or N < 2:
        return Estimate(None, (0.0, 1.0), "prediction-powered (too few gold labels)", N)
    if not (np.isfinite(f).all() and np.isfinite(fg).all() and np.isfinite(y).all()):
        raise ValueError("ppi_mean: labels must be finite numbers")
    lam = 1.0
    if power_tuning:  # both moments from the gold rows: exactly 1 when the cheap judge is perfect
        lam = float(np.clip(np.cov(y, fg)[0, 1] / fg.var(ddof=1), 0.0, 1.0)) if fg.std() > 0 else 0.0
    theta = float(lam * f.mean() + (y - lam * fg).mean())
    # the interval (not the estimate) adds two EM and two non-EM pseudo gold rows whose cheap label is the cheap
    # mean (Agresti-Coull's fix): a Wald interval on 0/1 labels under-covers rare rates (0.87 at p = 0.05 with
    # 100 gold labels, simulated); with them 0.95-0.97 (tests/test_estimators.py)
    ya, fa = np.concatenate([y, [1.0, 1.0, 0.0, 0.0]]), np.concatenate([fg, np.full(4, f.mean())])
    rect = ya - lam * fa
    centre = float(lam * f.mean() + rect.mean())
    var = ya.var(ddof=1) / (N + 4) + rect.var(ddof=1) * max(1 / len(ya) - 1 / (N + 4), 0.0)
    half = Z95 * float(np.sqrt(var))
    lo, hi = float(np.clip(min(centre - half, theta), 0, 1)), float(np.clip(max(centre + half, theta), 0, 1))
    method = (f"PPI++ (power-tuned, lambda = {lam:.2f})" if power_tuning else "PPI (lambda = 1)") + \
        ": cheap judge on all answers, gold judge on a random subset"
    return Estimate(float(np.clip(theta, 0, 1)), (lo, hi), method, N)
