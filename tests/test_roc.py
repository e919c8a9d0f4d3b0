"""ROC, AUC, TPR-at-FPR, precision and their intervals against slow references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure
from scipy import stats

from privfl.metrics import roc

scores = st.lists(st.integers(-5, 5).map(float), min_size=1, max_size=30)


def _brute_auc(s_in, s_out):
    s_in, s_out = np.asarray(s_in), np.asarray(s_out)
    gt = (s_in[:, None] > s_out[None, :]).mean()
    eq = (s_in[:, None] == s_out[None, :]).mean()
    return gt + 0.5 * eq


@settings(max_examples=60, deadline=None)
@given(scores, scores)
def test_auc_matches_pairwise_reference_with_ties(s_in, s_out):
    assert roc.auc(s_in, s_out) == pytest.approx(_brute_auc(s_in, s_out), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(scores, scores)
def test_roc_points_reproduce_their_thresholds_and_area(s_in, s_out):
    c = roc.roc_curve(s_in, s_out)
    a_in, a_out = np.asarray(s_in), np.asarray(s_out)
    for f, t, thr in zip(c.fpr, c.tpr, c.thresholds, strict=True):
        assert f == pytest.approx(np.mean(a_out > thr))
        assert t == pytest.approx(np.mean(a_in > thr))
    assert c.fpr[0] == 0 and c.tpr[0] == 0 and c.fpr[-1] == 1 and c.tpr[-1] == 1
    assert np.all(np.diff(c.fpr) >= 0) and np.all(np.diff(c.tpr) >= 0)
    # Trapezoids (ties are diagonal segments) give the tie-aware AUC.
    assert np.trapezoid(c.tpr, c.fpr) == pytest.approx(roc.auc(s_in, s_out), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(scores, scores, st.sampled_from([0.0, 0.01, 0.1, 0.25, 0.5, 1.0]))
def test_tpr_at_fpr_is_best_rate_within_budget(s_in, s_out, fpr):
    a_in, a_out = np.asarray(s_in), np.asarray(s_out)
    r = roc.tpr_at_fpr(a_in, a_out, fpr)
    # Reference: every candidate threshold, keep those within the FPR budget.
    cands = np.r_[np.unique(np.r_[a_in, a_out]), -np.inf]
    best = max(np.mean(a_in > t) for t in cands if np.mean(a_out > t) <= fpr + 1e-12)
    assert r.value == pytest.approx(best)
    assert np.mean(a_out > r.threshold) <= fpr + 1e-12
    assert r.low <= r.value <= r.high


def test_roc_hand_example():
    c = roc.roc_curve([3.0, 2.0], [2.0, 1.0])
    np.testing.assert_allclose(c.fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(c.tpr, [0, 0.5, 1, 1])
    assert roc.auc([3.0, 2.0], [2.0, 1.0]) == pytest.approx(0.875)


def test_clopper_pearson_closed_forms_and_beta_quantiles():
    n, a = 20, 0.05
    assert roc.clopper_pearson(0, n)[0] == 0.0
    assert roc.clopper_pearson(0, n)[1] == pytest.approx(1 - (a / 2) ** (1 / n))
    assert roc.clopper_pearson(n, n)[0] == pytest.approx((a / 2) ** (1 / n))
    lo, hi = roc.clopper_pearson(7, n)
    assert lo == pytest.approx(stats.beta.ppf(a / 2, 7, 14))
    assert hi == pytest.approx(stats.beta.ppf(1 - a / 2, 8, 13))
    assert all(math.isnan(v) for v in roc.clopper_pearson(0, 0))
    with pytest.raises(ValueError, match="successes"):
        roc.clopper_pearson(5, 3)


def test_clopper_pearson_covers_at_least_nominal():
    rng = np.random.default_rng(0)
    n, p = 50, 0.1
    ks = rng.binomial(n, p, size=2000)
    covered = np.mean([lo <= p <= hi for lo, hi in (roc.clopper_pearson(k, n) for k in ks)])
    assert covered >= 0.94


def test_precision_and_fpr_at_threshold():
    s_in = np.array([5.0, 4.0, 3.0, 0.0])
    s_out = np.array([4.5, 1.0, 0.5, -1.0])
    p = roc.precision_at(s_in, s_out, 2.0)
    assert (p.successes, p.trials, p.value) == (3, 4, 0.75)
    assert p.low <= 0.75 <= p.high
    assert roc.fpr_at(s_out, 2.0).value == 0.25
    assert math.isnan(roc.precision_at(s_in, s_out, 10.0).value)


def test_balanced_precision_ignores_how_many_non_members_are_scored():
    s_in = np.array([5.0, 4.0, 3.0, 0.0])
    s_out = np.array([4.5, 1.0, 0.5, -1.0])
    # TPR 3/4, FPR 1/4 -> 0.75; with every non-member scored 5 times over, the raw
    # precision falls to 3/8 while the 1:1 precision stays.
    p = roc.balanced_precision_at(s_in, s_out, 2.0)
    assert (p.value, p.successes, p.trials) == (0.75, 3, 4)
    many = np.tile(s_out, 5)
    assert roc.precision_at(s_in, many, 2.0).value == pytest.approx(3 / 8)
    q = roc.balanced_precision_at(s_in, many, 2.0)
    assert q.value == pytest.approx(0.75)
    assert q.low <= 0.75 <= q.high and p.low <= 0.75 <= p.high
    # More evidence, narrower interval.
    assert q.high - q.low < p.high - p.low
    assert math.isnan(roc.balanced_precision_at(s_in, s_out, 10.0).value)


def test_balanced_precision_interval_covers():
    rng = np.random.default_rng(3)
    tpr, fpr, n_in, n_out = 0.3, 0.05, 100, 400
    truth = tpr / (tpr + fpr)
    hits = 0
    for _ in range(400):
        s_in = (rng.uniform(size=n_in) < tpr).astype(float)
        s_out = (rng.uniform(size=n_out) < fpr).astype(float)
        r = roc.balanced_precision_at(s_in, s_out, 0.5)
        hits += r.low <= truth <= r.high
    assert hits / 400 >= 0.95


def test_auc_bootstrap_interval_contains_estimate_and_narrows():
    rng = np.random.default_rng(1)
    small = roc.auc_ci(rng.normal(1, 1, 50), rng.normal(0, 1, 50), n_boot=300)
    large = roc.auc_ci(rng.normal(1, 1, 2000), rng.normal(0, 1, 2000), n_boot=300)
    for r in (small, large):
        assert r.low <= r.value <= r.high
    assert large.high - large.low < small.high - small.low
    analytic = stats.norm.cdf(1 / math.sqrt(2))
    assert large.low - 0.01 <= analytic <= large.high + 0.01


def test_threshold_at_fpr_and_errors():
    out = np.arange(1000, dtype=float)
    # 0.1% of 1000: one false positive allowed -> threshold is the second largest.
    assert roc.threshold_at_fpr(out, 0.001) == 998.0
    assert roc.threshold_at_fpr(out, 1.0) == -math.inf
    with pytest.raises(ValueError, match="fpr"):
        roc.threshold_at_fpr(out, 1.5)
    with pytest.raises(ValueError, match="scores_in"):
        roc.auc([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        roc.auc([np.nan], [1.0])


def test_roc_figure_is_log_log(tmp_path):
    rng = np.random.default_rng(2)
    curves = {"a": roc.roc_curve(rng.normal(1, 1, 300), rng.normal(0, 1, 300))}
    fig = roc.roc_figure(curves)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    fig.savefig(tmp_path / "roc.png")
    assert (tmp_path / "roc.png").stat().st_size > 1000
