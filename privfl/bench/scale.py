"""privfl bench scale: how a round's cost grows with the number of parties.

For n parties (every party in a round up to 100, then 100 sampled per round) and each
method — plain FedAvg, additive and masking secure aggregation, masking+dp
(masking with automatic O(log n) neighbours and distributed DP) and flower-secagg+
(Flower's own SecAgg+ workflow, legacy API, on the same parties, model and data) — it
runs one warm-up round and --rounds measured training rounds of the
thousand_clinics model, data and training (small CNN, 8 samples per party, 5 local
epochs) and reports per row:

- round_seconds: median wall time of a measured round (train and secure sum; no
  evaluation);
- party_seconds: mean ClientApp time per party per round (all of its messages);
- server_seconds: median time per round in the strategy, outside the grid's calls;
- bytes_per_party: mean serialised bytes a party of the round sends per round;
- peak_memory_bytes: peak resident memory (the kernel's VmHWM, reset before each row)
  of this process, which holds the server and every simulated party: an upper bound on
  the server's.

The federation runs in-process on privfl's LoopbackGrid (real messages, mods and
serialised records, no Ray): Flower's Ray engine spends minutes
starting 1,000 SuperNodes on a 2-core machine, which would swamp the protocol's cost.
The round time includes the grid's copying and serialisation of every message (what a
transport would also pay); it is neither party nor server time. Each row starts from a
collected heap frozen out of the garbage collector's reach (``gc.freeze``), so that a
row's full collections scan its own objects, not the interpreter's and the earlier rows'.

One file: privfl's federation and its Flower SecAgg+ twin are built from the same
scenario and timed by the same grid and row, so the table compares like with like.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import resource
import statistics
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters
from flwr.server import ServerConfig
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from privfl.architecture import build_model
from privfl.clients.app import make_client_app
from privfl.clients.policy import simulation_roster
from privfl.config import SCENARIO_KEY, Scenario
from privfl.data import load_federation
from privfl.errors import UserError
from privfl.flower.loopback import LoopbackGrid
from privfl.results import atomic_write_text
from privfl.runner import resolve
from privfl.strategies.factory import build_strategy
from privfl.training import train_local

METHODS = ("plain", "additive", "masking", "masking+dp", "flower-secagg+")
PARTIES = (10, 30, 100, 300, 1000)
PER_ROUND = 100
# Additive sharing sends every other party of the round a share of the whole update:
# n·d words per party, so beyond this many parties per round it only measures copying.
ADDITIVE_MAX = 30
ADDITIVE_WHY = (
    f"additive: not run above {ADDITIVE_MAX} parties per round: each party sends a share "
    "of its whole update to every other party of the round (n x the model per party per "
    "round), which masking does with one masked update plus O(log n) self-mask shares"
)
FLOWER_FEW = "flower-secagg+: not run below 3 parties per round (SecAgg+ needs num_shares > 2)"
SECRET = bytes(range(32))  # the simulated parties' lab secret: fixed, so reruns agree


@dataclass(frozen=True)
class Row:
    """One line of ``scale.json``."""

    method: str
    parties: int
    per_round: int
    round_seconds: float
    party_seconds: float
    server_seconds: float
    bytes_per_party: float
    peak_memory_bytes: int


class TimedGrid(LoopbackGrid):
    """A LoopbackGrid that adds up the ClientApp's seconds and its own."""

    def __init__(self, app: Callable[[Message, Context], Message], partitions: dict[int, int]):
        self.app_seconds = 0.0
        self.grid_seconds = 0.0

        def timed(msg: Message, context: Context) -> Message:
            t0 = time.perf_counter()
            try:
                return app(msg, context)
            finally:
                self.app_seconds += time.perf_counter() - t0

        super().__init__(timed, partitions)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201 - Grid API
        t0 = time.perf_counter()
        try:
            return super().send_and_receive(messages, timeout=timeout)
        finally:
            self.grid_seconds += time.perf_counter() - t0


