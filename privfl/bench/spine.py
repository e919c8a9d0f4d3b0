"""``privfl bench spine``: wall time of the default scenario, start-up vs rounds."""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="privfl bench spine", description=__doc__)
    p.add_argument("scenario", nargs="?", default="three_hospitals")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)

    from privfl.runner import run_scenario

    with tempfile.TemporaryDirectory() as tmp:
        res = run_scenario(args.scenario, Path(tmp) / "run", overrides=args.set, progress=False)
    t = res["timing"]
    per_round = t["per_round_seconds"]
    rows = [
        ("total wall time", t["total_seconds"]),
        ("start-up (Ray, actors, parties connect)", t["startup_seconds"]),
        ("rounds (sum)", sum(per_round)),
        ("round 1 (first training in each actor)", per_round[0] if per_round else float("nan")),
        (
            "later rounds (median)",
            statistics.median(per_round[1:]) if len(per_round) > 1 else float("nan"),
        ),
        ("teardown and reporting", t["total_seconds"] - t["startup_seconds"] - sum(per_round)),
    ]
    print(
        f"privfl bench spine — {res['scenario']}, {len(per_round)} rounds, "
        f"final accuracy {res['final']['accuracy']:.2%}"
    )
    print(f"{'phase':<42} {'seconds':>9}")
    for name, sec in rows:
        print(f"{name:<42} {sec:>9.2f}")
    return 0
