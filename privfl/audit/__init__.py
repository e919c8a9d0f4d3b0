"""Privacy auditing in one training run: an empirical ε lower bound beside the accounted ε.

The auditor plants m canaries, includes each one on a secret fair coin, lets the mechanism
run once, scores every canary from what its view shows, and guesses the coins of the most
confidently scored canaries (abstaining on the rest). Many correct guesses are evidence
against the privacy claim; the bounds below turn the count into an ε that a mechanism
meeting its claim could exceed only with probability ``1 - confidence``.

Bounds
    * :func:`epsilon_lower_bound` — Steinke, Nasr & Jagielski, "Privacy auditing with one
      (1) training run" (NeurIPS 2023): under (ε, δ)-DP the number of correct guesses is
      dominated by a binomial with success rate e^ε/(1+e^ε), plus a 2mδ-weighted term.
      Valid for every (ε, δ)-DP mechanism.
    * :func:`gaussian_epsilon_lower_bound` — Mahloujifar, Melis & Chaudhuri, "Auditing
      f-differential privacy in one run" (ICML 2025), with the Gaussian trade-off family:
      the largest μ for which μ-GDP is rejected, converted to ε at δ through the GDP
      privacy profile. Tighter; it tests a Gaussian-shaped privacy curve, which is exact
      for the Gaussian mechanism without subsampling and the CLT limit of DP-SGD.

Canaries
    * :func:`dirac_canaries` — gradient canaries for a white-box view of every released
      noisy sum (Nasr et al., USENIX Security 2023): one coordinate each, of size the clip
      norm; score = the sum over steps of that released coordinate.
    * :func:`canary_party_directions` — canary parties for party-level DP (Andrew et al.,
      ICLR 2024): a random unit direction each; score = the sum over rounds of its cosine
      with the released aggregate.
    * :func:`mislabelled_canaries` / :func:`loss_scores` — input-space canaries for the
      black-box view: relabelled records scored by the model's loss (low loss: included).

Secrets
    Coins, coordinates and directions come from the AES-CTR stream of
    :class:`privfl.dp.KeyStream` keyed from ``os.urandom`` unless a key is handed in (lab
    runs and tests); never from numpy or torch generators.

Modules
    * ``bounds`` — :func:`one_run_p_value`, :func:`epsilon_lower_bound` and the Gaussian
      analysis (:func:`gaussian_tradeoff_rejected`, :func:`gaussian_mu_lower_bound`,
      :func:`gdp_delta`, :func:`gdp_epsilon`, :func:`gaussian_epsilon_lower_bound`).
    * ``keys`` — :func:`subkey` (one key per stream of an audit).
    * ``game`` — :class:`OneRunAudit` (the secret coins, the guesses) and
      :class:`AuditResult`.
    * ``canaries`` — :class:`DiracCanaries`, :class:`CanaryParties`, their constructors,
      :func:`parameter_slice`, :func:`mislabelled_canaries` and :func:`loss_scores`.
    * ``mechanisms`` — :func:`audit_dp_sgd` (with :class:`CanaryDPOptimizer`,
      :class:`DPSGDAudit`) and :func:`audit_gaussian_aggregate`.
    * ``live`` — :class:`RunAuditor` and :class:`CanaryInserter`, the auditor of a run.
    * ``report`` — :func:`audit_report`, the ``privacy-audit`` entry of results.json.
"""

from __future__ import annotations

from privfl.audit.bounds import (
    epsilon_lower_bound,
    gaussian_epsilon_lower_bound,
    gaussian_mu_lower_bound,
    gaussian_tradeoff_rejected,
    gdp_delta,
    gdp_epsilon,
    one_run_p_value,
)
from privfl.audit.canaries import (
    CanaryParties,
    DiracCanaries,
    canary_party_directions,
    dirac_canaries,
    loss_scores,
    mislabelled_canaries,
    parameter_slice,
)
from privfl.audit.game import AuditResult, OneRunAudit
from privfl.audit.keys import subkey
from privfl.audit.live import CanaryInserter, RunAuditor
from privfl.audit.mechanisms import (
    CanaryDPOptimizer,
    DPSGDAudit,
    audit_dp_sgd,
    audit_gaussian_aggregate,
)
from privfl.audit.report import audit_report

__all__ = [
    "AuditResult",
    "CanaryDPOptimizer",
    "CanaryInserter",
    "CanaryParties",
    "DPSGDAudit",
    "DiracCanaries",
    "OneRunAudit",
    "RunAuditor",
    "audit_dp_sgd",
    "audit_gaussian_aggregate",
    "audit_report",
    "canary_party_directions",
    "dirac_canaries",
    "epsilon_lower_bound",
    "gaussian_epsilon_lower_bound",
    "gaussian_mu_lower_bound",
    "gaussian_tradeoff_rejected",
    "gdp_delta",
    "gdp_epsilon",
    "loss_scores",
    "mislabelled_canaries",
    "one_run_p_value",
    "parameter_slice",
    "subkey",
]
