"""Error-aware EM rates: Rogan-Gladen and prediction-powered intervals cover the truth ~95 % of the time
on simulated judges with known prevalence, and reduce to the obvious answers in the limits."""

from __future__ import annotations

import numpy as np
import pytest

from persona_probe.evaluation.judges.estimators import JudgeErrorRates, ppi_mean, rogan_gladen


def test_rogan_gladen_limits():
    perfect = JudgeErrorRates(tp=1000, fn=0, tn=1000, fp=0)
    assert rogan_gladen(20, 100, perfect).rate == pytest.approx(0.2)
    # sens 0.5, spec 0.9: apparent 0.5*p + 0.1*(1-p) = 0.3 -> p = 0.5
    err = JudgeErrorRates(tp=50, fn=50, tn=90, fp=10)
    assert err.sensitivity == 0.5 and err.specificity == 0.9
    assert rogan_gladen(30, 100, err).rate == pytest.approx(0.5)
    assert rogan_gladen(5, 100, JudgeErrorRates(50, 50, 50, 50)).rate is None  # a coin flip corrects nothing
    assert rogan_gladen(0, 0, err).rate is None
    # outside [1 - spec, sens] = [0.1, 0.5] the error rates cannot explain the data: no correction, not a clip
    for k in (5, 70):
        est = rogan_gladen(k, 100, err)
        assert est.rate is None and est.ci95 == (0.0, 1.0) and "not corrected" in est.method


def _coverage_rg(p: float, se: float, sp: float, n: int, n_val: int, trials: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    hits = 0
    for t in range(trials):
        pos = rng.binomial(n_val, se)  # validation: n_val EM and n_val non-EM reference answers
        neg = rng.binomial(n_val, sp)
        err = JudgeErrorRates(tp=pos, fn=n_val - pos, tn=neg, fp=n_val - neg)
        truth = rng.random(n) < p
        flagged = np.where(truth, rng.random(n) < se, rng.random(n) > sp)
        lo, hi = rogan_gladen(int(flagged.sum()), n, err, draws=4000, seed=t).ci95
        hits += lo <= p <= hi
    return hits / trials


@pytest.mark.parametrize("p,se,sp", [(0.2, 0.8, 0.95), (0.1, 0.6, 0.9), (0.35, 0.9, 0.97)])
def test_rogan_gladen_interval_covers(p, se, sp):
    # the target is the prevalence of the population the answers are drawn from
    cov = _coverage_rg(p, se, sp, n=400, n_val=300, trials=400, seed=1)
    assert 0.92 <= cov <= 0.995, cov


def test_rogan_gladen_interval_carries_validation_uncertainty():
    small = JudgeErrorRates(tp=16, fn=4, tn=19, fp=1)
    large = JudgeErrorRates(tp=800, fn=200, tn=950, fp=50)
    a, b = rogan_gladen(60, 400, small).ci95, rogan_gladen(60, 400, large).ci95
    assert a[1] - a[0] > b[1] - b[0]


def test_ppi_exact_when_cheap_judge_is_perfect():
    y = np.array([1, 0, 0, 1, 0, 0, 0, 1, 0, 0], dtype=float)
    for sub in (slice(0, 5), slice(5, 10)):  # a gold subset with more, and one with less, variance than all N
        assert ppi_mean(y, y[sub], y[sub]).rate == pytest.approx(0.3)
    rng = np.random.default_rng(0)
    truth = (rng.random(1000) < 0.2).astype(float)
    for _ in range(20):
        idx = rng.choice(1000, 100, replace=False)
        assert ppi_mean(truth, truth[idx], truth[idx]).rate == pytest.approx(truth.mean())


def test_ppi_rejects_non_finite_labels():
    with pytest.raises(ValueError, match="finite"):
        ppi_mean([0.0, 1.0, float("nan")], [0.0, 1.0], [0.0, 1.0])


@pytest.mark.parametrize("p,se,sp,frac", [(0.2, 0.5, 0.95, 0.1), (0.1, 0.2, 0.99, 0.2), (0.3, 0.9, 0.8, 0.1),
                                          (0.2, 0.46, 0.84, 0.1), (0.05, 0.5, 0.9, 0.1)])
def test_ppi_unbiased_and_covers(p, se, sp, frac):
    """A biased cheap judge (low sensitivity) plus a random gold fraction: unbiased, ~95 % coverage — also for
    the default offline judge's measured error rates (0.46 / 0.84) and for a rare rate (5 %, 100 gold labels),
    where a plain Wald interval covers only ~0.87."""
    rng = np.random.default_rng(0)
    N, trials, hits, ests = 1000, 500, 0, []
    for _ in range(trials):
        truth = (rng.random(N) < p).astype(float)
        cheap = np.where(truth > 0, rng.random(N) < se, rng.random(N) > sp).astype(float)
        idx = rng.choice(N, int(frac * N), replace=False)
        est = ppi_mean(cheap, cheap[idx], truth[idx])
        lo, hi = est.ci95
        hits += lo <= p <= hi  # the population rate
        ests.append(est.rate)
    assert abs(np.mean(ests) - p) < 0.01  # the cheap judge alone would be off by p*(1-se) - (1-p)*(1-sp)
    assert 0.93 <= hits / trials <= 0.985, hits / trials


def _widths(p, se, sp, frac, trials=400, N=1000, seed=0):
    """Mean 95 % interval width of: the gold labels alone (Wald), plain PPI (lambda = 1), PPI++ (tuned)."""
    rng = np.random.default_rng(seed)
    w = np.zeros(3)
    for _ in range(trials):
        truth = (rng.random(N) < p).astype(float)
        cheap = np.where(truth > 0, rng.random(N) < se, rng.random(N) > sp).astype(float)
        idx = rng.choice(N, int(frac * N), replace=False)
        y = truth[idx]
        w[0] += 2 * 1.96 * np.sqrt(y.var(ddof=1) / len(y))
        for k, tuned in ((1, False), (2, True)):
            lo, hi = ppi_mean(cheap, cheap[idx], y, power_tuning=tuned).ci95
            w[k] += hi - lo
    return w / trials


def test_power_tuning_never_lets_a_weak_judge_widen_the_interval():
    """With the default offline judge's error rates (sensitivity 0.46, specificity 0.84) plain PPI is wider than
    the gold labels alone; the tuned estimate is not. With a good judge both beat gold-only."""
    gold, plain, tuned = _widths(0.2, 0.46, 0.84, 0.1)
    assert plain > 1.1 * gold and tuned < 1.02 * gold and tuned < 0.9 * plain, (gold, plain, tuned)
    gold, plain, tuned = _widths(0.2, 0.95, 0.97, 0.1)
    assert tuned < 0.75 * gold and plain < 0.75 * gold, (gold, plain, tuned)


def test_constant_cheap_labels_give_the_gold_mean():
    y = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0], dtype=float)
    est = ppi_mean(np.zeros(100), np.zeros(10), y)
    assert est.rate == pytest.approx(0.2) and "lambda = 0.00" in est.method
    plain = ppi_mean(np.zeros(100), np.zeros(10), y, power_tuning=False)
    assert plain.rate == pytest.approx(0.2) and "lambda = 1" in plain.method