def per_round(n: int) -> int:
    """Parties asked per round: all of them up to 100, then 100."""
    return n if n <= PER_ROUND else PER_ROUND


def scenario_for(method: str, n: int, rounds: int, overrides: list[str]) -> Scenario:
    """The thousand_clinics scenario with ``n`` parties and ``method``'s defense."""
    k = per_round(n)
    protocol, dp = {
        "plain": ("none", "none"),
        "additive": ("additive", "none"),
        "masking": ("masking", "none"),
        "masking+dp": ("masking", "distributed"),
        "flower-secagg+": ("none", "none"),
    }[method]
    sets = [
        f"data.parties={n}",
        f"scenario.parties_per_round={0 if k == n else k}",
        f"scenario.rounds={rounds}",
        "scenario.dropout_rate=0.0",
        "scenario.device='cpu'",
        "data.server_test_samples=100",
        f"defense.secure_aggregation='{protocol}'",
        f"defense.secagg.auto_neighbours={'true' if protocol == 'masking' else 'false'}",
        f"defense.dp.mode='{dp}'",
        *overrides,
    ]
    return resolve("thousand_clinics", sets)


def _reset_peak() -> None:
    # Not Linux, or not allowed: the peak is then the process's so far.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB else
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class _Marks(NamedTuple):
    """Counters read at a round's start or end."""

    wall: float
    app: float
    grid: float
    up: int


def _summarise(method: str, n: int, k: int, rounds: list[tuple[_Marks, _Marks]], peak: int) -> Row:
    walls, apps, servers, ups = [], [], [], []
    for a, b in rounds[1:]:  # the first round warms up
        walls.append(b.wall - a.wall)
        apps.append((b.app - a.app) / k)
        servers.append(b.wall - a.wall - (b.grid - a.grid))
        ups.append((b.up - a.up) / k)
    return Row(
        method=method,
        parties=n,
        per_round=k,
        round_seconds=statistics.median(walls),
        party_seconds=float(np.mean(apps)),
        server_seconds=statistics.median(servers),
        bytes_per_party=float(np.mean(ups)),
        peak_memory_bytes=peak,
    )


def _mark(grid: TimedGrid) -> _Marks:
    up = sum(grid.bytes_up.values())
    return _Marks(time.perf_counter(), grid.app_seconds, grid.grid_seconds, up)


def run_privfl(method: str, n: int, measured: int, overrides: list[str]) -> Row:
    """One row for a privfl method: warm-up plus ``measured`` training rounds."""
    sc = scenario_for(method, n, measured + 1, overrides)
    nodes = {100 + p: p for p in range(n)}
    fed = load_federation(sc)
    _reset_peak()
    grid = TimedGrid(make_client_app(sc, secret=SECRET), nodes)
    # The server holds the public roster, as privfl run hands it: no key registration.
    strategy = build_strategy(sc, nodes, roster=simulation_roster(n, SECRET))
    arrays = ArrayRecord(build_model(sc, fed.num_classes).state_dict())
    cfg = ConfigRecord({SCENARIO_KEY: sc.to_json()})
    marks = []
    for rnd in range(1, measured + 2):
        start = _mark(grid)
        replies = grid.send_and_receive(strategy.configure_train(rnd, arrays, cfg, grid))
        new, _ = strategy.aggregate_train(rnd, replies)
        marks.append((start, _mark(grid)))
        if new is None:
            raise RuntimeError(f"{method}, {n} parties: round {rnd} released no model")
        arrays = new
    if grid.errors:
        raise RuntimeError(grid.errors[0].splitlines()[0])
    return _summarise(method, n, per_round(n), marks, _peak_bytes())


