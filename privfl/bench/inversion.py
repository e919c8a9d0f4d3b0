"""Gradient-inversion rows for ``privfl bench seed``: recovery and CPU time per scenario.

Each (scenario, seed) is run end to end in-process: the scenario's real server stack
(:func:`privfl.server.run_federation`: curious server ⊃ secure aggregation ⊃ FedAvg) and
the real ClientApp exchange serialised Flower messages over a
:class:`~privfl.flower.loopback.LoopbackGrid`, so the attack inverts exactly what a
Flower run's server receives (the masked payload under secure aggregation) and the
numbers equal ``privfl run`` for the same seed; only Ray is left out. Every row is
printed beside the reference figure for that scenario. Usage::

    python -m privfl.bench.inversion dlg_batch1 dlg_batch7 dlg_secagg \\
        --seeds 0,1,2,3,4 [--model cnn] [--threads 1]
    privfl bench inversion ig_cnn_b1 ig_cnn_b8 ig_fedavg ig_fedavg_secagg span_fedavg \\
        [-o attack.gradient_inversion.round=3]

The ``ig_*`` and ``span_*`` rows also carry what was measured per seed when those scenarios
were tuned (``measured``) and the CPU time of the whole run (the machine may be shared).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from privfl.clients.app import make_client_app
from privfl.config import load_scenario, resolve_scenario_path
from privfl.flower.loopback import LoopbackGrid
from privfl.server import run_federation

# The reference figure for each shipped scenario.
REFERENCE = {
    "dlg_batch1": "1 of 1, reconstructed exactly",
    "dlg_batch7": "3 of 7",
    "dlg_secagg": "nothing (0 of 7)",
    "ig_cnn_b1": "target: >= 25 dB on 4 of 5 seeds, < 60 s",
    "ig_cnn_b8": "target: >= 4 of 8 at >= 18 dB",
    "ig_fedavg": "target: >= 10 of 40 at >= 18 dB, < 10 min",
    "ig_fedavg_secagg": "target: 0 of 40",
    "span_fedavg": "target: >= 10 of 40 at >= 18 dB, < 10 min",
}

# What was measured per seed when the ig_* and span_* scenarios were tuned (2-core CPU,
# --threads 1): recovered/total, best or mean PSNR, CPU seconds of the whole run or of
# the attack alone.
MEASURED: dict[str, dict[int, str]] = {
    "ig_cnn_b1": {
        0: "1/1, 22.0 dB, run 42 s CPU",
        1: "1/1, 28.2 dB, run 40 s CPU",
        2: "1/1, 37.9 dB, run 38 s CPU",
        3: "1/1, 32.3 dB, run 39 s CPU",
        4: "1/1, 41.8 dB, run 37 s CPU",
    },
    "ig_cnn_b8": {
        0: "7/8, best 27.0 dB, run 126 s CPU",
        1: "5/8, best 24.0 dB, run 117 s CPU",
        2: "2/8, best 22.0 dB, run 115 s CPU",
        3: "8/8, best 28.3 dB, run 119 s CPU",
        4: "8/8, best 26.0 dB, run 117 s CPU",
    },
    "ig_fedavg": {0: "0/40, best 12.4 dB, labels 33/40, run 618 s CPU"},
    "span_fedavg": {
        0: "34/40, mean 22.2 dB, labels 40/40, run 135 s CPU",
        1: "21/40, mean 19.3 dB, labels 40/40, run 101 s CPU",
        2: "36/40, mean 24.8 dB, labels 40/40, run 100 s CPU",
        3: "32/40, mean 20.8 dB, labels 40/40, run 101 s CPU",
        4: "40/40, mean 31.7 dB, labels 40/40, run 111 s CPU",
    },
    # with -o attack.gradient_inversion.iterations=200: the payload is ring noise
    "ig_fedavg_secagg": {
        0: "0/40, best 6.6 dB (200 steps), 16 s CPU",
        1: "0/40, best 6.2 dB (200 steps), 16 s CPU",
        2: "0/40, best 6.3 dB (200 steps), 17 s CPU",
        3: "0/40, best 6.6 dB (200 steps), 17 s CPU",
        4: "0/40, best 6.7 dB (200 steps), 16 s CPU",
    },
}


@contextlib.contextmanager
def _run_dir(keep: Path | None, name: str, seed: int) -> Iterator[Path]:
    """``keep/<scenario>_seed<seed>`` when the run is to be kept, else a temporary folder."""
    if keep is not None:
        yield Path(keep) / f"{name}_seed{seed}"
        return
    with tempfile.TemporaryDirectory() as out:
        yield Path(out)


def gradient_inversion_bench_rows(
    scenarios: list[str],
    seeds: list[int],
    overrides: list[str] | None = None,
    keep: Path | None = None,
) -> list[dict[str, Any]]:
    """One row per (scenario, seed): recovered/total, PSNR, SSIM, labels, seconds.

    With ``keep``, each run's folder (results, report, the reconstruction grid
    ``gradient_inversion.png``) is written to ``keep/<scenario>_seed<seed>``.
    """
    rows = []
    for name in scenarios:
        for seed in seeds:
            sc = load_scenario(
                resolve_scenario_path(name), [f"scenario.seed={seed}", *(overrides or [])]
            )
            app = make_client_app(sc)
            grid = LoopbackGrid(app, {100 + p: p for p in range(sc.data.parties)})
            cpu = time.process_time()
            with _run_dir(keep, name, seed) as out:
                results = run_federation(grid, sc, out, progress=False)
            cpu = time.process_time() - cpu
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
                    # the machine may be shared: CPU time of the whole run says more
                    "cpu_seconds_run": round(cpu, 1),
                    "measured": MEASURED.get(sc.scenario.name, {}).get(seed, "-"),
                    "reference": REFERENCE.get(sc.scenario.name, "-"),
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
    ap.add_argument(
        "--keep", type=Path, default=None, help="write each run's folder under this one"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = list(args.override) + ([f"model.name={args.model}"] if args.model else [])
    seeds = [int(s) for s in args.seeds.split(",")]
    summary: dict[str, list[str]] = {}
    for row in gradient_inversion_bench_rows(args.scenarios, seeds, overrides, args.keep):
        print(json.dumps(row), flush=True)
        summary.setdefault(row["scenario"], []).append(f"{row['recovered']}/{row['total']}")
    for name, got in summary.items():
        print(
            f"{name}: recovered {', '.join(got)} on seeds {args.seeds}; "
            f"reference: {REFERENCE.get(name, '-')}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
