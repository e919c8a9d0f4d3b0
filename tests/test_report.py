"""results.json, report.md, rounds.csv and the figures a run leaves behind."""

from __future__ import annotations

import csv
import json
import math
import os
import stat

import jsonschema
import numpy as np
import pytest
import torch
from matplotlib.ticker import MaxNLocator, PercentFormatter

from privfl.clients.app import make_client_app
from privfl.flower.loopback import LoopbackGrid
from privfl.metrics.images import image_grid_figure
from privfl.report import RunFolderError, key_metrics, render_report, training_figure, write_run
from privfl.results import SCHEMA_PATH, SCHEMA_VERSION, AttackReport
from privfl.runner import resolve
from privfl.server import run_federation


def _results(**extra):
    mia = AttackReport(
        name="membership-inference",
        role="query-only",
        target="hospital-api/loss",
        recovered=0,
        total=4,
        metrics={
            "auc_low": 0.4,
            "auc_high": 0.6,
            "auc": 0.5,
            "tpr_at_0.1pct_fpr": 0.0,
            "precision": math.nan,
            "precision_low": math.nan,
            "precision_high": math.nan,
        },
        notes=["precision nan [nan, nan]; nothing flagged"],
        arrays={"scores_in": np.arange(4.0), "roc_fpr": np.array([0.0, 0.5, 1.0])},
    )
    res = {
        "scenario": "t",
        "seed": 0,
        "config": {},
        "rounds": [
            {"round": 1, "accuracy": 0.5, "loss": 1.0, "seconds": 0.1, "faults": [{}]},
            {"round": 2, "accuracy": 0.75, "loss": 0.5, "seconds": 0.1, "epsilon": 1.5},
        ],
        "final": {"accuracy": 0.75, "loss": 0.5},
        "attacks": [mia.to_json()],
        "timing": {"total_seconds": 1.0},
        "versions": {},
    }
    res.update(extra)
    return res


def test_write_run_saves_round_0_arrays_csv_and_version(tmp_path):
    res = _results(round_0={"accuracy": 0.1, "loss": 2.3})
    write_run(tmp_path / "run", res, {})
    out = json.loads((tmp_path / "run" / "results.json").read_text())
    assert out["schema_version"] == SCHEMA_VERSION
    assert "round_0" not in out
    assert [r["round"] for r in out["rounds"]] == [0, 1, 2]
    assert out["rounds"][0] == {"round": 0, "accuracy": 0.1, "loss": 2.3}
    # The arrays are in the npz the entry names, in results.json and in the caller's dict.
    name = out["attacks"][0]["arrays"]
    assert name == "membership-inference_hospital-api_loss.npz" == res["attacks"][0]["arrays"]
    with np.load(tmp_path / "run" / name) as npz:
        np.testing.assert_array_equal(npz["scores_in"], np.arange(4.0))
        assert set(npz.files) == {"scores_in", "roc_fpr"}
    rows = list(csv.DictReader((tmp_path / "run" / "rounds.csv").open()))
    assert [r["round"] for r in rows] == ["0", "1", "2"]
    assert rows[1]["faults"] == "1" and rows[2]["epsilon"] == "1.5" and rows[0]["epsilon"] == ""


def test_report_shows_the_attacks_key_metrics_and_never_nan(tmp_path):
    write_run(tmp_path / "run", _results(), {})
    text = (tmp_path / "run" / "report.md").read_text()
    assert "nan" not in text.lower()
    row = next(line for line in text.splitlines() if line.startswith("| membership-inference"))
    # The attack's own choice, in its order, with intervals; interval ends are no columns.
    assert "auc 0.5 [0.4, 0.6], tpr_at_0.1pct_fpr 0, precision –" in row
    assert "auc_low" not in row
    assert "precision – [–, –]; nothing flagged" in text


def test_key_metrics_of_an_unknown_attack_are_its_first_numbers():
    entry = {"name": "x", "metrics": {"a": 1.0, "a_low": 0.0, "s": "t", "b": 2, "c": 3, "d": 4}}
    assert key_metrics(entry) == ["a 1", "b 2", "c 3", "d 4"]
    refusals = {"name": "downgrade", "metrics": {"errors": 0, "refusals": 3}}
    assert key_metrics(refusals) == ["refusals 3"]


def test_training_figure_has_whole_rounds_and_percent_accuracy():
    rounds = [{"round": r, "accuracy": 0.1 * r, "loss": 1.0 / (r + 1)} for r in range(3)]
    fig = training_figure(rounds)
    acc = fig.axes[0]
    assert isinstance(acc.yaxis.get_major_formatter(), PercentFormatter)
    for ax in fig.axes:
        locator = ax.xaxis.get_major_locator()
        assert isinstance(locator, MaxNLocator) and locator._integer
    assert training_figure([]) is None


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_run(tmp_path / "run", _results(), {})
    finally:
        os.umask(old)
    run = tmp_path / "run"
    assert stat.S_IMODE(run.stat().st_mode) == 0o750
    for name in ("results.json", "report.md", "rounds.csv", "training.png"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o640, name


def test_unreadable_run_folders_are_named_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json"):
        render_report(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(RunFolderError, match="not valid JSON"):
        render_report(tmp_path)
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(RunFolderError, match="not a privfl results file"):
        render_report(tmp_path)


def test_a_real_run_matches_the_schema(tmp_path):
    sc = resolve(
        "three_hospitals",
        ["scenario.rounds=2", "data.samples_per_party=64", "data.server_test_samples=200"],
    )
    grid = LoopbackGrid(make_client_app(sc), {100 + p: p for p in range(sc.data.parties)})
    run_federation(grid, sc, tmp_path / "run", progress=False)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.validate(results, schema)
    assert [r["round"] for r in results["rounds"]][-2:] == [1, 2]
    # The schema is not vacuous: a wrong type in a round is caught.
    results["rounds"][0]["accuracy"] = "high"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(results, schema)


def test_image_grid_wraps_wide_batches():
    images = torch.rand(24, 1, 28, 28)
    fig = image_grid_figure(images, images, columns=8)
    width, height = fig.get_size_inches()
    assert width < 12 and height > width / 2  # 3 blocks of 8, not one 24-wide row
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 48
    # A batch that does not fill its last block leaves the rest blank.
    fig = image_grid_figure(images[:10], images[:10], columns=8)
    assert len([ax for ax in fig.axes if ax.images]) == 20
    assert len(fig.axes) == 32


def test_a_killed_writer_leaves_nothing_behind_for_the_next_run(tmp_path):
    dead = 2**22 + 17  # above Linux's largest pid: no process has it
    out = tmp_path / "run"
    # A writer killed between its two renames: the previous run moved aside, its staging
    # folder complete but never swapped in.
    (tmp_path / f".run.old-{dead}").mkdir()
    (tmp_path / f".run.old-{dead}" / "results.json").write_text("{}")
    (tmp_path / f".run.stage-{dead}-abc").mkdir()
    write_run(out, {"scenario": "x", "rounds": []}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert json.loads((out / "results.json").read_text())["scenario"] == "x"
