"""The ``privfl`` command line.

A mistake the user can fix (a bad scenario value, a missing data folder, a device that
is not there, a run folder that cannot be read) ends with ``privfl: error: ...`` and exit
code 2; ``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import tomllib
import traceback
from collections.abc import Iterator
from pathlib import Path

from privfl import __version__, progress
from privfl.config import scenario_dir
from privfl.errors import UserError
from privfl.runner import resolve

USER_ERROR_EXIT = 2

BENCH_SUITES = {
    "spine": "privfl.bench.spine",
    "secagg": "privfl.bench.secagg",
    "dp": "privfl.bench.dp",
    "seed": "privfl.bench.seed",
    "inversion": "privfl.bench.inversion",
    "imprint": "privfl.bench.imprint",
    "membership": "privfl.bench.membership",
    "audit": "privfl.bench.audit",
    "scale": "privfl.bench.scale",
}


def _cmd_run(args: argparse.Namespace) -> int:
    # matplotlib and numpy: kept off the CLI's start.
    from privfl.report import key_metrics

    # Looked up per call: tests replace privfl.runner.run_scenario.
    from privfl.runner import run_scenario

    scenario = resolve(args.scenario, args.set)
    out = Path(args.out or Path("runs") / scenario.scenario.name)
    if args.engine == "deployment":
        # Flower and torch: kept off the CLI's start.
        from privfl.deployment import run_deployment
        from privfl.strategies.factory import aggregation_strategy

        # A [strategy] the server cannot build fails here, before any process starts.
        aggregation_strategy(scenario)
        results = run_deployment(scenario, out, tls=args.tls, verbose=args.verbose)
    else:
        if args.tls:
            raise UserError("--tls: only the deployment engine has network connections")
        results = run_scenario(scenario, out, verbose=args.verbose, engine=args.engine)
    final = results.get("final", {})
    acc = final.get("accuracy")
    print(
        f"{scenario.scenario.name}: final accuracy {'–' if acc is None else f'{acc:.2%}'}", end=""
    )
    if final.get("epsilon") is not None:
        print(f", ε = {final['epsilon']:.3g} (δ = {final['delta']})", end="")
    print()
    for a in results.get("attacks", []):
        extra = ", ".join(key_metrics(a))
        print(
            f"  {a['name']} [{a['role']} → {a['target']}]: recovered "
            f"{a['recovered']}/{a['total']}" + (f" ({extra})" if extra else "")
        )
    print(f"results: {out / 'results.json'}\nreport:  {out / 'report.md'}")
    if final.get("stopped_early"):
        print(f"privfl: the run stopped early: {final['stopped_early']}", file=sys.stderr)
    if final.get("privacy_violation"):
        print(f"privfl: PRIVACY VIOLATION: {final['privacy_violation']}", file=sys.stderr)
        if scenario.audit.fail_on_violation:
            return 3
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
    # matplotlib and numpy: kept off the CLI's start.
    from privfl.report import render_report

    print(render_report(args.dir))
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    # numpy and cryptography: kept off the CLI's start.
    from privfl.results import atomic_write_private
    from privfl.secagg.identity import generate_identity, public_identity, save_roster

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    roster = {}
    for p in range(args.parties):
        key = generate_identity()
        roster[p] = public_identity(key)
        atomic_write_private(out / f"party-{p}.key", key.hex())
    save_roster(out / "roster.json", roster)
    print(
        f"wrote {args.parties} identity keys (party-<i>.key, keep each with its party only) "
        f"and roster.json (give it to every party) to {out}"
    )
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    # numpy: kept off the CLI's start.
    from privfl.sweep import parse_grid, parse_seeds, run_sweep

    result = run_sweep(
        args.scenario,
        parse_grid(args.grid),
        args.out,
        seeds=parse_seeds(args.seeds) if args.seeds else None,
        overrides=args.set,
        jobs=args.jobs,
        keep_going=not args.verbose,
    )
    print(
        f"sweep: {len(result.ran) + len(result.skipped) + len(result.failed)} cells: "
        f"{len(result.ran)} run now, {len(result.skipped)} already done"
        + (f", {len(result.failed)} failed" if result.failed else "")
    )
    for name, reason in result.failed.items():
        print(f"  failed: {name}: {reason}", file=sys.stderr)
    for path in result.files:
        print(f"  {path}")
    return 1 if result.failed else 0


def _cmd_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCH_SUITES[args.suite])
    return int(module.main(args.rest) or 0)


def _add_set(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=help
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="privfl",
        description="Privacy attacks and defenses in federated learning, on Flower. A "
        "mistake in what you asked for ends with 'privfl: error: ...' (exit code 2); -v "
        "shows the traceback.",
    )
    p.add_argument("--version", action="version", version=f"privfl {__version__}")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show tracebacks of errors, and Flower's logs",
    )
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a scenario on Flower's simulation or deployment engine")
    run.add_argument(
        "scenario",
        nargs="?",
        default=None,
        help="scenario file or shipped name (default: three_hospitals)",
    )
    run.add_argument("--out", help="output folder (default: runs/<scenario name>)")
    _add_set(run, "override a scenario value (repeatable)")
    run.add_argument(
        "--engine",
        choices=("simulation", "inprocess", "deployment"),
        default="simulation",
        help="simulation (default: Flower's simulation engine, in this process), inprocess "
        "(the same apps and messages delivered in this process without Ray: fastest for "
        "hundreds of small parties) or deployment (a local flower-superlink and one "
        "flower-supernode process per party)",
    )
    run.add_argument(
        "--tls",
        action="store_true",
        help="deployment engine: TLS with a certificate authority made for the run, and "
        "SuperNode authentication",
    )
    # SUPPRESS: `privfl -v run` keeps its -v when run's own is not given.
    run.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="as privfl -v"
    )
    run.set_defaults(func=_cmd_run)

    sw = sub.add_parser(
        "sweep",
        help="run a scenario over a grid of values and seeds; write sweep.csv and plots",
        description="Run every cell of the grid (skipping cells whose folder already holds "
        "results.json), then write sweep.csv, frontier.png (accuracy vs ε, or vs the first "
        "swept key) and attacks.png (attack success vs the first swept key) into --out.",
    )
    sw.add_argument("scenario", help="scenario file or shipped name")
    sw.add_argument(
        "--grid",
        action="append",
        default=[],
        required=True,
        metavar="SECTION.KEY=V1,V2,...",
        help="a swept key and its values (repeatable: the grid is every combination)",
    )
    sw.add_argument(
        "--seeds",
        default="",
        metavar="S1,S2,...",
        help="seeds of every cell (default: the "
        "scenario's seed); the plots show their spread as error bars",
    )
    _add_set(sw, "override applied to every cell (repeatable)")
    sw.add_argument("--out", required=True, help="the sweep's folder (one run folder per cell)")
    sw.add_argument("--jobs", type=int, default=1, help="cells run at once (default 1)")
    sw.set_defaults(func=_cmd_sweep)

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


def _user_error(exc: BaseException) -> BaseException | None:
    """The user error behind ``exc`` (itself or a cause), if any.

    OSErrors count: they name a file the user pointed at (a data root, a run folder) or
    a disk the user can free. A run that fails inside Flower is re-raised with the
    party's error as its cause.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, UserError | OSError):
            return seen
        seen = seen.__cause__
    return None


@contextlib.contextmanager
def _progress_shown() -> Iterator[None]:
    """Progress on stderr while a command runs: rich bars on a terminal, else one line per
    phase and per round (the rounds are logged to the ``privfl`` logger)."""
    before = progress.configure("auto")
    handler = None
    logger = logging.getLogger("privfl")
    level, propagate = logger.level, logger.propagate
    if progress.mode() == "plain":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("privfl: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # Ray's or Flower's root handler would print it again
    try:
        yield
    finally:
        progress.configure(before)
        if handler is not None:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


def main(argv: list[str] | None = None) -> int:
    """Run the ``privfl`` command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        with _progress_shown():
            return args.func(args)
    except KeyboardInterrupt:
        print("privfl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`privfl scenarios | head`): nothing to report. Point
        # stdout at devnull so that flushing it at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        cause = _user_error(exc)
        if cause is None:
            raise  # a bug: its traceback is what a report needs
        if args.verbose:
            traceback.print_exception(exc)
        print(f"privfl: error: {cause}", file=sys.stderr)
        if not args.verbose:
            print("(rerun with privfl -v to see the traceback)", file=sys.stderr)
        return USER_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
