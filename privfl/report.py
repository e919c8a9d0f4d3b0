"""report.md and its figures, rendered from results.json; runs are written atomically."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from privfl.config import ACTIVE_ATTACKS
from privfl.errors import UserError
from privfl.results import SCHEMA_VERSION, atomic_write_json, atomic_write_text, umask

TRAINING_FIGURE = "training.png"
ROUNDS_CSV = "rounds.csv"

# The metrics that say how well each attack did, in the order they are shown; an attack
# not listed shows its first few numbers.
KEY_METRICS: dict[str, tuple[str, ...]] = {
    "gradient-inversion": ("psnr_mean", "ssim_mean"),
    "imprint": ("psnr_mean", "ssim_mean"),
    "membership-inference": ("auc", "tpr_at_0.1pct_fpr", "precision"),
    **{name: ("refusals",) for name in ACTIVE_ATTACKS},
    "privacy-audit": ("epsilon_lower_bound", "epsilon_gaussian", "epsilon_accounted"),
}


class RunFolderError(UserError, ValueError):
    """A run folder whose results.json cannot be read; the message names the file."""


def write_run(
    out_dir: Path,
    results: dict[str, Any],
    figures: dict[str, Any],
    notes: dict[str, list[str]] | None = None,
) -> None:
    """Write results.json, report.md and every figure into ``out_dir`` as one unit.

    Everything is written into a staging folder beside ``out_dir`` first and then
    swapped in, so an interrupted run leaves the previous outputs (or none), never a
    half-written set. Files and the folder get the user's umask.

    results.json gets ``schema_version``; a ``round_0`` entry (the model before
    training: ``{"accuracy", "loss"}``) becomes round 0 of ``rounds``; an attack entry's
    ``arrays`` (see :meth:`privfl.results.AttackReport.to_json`) are saved as an .npz
    file whose name replaces them, in ``results`` too.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _recover_interrupted(out_dir)
    stage = Path(
        tempfile.mkdtemp(prefix=f".{out_dir.name}.stage-{os.getpid()}-", dir=out_dir.parent)
    )
    try:
        stage.chmod(0o777 & ~umask())  # mkdtemp makes it 0700
        for name, fig in figures.items():
            # Figures are matplotlib's object API (no pyplot): no backend to choose, no
            # global figure registry to close.
            fig.savefig(stage / name, dpi=110, bbox_inches="tight")
        for attack in results.get("attacks", []):
            arrays = attack.get("arrays")
            if isinstance(arrays, dict):
                arrays = dict(arrays)
                file = arrays.pop("file")
                np.savez_compressed(stage / file, **{k: np.asarray(v) for k, v in arrays.items()})
                attack["arrays"] = file
        results = {"schema_version": SCHEMA_VERSION, **results}
        round_0 = results.pop("round_0", None)
        rounds = list(results.get("rounds", []))
        if round_0 and not (rounds and rounds[0].get("round") == 0):
            results["rounds"] = [{"round": 0, **round_0}, *rounds]
        results["notes"] = notes or {}
        atomic_write_json(stage / "results.json", results)
        render_report(stage)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
        stage.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _recover_interrupted(out_dir: Path) -> None:
    """Clean up after a writer that was killed: its staging folders go, and a previous
    run it had moved aside but not yet replaced goes back where it was."""
    for path in out_dir.parent.glob(f".{out_dir.name}.*"):
        m = re.fullmatch(rf"\.{re.escape(out_dir.name)}\.(stage|old)-(\d+)(-.*)?", path.name)
        if m is None or _alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out_dir.exists():
            path.rename(out_dir)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _fmt(v: Any, pct: bool = False) -> str:
    """A table cell: ``–`` for missing and non-finite numbers (never "nan")."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.2%}" if pct else f"{v:.4g}"
    return str(v)


def _no_nan(text: str) -> str:
    # Attack notes are written by the attacks; a rate with nothing to count is NaN there.
    return re.sub(r"\bnan\b", "–", text)


def key_metrics(attack: dict[str, Any]) -> list[str]:
    """An attack entry's key metrics as ``name value [low, high]`` strings.

    Which metrics are key is the attack's choice (:data:`KEY_METRICS`); an attack not
    listed shows its first four numbers that are not interval ends.
    """
    m = attack.get("metrics", {})
    names = KEY_METRICS.get(attack.get("name", ""))
    if names is None:
        names = tuple(
            k
            for k, v in m.items()
            if isinstance(v, int | float)
            and not isinstance(v, bool)
            and not k.endswith(("_low", "_high"))
        )[:4]
    shown = []
    for k in names:
        if k not in m:
            continue
        text = f"{k} {_fmt(m[k])}"
        if f"{k}_low" in m and f"{k}_high" in m and _fmt(m[k]) != "–":
            text += f" [{_fmt(m[f'{k}_low'])}, {_fmt(m[f'{k}_high'])}]"
        shown.append(text)
    return shown


def training_figure(rounds: list[dict[str, Any]]) -> Figure | None:
    """Accuracy (in %), loss and ε against the round (whole numbers); None without rounds."""
    if not rounds:
        return None
    r = [row["round"] for row in rounds]
    eps = [row.get("epsilon") for row in rounds]
    ncols = 3 if any(e is not None for e in eps) else 2
    fig = Figure(figsize=(4.2 * ncols, 3.2))
    axes = fig.subplots(1, ncols)
    axes[0].plot(r, [row.get("accuracy") for row in rounds], marker="o", label="server test")
    if any("party_accuracy" in row for row in rounds):
        axes[0].plot(
            r,
            [row.get("party_accuracy") for row in rounds],
            marker=".",
            label="parties' local test",
        )
    axes[0].set(xlabel="round", ylabel="accuracy", title="Accuracy")
    axes[0].yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    axes[0].legend()
    axes[1].plot(r, [row.get("loss") for row in rounds], marker="o", color="tab:red")
    axes[1].set(xlabel="round", ylabel="cross-entropy", title="Loss")
    if ncols == 3:
        axes[2].plot(r, eps, marker="o", color="tab:green")
        axes[2].set(xlabel="round", ylabel="ε", title="Privacy spent")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def render_report(out_dir: str | Path) -> Path:
    """(Re)render ``report.md`` and the training figure from ``out_dir/results.json``."""
    out_dir = Path(out_dir)
    src = out_dir / "results.json"
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist: not a privfl run folder")
    try:
        res = json.loads(src.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{src}: not valid JSON ({exc}); rerun the scenario") from exc
    if not isinstance(res, dict) or not isinstance(res.get("rounds", []), list):
        raise RunFolderError(f"{src}: not a privfl results file (no results object)")
    cfg = res.get("config", {})
    lines = [f"# privfl report — {res.get('scenario', '?')}", ""]
    violation = res.get("final", {}).get("privacy_violation")
    if violation:
        lines += [
            f"> **PRIVACY VIOLATION** — {violation}: the mechanism does not deliver the ε its "
            "accountant reports.",
            "",
        ]
    desc = cfg.get("scenario", {}).get("description")
    if desc:
        lines += [desc, ""]
    data, defense = cfg.get("data", {}), cfg.get("defense", {})
    lines += [
        "| setting | value |",
        "|---|---|",
        f"| seed | {res.get('seed')} |",
        f"| parties | {data.get('parties')} ({data.get('partition')}) |",
        f"| dataset | {data.get('dataset')} (root: {data.get('root') or 'default'}) |",
        f"| model | {cfg.get('model', {}).get('name')} |",
        f"| rounds | {cfg.get('scenario', {}).get('rounds')} |",
        f"| secure aggregation | {defense.get('secure_aggregation', 'none')} |",
        f"| differential privacy | {defense.get('dp', {}).get('mode', 'none')} |",
        f"| attack | {cfg.get('attack', {}).get('kind', 'none')} |",
        "",
        "## Outcome",
        "",
    ]
    final = res.get("final", {})
    lines.append(
        f"- final test accuracy: **{_fmt(final.get('accuracy'), pct=True)}**, "
        f"loss {_fmt(final.get('loss'))}"
    )
    if final.get("epsilon") is not None:
        lines.append(f"- privacy: ε = {final['epsilon']:.3g}, δ = {final.get('delta')}")
    if final.get("party_epsilon"):
        own = ", ".join(f"party {p}: {e:.3g}" for p, e in final["party_epsilon"].items())
        lines.append(f"- each party's own account: {own}")
    privacy = res.get("privacy", {})
    if privacy:
        who = (
            "trust the server"
            if privacy.get("parties_trust_server")
            else "enforce their own policy"
        )
        lines.append(
            f"- parties {who}; sums of at least {privacy.get('min_parties')} parties; "
            f"DP noise: {privacy.get('noise')}"
        )
        if privacy.get("dp_mode", "none") != "none":
            lines.append(f"- neighbouring datasets: {privacy.get('neighbouring')}")
    for w in res.get("warnings", []):
        lines.append(f"- **warning:** {w}")
    faults = [(r["round"], f) for r in res.get("rounds", []) for f in r.get("faults", [])]
    if faults:
        lines.append(f"- refusals and faults: {len(faults)} (listed below)")
    if final.get("stopped_early"):
        lines.append(f"- stopped early: {final['stopped_early']}")
    timing = res.get("timing", {})
    lines += [
        f"- wall time {_fmt(timing.get('total_seconds'))} s "
        f"(start-up {_fmt(timing.get('startup_seconds'))} s)",
        "",
    ]

    rounds = res.get("rounds", [])
    if rounds:
        atomic_write_text(out_dir / ROUNDS_CSV, rounds_csv(rounds))
    fig = training_figure(rounds)
    if fig is not None:
        fig.savefig(out_dir / TRAINING_FIGURE, dpi=110)
        lines += [
            f"![training]({TRAINING_FIGURE})",
            "",
            "| round | accuracy | loss | ε | seconds |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['round']} | {_fmt(r.get('accuracy'), pct=True)} | {_fmt(r.get('loss'))} | "
            f"{_fmt(r.get('epsilon'))} | {_fmt(r.get('seconds'))} |"
            for r in rounds
        ]
        lines.append("")

    if faults:
        lines += [
            "## Refusals and faults",
            "",
            "| round | party | stage | reason |",
            "|---|---|---|---|",
        ]
        for rnd, f in faults[:50]:
            reason = str(f.get("reason", "")).replace("|", "/")
            lines.append(f"| {rnd} | {_fmt(f.get('party'))} | {f.get('stage')} | {reason} |")
        if len(faults) > 50:
            lines.append(f"| … | | | {len(faults) - 50} more in results.json |")
        lines.append("")

    attacks = res.get("attacks", [])
    if attacks:
        lines += [
            "## Attacks",
            "",
            "| attack | role | target | recovered | key metrics |",
            "|---|---|---|---|---|",
        ]
        for a in attacks:
            shown = ", ".join(key_metrics(a))
            lines.append(
                f"| {a['name']} | {a['role']} | {a['target']} | {a['recovered']}/{a['total']} | "
                f"{shown} |"
            )
        lines.append("")
        notes = res.get("notes", {})
        for a in attacks:
            body = notes.get(f"{a['name']}:{a['target']}", a.get("notes", []))
            figs = [f for f in a.get("figures", []) if (out_dir / f).is_file()]
            if not body and not figs:
                continue
            lines += [f"### {a['name']} ({a['role']} → {a['target']})", ""]
            lines += [f"- {_no_nan(n)}" for n in body]
            lines += ["", *[f"![{f}]({f})" for f in figs], ""]
            if a.get("arrays"):
                lines += [f"Scores and ROC points: [{a['arrays']}]({a['arrays']})", ""]
    dst = out_dir / "report.md"
    atomic_write_text(dst, "\n".join(lines) + "\n")
    return dst


def rounds_csv(rounds: list[dict[str, Any]]) -> str:
    """results.json's rounds as CSV: one row per round, ``faults`` as their count."""
    columns: list[str] = []
    for row in rounds:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rounds:
        writer.writerow(
            {k: len(v) if isinstance(v, list) else ("" if v is None else v) for k, v in row.items()}
        )
    return buf.getvalue()