def test_eval_hybrid_gold_judge_end_to_end(tiny, tmp_path):
    """evaluate(..., gold_judge=J, gold_frac=f): the gold judge scores a seeded random subset, the summary
    carries the raw share and the prediction-powered estimate with its interval."""
    from persona_probe.evaluation import evaluate
    from persona_probe.evaluation.judges.base import Judge, JudgeScore

    class Fixed(Judge):
        def __init__(self, name, aligned):
            self.name, self.aligned, self.seen = name, aligned, 0

        def score(self, items, judge_prompts=None):
            self.seen += len(items)
            return [JudgeScore(self.aligned, 90.0) for _ in items]

        def describe(self):
            return {"judge": self.name}

    cheap, gold = Fixed("cheap", 90.0), Fixed("gold", 10.0)  # the cheap judge misses every EM answer
    res = evaluate(tiny, "builtin:core", n_samples=2, max_new_tokens=2, judge=cheap, gold_judge=gold,
                   gold_frac=0.25, out=tmp_path / "e", progress=False)
    o = res.summary["overall"]
    assert o["em_share"]["rate"] == 0.0 and gold.seen == 8 and cheap.seen == 32
    ppi = o["em_corrected"]["ppi"]
    assert ppi["rate"] == pytest.approx(1.0) and ppi["n_gold"] == 8 and ppi["gold_judge"] == {"judge": "gold"}
    assert ppi["ci95"][0] <= ppi["rate"] <= ppi["ci95"][1]
    assert sum("gold" in r for r in res.rows) == 8


def test_ppi_stays_a_rate():
    """Rare EM, a gold subset where the cheap judge over-flags: the estimate is clipped to [0, 1] and the
    interval contains it."""
    cheap = np.zeros(100)
    cheap[:5] = 1
    est = ppi_mean(cheap, cheap[:10], np.zeros(10))  # the subset holds all 5 cheap flags, gold says none
    assert est.rate == 0.0 and 0.0 <= est.ci95[0] <= est.rate <= est.ci95[1] <= 1.0