def flower_graph(n: int, overrides: list[str]) -> tuple[int, int]:
    """SecAgg+'s ``num_shares`` and threshold for the graph privfl's masking uses at n.

    Flower counts the party itself among its shares and wants an odd number; a party of
    privfl's graph has ``neighbours`` others (0: all), with a threshold of 2/3 + 1.
    """
    k = per_round(n)
    neighbours = scenario_for("masking", n, 2, overrides).defense.secagg.neighbours
    shares = k if neighbours == 0 or neighbours + 1 >= k else neighbours + 1 + (neighbours % 2)
    return shares, min(shares - 1, (2 * shares) // 3 + 1)


def run_flower_secaggplus(n: int, measured: int, overrides: list[str]) -> Row:
    """One row for Flower's SecAgg+ workflow over the same parties, model and data."""
    sc = scenario_for("flower-secagg+", n, measured + 1, overrides)
    fed = load_federation(sc)
    k = per_round(n)
    device = torch.device("cpu")

    class Clinic(NumPyClient):
        """The same honest local training as privfl's party, as a NumPyClient."""

        def __init__(self, party: int, rnd: int) -> None:
            self.party, self.rnd = party, rnd

        def fit(self, parameters, config):  # noqa: ANN001 - NumPyClient API
            model = build_model(sc, fed.num_classes)
            keys = list(model.state_dict())
            model.load_state_dict(
                {k: torch.from_numpy(v) for k, v in zip(keys, parameters, strict=True)}
            )
            data = fed.parties[self.party].train
            train_local(model, data, sc, party=self.party, server_round=self.rnd, device=device)
            out = [v.detach().cpu().numpy() for v in model.state_dict().values()]
            return out, len(data), {}

    def client_fn(context: Context):
        return Clinic(int(context.node_config["partition-id"]), current[0]).to_client()

    nodes = {100 + p: p for p in range(n)}
    _reset_peak()
    grid = TimedGrid(ClientApp(client_fn=client_fn, mods=[secaggplus_mod]), nodes)
    current = [0]
    marks: list[tuple[_Marks, _Marks]] = []

    class Timed(LegacyFedAvg):
        def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001
            current[0] = server_round
            marks.append((_mark(grid), _mark(grid)))
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001
            out = super().aggregate_fit(server_round, results, failures)
            marks[-1] = (marks[-1][0], _mark(grid))
            if failures:
                raise RuntimeError(f"flower-secagg+: {len(failures)} parties failed")
            return out

    model = build_model(sc, fed.num_classes)
    initial = [v.detach().numpy() for v in model.state_dict().values()]
    strategy = Timed(
        fraction_fit=k / n,
        fraction_evaluate=0.0,
        min_fit_clients=k,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters(initial),
    )
    ctx = LegacyContext(
        Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=measured + 1),
        strategy=strategy,
    )
    shares, threshold = flower_graph(n, overrides)
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold)
    )
    workflow(grid, ctx)
    if grid.errors:
        raise RuntimeError(grid.errors[0].splitlines()[0])
    if len(marks) != measured + 1:
        raise RuntimeError(f"flower-secagg+: {len(marks)} of {measured + 1} rounds ran")
    return _summarise("flower-secagg+", n, k, marks, _peak_bytes())


def measure(method: str, n: int, measured: int, overrides: list[str]) -> Row:
    """One row of the table."""
    if method == "flower-secagg+":
        return run_flower_secaggplus(n, measured, overrides)
    return run_privfl(method, n, measured, overrides)


def skipped(method: str, n: int) -> str | None:
    """Why ``method`` is not run at ``n`` parties, or None."""
    if method == "additive" and per_round(n) > ADDITIVE_MAX:
        return ADDITIVE_WHY
    if method == "flower-secagg+" and per_round(n) < 3:
        return FLOWER_FEW
    return None


@dataclass(frozen=True)
class Slopes:
    """Two straight-line fits of a method's per-party cost against the round's parties."""

    method: str
    span: tuple[int, int]
    overhead: bool  # fitted to the cost above plain FedAvg's at the same n
    log2_slope: float  # seconds per doubling of n
    log2_r2: float
    n_slope: float  # seconds per extra party
    n_r2: float


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    slope, icpt = np.polyfit(x, y, 1)
    total = float(((y - y.mean()) ** 2).sum())
    resid = float(((y - (slope * x + icpt)) ** 2).sum())
    return float(slope), (1.0 - resid / total) if total > 0 else 1.0


