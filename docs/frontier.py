"""The privacy–utility frontier of privfl's three threats (README's first figure).

Runs three ``privfl sweep`` grids on the MNIST sample shipped with privfl (or on
``--set data.root=...``), then draws one panel per threat: the attacker's success against
the model's test accuracy, one point per defense setting.

    python docs/frontier.py --out runs/frontier            # all three, then the figure
    python docs/frontier.py --out runs/frontier --plot-only

Every cell is an ordinary run folder with its results.json; an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

from privfl.sweep import run_sweep

# threat -> {"attack" | "utility": (scenario, [grids])}; one grid per block of cells (a grid
# is a cross product, and "no defense" is not a value of the defense's strength). Where the
# attack's own run is no measure of utility (one attacked round of an untrained model, or
# a server that rigs the model), the accuracy comes from the three-hospital federation
# trained under the same defense setting.
SWEEPS: dict[str, dict[str, tuple[str, list[dict[str, list[str]]]]]] = {
    "membership": {
        "attack": (
            "mia_federated",
            [
                {"defense.dp.mode": ["none"]},
                {"defense.dp.mode": ["client"], "defense.dp.epsilon": ["8", "3", "1"]},
            ],
        ),
    },
    "inversion": {
        "attack": ("dlg_batch7", [{"defense.secure_aggregation": ["none", "additive", "masking"]}]),
        "utility": (
            "three_hospitals",
            [{"defense.secure_aggregation": ["none", "additive", "masking"]}],
        ),
    },
    "imprint": {
        "attack": (
            "imprint_dpsgd",
            [{"defense.dp.mode": ["none"]}, {"defense.dp.epsilon": ["8", "3", "1.5"]}],
        ),
        "utility": (
            "three_hospitals_dpsgd",
            [
                # Without DP, the ordinary optimiser of three_hospitals: DP-SGD's large
                # clipped steps diverge on unclipped gradients.
                {
                    "defense.dp.mode": ["none"],
                    "training.batch_size": ["32"],
                    "training.lr": ["0.05"],
                    "training.momentum": ["0.9"],
                },
                {"defense.dp.epsilon": ["8", "3", "1.5"]},
            ],
        ),
    },
}

TITLES = {
    "membership": "Membership inference (LiRA, QMIA, LOSS)\nagainst DP-SGD",
    "inversion": "Gradient inversion (DLG) of one party\nagainst secure aggregation",
    "imprint": "Imprint extraction through the aggregate\nagainst DP",
}


def run(out: Path, overrides: list[str], jobs: int) -> None:
    """Run every sweep that is not done yet."""
    for threat, parts in SWEEPS.items():
        for part, (scenario, grids) in parts.items():
            for i, grid in enumerate(grids):
                folder = out / threat / part / f"grid{i}"
                res = run_sweep(scenario, grid, folder, overrides=overrides, jobs=jobs)
                if res.failed:
                    raise SystemExit(f"{threat}: failed cells: {res.failed}")


def _rows(folder: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for path in sorted(folder.glob("grid*/sweep.csv")):
        with path.open(newline="") as fh:
            rows += list(csv.DictReader(fh))
    return rows


def _label(row: dict[str, str]) -> str:
    if row.get("defense.secure_aggregation"):
        return {"none": "no secure agg.", "additive": "additive", "masking": "masking"}[
            row["defense.secure_aggregation"]
        ]
    if row.get("defense.dp.mode") == "none":
        return "no DP"
    return f"ε = {float(row.get('defense.dp.epsilon') or row['epsilon']):g}"


def _success(threat: str, row: dict[str, str]) -> float:
    if threat == "membership":
        # The strongest of the attacks, as AUC: 50% is a coin flip.
        aucs = [float(v) for k, v in row.items() if k.endswith(" auc") and v]
        return 100 * max(aucs)
    fractions = [float(v) for k, v in row.items() if k.endswith(" recovered") and v]
    return 100 * max(fractions)


def plot(out: Path) -> Path:
    """One panel per threat: attack success (x) against test accuracy (y)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13.5, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, threat in zip(axes, SWEEPS, strict=True):
        rows = _rows(out / threat / "attack")
        if not rows:
            raise SystemExit(f"{threat}: no results under {out / threat}; run without --plot-only")
        utility = {_label(r): float(r["accuracy"]) for r in _rows(out / threat / "utility")}
        pts: list[tuple[float, float, str]] = [
            (_success(threat, r), 100 * utility.get(_label(r), float(r["accuracy"])), _label(r))
            for r in rows
        ]
        xs, ys, _ = zip(*pts, strict=True)
        ax.plot(xs, ys, "o-", color="C0" if threat != "inversion" else "C2")
        placed: list[tuple[float, float]] = []
        for x, y, text in pts:
            # Stack the labels of points that (nearly) coincide instead of overprinting.
            near = sum(abs(x - px) < 3 and abs(y - py) < 3 for px, py in placed)
            placed.append((x, y))
            ax.annotate(
                text, (x, y), textcoords="offset points", xytext=(6, 4 - 11 * near), fontsize=9
            )
        if threat == "membership":
            ax.axvline(50, color="grey", lw=0.8, ls=":")
            ax.set_xlabel("attack AUC, best of three (%; 50 = chance)")
        else:
            ax.set_xlabel("samples recovered (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(TITLES[threat], fontsize=10)
        ax.grid(alpha=0.3)
        lo = min(ys)
        ax.set_ylim(max(0.0, lo - 10), 100)
        xmin = 45 if threat == "membership" else -5
        ax.set_xlim(xmin, max(max(xs) * 1.15, xmin + 20))
    fig.suptitle("What each defense costs and what it stops (MNIST, three hospitals)", fontsize=11)
    path = out / "frontier.png"
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)  # never a half-written figure
    return path


def main(argv: list[str] | None = None) -> Any:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args(argv)
    if not args.plot_only:
        run(args.out, args.overrides, args.jobs)
    print(plot(args.out))


if __name__ == "__main__":
    main()
