"""The audit's entry in results.json: both ε side by side and the score histograms."""

from __future__ import annotations

import math

import numpy as np

from privfl.audit.game import AuditResult
from privfl.results import AttackReport


def audit_report(result: AuditResult) -> AttackReport:
    """results.json's ``privacy-audit`` entry: both ε side by side, the score histograms."""
    from matplotlib.figure import Figure  # drawn only for a report (slow to import)

    fig = Figure(figsize=(5.2, 3.2))
    ax = fig.subplots()
    both = np.concatenate([result.included_scores, result.excluded_scores])
    bins = np.linspace(float(both.min()), float(both.max()), 41) if both.size else 10
    ax.hist(result.excluded_scores, bins=bins, alpha=0.6, label="excluded canaries")
    ax.hist(result.included_scores, bins=bins, alpha=0.6, label="included canaries")
    acc = result.epsilon_accounted
    ax.set(
        xlabel="canary score",
        ylabel="canaries",
        title=f"audit: ε ≥ {result.epsilon_lower_bound:.2f} "
        f"(accounted {'∞' if math.isinf(acc) else f'{acc:.2f}'})",
    )
    ax.legend()
    fig.tight_layout()
    accounted = "∞ (no DP)" if math.isinf(acc) else f"{acc:.3g}"
    notes = [
        f"view: {result.view}",
        f"ε lower bound {result.epsilon_lower_bound:.3g} (one-run, Steinke et al.), "
        f"{result.epsilon_gaussian:.3g} (Gaussian one-run analysis, μ ≥ "
        f"{result.mu_gaussian:.3g}); accounted ε {accounted}; δ = {result.delta:g}, "
        f"{result.confidence:.0%} confidence",
        f"{result.correct} of {result.guesses} guesses right among {result.canaries} canaries",
    ]
    if result.violation:
        notes.insert(
            0,
            "PRIVACY VIOLATION: the empirical lower bound exceeds the accounted ε; "
            "the mechanism does not deliver what its accountant claims",
        )
    return AttackReport(
        name="privacy-audit",
        role="auditor",
        target="the run",
        recovered=result.correct,
        total=result.guesses,
        metrics={
            "epsilon_lower_bound": result.epsilon_lower_bound,
            "epsilon_gaussian": result.epsilon_gaussian,
            "epsilon_accounted": acc,
            "confidence": result.confidence,
            "canaries": result.canaries,
            "correct": result.correct,
            "guesses": result.guesses,
            "view": result.view,
            "violation": result.violation,
        },
        figures={"privacy_audit.png": fig},
        notes=notes,
        arrays={"included": result.included_scores, "excluded": result.excluded_scores},
    )