def slopes(rows: list[Row], method: str = "masking") -> Slopes | None:
    """Fit ``method``'s party seconds against log2 n and against n, over the rows where
    every party takes part in every round (a sampled round mixes in the parties' first
    participation). Where plain FedAvg ran at the same n, the fit is to the cost above it
    (the secure-aggregation work, without the training every party does)."""
    plain = {r.parties: r.party_seconds for r in rows if r.method == "plain"}
    mine = [r for r in rows if r.method == method and r.per_round == r.parties]
    overhead = bool(mine) and all(r.parties in plain for r in mine)
    pts = [(r.per_round, r.party_seconds - (plain[r.parties] if overhead else 0.0)) for r in mine]
    if len({k for k, _ in pts}) < 2:
        return None
    ks = np.array([k for k, _ in pts], float)
    ys = np.array([y for _, y in pts], float)
    log_slope, log_r2 = _fit(np.log2(ks), ys)
    lin_slope, lin_r2 = _fit(ks, ys)
    span = (int(ks.min()), int(ks.max()))
    return Slopes(method, span, overhead, log_slope, log_r2, lin_slope, lin_r2)


def _parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"{what}: empty list")
    return items


def parse_parties(text: str) -> list[int]:
    """``--parties 10,30,100`` -> [10, 30, 100]."""
    out = []
    for t in _parse_list(text, "--parties"):
        if not t.isdigit() or int(t) < 2:
            raise UserError(f"--parties: {t!r} is not a number of parties >= 2")
        out.append(int(t))
    return out


def parse_methods(text: str) -> list[str]:
    """``--methods plain,masking`` -> ["plain", "masking"], each one of METHODS."""
    out = _parse_list(text, "--methods")
    for m in out:
        if m not in METHODS:
            raise UserError(f"--methods: unknown method {m!r}; one of {', '.join(METHODS)}")
    return out


def peers(method: str, n: int, overrides: list[str]) -> int | None:
    """How many other parties of the round a party's secure-aggregation work involves."""
    k = per_round(n)
    if method == "flower-secagg+":
        return flower_graph(n, overrides)[0] - 1
    if method == "additive":
        return k - 1
    if method.startswith("masking"):
        return scenario_for(method, n, 2, overrides).defense.secagg.neighbours or k - 1
    return None


def _print_row(r: Row, n_peers: int | None, plain: float | None) -> None:
    ratio = "-" if plain is None or r.method == "plain" else f"{r.round_seconds / plain:.2f}"
    print(
        f"{r.parties:>6} {r.per_round:>6} {'-' if n_peers is None else n_peers:>5} "
        f"{r.method:<15} {r.round_seconds:>9.3f} {ratio:>7} "
        f"{r.party_seconds * 1e3:>10.1f} {r.server_seconds:>9.3f} "
        f"{r.bytes_per_party / 1024:>10.1f} {r.peak_memory_bytes / 2**20:>9.0f}",
        flush=True,
    )


def run(
    parties: list[int], methods: list[str], measured: int, overrides: list[str]
) -> tuple[list[Row], list[str]]:
    """Measure every (method, n) that runs; returns the rows and why others did not."""
    rows: list[Row] = []
    notes: list[str] = []
    print(
        f"{'n':>6} {'/round':>6} {'peers':>5} {'method':<15} {'round s':>9} {'x plain':>7} "
        f"{'party ms':>10} "
        f"{'server s':>9} {'KiB/party':>10} {'peak MiB':>9}",
        flush=True,
    )
    for n in parties:
        for method in methods:
            why = skipped(method, n)
            if why is not None:
                if why not in notes:
                    notes.append(why)
                continue
            # A full collection in a row then scans that row's objects only, not the
            # interpreter's and earlier rows' (hundreds of thousands, 0.2 s a scan).
            gc.collect()
            gc.freeze()
            try:
                row = measure(method, n, measured, overrides)
            except UserError:
                raise
            except Exception as exc:  # report, keep measuring the others
                note = f"{method} at n = {n} failed: {type(exc).__name__}: {exc}"[:300]
                notes.append(note)
                print(f"{n:>6} {per_round(n):>6} {'':>5} {method:<15} failed", flush=True)
                continue
            finally:
                gc.unfreeze()
            rows.append(row)
            plain = next(
                (r.round_seconds for r in rows if r.method == "plain" and r.parties == n), None
            )
            _print_row(row, peers(method, n, overrides), plain)
    return rows, notes


