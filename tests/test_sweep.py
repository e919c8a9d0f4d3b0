"""privfl sweep: the grid's cells, resuming, sweep.csv and the plots."""

from __future__ import annotations

import csv
import json

import pytest

from privfl.cli import main
from privfl.config import ScenarioError
from privfl.runner import run_scenario
from privfl.sweep import parse_grid, parse_seeds, plan, run_sweep

# A single-model DP-SGD target attacked by the LOSS attack: a real run in about a second.
TINY = [
    'attack.membership.attacks=["loss"]',
    "attack.membership.targets=1",
    "attack.membership.members=64",
    "attack.membership.eval_samples=64",
    "attack.membership.eval_non_members=64",
    "attack.membership.public_samples=200",
    "attack.membership.epochs=1",
]


def test_tiny_sweep_writes_csv_and_plots_and_a_rerun_runs_nothing(tmp_path):
    out = tmp_path / "sweep"
    grid = {"defense.dp.epsilon": ["1", "8"]}
    first = run_sweep("mia_small_hospitals_dpsgd", grid, out, overrides=TINY, keep_going=False)
    assert sorted(first.ran) == ["defense.dp.epsilon=1,seed=0", "defense.dp.epsilon=8,seed=0"]
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["defense.dp.epsilon"] for r in rows] == ["1", "8"]
    eps = [float(r["epsilon"]) for r in rows]
    assert 0 < eps[0] <= 1.0 < eps[1] <= 8.0  # each cell spent its own budget
    assert all(0 <= float(r["accuracy"]) <= 1 for r in rows)
    assert all(r["membership-inference/hospital-api/loss recovered"] != "" for r in rows)
    assert all(r["membership-inference/hospital-api/loss auc"] != "" for r in rows)
    for png in ("frontier.png", "attacks.png"):
        assert (out / png).stat().st_size > 5000
    assert json.loads((out / rows[0]["run"] / "results.json").read_text())["seed"] == 0

    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return run_scenario(*args, **kwargs)

    again = run_sweep("mia_small_hospitals_dpsgd", grid, out, overrides=TINY, run=counting)
    assert calls == [] and again.ran == [] and len(again.skipped) == 2
    assert list(csv.DictReader((out / "sweep.csv").open())) == rows


def _fake_run(scenario, out, *, overrides):
    """A stand-in for run_scenario: accuracy and success from the overrides."""
    values = dict(o.split("=", 1) for o in overrides)
    x, seed = float(values["defense.dp.epsilon"]), int(values["scenario.seed"])
    if x == 3:
        raise RuntimeError("diverged")
    out.mkdir(parents=True)
    results = {
        "seed": seed,
        "final": {"accuracy": 0.5 + 0.05 * x + 0.01 * seed, "epsilon": x},
        "attacks": [
            {
                "name": "imprint",
                "target": "aggregate",
                "recovered": int(x),
                "total": 10,
                "metrics": {"psnr_mean": 20.0 + x},
            }
        ],
    }
    (out / "results.json").write_text(json.dumps(results))


def test_seeds_give_rows_per_cell_and_failed_cells_are_reported(tmp_path):
    grid = {"defense.dp.epsilon": ["1", "2", "3"]}
    res = run_sweep("three_hospitals_dpsgd", grid, tmp_path, seeds=[0, 1], run=_fake_run)
    assert set(res.failed) == {"defense.dp.epsilon=3,seed=0", "defense.dp.epsilon=3,seed=1"}
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert [(r["defense.dp.epsilon"], r["seed"]) for r in rows] == [
        ("1", "0"),
        ("1", "1"),
        ("2", "0"),
        ("2", "1"),
    ]
    assert rows[2]["imprint/aggregate recovered"] == "0.2"
    assert rows[2]["imprint/aggregate psnr_mean"] == "22.0"
    assert (tmp_path / "frontier.png").is_file() and (tmp_path / "attacks.png").is_file()
    # A rerun retries only the failed cells.
    calls = []
    run_sweep(
        "three_hospitals_dpsgd",
        grid,
        tmp_path,
        seeds=[0, 1],
        run=lambda s, o, overrides: calls.append(o.name) or _fake_run(s, o, overrides=overrides),
    )
    assert sorted(calls) == sorted(res.failed)


def test_cells_are_validated_before_anything_runs(tmp_path):
    with pytest.raises(ScenarioError, match="defense.dp.epsilon=x.*defense.dp.epsilon"):
        run_sweep("three_hospitals_dpsgd", {"defense.dp.epsilon": ["1", "x"]}, tmp_path)
    assert not any(tmp_path.iterdir())
    with pytest.raises(ScenarioError, match="--seeds"):
        plan("three_hospitals", {"scenario.seed": ["1", "2"]})
    assert [c.name for c in plan("three_hospitals", {"training.lr": ["0.1"]}, seeds=[3])] == [
        "training.lr=0.1,seed=3"
    ]


@pytest.mark.parametrize(
    "items, match",
    [
        (["training.lr"], "section.key=value1"),
        (["lr=0.1"], "section.key=value1"),
        (["training.lr=0.1,"], "empty value"),
        (["training.lr=0.1", "training.lr=0.2"], "given twice"),
        ([], "at least one"),
    ],
)
def test_bad_grids_are_named(items, match):
    with pytest.raises(ScenarioError, match=match):
        parse_grid(items)


def test_grid_and_seed_parsing():
    assert parse_grid(["a.b=1,2", "c.d=x"]) == {"a.b": ["1", "2"], "c.d": ["x"]}
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    with pytest.raises(ScenarioError, match="--seeds"):
        parse_seeds("0,a")


def test_sweep_command_reports_failed_cells(tmp_path, monkeypatch, capsys):
    import privfl.runner

    monkeypatch.setattr(privfl.runner, "run_scenario", _fake_run)
    argv = ["sweep", "three_hospitals_dpsgd", "--grid", "defense.dp.epsilon=2,3"]
    assert main([*argv, "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "1 run now, 0 already done, 1 failed" in captured.out
    assert "defense.dp.epsilon=3,seed=0: RuntimeError: diverged" in captured.err
