"""``privfl bench spine``: wall time of the default scenario, start-up vs rounds.

``--engine deployment`` runs the same scenario on both engines, one after the other, and
prints their round times side by side, then where a deployment-engine round goes: each
exchange of the round (the ClientApp's work and the moving of messages, for the slowest
party), the rest (the server's aggregation and evaluation, and the polling between),
and what Flower's default ClientApp isolation would add (a process, with its imports,
per message).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from privfl.deployment import DeploymentRun, run_deployment
from privfl.runner import resolve, run_scenario


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _simulation_rows(t: dict[str, Any]) -> list[tuple[str, float]]:
    per_round = t["per_round_seconds"]
    return [
        ("total wall time", t["total_seconds"]),
        ("start-up (Ray, actors, parties connect)", t["startup_seconds"]),
        ("rounds (sum)", sum(per_round)),
        ("round 1 (first training in each actor)", per_round[0] if per_round else float("nan")),
        ("later rounds (median)", _median(per_round[1:])),
        ("teardown and reporting", t["total_seconds"] - t["startup_seconds"] - sum(per_round)),
    ]


def exchanges(timings: Path) -> dict[int, dict[str, dict[str, float]]]:
    """Per round and message type: the exchange's span and its slowest party's phases.

    Read from the ClientApp runners' JSON lines (``privfl.node``); evaluate messages
    carry no round, so each joins the round of the train message before it.
    """
    rows: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(timings.glob("clientapp-*.jsonl")):
        current = 0
        for line in path.read_text().splitlines():
            task = json.loads(line)
            if task.get("round"):
                current = int(task["round"])
            if "app" in task and current > 0:
                rows[(current, task["type"].removeprefix("train.privfl_"))].append(task)
    out: dict[int, dict[str, dict[str, float]]] = defaultdict(dict)
    for (rnd, kind), tasks in rows.items():
        out[rnd][kind] = {
            "span": max(t["end"] for t in tasks) - min(t["start"] for t in tasks),
            "app": max(t["app"] for t in tasks),
            "transfer": max(t["pull"] + t["push"] for t in tasks),
        }
    return dict(out)


def import_seconds() -> float:
    """Wall time of a fresh Python that imports privfl's ClientApp (what Flower's default
    isolation pays for every message: it starts a ``flwr-clientapp`` process per message)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import privfl.clients.app"], check=True)
    return time.perf_counter() - t0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="privfl bench spine", description=__doc__)
    p.add_argument("scenario", nargs="?", default="three_hospitals")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument(
        "--engine",
        choices=("simulation", "deployment"),
        default="simulation",
        help="deployment: run on both engines and compare (default: simulation only)",
    )
    args = p.parse_args(argv)

    scenario = resolve(args.scenario, args.set)
    with tempfile.TemporaryDirectory() as tmp:
        res = run_scenario(scenario, Path(tmp) / "run", progress=False)
        if args.engine == "deployment":
            timings = Path(tmp) / "timings"
            timings.mkdir()
            report = DeploymentRun()
            dep = run_deployment(scenario, Path(tmp) / "deployed", report=report, timings=timings)
            stages = exchanges(timings)
    t = res["timing"]
    print(
        f"privfl bench spine — {res['scenario']}, {len(t['per_round_seconds'])} rounds, "
        f"final accuracy {res['final']['accuracy']:.2%}"
    )
    if args.engine == "simulation":
        print(f"{'phase':<42} {'seconds':>9}")
        for name, sec in _simulation_rows(t):
            print(f"{name:<42} {sec:>9.2f}")
        return 0
    _print_comparison(res, dep, report.seconds, stages)
    return 0


def _print_comparison(
    sim: dict[str, Any],
    dep: dict[str, Any],
    engine_seconds: dict[str, float],
    stages: dict[int, dict[str, dict[str, float]]],
) -> None:
    ts, td = sim["timing"], dep["timing"]
    rs, rd = ts["per_round_seconds"], td["per_round_seconds"]
    print(f"deployment engine: final accuracy {dep['final']['accuracy']:.2%}")
    nan = float("nan")
    run = engine_seconds.get("run", nan)
    rows: list[tuple[str, float | None, float]] = [
        ("start SuperLink, SuperNodes, ClientApp runners", None, engine_seconds.get("start", nan)),
        ("flwr run: submit, start the ServerApp", None, run - td["total_seconds"]),
        ("start-up (Ray, actors, parties connect)", ts["startup_seconds"], td["startup_seconds"]),
        ("round 1", rs[0] if rs else nan, rd[0] if rd else nan),
        ("later rounds (median)", _median(rs[1:]), _median(rd[1:])),
        (
            "teardown and reporting",
            ts["total_seconds"] - ts["startup_seconds"] - sum(rs),
            td["total_seconds"] - td["startup_seconds"] - sum(rd),
        ),
        ("stop every process", None, engine_seconds.get("stop", nan)),
    ]
    print(f"{'phase':<48} {'simulation':>10} {'deployment':>10}")
    for name, a, b in rows:
        a_text = "" if a is None else f"{a:.2f}"
        print(f"{name:<48} {a_text:>10} {b:>10.2f}")
    later = _median(rd[1:]) if len(rd) > 1 else (rd[0] if rd else float("nan"))
    base = _median(rs[1:]) if len(rs) > 1 else (rs[0] if rs else float("nan"))
    print(f"deployment round / simulation round (later rounds): {later / base:.2f}×")
    print("\nwhere a deployment-engine round goes (median over rounds after the first):")
    kinds = sorted({k for r in stages.values() for k in r})
    print(f"  {'exchange':<20} {'span':>8} {'ClientApp':>10} {'messages':>9}")
    later_rounds = [r for r in sorted(stages) if r > 1] or sorted(stages)
    spent = 0.0
    for kind in kinds:
        vals = [stages[r][kind] for r in later_rounds if kind in stages[r]]
        if not vals:
            continue
        span = _median([v["span"] for v in vals])
        spent += span
        print(
            f"  {kind:<20} {span:>8.2f} {_median([v['app'] for v in vals]):>10.2f} "
            f"{_median([v['transfer'] for v in vals]):>9.2f}"
        )
    print(
        f"  {'server and polling':<20} {later - spent:>8.2f}   (aggregation, central "
        "evaluation, waits between polls)"
    )
    per_round = _median([len(stages[r]) for r in later_rounds])
    cost = import_seconds()
    print(
        f"\nClientApp processes: one per party for the whole run. Flower's default "
        f"isolation starts one per message ({per_round:.0f} exchanges per round here), each "
        f"importing torch and privfl: {cost:.2f} s measured now, up to "
        f"{per_round * cost:.1f} s more per round, on top of up to 3 s of idle polling per "
        "exchange (SuperNode and ServerApp) and 1 s object-pull retries."
    )