def report_slopes(rows: list[Row]) -> list[str]:
    """Lines on the masking methods' per-party cost against log2 n and against n."""
    lines = []
    for method in ("masking", "masking+dp"):
        s = slopes(rows, method)
        if s is None:
            continue
        what = "party seconds above plain FedAvg's" if s.overhead else "party seconds"
        lines.append(
            f"{method}, {what} against the round's parties ({s.span[0]}..{s.span[1]}): "
            f"{s.log2_slope * 1e3:+.2f} ms per doubling of n (fit on log2 n, "
            f"R² {s.log2_r2:.2f}); {s.n_slope * 1e3:+.4f} ms per extra party (fit on n, "
            f"R² {s.n_r2:.2f})"
        )
    for method in ("masking", "masking+dp"):
        sampled = sorted((r.parties, r.party_seconds) for r in rows if r.method == method)
        sampled = [(n, sec) for n, sec in sampled if per_round(n) == PER_ROUND]
        if len(sampled) > 1:
            cells = ", ".join(f"{n}: {sec * 1e3:.1f}" for n, sec in sampled)
            lines.append(f"{method}, party ms at {PER_ROUND} per round by n ({cells})")
    return lines


def main(argv: list[str]) -> int:
    """Run the benchmark, print the table and write ``--out``; returns the exit status."""
    ap = argparse.ArgumentParser(
        prog="privfl bench scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.fill(
            f"{ADDITIVE_WHY}. flower-secagg+ runs Flower's SecAggPlusWorkflow (legacy API: a "
            "NumPyClient doing privfl's local training) with as many shares per party as "
            "privfl's masking graph has neighbours at the same n.",
            88,
        ),
    )
    ap.add_argument(
        "--parties",
        default=",".join(map(str, PARTIES)),
        help="n, comma-separated (default: %(default)s)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="measured rounds after 1 warm-up (default: %(default)s)",
    )
    ap.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated (default: %(default)s)"
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a key of the thousand_clinics scenario (repeatable)",
    )
    ap.add_argument("--out", type=Path, help="write DIR/scale.json")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        raise UserError(f"--rounds: must be >= 1, got {args.rounds}")
    parties, methods = parse_parties(args.parties), parse_methods(args.methods)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # Validate the overrides once, before any row runs.
    scenario_for("plain", parties[0], args.rounds + 1, args.set)
    print(
        f"privfl bench scale — thousand_clinics model and data, {args.rounds} measured "
        f"round(s) after 1 warm-up, in-process LoopbackGrid (no Ray)"
    )
    rows, notes = run(parties, methods, args.rounds, args.set)
    print(
        "round s: median wall time of a measured round; x plain: that over plain FedAvg's "
        "round at the same n in this run; party ms: ClientApp time per party "
        "per round; server s: strategy time outside the grid; KiB/party: bytes a party "
        "sends per round; peak MiB: peak resident memory of this process (VmHWM), server "
        "and simulated parties together"
    )
    for line in report_slopes(rows):
        print(line)
    for note in notes:
        print(note)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        text = json.dumps([asdict(r) for r in rows], indent=2) + "\n"
        atomic_write_text(args.out / "scale.json", text)
        print(f"wrote {args.out / 'scale.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
