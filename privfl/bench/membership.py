"""``privfl bench membership``: QMIA, LOSS and offline LiRA on the membership scenarios.

``mia_small_hospitals`` / ``mia_small_hospitals_dpsgd`` train their single target
in-process exactly as a run does (:func:`privfl.evaluation.membership.run_membership`).
``mia_federated`` needs a global model: here it is the FedAvg of the parties'
``train_local`` updates computed in-process (the same local training as a Flower run,
without Flower), so the rows come without Ray.
One row per (scenario, attack), printed beside the reference figure.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from privfl.architecture import build_model
from privfl.config import Scenario
from privfl.data import load_federation
from privfl.evaluation.membership import run_membership
from privfl.runner import resolve
from privfl.training import TrainConfig, train_local

DEFAULT_SCENARIOS = ("mia_small_hospitals", "mia_small_hospitals_dpsgd")
# The reference figure for each scenario's setting.
FOUNDING_FIGURE = {
    "mia_small_hospitals": "QMIA: 97% of flagged records truly members (ResNet-50, ImageNet)",
    "mia_small_hospitals_dpsgd": "DP-SGD pushes membership inference to chance",
    "mia_federated": "membership inference on a federated global model: (not reported)",
}
ROW_KEYS = (
    "auc",
    "auc_low",
    "auc_high",
    "tpr_at_0.1pct_fpr",
    "tpr_at_0.1pct_fpr_low",
    "tpr_at_0.1pct_fpr_high",
    "tpr_at_1pct_fpr",
    "tpr_at_1pct_fpr_low",
    "tpr_at_1pct_fpr_high",
    "precision",
    "precision_low",
    "precision_high",
    "precision_balanced",
    "operating_observed_fpr",
    "members_scored",
    "non_members_scored",
    "flagged",
    "target_train_accuracy",
    "target_test_accuracy",
)


def fedavg_global_model(scenario: Scenario, device: torch.device | str = "cpu") -> nn.Module:
    """The global model of ``scenario.rounds`` rounds of plain FedAvg, in-process."""
    fed = load_federation(scenario)
    model = build_model(scenario, fed.num_classes)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = TrainConfig.from_scenario(scenario)
    for rnd in range(1, scenario.scenario.rounds + 1):
        total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
        weight = 0
        for party in range(scenario.data.parties):
            model.load_state_dict(global_state)
            data = fed.parties[party].train
            train_local(model, data, config, party=party, server_round=rnd, device=device)
            for k, v in model.state_dict().items():
                total[k] += len(data) * v.detach().double().cpu()
            weight += len(data)
        global_state = {k: (total[k] / weight).to(v.dtype) for k, v in global_state.items()}
    model.load_state_dict(global_state)
    return model.eval()


def membership_bench_rows(
    scenarios: Iterable[str | Scenario] = DEFAULT_SCENARIOS,
    *,
    device: str = "cpu",
    overrides: Sequence[str] = (),
    seeds: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Rows for ``privfl bench seed``: one per (scenario, attack[, seed]).

    Parameters
    ----------
    scenarios : Iterable[str or Scenario]
        Shipped scenario names, paths or resolved scenarios (membership-inference ones).
    device : str
        Where targets, shadows and the quantile regressor train.
    overrides : Sequence[str]
        ``section.key=value`` overrides applied to every scenario.
    seeds : Sequence[int], optional
        Run every scenario once per seed (``scenario.seed``); rows carry ``seed``.

    Returns
    -------
    list[dict]
        ``scenario``, ``attack``, ``target``, ``recovered``/``total`` (members flagged at
        the operating point / members scored), ``epsilon`` (DP runs), ``seconds`` (the
        whole scenario, shared by its rows) and the metrics in ``ROW_KEYS``.
    """
    rows: list[dict[str, Any]] = []
    runs = (
        [(name, None) for name in scenarios]
        if seeds is None
        else [(name, seed) for name in scenarios for seed in seeds]
    )
    for name, seed in runs:
        extra = [] if seed is None else [f"scenario.seed={seed}"]
        sc = resolve(name, [*overrides, *extra])
        if sc.attack.kind != "membership-inference":
            raise ValueError(
                f"scenario {sc.scenario.name!r}: attack.kind is not membership-inference"
            )
        t0 = time.perf_counter()
        target = None
        if sc.attack.membership.target == "federated":
            target = fedavg_global_model(sc, device)
        reports = run_membership(sc, target_model=target, device=device)
        seconds = time.perf_counter() - t0
        for r in reports:
            row = {
                "scenario": sc.scenario.name,
                "seed": sc.scenario.seed,
                "attack": r.metrics["attack"],
                "target": r.target,
                "recovered": r.recovered,
                "total": r.total,
                "epsilon": r.metrics.get("epsilon"),
                "seconds": seconds,
            }
            row.update({k: r.metrics[k] for k in ROW_KEYS})
            rows.append(row)
    return rows


