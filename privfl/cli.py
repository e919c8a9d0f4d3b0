"""The ``privfl`` command line."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tomllib
from pathlib import Path

from privfl.config import ScenarioError, scenario_dir

BENCH_SUITES = {
    "spine": "privfl.bench.spine",
    "secagg": "privfl.bench.secagg",
    "dp": "privfl.bench.dp",
    "seed": "privfl.bench.seed",
    "inversion": "privfl.bench.inversion",
    "imprint": "privfl.bench.imprint",
    "membership": "privfl.bench.membership",
    "audit": "privfl.bench.audit",
}


def _cmd_run(args: argparse.Namespace) -> int:
    from privfl.runner import resolve, run_scenario

    scenario = resolve(args.scenario, args.set)
    out = Path(args.out or Path("runs") / scenario.scenario.name)
    results = run_scenario(scenario, out, verbose=args.verbose)
    final = results.get("final", {})
    acc = final.get("accuracy")
    print(
        f"{scenario.scenario.name}: final accuracy {'–' if acc is None else f'{acc:.2%}'}", end=""
    )
    if final.get("epsilon") is not None:
        print(f", ε = {final['epsilon']:.3g} (δ = {final['delta']})", end="")
    print()
    for a in results.get("attacks", []):
        m = a["metrics"]
        extra = ", ".join(
            f"{k} {v:.3g}"
            for k, v in m.items()
            if isinstance(v, float)
            and k in ("psnr_mean", "auc", "ssim_mean", "tpr_at_1pct_fpr", "precision")
        )
        print(
            f"  {a['name']} [{a['role']} → {a['target']}]: recovered "
            f"{a['recovered']}/{a['total']}" + (f" ({extra})" if extra else "")
        )
    print(f"results: {out / 'results.json'}\nreport:  {out / 'report.md'}")
    return 0


def _cmd_scenarios(args: argparse.Namespace) -> int:
    for path in sorted(scenario_dir().glob("*.toml")):
        try:
            desc = tomllib.loads(path.read_text()).get("scenario", {}).get("description", "")
        except tomllib.TOMLDecodeError as exc:
            desc = f"(invalid TOML: {exc})"
        print(f"{path.stem:<28} {desc}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from privfl.report import render_report

    print(render_report(args.dir))
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from privfl.secagg.identity import generate_identity, public_identity, save_roster

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    roster = {}
    for p in range(args.parties):
        key = generate_identity()
        roster[p] = public_identity(key)
        path = out / f"party-{p}.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key.hex())
    save_roster(out / "roster.json", roster)
    print(
        f"wrote {args.parties} identity keys (party-<i>.key, keep each with its party only) "
        f"and roster.json (give it to every party) to {out}"
    )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCH_SUITES[args.suite])
    return int(module.main(args.rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="privfl", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a scenario on Flower's simulation engine")
    run.add_argument(
        "scenario",
        nargs="?",
        default=None,
        help="scenario file or shipped name (default: three_hospitals)",
    )
    run.add_argument("--out", help="output folder (default: runs/<scenario name>)")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a scenario value (repeatable)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="show Flower's logs")
    run.set_defaults(func=_cmd_run)

    sc = sub.add_parser("scenarios", help="list the shipped scenarios")
    sc.set_defaults(func=_cmd_scenarios)

    rep = sub.add_parser("report", help="re-render report.md from a run folder")
    rep.add_argument("dir")
    rep.set_defaults(func=_cmd_report)

    keys = sub.add_parser(
        "keys", help="make identity keys and the roster for a deployed federation"
    )
    keys.add_argument("--parties", type=int, required=True, help="number of parties")
    keys.add_argument("--out", required=True, help="folder for party-<i>.key and roster.json")
    keys.set_defaults(func=_cmd_keys)

    bench = sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCH_SUITES))
    bench.add_argument("suite", choices=sorted(BENCH_SUITES))
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options for the suite")
    bench.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ScenarioError, FileNotFoundError) as exc:
        print(f"privfl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
