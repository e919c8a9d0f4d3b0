"""Record, or check, the figures every shipped scenario gives: the guard for refactors.

``--record FILE`` runs each shipped scenario (in process, without Ray) and writes the
figures of its results.json — accuracy and loss per round, ε, and every attack's
recovered/total and metrics — to FILE. ``--check FILE`` runs them again and lists every
figure that moved. A refactor that changes no behaviour changes no figure.

Runs are made reproducible where the product draws from the operating system: the DP
noise and sampling coins come from a fixed lab secret (``party.noise = "lab"``), torch
uses one thread, and for this check only ``os.urandom`` is a fixed SHA-256 counter
stream (the privacy audit's secret coins, self-mask seeds, session ids). Keys that
OpenSSL draws (X25519, Ed25519) stay random, so a curious server that inverts one
*masked* payload inverts different ring noise every run: for those attacks only the
count of recovered records is compared, not the image metrics of the noise.

``--rounds R`` caps every scenario's rounds (and the round an
attack targets) so that a whole check takes minutes, not hours; record and check must use
the same cap.

    python scripts/scenario_figures.py --record figures.json --rounds 2
    python scripts/scenario_figures.py --check figures.json --rounds 2
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

# One thread and a fixed lab secret before torch and privfl load: same seed, same bits.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PRIVFL_LAB_SECRET", "5c" * 32)


def _counter_urandom(scenario: str) -> None:
    """``os.urandom`` as a SHA-256 counter stream, restarted for each scenario (so its
    figures do not depend on which scenarios ran before it in the process)."""
    counter = itertools.count()
    tag = b"privfl-figures|" + scenario.encode() + b"|"

    def urandom(n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(tag + str(next(counter)).encode()).digest()
        return out[:n]

    os.urandom = urandom


_counter_urandom("")

import torch  # noqa: E402

from privfl.config import load_scenario, scenario_dir  # noqa: E402
from privfl.runner import run_scenario  # noqa: E402

ROUND_KEYS = ("round", "accuracy", "loss", "train_loss", "party_accuracy", "epsilon")


def _overrides(name: str, rounds: int | None) -> list[str]:
    sets = ['party.noise="lab"']
    if rounds is None:
        return sets
    sc = load_scenario(scenario_dir() / f"{name}.toml")
    r = min(rounds, sc.scenario.rounds)
    sets.append(f"scenario.rounds={r}")
    # An attack on a later round than the run now has moves to its last round.
    for section in ("gradient_inversion", "imprint", "active_server"):
        sub = getattr(sc.attack, section, None)
        if sub is not None and getattr(sub, "round", 0) > r:
            sets.append(f"attack.{section}.round={r}")
    return sets


def _is_timing(key: str) -> bool:
    # Wall times differ from run to run; they are benchmarks' business.
    return "seconds" in key or key.endswith("_s") or "time" in key


def _inverts_masked_payload(name: str) -> bool:
    sc = load_scenario(scenario_dir() / f"{name}.toml")
    return sc.attack.kind == "gradient-inversion" and sc.defense.secure_aggregation != "none"


def figures(results: dict[str, Any], *, count_only: bool = False) -> dict[str, Any]:
    """The figures of one results.json that a behaviour-preserving change must keep
    (``count_only``: of the attacks, only what they recovered out of how many)."""
    rounds = [{k: r[k] for k in ROUND_KEYS if k in r} for r in results.get("rounds", [])]
    attacks = [
        {
            "name": a["name"],
            "role": a.get("role"),
            "target": a.get("target"),
            "recovered": a.get("recovered"),
            "total": a.get("total"),
            "metrics": {}
            if count_only
            else {
                k: v
                for k, v in a.get("metrics", {}).items()
                if isinstance(v, int | float) and not _is_timing(k)
            },
        }
        for a in results.get("attacks", [])
    ]
    final = {k: v for k, v in results.get("final", {}).items() if isinstance(v, int | float)}
    return {"rounds": rounds, "final": final, "attacks": attacks}


def run_all(names: list[str], rounds: int | None) -> dict[str, Any]:
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    for name in names:
        print(f"  {name} ...", file=sys.stderr, flush=True)
        _counter_urandom(name)
        with tempfile.TemporaryDirectory() as tmp:
            res = run_scenario(
                name,
                Path(tmp),
                overrides=_overrides(name, rounds),
                progress=False,
                engine="inprocess",
            )
        out[name] = figures(res, count_only=_inverts_masked_payload(name))
    return out


def _diff(path: str, a: Any, b: Any, rel: float, found: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                found.append(f"{path}.{k}: only in {'check' if k in b else 'record'}")
            else:
                _diff(f"{path}.{k}", a[k], b[k], rel, found)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            found.append(f"{path}: {len(a)} entries recorded, {len(b)} now")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            _diff(f"{path}[{i}]", x, y, rel, found)
    elif isinstance(a, float) or isinstance(b, float):
        if not (isinstance(a, int | float) and isinstance(b, int | float)) or not (
            math.isclose(a, b, rel_tol=rel, abs_tol=rel) or (a != a and b != b)
        ):
            found.append(f"{path}: {a!r} recorded, {b!r} now")
    elif a != b:
        found.append(f"{path}: {a!r} recorded, {b!r} now")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", metavar="FILE", help="write the figures to FILE")
    mode.add_argument("--check", metavar="FILE", help="compare with the figures in FILE")
    p.add_argument("--rounds", type=int, default=None, help="cap every scenario's rounds")
    p.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    p.add_argument("--rel", type=float, default=1e-6, help="relative tolerance of a float")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or sorted(
        f.stem for f in scenario_dir().glob("*.toml")
    )
    if args.record:
        figs = run_all(names, args.rounds)
        tmp = Path(args.record).with_suffix(".tmp")
        tmp.write_text(json.dumps({"rounds_cap": args.rounds, "scenarios": figs}, indent=1))
        tmp.replace(args.record)
        print(f"recorded {len(figs)} scenarios in {args.record}")
        return 0
    recorded = json.loads(Path(args.check).read_text())
    if recorded.get("rounds_cap") != args.rounds:
        p.error(f"--rounds {args.rounds}: the record was made with {recorded.get('rounds_cap')}")
    names = [n for n in names if n in recorded["scenarios"]]
    now = run_all(names, args.rounds)
    found: list[str] = []
    for n in names:
        _diff(n, recorded["scenarios"][n], now[n], args.rel, found)
    for line in found:
        print(line)
    print(f"{len(names)} scenarios checked, {len(found)} figures moved")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