def seed_summary(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Lines summarising rows of several seeds: per (scenario, attack) the mean and
    standard deviation over seeds, and on how many seeds QMIA's TPR at 0.1% FPR is at
    least LiRA's (a single seed's TPR there rests on a handful of non-members)."""
    lines = []
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        mine = [r for r in rows if r["scenario"] == scenario]
        by_attack: dict[str, dict[int, dict[str, Any]]] = {}
        for r in mine:
            by_attack.setdefault(r["attack"], {})[r["seed"]] = r
        n = len({r["seed"] for r in mine})
        for attack, per_seed in by_attack.items():
            parts = []
            for key, label in (
                ("auc", "AUC"),
                ("tpr_at_0.1pct_fpr", "TPR@0.1%"),
                ("tpr_at_1pct_fpr", "TPR@1%"),
                ("precision", "precision"),
            ):
                v = np.array([r[key] for r in per_seed.values()], dtype=np.float64)
                parts.append(f"{label} {np.nanmean(v):.3f} ± {np.nanstd(v):.3f}")
            lines.append(
                f"{scenario:<12} {attack:<5} over {len(per_seed)} seeds: " + ", ".join(parts)
            )
        if "qmia" in by_attack and "lira" in by_attack:
            common = sorted(set(by_attack["qmia"]) & set(by_attack["lira"]))
            wins = [
                s
                for s in common
                if by_attack["qmia"][s]["tpr_at_0.1pct_fpr"]
                >= by_attack["lira"][s]["tpr_at_0.1pct_fpr"]
            ]
            lines.append(
                f"{scenario:<12} QMIA's TPR@0.1% >= LiRA's on {len(wins)}/{len(common)} seeds"
                f" (seeds {', '.join(map(str, wins)) or 'none'}); {n} seeds run"
            )
    return lines


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="privfl bench membership", description=__doc__)
    p.add_argument("scenarios", nargs="*", default=list(DEFAULT_SCENARIOS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument(
        "--seeds",
        type=_seed_list,
        default=None,
        metavar="S[,S...]",
        help="run each scenario once per seed and summarise over seeds (e.g. 0,1,2,3,4)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = membership_bench_rows(
        args.scenarios, device=args.device, overrides=args.set, seeds=args.seeds
    )
    print("privfl bench membership")
    print(
        f"{'scenario':<12} {'seed':>4} {'attack':<5} {'AUC [95% CI]':<22} "
        f"{'TPR@0.1% [95% CI]':<22} {'TPR@1% [95% CI]':<22} "
        f"{'flagged':>9} {'prec. [95% CI]':<22} {'1:1':>5} {'obs.FPR':>7} {'acc':>5} "
        f"{'eps':>5} {'s':>5}"
    )
    for i, r in enumerate(rows):
        eps = f"{r['epsilon']:.2f}" if r["epsilon"] is not None else "-"
        print(
            f"{r['scenario']:<12} {r['seed']:>4} {r['attack']:<5} "
            f"{r['auc']:.3f} [{r['auc_low']:.3f}, {r['auc_high']:.3f}]   "
            f"{r['tpr_at_0.1pct_fpr']:.3f} [{r['tpr_at_0.1pct_fpr_low']:.3f}, "
            f"{r['tpr_at_0.1pct_fpr_high']:.3f}]   "
            f"{r['tpr_at_1pct_fpr']:.3f} [{r['tpr_at_1pct_fpr_low']:.3f}, "
            f"{r['tpr_at_1pct_fpr_high']:.3f}]   "
            f"{r['recovered']:>4}/{r['flagged']:<4} "
            f"{r['precision']:.3f} [{r['precision_low']:.3f}, {r['precision_high']:.3f}]   "
            f"{r['precision_balanced']:>5.3f} {r['operating_observed_fpr']:>7.4f} "
            f"{r['target_test_accuracy']:>5.3f} {eps:>5} {r['seconds']:>5.0f}"
        )
        nxt = rows[i + 1] if i + 1 < len(rows) else None
        if nxt is None or (nxt["scenario"], nxt["seed"]) != (r["scenario"], r["seed"]):
            print(
                f"{'':<12} {r['members_scored']} members : {r['non_members_scored']} "
                f"non-members scored; reference: "
                f"{FOUNDING_FIGURE.get(r['scenario'], '(no figure)')}"
            )
    if args.seeds is not None and len(args.seeds) > 1:
        print()
        for line in seed_summary(rows):
            print(line)
    return 0


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not seeds:
        raise argparse.ArgumentTypeError("no seed given")
    return seeds
