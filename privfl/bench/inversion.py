"""Gradient-inversion rows for ``privfl bench seed``: recovery and CPU time per scenario.

Each (scenario, seed) is run end to end in-process: the scenario's real server stack
(:func:`privfl.server.run_federation`: curious server ⊃ secure aggregation ⊃ FedAvg) and
the real ClientApp exchange serialised Flower messages over a
:class:`~privfl.secagg.loopback.LoopbackGrid`, so the attack inverts exactly what a
Flower run's server receives (the masked payload under secure aggregation) and the
numbers equal ``privfl run`` for the same seed; only Ray is left out. Every row is
printed beside the founding document's figure for that scenario. Usage::

    python -m privfl.bench.inversion seed_dlg_b1 seed_dlg_b7 seed_dlg_secagg \\
        --seeds 0,1,2,3,4 [--model cnn] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from privfl.config import load_scenario, resolve_scenario_path

# What the founding document reported for each shipped scenario.
FOUNDING = {
    "seed_dlg_b1": "1 of 1, reconstructed exactly",
    "seed_dlg_b7": "3 of 7",
    "seed_dlg_secagg": "nothing (0 of 7)",
}


def gradient_inversion_bench_rows(
    scenarios: list[str], seeds: list[int], overrides: list[str] | None = None
) -> list[dict[str, Any]]:
    """One row per (scenario, seed): recovered/total, PSNR, SSIM, labels, seconds."""
    from privfl.clients.app import make_client_app
    from privfl.secagg.loopback import LoopbackGrid
    from privfl.server import run_federation

    rows = []
    for name in scenarios:
        for seed in seeds:
            sc = load_scenario(
                resolve_scenario_path(name), [f"scenario.seed={seed}", *(overrides or [])]
            )
            app = make_client_app(sc)
            grid = LoopbackGrid(app, {100 + p: p for p in range(sc.data.parties)})
            with tempfile.TemporaryDirectory() as out:
                results = run_federation(grid, sc, Path(out), progress=False)
            if grid.errors:
                raise RuntimeError(f"{name} seed {seed}: parties failed: {grid.errors}")
            rep = next(a for a in results["attacks"] if a["name"] == "gradient-inversion")
            m = rep["metrics"]
            rows.append(
                {
                    "scenario": sc.scenario.name,
                    "model": sc.model.name,
                    "secure_aggregation": sc.defense.secure_aggregation,
                    "seed": seed,
                    "recovered": rep["recovered"],
                    "total": rep["total"],
                    "psnr_mean": round(m.get("psnr_mean", float("nan")), 2),
                    "psnr_max": round(m.get("psnr_max", float("nan")), 2),
                    "ssim_mean": round(m.get("ssim_mean", float("nan")), 3),
                    "label_accuracy": m.get("label_accuracy"),
                    "seconds_per_reconstruction": round(m.get("seconds", float("nan")), 1),
                    "founding_document": FOUNDING.get(sc.scenario.name, "-"),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print one JSON row per (scenario, seed), then a recovered-count summary."""
    ap = argparse.ArgumentParser(prog="privfl bench inversion")
    ap.add_argument("scenarios", nargs="+")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--model", default="", help="override model.name (e.g. cnn)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("-o", "--override", action="append", default=[])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = list(args.override) + ([f"model.name={args.model}"] if args.model else [])
    seeds = [int(s) for s in args.seeds.split(",")]
    summary: dict[str, list[str]] = {}
    for row in gradient_inversion_bench_rows(args.scenarios, seeds, overrides):
        print(json.dumps(row), flush=True)
        summary.setdefault(row["scenario"], []).append(f"{row['recovered']}/{row['total']}")
    for name, got in summary.items():
        print(
            f"{name}: recovered {', '.join(got)} on seeds {args.seeds}; "
            f"founding document: {FOUNDING.get(name, '-')}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
