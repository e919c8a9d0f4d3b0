"""``privfl bench secagg``: cost of secure aggregation, measured in one run.

Round time of plain FedAvg vs ``additive`` vs ``masking`` vs Flower's own SecAgg+
workflow (legacy API), all over the same in-process Grid
(:class:`privfl.flower.loopback.LoopbackGrid`) so only protocol work differs; round
trips and bytes sent per party per round; the per-party encode + mask time for a
``d``-coordinate update, fast kernels against their slow references in the same run,
against the AES-CTR floor: one expansion of ``d`` ring words into a ready buffer, i.e.
``d * 8`` keystream bytes for a 62-bit ring (uint64 words) and ``d * 4`` for a ring of
<= 32 bits (uint32 words). Masking with 2 pairwise + 1 self mask needs 3 expansions, so
3 x floor is the least it can cost; the table prints mask() and encode + mask() against
both. With ``--scenario`` (on by default): the per-round time of the real three-hospital
Flower simulation with secure_aggregation = none, additive, masking.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters
from flwr.server import ServerConfig
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp.strategy import FedAvg

from privfl.clients.policy import make_policy_mod, simulation_policy
from privfl.clients.secagg import register_secure_aggregation, secagg_mod
from privfl.config import Scenario
from privfl.fixedpoint import FixedPointCodec
from privfl.flower.loopback import LoopbackGrid
from privfl.runner import resolve, run_scenario
from privfl.secagg import prg
from privfl.secagg.masking import MaskingParty, fresh_static_key
from privfl.strategies.secure_aggregation import SecureAggregation


def _delta(party: int, rnd: int, dim: int) -> np.ndarray:
    return np.random.default_rng(1000 * rnd + party).normal(0, 0.01, dim).astype(np.float32)


def _train(dim: int) -> Callable[[Message, Context], Message]:
    def train(msg: Message, context: Context) -> Message:
        party = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        g = msg.content["arrays"]["w"].numpy()
        local = ArrayRecord({"w": Array(g + _delta(party, rnd, dim))})
        metrics = MetricRecord({"num-examples": 100 + party, "train-loss": 1.0})
        return Message(RecordDict({"arrays": local, "metrics": metrics}), reply_to=msg)

    return train


def _message_api_run(protocol: str, n: int, dim: int, rounds: int) -> dict[str, float]:
    sc = Scenario.from_dict({"data": {"parties": n}, "defense": {"secure_aggregation": protocol}})
    policies = {p: simulation_policy(sc, p) for p in range(n)}
    # The party's guards run as in a real party: policy checks, signed keys, model binding.
    policy = make_policy_mod(lambda ctx: policies[int(ctx.node_config["partition-id"])])
    app = ClientApp()
    mods = [policy] if protocol == "none" else [policy, secagg_mod]
    app.train(mods=mods)(_train(dim))
    register_secure_aggregation(app, mods=[policy])
    nodes = {100 + i: i for i in range(n)}
    grid = LoopbackGrid(app, nodes)
    inner = FedAvg(fraction_evaluate=0.0, min_available_nodes=n, min_train_nodes=n)
    strat = (
        inner if protocol == "none" else SecureAggregation.from_scenario(inner, sc, party_of=nodes)
    )
    arrays = ArrayRecord({"w": Array(np.zeros(dim, np.float32))})
    cfg = ConfigRecord({"privfl.scenario": sc.to_json()})
    times = []
    for rnd in range(1, rounds + 1):
        before = grid.round_trips
        t0 = time.perf_counter()
        replies = grid.send_and_receive(strat.configure_train(rnd, arrays, cfg, grid))
        new, _ = strat.aggregate_train(rnd, replies)
        times.append(time.perf_counter() - t0)
        arrays = new if new is not None else arrays
        trips = grid.round_trips - before
    return {
        "first_s": times[0],
        "round_s": float(np.median(times[1:])) if rounds > 1 else times[0],
        "trips": trips,
        "up_kb": sum(grid.bytes_up.values()) / n / rounds / 1024,
    }


def _flower_secaggplus_run(n: int, dim: int, rounds: int) -> dict[str, float]:
    class Client(NumPyClient):
        def __init__(self, party: int) -> None:
            self.party = party

        def fit(self, parameters, config):  # noqa: ANN001 - NumPyClient API
            return [parameters[0] + _delta(self.party, 1, dim)], 100 + self.party, {}

        def evaluate(self, parameters, config):  # noqa: ANN001 - NumPyClient API
            return 0.0, 1, {}

    def client_fn(context: Context):  # Flower callback
        return Client(int(context.node_config["partition-id"])).to_client()

    app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
    nodes = {100 + i: i for i in range(n)}
    grid = LoopbackGrid(app, nodes)
    strategy = LegacyFedAvg(
        fraction_evaluate=0.0,
        min_available_clients=n,
        min_fit_clients=n,
        initial_parameters=ndarrays_to_parameters([np.zeros(dim, np.float32)]),
    )
    ctx = LegacyContext(
        Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=rounds),
        strategy=strategy,
    )
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=n, reconstruction_threshold=min(n - 1, (2 * n) // 3 + 1)
        )
    )
    t0 = time.perf_counter()
    workflow(grid, ctx)
    total = time.perf_counter() - t0
    if grid.errors:
        raise RuntimeError(grid.errors[0].splitlines()[0])
    # init exchange + per round: 4 SecAgg+ stages (+ evaluate sampled at fraction 0).
    return {
        "first_s": float("nan"),
        "round_s": total / rounds,
        "trips": (grid.round_trips - 1) / rounds,
        "up_kb": sum(grid.bytes_up.values()) / n / rounds / 1024,
    }


def _best(fn: Callable[[], object], reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def _kernel_timing(dim: int, n: int, reps: int, ring_bits: int) -> dict[str, float]:
    codec = FixedPointCodec(
        clip_range=4.0, frac_bits=12 if ring_bits <= 32 else 20, ring_bits=ring_bits
    )
    sks = {i: fresh_static_key() for i in range(n)}
    keys = {i: MaskingParty(i, codec, b"bench-session-01", sk).public_key for i, sk in sks.items()}
    p0 = MaskingParty(0, codec, b"bench-session-01", sks[0])
    ps = list(range(n))
    nb_keys = {j: keys[j] for j in ps if j != 0}
    x = np.random.default_rng(0).normal(0, 0.01, dim)
    seed = os.urandom(prg.SEED_BYTES)
    item = codec.dtype.itemsize
    zeros, buf = bytes(item * dim), bytearray(item * dim)

    def floor() -> None:  # the keystream alone, into a ready buffer
        prg.encryptor(seed).update_into(zeros, buf)

    def kw() -> dict:
        return {"weight": 100.0, "parties": n, "rng": np.random.default_rng(1)}

    enc = codec.encode(x, **kw())
    rnd = iter(range(1, 10_000_000))
    graph = {"parties": ps, "keys": nb_keys, "neighbours": 0, "threshold": 0}

    def mask_reference() -> None:
        seeds = p0.mask_seeds(next(rnd), nb_keys, os.urandom(prg.SEED_BYTES))
        prg.accumulate_reference(enc, seeds, ring_bits)

    def mask_kernel() -> None:
        seeds = p0.mask_seeds(next(rnd), nb_keys, os.urandom(prg.SEED_BYTES))
        prg.accumulate(np.empty_like(enc), seeds, ring_bits, base=enc)

    def encode_and_mask() -> None:  # as the client mod does: mask the encoding in place
        p0.mask(codec.encode(x, **kw()), rnd=next(rnd), overwrite=True, **graph)

    return {
        "expansions": len(nb_keys) + 1,
        "floor": _best(floor, reps),
        "floor_alloc": _best(lambda: prg.keystream(seed, item * dim), reps),
        "encode_ref": _best(lambda: codec.encode_reference(x, **kw()), reps),
        "encode": _best(lambda: codec.encode(x, **kw()), reps),
        "mask_ref": _best(mask_reference, reps),
        "mask_kernel": _best(mask_kernel, reps),
        "mask": _best(lambda: p0.mask(enc, rnd=next(rnd), **graph), reps),
        "encode_mask": _best(encode_and_mask, reps),
    }


def _scenario_rounds(overrides: list[str]) -> dict[str, dict[str, float]]:
    """Per-round seconds of the three-hospital Flower simulation per protocol."""
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="privfl-bench-secagg-") as tmp:
        for method in ("none", "additive", "masking"):
            ov = [*overrides, f"defense.secure_aggregation={method}"]
            t0 = time.perf_counter()
            res = run_scenario(
                "three_hospitals", os.path.join(tmp, method), overrides=ov, progress=False
            )
            per = res["timing"]["per_round_seconds"]
            out[method] = {
                "wall": time.perf_counter() - t0,
                "first": per[0],
                "round": float(np.median(per[1:])) if len(per) > 1 else float("nan"),
                "rounds": len(per),
                "accuracy": res["final"].get("accuracy", float("nan")),
            }
    return out


def main(argv: list[str]) -> int:
    """Run the benchmark and print a table; returns the exit status."""
    ap = argparse.ArgumentParser(prog="privfl bench secagg", description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=100_000, help="model size for round timing")
    ap.add_argument("--mask-dim", type=int, default=1_000_000, help="d for encode+mask timing")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parties", type=int, nargs="+", default=[3, 10])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--scenario",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time rounds of the three-hospital Flower simulation (none/additive/masking)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="SECTION.KEY=VALUE",
        help="override for the scenario runs (repeatable; default: scenario.rounds=3)",
    )
    args = ap.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.WARNING)

    print(f"Round time, {args.dim} parameters, median of rounds 2..{args.rounds} (in-process grid)")
    print(
        f"{'parties':>7} {'method':<16} {'round s':>9} {'x plain':>8} {'1st round s':>11} "
        f"{'trips/round':>11} {'KiB up/party':>12}"
    )
    for n in args.parties:
        plain = None
        for method in ("none", "additive", "masking", "flower-secagg+"):
            try:
                if method == "flower-secagg+":
                    r = _flower_secaggplus_run(n, args.dim, args.rounds)
                else:
                    r = _message_api_run(method, n, args.dim, args.rounds)
            except Exception as exc:  # report, keep measuring the others
                print(f"{n:>7} {method:<16} failed: {type(exc).__name__}: {exc}"[:200])
                continue
            plain = plain or r["round_s"]
            name = "plain FedAvg" if method == "none" else method
            print(
                f"{n:>7} {name:<16} {r['round_s']:>9.3f} {r['round_s'] / plain:>8.2f} "
                f"{r['first_s']:>11.3f} {r['trips']:>11.0f} {r['up_kb']:>12.1f}"
            )
    d = args.mask_dim
    print(f"\nPer-party cost, d = {d}, 3 parties (2 pairwise + 1 self mask), best of {args.reps}")
    print("  floor = one AES-256-CTR expansion of d ring words into a ready buffer;")
    print("  masking needs one expansion per mask, so (masks) x floor is its lower bound")
    for bits in (62, 32):
        m = _kernel_timing(d, 3, args.reps, bits)
        item = 8 if bits > 32 else 4
        f = m["floor"]
        print(f"  ring {bits} bits ({'uint64' if item == 8 else 'uint32'} words, d*{item} bytes)")
        k = m["expansions"]
        rows = [
            ("AES-CTR floor (d words)", f),
            ("  same, fresh buffers (old floor)", m["floor_alloc"]),
            (f"{k} expansions ({k} x floor, unavoidable)", k * f),
            ("encode, reference (float64 temps)", m["encode_ref"]),
            ("encode, fast (AES dither, chunked)", m["encode"]),
            ("mask kernel, reference (per seed)", m["mask_ref"]),
            ("mask kernel, fast (one pass)", m["mask_kernel"]),
            ("mask() incl. seeds+Shamir+seal", m["mask"]),
            ("encode + mask(overwrite), as the mod", m["encode_mask"]),
        ]
        for name, t in rows:
            print(f"    {name:<38} {t * 1e3:8.2f} ms {t / f:7.2f} x floor")
        print(
            f"    mask() / {k} expansions: {m['mask'] / (k * f):.2f} x;  "
            f"encode + mask() / {k} expansions: {m['encode_mask'] / (k * f):.2f} x"
        )
    if args.scenario:
        overrides = args.set if args.set is not None else ["scenario.rounds=3"]
        ring = resolve("three_hospitals", overrides).defense.secagg.ring_bits
        print(
            f"\nthree_hospitals on Flower's simulation engine ({', '.join(overrides)}; "
            f"ring {ring} bits)"
        )
        print(
            f"{'method':<14} {'round s':>9} {'x plain':>8} {'1st round s':>11} "
            f"{'wall s':>8} {'accuracy':>9}"
        )
        try:
            runs = _scenario_rounds(overrides)
        except Exception as exc:  # report; the tables above stand
            print(f"failed: {type(exc).__name__}: {exc}"[:300])
            return 1
        plain = runs["none"]["round"]
        for method, r in runs.items():
            name = "plain FedAvg" if method == "none" else method
            print(
                f"{name:<14} {r['round']:>9.3f} {r['round'] / plain:>8.2f} {r['first']:>11.3f} "
                f"{r['wall']:>8.1f} {r['accuracy']:>9.2%}"
            )
        print("round s: median of rounds >= 2 (round 1 includes Ray actor warm-up)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
