"""Real Flower simulations (Ray) of the default scenario, end to end."""

import json

import pytest

from privfl import run_scenario

SMALL = ["scenario.rounds=2", "data.samples_per_party=1000"]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "run"
    res = run_scenario(
        "three_hospitals",
        out,
        overrides=[*SMALL, "defense.secure_aggregation=none"],
        progress=False,
    )
    return out, res


@pytest.mark.slow
def test_three_parties_two_rounds_accuracy_rises(plain_run):
    out, res = plain_run
    assert [r["round"] for r in res["rounds"]] == [0, 1, 2]  # round 0: the initial model
    rounds = res["rounds"][1:]
    assert rounds[1]["accuracy"] > rounds[0]["accuracy"] > 0.3
    assert rounds[1]["loss"] < rounds[0]["loss"]
    # The results.json contract that tools read.
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["scenario"] == "three_hospitals" and on_disk["seed"] == 0
    assert on_disk["config"]["data"]["samples_per_party"] == 1000
    assert on_disk["final"]["accuracy"] == rounds[-1]["accuracy"]
    assert on_disk["attacks"] == []
    assert set(on_disk["timing"]) >= {"total_seconds", "per_round_seconds"}
    assert set(on_disk["versions"]) >= {"privfl", "flwr", "torch"}
    assert all("party_accuracy" in r for r in rounds)
    report = (out / "report.md").read_text()
    assert "three_hospitals" in report and "training.png" in report
    assert (out / "training.png").stat().st_size > 1000
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "staging left"


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["additive", "masking"])
def test_secure_aggregation_matches_plain_fedavg(plain_run, protocol, tmp_path):
    _, plain = plain_run
    res = run_scenario(
        "three_hospitals",
        tmp_path / protocol,
        overrides=[*SMALL, f"defense.secure_aggregation={protocol}"],
        progress=False,
    )
    assert abs(res["final"]["accuracy"] - plain["final"]["accuracy"]) <= 0.01


@pytest.mark.slow
def test_inprocess_engine_gives_the_simulation_engines_figures(plain_run, tmp_path):
    # Same apps, mods and serialised messages without Ray: the same bits come out.
    _, plain = plain_run
    res = run_scenario(
        "three_hospitals",
        tmp_path / "inprocess",
        overrides=[*SMALL, "defense.secure_aggregation=none"],
        progress=False,
        engine="inprocess",
    )
    assert [(r["accuracy"], r["loss"]) for r in res["rounds"]] == [
        (r["accuracy"], r["loss"]) for r in plain["rounds"]
    ]
    assert (tmp_path / "inprocess" / "report.md").is_file()


def test_unknown_engine_is_named(tmp_path):
    from privfl.errors import UserError

    with pytest.raises(UserError, match="engine must be one of simulation, inprocess"):
        run_scenario("three_hospitals", tmp_path, engine="ray", overrides=SMALL)
