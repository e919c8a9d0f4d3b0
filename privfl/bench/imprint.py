"""``privfl bench imprint``: imprint extraction from an in-process FedAvg aggregate.

Every party of the scenario trains the rigged model for one round exactly as in a run
(``privfl.training.train_local``); the aggregate is the FedAvg of their updates,
computed here in float64 (no secure aggregation, which only adds fixed-point rounding).
Rows: the scenario's own seed; the fraction recovered over 20 seeds against
``(1 - 1/k)^(N-1)``; and more local steps on the same batches with the same bins.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from privfl.architecture import build_model
from privfl.attacks.imprint import (
    attack_round_scenario,
    expected_fraction,
    imprint_bins_of,
    reconstruct_from_update,
)
from privfl.config import Scenario
from privfl.data import load_federation
from privfl.evaluation.imprint import evaluate_imprint
from privfl.runner import resolve
from privfl.training import TrainConfig, resolve_device, round_batch_data, train_local


def imprint_trial(scenario: Scenario) -> dict[str, Any]:
    """Rig, train every party one round, aggregate, reconstruct and score."""
    # The attack round's hyper-parameters (the server's own local steps / batch size).
    scenario = attack_round_scenario(scenario)
    fed = load_federation(scenario)
    model = build_model(scenario, fed.num_classes)
    info = model.info
    keys = (info.weight_key, info.bias_key)
    sent = {k: v.detach().clone() for k, v in model.state_dict().items()}
    aggregate = {k: torch.zeros(sent[k].shape, dtype=torch.float64) for k in keys}
    total_weight = 0
    device = resolve_device("cpu")
    config = TrainConfig.from_scenario(scenario)
    for party in range(scenario.data.parties):
        model.load_state_dict(sent)
        data = fed.parties[party].train
        train_local(model, data, config, party=party, server_round=1, device=device)
        new = model.state_dict()
        for k in keys:
            aggregate[k] += len(data) * (new[k].double() - sent[k].double())
        total_weight += len(data)
    aggregate = {k: v / total_weight for k, v in aggregate.items()}
    recon = reconstruct_from_update(aggregate, info)
    used = torch.cat(
        [round_batch_data(scenario, p, 1).images for p in range(scenario.data.parties)]
    )
    truth = torch.unique(used.flatten(1), dim=0).reshape(-1, *used.shape[1:])
    bins = imprint_bins_of(scenario)
    report = evaluate_imprint(
        recon.images,
        truth,
        scenario=scenario,
        role="malicious-server",
        bins=bins,
        expected=expected_fraction(len(truth), bins),
        seconds=recon.seconds,
        collisions=recon.collisions,
    )
    return {
        "seed": scenario.scenario.seed,
        "steps": scenario.training.local_steps,
        "bins": bins,
        "samples": len(truth),
        "expected_fraction": report.metrics["expected_fraction"],
        "recovered": report.recovered,
        "returned": int(recon.images.shape[0]),
        "collisions": recon.collisions,
        "psnr_mean": report.metrics["psnr_mean"],
        "ssim_mean": report.metrics["ssim_mean"],
        "seconds": recon.seconds,
    }


def imprint_bench_rows(
    scenario: str | Scenario = "imprint_secagg",
    *,
    seeds: int = 20,
    steps: Iterable[int] = (2, 5),
    overrides: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Rows for ``privfl bench seed``: the scenario's seed, a ``seeds``-seed fraction
    summary (``kind = "seeds"``), and one row per extra local-step count.

    Parameters
    ----------
    scenario : str or Scenario
        A shipped scenario name, a path, or a resolved scenario.
    seeds : int
        Seeds ``0 .. seeds-1`` for the fraction check (0 skips it).
    steps : Iterable[int]
        Local step counts to measure the degradation at (same batches, same bins).
    overrides : Sequence[str]
        ``section.key=value`` overrides applied first.
    """
    base = resolve(scenario, overrides)
    bins = imprint_bins_of(base)
    rows = [{"kind": "scenario", **imprint_trial(base)}]
    if seeds:
        trials = [imprint_trial(base.replace([f"scenario.seed={s}"])) for s in range(seeds)]
        fractions = [t["recovered"] / t["samples"] for t in trials]
        rows.append(
            {
                "kind": "seeds",
                "seeds": seeds,
                "bins": bins,
                "samples": trials[0]["samples"],
                "expected_fraction": trials[0]["expected_fraction"],
                "measured_fraction": statistics.mean(fractions),
                "measured_fraction_std": statistics.stdev(fractions) if seeds > 1 else 0.0,
                "all_recovered_seeds": sum(t["recovered"] == t["samples"] for t in trials),
                "seconds_max": max(t["seconds"] for t in trials),
                "per_seed": fractions,
            }
        )
    for n in steps:
        key = "attack.imprint" if base.attack.imprint.local_steps else "training"
        trial = imprint_trial(
            base.replace([f"{key}.local_steps={n}", f"attack.imprint.bins={bins}"])
        )
        rows.append({"kind": "steps", **trial})
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="privfl bench imprint", description=__doc__)
    p.add_argument("scenario", nargs="?", default="imprint_secagg")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--steps", type=int, nargs="*", default=[2, 5])
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = imprint_bench_rows(args.scenario, seeds=args.seeds, steps=args.steps, overrides=args.set)
    head = f"{'row':<10} {'steps':>5} {'bins':>5} {'N':>4} {'expected':>8} {'measured':>8}"
    print(f"privfl bench imprint — {args.scenario}")
    print(f"{head} {'PSNR':>6} {'SSIM':>5} {'coll.':>5} {'recon s':>7}")
    for r in rows:
        if r["kind"] == "seeds":
            print(
                f"{'20 seeds' if r['seeds'] == 20 else str(r['seeds']) + ' seeds':<10} "
                f"{1:>5} {r['bins']:>5} {r['samples']:>4} {r['expected_fraction']:>8.3f} "
                f"{r['measured_fraction']:>8.3f} (std {r['measured_fraction_std']:.3f}, "
                f"all recovered in {r['all_recovered_seeds']}/{r['seeds']}, "
                f"max {r['seconds_max']:.2f} s)"
            )
            print("  per seed: " + " ".join(f"{f:.2f}" for f in r["per_seed"]))
            continue
        measured = r["recovered"] / r["samples"]
        print(
            f"{r['kind']:<10} {max(r['steps'], 1):>5} {r['bins']:>5} {r['samples']:>4} "
            f"{r['expected_fraction']:>8.3f} {measured:>8.3f} {r['psnr_mean']:>6.1f} "
            f"{r['ssim_mean']:>5.3f} {r['collisions']:>5} {r['seconds']:>7.3f}"
        )
    return 0
