"""ROC analysis for membership inference, with confidence intervals.

Convention throughout: a *higher* score means "more likely a member". ``scores_in`` are
the attack's scores on members, ``scores_out`` on non-members. A threshold ``t`` flags
every record whose score is strictly greater than ``t``.

Intervals: Clopper–Pearson (exact binomial) for rates and precision, conditional on
the threshold; stratified bootstrap (members and non-members resampled separately)
for the AUC.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from scipy import stats


@dataclass(frozen=True)
class RocCurve:
    """An empirical ROC curve: ``fpr[i]``, ``tpr[i]`` when flagging scores ``> thresholds[i]``.

    Points are ordered by increasing FPR; the first point is (0, 0) at threshold +inf.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


@dataclass(frozen=True)
class RateEstimate:
    """A proportion with its confidence interval.

    ``value = successes / trials``; ``low``/``high`` bound it at ``confidence``;
    ``threshold`` is the score threshold that produced it (flag ``score > threshold``).
    """

    value: float
    low: float
    high: float
    successes: int
    trials: int
    threshold: float
    confidence: float


def _as_scores(x: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"{name}: needs at least one score, got none")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: scores must be finite (no NaN/inf)")
    return a


def roc_curve(scores_in: np.ndarray, scores_out: np.ndarray) -> RocCurve:
    """The empirical ROC curve, one point per distinct score (ties move together).

    Parameters
    ----------
    scores_in, scores_out
        Attack scores of members and non-members (higher = member).

    Returns
    -------
    RocCurve
        From (0, 0) at threshold +inf to (1, 1) at threshold -inf.
    """
    s_in = _as_scores(scores_in, "scores_in")
    s_out = _as_scores(scores_out, "scores_out")
    scores = np.concatenate([s_in, s_out])
    is_in = np.concatenate([np.ones(s_in.size), np.zeros(s_out.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, is_in = scores[order], is_in[order]
    # Last index of every run of equal scores: flagging "> next distinct score".
    last = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]
    tp = np.cumsum(is_in)[last]
    fp = np.cumsum(1.0 - is_in)[last]
    # Flagging everything down to scores[last[i]] is threshold "just below" it; record
    # the next lower distinct score (or -inf) so that "> threshold" reproduces the point.
    below = np.r_[scores[last[1:]], -np.inf]
    return RocCurve(
        fpr=np.r_[0.0, fp / s_out.size],
        tpr=np.r_[0.0, tp / s_in.size],
        thresholds=np.r_[np.inf, below],
    )


def auc(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """Area under the ROC curve: P(member score > non-member score) + ½ P(tie)."""
    s_in = _as_scores(scores_in, "scores_in")
    s_out = _as_scores(scores_out, "scores_out")
    return float(_auc_ranks(s_in, s_out))


def _auc_ranks(s_in: np.ndarray, s_out: np.ndarray) -> float:
    ranks = stats.rankdata(np.concatenate([s_in, s_out]))
    n_in, n_out = s_in.size, s_out.size
    return (ranks[:n_in].sum() - n_in * (n_in + 1) / 2.0) / (n_in * n_out)


def auc_ci(
    scores_in: np.ndarray,
    scores_out: np.ndarray,
    *,
    confidence: float = 0.95,
    n_boot: int = 500,
    seed: int = 0,
) -> RateEstimate:
    """AUC with a stratified percentile-bootstrap interval.

    ``successes``/``trials`` of the result are the member / non-member counts.
    """
    s_in = _as_scores(scores_in, "scores_in")
    s_out = _as_scores(scores_out, "scores_out")
    _check_confidence(confidence)
    if n_boot < 1:
        raise ValueError(f"n_boot: must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for b in range(n_boot):
        bi = s_in[rng.integers(0, s_in.size, s_in.size)]
        bo = s_out[rng.integers(0, s_out.size, s_out.size)]
        boots[b] = _auc_ranks(bi, bo)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(boots, [tail, 1.0 - tail])
    return RateEstimate(
        value=_auc_ranks(s_in, s_out),
        low=float(lo),
        high=float(hi),
        successes=s_in.size,
        trials=s_out.size,
        threshold=math.nan,
        confidence=confidence,
    )


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: must be in (0, 1), got {confidence}")


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper–Pearson) two-sided interval for a binomial proportion.

    Returns ``(nan, nan)`` when there are no trials.
    """
    _check_confidence(confidence)
    if not 0 <= successes <= trials:
        raise ValueError(f"successes: must be in [0, trials={trials}], got {successes}")
    if trials == 0:
        return math.nan, math.nan
    a = (1.0 - confidence) / 2.0
    lo = 0.0 if successes == 0 else stats.beta.ppf(a, successes, trials - successes + 1)
    hi = 1.0 if successes == trials else stats.beta.ppf(1 - a, successes + 1, trials - successes)
    return float(lo), float(hi)


def _rate(successes: int, trials: int, threshold: float, confidence: float) -> RateEstimate:
    lo, hi = clopper_pearson(successes, trials, confidence)
    value = successes / trials if trials else math.nan
    return RateEstimate(value, lo, hi, int(successes), int(trials), float(threshold), confidence)


def threshold_at_fpr(scores_out: np.ndarray, fpr: float) -> float:
    """The lowest threshold whose empirical FPR on ``scores_out`` is at most ``fpr``.

    Flagging ``score > threshold`` then yields at most ``floor(fpr * n)`` false positives.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr: must be in [0, 1], got {fpr}")
    s_out = np.sort(_as_scores(scores_out, "scores_out"))[::-1]
    allowed = math.floor(fpr * s_out.size + 1e-9)
    return -math.inf if allowed >= s_out.size else float(s_out[allowed])


def tpr_at_fpr(
    scores_in: np.ndarray,
    scores_out: np.ndarray,
    fpr: float,
    *,
    confidence: float = 0.95,
) -> RateEstimate:
    """TPR at the lowest threshold whose empirical FPR is ``<= fpr``.

    The interval is Clopper–Pearson on the member count above that threshold (it does
    not include the threshold's own sampling error). With ``n`` non-members, an FPR
    below ``1/n`` can only be met with zero false positives.
    """
    s_in = _as_scores(scores_in, "scores_in")
    t = threshold_at_fpr(scores_out, fpr)
    return _rate(int(np.sum(s_in > t)), s_in.size, t, confidence)


def fpr_at(scores_out: np.ndarray, threshold: float, *, confidence: float = 0.95) -> RateEstimate:
    """Empirical FPR of flagging ``score > threshold``, with its Clopper–Pearson interval."""
    s_out = _as_scores(scores_out, "scores_out")
    return _rate(int(np.sum(s_out > threshold)), s_out.size, threshold, confidence)


def precision_at(
    scores_in: np.ndarray,
    scores_out: np.ndarray,
    threshold: float,
    *,
    confidence: float = 0.95,
) -> RateEstimate:
    """Precision of the flagged set ``{score > threshold}``: TP / (TP + FP).

    Value is NaN (interval NaN) when nothing is flagged.
    """
    s_in = _as_scores(scores_in, "scores_in")
    s_out = _as_scores(scores_out, "scores_out")
    tp = int(np.sum(s_in > threshold))
    fp = int(np.sum(s_out > threshold))
    return _rate(tp, tp + fp, threshold, confidence)


def balanced_precision_at(
    scores_in: np.ndarray,
    scores_out: np.ndarray,
    threshold: float,
    *,
    confidence: float = 0.95,
) -> RateEstimate:
    """Precision of flagging ``score > threshold`` were members and non-members equally
    many: ``TPR / (TPR + FPR)``.

    Precision depends on the base rate; this one does not depend on how many non-members
    happen to be scored, so an evaluation with more non-members than members (to resolve
    low FPRs) stays comparable to a balanced one. The interval combines Clopper–Pearson
    intervals of TPR and FPR, each at ``(1 + confidence) / 2`` (Bonferroni), at their
    worst and best ends. ``successes``/``trials`` are the raw true positives / flagged.
    NaN when nothing is flagged.
    """
    s_in = _as_scores(scores_in, "scores_in")
    s_out = _as_scores(scores_out, "scores_out")
    _check_confidence(confidence)
    tp = int(np.sum(s_in > threshold))
    fp = int(np.sum(s_out > threshold))
    if tp + fp == 0:
        return RateEstimate(math.nan, math.nan, math.nan, 0, 0, float(threshold), confidence)
    each = (1.0 + confidence) / 2.0
    tpr, fpr = tp / s_in.size, fp / s_out.size
    tpr_lo, tpr_hi = clopper_pearson(tp, s_in.size, each)
    fpr_lo, fpr_hi = clopper_pearson(fp, s_out.size, each)

    def prec(t: float, f: float) -> float:
        return t / (t + f) if t + f > 0 else 0.0

    return RateEstimate(
        prec(tpr, fpr),
        prec(tpr_lo, fpr_hi),
        prec(tpr_hi, fpr_lo),
        tp,
        tp + fp,
        float(threshold),
        confidence,
    )


def roc_figure(
    curves: Mapping[str, RocCurve], *, title: str = "Membership inference ROC"
) -> Figure:
    """A log-log ROC figure (matplotlib Agg) with one line per named curve and the chance line.

    The figure is built without pyplot, so no GUI backend is ever touched.
    """
    fig = Figure(figsize=(4.8, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    floor = 1.0
    for name, c in curves.items():
        pos = (c.fpr > 0) & (c.tpr > 0)
        if np.any(pos):
            floor = min(floor, float(c.fpr[pos].min()), float(c.tpr[pos].min()))
        ax.step(c.fpr[pos], c.tpr[pos], where="post", label=name)
    floor = max(floor / 2.0, 1e-5)
    ax.plot([floor, 1], [floor, 1], "k--", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig
