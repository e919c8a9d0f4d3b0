"""``privfl sweep``: run a scenario over a grid of settings and seeds, then tabulate and plot.

Every cell of the grid (one value per swept key, one seed) is an ordinary run written to
its own folder under the sweep's output folder. A cell whose folder already holds
results.json is done and is not run again, so an interrupted sweep resumes where it
stopped. ``sweep.csv`` gets one row per cell; ``frontier.png`` plots test accuracy
against ε (or against the first swept key when ε does not vary) and ``attacks.png`` each
attack's success against the first swept key, with the spread over seeds as error bars.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from privfl import progress
from privfl.config import ScenarioError
from privfl.results import atomic_write_text
from privfl.runner import resolve, run_scenario

SWEEP_CSV = "sweep.csv"
FRONTIER_FIGURE = "frontier.png"
ATTACKS_FIGURE = "attacks.png"
# Attack metrics plotted beside the recovered fraction: rates in [0, 1] that say how much
# an attack got (the TPR at 0.1% FPR is the membership attacks' headline).
SUCCESS_METRICS = ("tpr_at_0.1pct_fpr",)

RunFn = Callable[..., Any]


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: a value for every swept key, and a seed."""

    values: tuple[tuple[str, str], ...]
    seed: int

    @property
    def name(self) -> str:
        """The cell's folder name, ``key=value,...,seed=N`` (odd characters as ``_``)."""
        text = ",".join([*(f"{k}={v}" for k, v in self.values), f"seed={self.seed}"])
        return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)

    def overrides(self) -> list[str]:
        """The ``section.key=value`` overrides that make this cell."""
        return [*(f"{k}={v}" for k, v in self.values), f"scenario.seed={self.seed}"]


@dataclass
class SweepResult:
    """What a sweep produced: one row per finished cell, what ran now and what failed."""

    rows: list[dict[str, Any]]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def parse_grid(items: Iterable[str]) -> dict[str, list[str]]:
    """``["section.key=v1,v2", ...]`` as ``{"section.key": ["v1", "v2"], ...}``.

    Raises
    ------
    ScenarioError
        An item without ``=``, without a dotted key, without values, or a key given twice.
    """
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        vals = [v.strip() for v in values.split(",")]
        if not sep or len(parts) < 2 or not all(parts):
            raise ScenarioError(f"--grid {item!r}: expected section.key=value1,value2,...")
        if not all(vals):
            raise ScenarioError(f"--grid {item!r}: empty value in the list")
        if key in grid:
            raise ScenarioError(f"--grid {key}: given twice; list all its values in one --grid")
        if len(set(vals)) != len(vals):
            raise ScenarioError(f"--grid {key}: a value is listed twice")
        grid[key] = vals
    if not grid:
        raise ScenarioError("--grid: at least one section.key=value1,value2,... is needed")
    return grid


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` as ``[0, 1, 2]``."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ScenarioError(f"--seeds {text!r}: expected integers such as 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ScenarioError(f"--seeds {text!r}: expected distinct integers such as 0,1,2")
    return seeds


def plan(
    scenario: str | Path,
    grid: dict[str, list[str]],
    *,
    seeds: Sequence[int] | None = None,
    overrides: Sequence[str] = (),
) -> list[Cell]:
    """Every cell of the grid, each scenario validated before anything runs.

    Parameters
    ----------
    scenario
        A scenario file or the name of a shipped scenario.
    grid
        Values of each swept key (see :func:`parse_grid`).
    seeds
        Seeds of every cell (default: the scenario's own seed).
    overrides
        ``section.key=value`` applied to every cell before the grid's values.

    Raises
    ------
    ScenarioError
        A cell's scenario is invalid (the message names the cell and the key), or two
        cells would share a folder.
    """
    if "scenario.seed" in grid:
        raise ScenarioError("--grid scenario.seed: sweep seeds with --seeds instead")
    base = resolve(scenario, overrides)
    seeds = list(seeds) if seeds else [base.scenario.seed]
    cells = [
        Cell(tuple(zip(grid, combo, strict=True)), seed)
        for combo in itertools.product(*grid.values())
        for seed in seeds
    ]
    seen: dict[str, Cell] = {}
    for cell in cells:
        if cell.name in seen:
            raise ScenarioError(
                f"--grid: cells {seen[cell.name].values} and {cell.values} would share the "
                f"folder {cell.name!r}; spell the values differently"
            )
        seen[cell.name] = cell
        try:
            resolve(scenario, [*overrides, *cell.overrides()])
        except ScenarioError as exc:
            raise ScenarioError(f"sweep cell {cell.name}: {exc}") from exc
    return cells


def _run_cell(scenario: str, out: str, overrides: list[str]) -> None:
    # In a worker process: no bars of its own, they would interleave with the others'.
    run_scenario(scenario, out, overrides=overrides, progress=False)


def run_sweep(
    scenario: str | Path,
    grid: dict[str, list[str]],
    out_dir: str | Path,
    *,
    seeds: Sequence[int] | None = None,
    overrides: Sequence[str] = (),
    jobs: int = 1,
    run: RunFn | None = None,
    keep_going: bool = True,
) -> SweepResult:
    """Run every cell that is not done yet, then write sweep.csv and the figures.

    Parameters
    ----------
    scenario, grid, seeds, overrides
        As for :func:`plan`.
    out_dir
        The sweep's folder: one run folder per cell, sweep.csv and the PNGs.
    jobs
        Cells run at once, each in its own process (1: one after the other, here).
    run
        ``run(scenario, out, overrides=...)`` runs one cell (default
        :func:`privfl.runner.run_scenario`); with ``jobs > 1`` the default is always used.
    keep_going
        Record a failed cell and go on with the others (False: raise at once).

    Returns
    -------
    SweepResult
    """
    if jobs < 1:
        raise ScenarioError(f"--jobs: must be >= 1, got {jobs}")
    out = Path(out_dir).expanduser().resolve()
    cells = plan(scenario, grid, seeds=seeds, overrides=overrides)
    result = SweepResult(rows=[])
    todo = []
    for cell in cells:
        if (out / cell.name / "results.json").is_file():
            result.skipped.append(cell.name)
        else:
            todo.append(cell)
    ref = str(scenario)
    with progress.phase("sweep: cells", total=len(todo)) as bar:
        if jobs == 1 or len(todo) <= 1:
            if run is None:
                # Looked up per call: tests replace privfl.runner.run_scenario.
                from privfl.runner import run_scenario as run
            for i, cell in enumerate(todo):
                bar.update(bar.completed, status=cell.name)
                try:
                    with progress.phase(f"sweep cell {i + 1}/{len(todo)} {cell.name}"):
                        run(ref, out / cell.name, overrides=[*overrides, *cell.overrides()])
                    result.ran.append(cell.name)
                except Exception as exc:
                    if not keep_going:
                        raise
                    result.failed[cell.name] = f"{type(exc).__name__}: {exc}"
                bar.advance()
        else:
            ctx = get_context("spawn")  # Ray and torch do not survive a fork
            with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
                futures = {
                    pool.submit(_run_cell, ref, str(out / c.name), [*overrides, *c.overrides()]): c
                    for c in todo
                }
                for fut in as_completed(futures):
                    name = futures[fut].name
                    try:
                        fut.result()
                        result.ran.append(name)
                    except Exception as exc:
                        if not keep_going:
                            raise
                        result.failed[name] = f"{type(exc).__name__}: {exc}"
                    bar.advance(status=name)
    result.rows = [sweep_row(out / c.name, c) for c in cells if c.name not in result.failed]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(result.rows, out / SWEEP_CSV)
    result.files = [out / SWEEP_CSV, *plot_sweep(result.rows, list(grid), out)]
    return result


def sweep_row(run_dir: Path, cell: Cell) -> dict[str, Any]:
    """One row of sweep.csv from a cell's results.json.

    Columns: the swept keys, ``seed``, ``run`` (the folder), ``accuracy`` (final test
    accuracy), ``epsilon`` (the run's ε, or the largest an attack's target reported), and
    per attack ``<name>/<target> recovered`` (recovered / total) and
    ``<name>/<target> <metric>`` for each of the attack's key metrics.
    """
    # Imported here: report pulls in matplotlib, which plain planning does not need.
    from privfl.report import KEY_METRICS

    res = json.loads((run_dir / "results.json").read_text())
    final = res.get("final", {})
    row: dict[str, Any] = dict(cell.values)
    row.update(seed=cell.seed, run=run_dir.name, accuracy=final.get("accuracy"))
    eps = final.get("epsilon")
    if eps is None:
        spent = [
            a["metrics"]["epsilon"]
            for a in res.get("attacks", [])
            if isinstance(a.get("metrics", {}).get("epsilon"), int | float)
        ]
        eps = max(spent) if spent else None
    row["epsilon"] = eps
    for a in res.get("attacks", []):
        label = f"{a['name']}/{a['target']}"
        row[f"{label} recovered"] = a["recovered"] / a["total"] if a.get("total") else None
        m = a.get("metrics", {})
        for k in dict.fromkeys([*KEY_METRICS.get(a["name"], ()), *SUCCESS_METRICS]):
            if k in m:
                row[f"{label} {k}"] = m[k]
    return row


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """``rows`` as CSV (columns in first-seen order; missing and null cells empty)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([["" if row.get(k) is None else row[k] for k in columns] for row in rows])
    atomic_write_text(path, buf.getvalue())


def _numeric(values: Sequence[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def _groups(
    rows: list[dict[str, Any]], keys: list[str], y: str
) -> dict[tuple[str, ...], dict[str, list[float]]]:
    """Per combination of the keys after the first: x value -> the y values over seeds."""
    out: dict[tuple[str, ...], dict[str, list[float]]] = {}
    for row in rows:
        v = row.get(y)
        if not isinstance(v, int | float) or not math.isfinite(v):
            continue
        out.setdefault(tuple(row[k] for k in keys[1:]), {}).setdefault(row[keys[0]], []).append(
            float(v)
        )
    return out


def _mean_sd(vals: list[float]) -> tuple[float, float]:
    n = len(vals)
    mean = sum(vals) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return mean, sd


def _spread_axis(ax: Any, values: Sequence[float]) -> None:
    """A log x axis for values spanning a factor of 10 or more, ticked at the values."""
    # matplotlib is needed only once there is something to draw.
    from matplotlib.ticker import NullFormatter

    if min(values) > 0 and max(values) / min(values) >= 10:
        ax.set_xscale("log")
        ax.set_xticks(list(values), [f"{v:.2g}" for v in values])
        ax.xaxis.set_minor_formatter(NullFormatter())


def plot_sweep(rows: list[dict[str, Any]], keys: list[str], out_dir: Path) -> list[Path]:
    """frontier.png (accuracy vs ε, or vs the first key) and attacks.png (each attack's
    success vs the first key); seeds give the error bars (one standard deviation)."""
    # Imported here: matplotlib is needed only once there is something to draw.
    import matplotlib

    matplotlib.use("Agg")
    # Same reason: matplotlib only when drawing.
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    if not rows:
        return []
    written = []
    first = keys[0]
    xs = list(dict.fromkeys(row[first] for row in rows))
    numeric = _numeric(xs)
    positions = dict(zip(xs, numeric or range(len(xs)), strict=True))

    def axis(ax: Any) -> None:
        ax.set_xlabel(first)
        if numeric is None:
            ax.set_xticks(list(positions.values()), xs)
        else:
            _spread_axis(ax, numeric)
        ax.grid(alpha=0.3)

    def series(ax: Any, y: str, label: str, against_eps: bool = False) -> bool:
        drawn = False
        for rest, by_x in _groups(rows, keys, y).items():
            pts = []
            for x, vals in by_x.items():
                if against_eps:
                    eps = [
                        r["epsilon"]
                        for r in rows
                        if r[first] == x and isinstance(r.get("epsilon"), int | float)
                    ]
                    if not eps:
                        continue
                    xm, xs_d = _mean_sd(eps)
                else:
                    xm, xs_d = positions[x], 0.0
                pts.append((xm, xs_d, *_mean_sd(vals)))
            if not pts:
                continue
            pts.sort()
            extra = ", ".join(f"{k}={v}" for k, v in zip(keys[1:], rest, strict=True))
            ax.errorbar(
                [p[0] for p in pts],
                [p[2] for p in pts],
                xerr=[p[1] for p in pts] if against_eps else None,
                yerr=[p[3] for p in pts],
                marker="o",
                capsize=3,
                label=f"{label} ({extra})" if extra else label,
            )
            drawn = True
        return drawn

    eps_values = {r.get("epsilon") for r in rows if isinstance(r.get("epsilon"), int | float)}
    against_eps = len(eps_values) > 1
    fig = Figure(figsize=(5.2, 3.8), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    if series(ax, "accuracy", "test accuracy", against_eps=against_eps):
        if against_eps:
            ax.set_xlabel("ε")
            ax.grid(alpha=0.3)
            _spread_axis(ax, sorted(eps_values))
        else:
            axis(ax)
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        ax.set_ylabel("test accuracy")
        ax.set_title("Privacy–utility frontier" if against_eps else f"Accuracy vs {first}")
        if len(keys) > 1:
            ax.legend(fontsize=7)
        fig.savefig(out_dir / FRONTIER_FIGURE, dpi=110)
        written.append(out_dir / FRONTIER_FIGURE)

    suffix = " recovered"
    attacks = list(
        dict.fromkeys(c.removesuffix(suffix) for r in rows for c in r if c.endswith(suffix))
    )
    if attacks:
        fig = Figure(figsize=(5.2, 2.2 + 1.8 * len(attacks)), layout="constrained")
        for i, label in enumerate(attacks):
            ax = fig.add_subplot(len(attacks), 1, i + 1)
            series(ax, f"{label} recovered", "recovered")
            for k in SUCCESS_METRICS:
                series(ax, f"{label} {k}", k)
            axis(ax)
            ax.set_ylim(0, max(0.05, ax.get_ylim()[1]))  # rates: 0 is the floor
            ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
            ax.set_title(label, fontsize=9)
            ax.legend(fontsize=7)
        fig.savefig(out_dir / ATTACKS_FIGURE, dpi=110)
        written.append(out_dir / ATTACKS_FIGURE)
    return written
