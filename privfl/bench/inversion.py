"""Gradient-inversion rows for ``privfl bench seed``: recovery and CPU time per scenario.

Runs the curious server's attack without Flower: the target party's one-round update is
produced exactly as the party's ``train_local`` would, inverted with the scenario's
settings, and scored against ``round_batch_data``. Usage::

    python -m privfl.bench.inversion seed_dlg_b1 seed_dlg_b7 --seeds 0,1,2,3,4 [--model cnn]
"""

from __future__ import annotations

import argparse
import copy
import json
from typing import Any

import torch

from privfl.attacks.gradient_inversion import AttackerKnowledge, invert_update
from privfl.config import load_scenario, resolve_scenario_path
from privfl.data import load_federation
from privfl.metrics import evaluate_reconstruction
from privfl.models import INPUT_SHAPE, build_model
from privfl.training import local_steps, resolve_device, round_batch_data, train_local


def gradient_inversion_bench_rows(
    scenarios: list[str], seeds: list[int], overrides: list[str] | None = None
) -> list[dict[str, Any]]:
    """One row per (scenario, seed): recovered/total, PSNR, SSIM, labels, seconds."""
    rows = []
    for name in scenarios:
        for seed in seeds:
            sc = load_scenario(
                resolve_scenario_path(name), [f"scenario.seed={seed}", *(overrides or [])]
            )
            gi, t = sc.attack.gradient_inversion, sc.training
            fed = load_federation(sc)
            model = build_model(sc, fed.num_classes)
            party = copy.deepcopy(model)
            before = {k: v.clone() for k, v in party.state_dict().items()}
            data = fed.parties[gi.target_party].train
            train_local(
                party,
                data,
                sc,
                party=gi.target_party,
                server_round=gi.round,
                device=torch.device("cpu"),
            )
            update = {k: party.state_dict()[k] - before[k] for k in before}
            steps = local_steps(len(data), sc)
            kn = AttackerKnowledge(
                batch_size=min(len(data), steps * t.batch_size),
                labels_known=gi.labels_known,
                local_steps=steps,
                lr=t.lr,
                input_shape=INPUT_SHAPE,
                num_classes=fed.num_classes,
            )
            truth = round_batch_data(sc, gi.target_party, gi.round)
            rec = invert_update(
                model,
                update,
                kn,
                gi.method,
                iterations=gi.iterations,
                restarts=gi.restarts,
                lr=gi.lr,
                tv_weight=gi.tv_weight,
                seed=seed,
                device=resolve_device(sc.scenario.device),
                labels=truth.labels if gi.labels_known else None,
                multi_step=gi.multi_step,
                label_recovery=gi.label_recovery,
            )
            ev = evaluate_reconstruction(
                rec.images,
                rec.labels,
                truth.images[: kn.batch_size],
                truth.labels[: kn.batch_size],
                gi.recovered_psnr,
            )
            rows.append(
                {
                    "scenario": sc.scenario.name,
                    "model": sc.model.name,
                    "seed": seed,
                    "recovered": ev["recovered"],
                    "total": ev["total"],
                    "psnr_mean": round(ev["psnr_mean"], 2),
                    "psnr_max": round(ev["psnr_max"], 2),
                    "ssim_mean": round(ev["ssim_mean"], 3),
                    "label_accuracy": ev["label_accuracy"],
                    "seconds": round(rec.seconds, 2),
                    "labels": truth.labels.tolist(),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print one JSON row per (scenario, seed)."""
    ap = argparse.ArgumentParser(prog="privfl bench inversion")
    ap.add_argument("scenarios", nargs="+")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--model", default="", help="override model.name (e.g. cnn)")
    ap.add_argument("-o", "--override", action="append", default=[])
    args = ap.parse_args(argv)
    overrides = list(args.override) + ([f"model.name={args.model}"] if args.model else [])
    seeds = [int(s) for s in args.seeds.split(",")]
    for row in gradient_inversion_bench_rows(args.scenarios, seeds, overrides):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
