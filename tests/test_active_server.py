"""Malicious servers against the real ClientApp, in process (LoopbackGrid, no Ray).

Each shipped ``scenarios/server_<method>.toml`` runs end to end through
``run_federation``: with ``party.trust_server = true`` (teaching mode) the attack
recovers what it went after; with the default policy the parties refuse and nothing is
recovered.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg

from privfl.architecture import build_model
from privfl.clients.app import make_client_app
from privfl.config import ACTIVE_ATTACKS, Scenario, load_scenario, scenario_dir
from privfl.data import load_federation
from privfl.flower.loopback import LoopbackGrid
from privfl.server import run_federation
from privfl.strategies.active_server import (
    ACTIVE_SERVERS,
    ServerGrid,
    build_active_server,
    dead_relu_model,
    downgraded_scenario,
)

SECRET = bytes(range(32))  # the lab secret of the simulated parties (keys, lab noise)
METHODS = sorted(ACTIVE_ATTACKS)
# What each attack goes after: one party's input, or every party's.
TOTAL = {
    "downgrade": 3,
    "noise_strip": 3,
    "key_mitm": 1,
    "isolation": 1,
    "round_replay": 3,
    "model_inconsistency": 1,
}


pytestmark = pytest.mark.usefixtures("task_identity", "quiet_flower")


def _scenario(method: str, *overrides: str) -> Scenario:
    return load_scenario(scenario_dir() / f"server_{method}.toml", list(overrides))


Run = Callable[..., tuple[dict[str, Any], Path]]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Run a shipped scenario over the in-process grid, once per set of overrides."""
    done: dict[tuple[str, ...], tuple[dict[str, Any], Path]] = {}

    def run_once(method: str, *overrides: str) -> tuple[dict[str, Any], Path]:
        key = (method, *overrides)
        if key not in done:
            sc = _scenario(method, *overrides)
            app = make_client_app(sc, secret=SECRET)
            grid = LoopbackGrid(app, {100 + p: p for p in range(sc.data.parties)})
            out = tmp_path_factory.mktemp(method) / "run"
            done[key] = run_federation(grid, sc, out, progress=False), out
        return done[key]

    return run_once


def _report(results: dict[str, Any]) -> dict[str, Any]:
    (report,) = results["attacks"]
    return report


def test_every_method_has_a_class_and_a_scenario():
    assert sorted(ACTIVE_SERVERS) == METHODS
    for method in METHODS:
        sc = _scenario(method)
        assert sc.attack.kind == "active-server" and sc.attack.active_server.method == method
        assert not sc.party.trust_server  # the shipped default is the guarded party
        assert sc.data.parties == 3 and sc.scenario.rounds <= 3


@pytest.mark.parametrize("method", METHODS)
def test_teaching_mode_parties_leak(run, method):
    results, out = run(method, "party.trust_server=true")
    report = _report(results)
    assert report["name"] == method and report["role"] == "malicious-server"
    assert report["total"] == TOTAL[method]
    assert report["recovered"] == TOTAL[method], report["notes"]
    assert report["metrics"]["refusals"] == 0 and report["metrics"]["failed_sums"] == 0
    assert report["metrics"]["errors"] == 0
    assert len(results["rounds"]) == _scenario(method).scenario.rounds  # the run ended normally
    assert json.loads((out / "results.json").read_text())["attacks"][0]["recovered"] > 0


@pytest.mark.parametrize("method", METHODS)
def test_default_policy_recovers_nothing(run, method):
    results, out = run(method)
    report = _report(results)
    assert report["recovered"] == 0, report["notes"]
    metrics = report["metrics"]
    if method == "noise_strip":
        # Nothing to refuse: the noise is keyed from the party's own secret and stays.
        assert metrics["residual_norm"] > 10 * metrics["residual_bound"]
    else:
        assert metrics["refusals"] + metrics["failed_sums"] >= 1, report["notes"]
    refused = [n for n in report["notes"] if n.startswith("refused by party")]
    assert len(refused) == metrics["refusals"]  # every reason, as the party gave it
    assert len(results["rounds"]) == _scenario(method).scenario.rounds
    assert (out / "results.json").is_file()


def test_relays_keep_every_sum_correct(run):
    """key_mitm re-seals every share and isolation sums on the side: the model trains
    exactly as without an attacker."""
    baseline, _ = run("key_mitm", "attack.kind=none")
    for method in ("key_mitm", "isolation"):
        results, _ = run(method, "party.trust_server=true")
        for got, want in zip(results["rounds"], baseline["rounds"], strict=True):
            assert got["accuracy"] == want["accuracy"] and got["loss"] == pytest.approx(
                want["loss"], abs=1e-6
            )


def test_dead_relu_model_leaves_only_the_output_bias_to_learn():
    sc = _scenario("model_inconsistency")
    fed = load_federation(sc)
    model = build_model(sc, fed.num_classes)
    arrays = ArrayRecord(model.state_dict())
    dead, bias = dead_relu_model(build_model(sc, fed.num_classes), arrays, fed.public.images[:8])
    assert bias == "classifier.3.bias"
    model.load_state_dict(dead.to_torch_state_dict())
    x, y = fed.public.images[:16], fed.public.labels[:16]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        moved = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert moved == (name == bias), name
    lenet = sc.replace(["model.name=lenet"])
    with pytest.raises(ValueError, match="no ReLU"):
        dead_relu_model(build_model(lenet, 10), ArrayRecord(build_model(lenet, 10).state_dict()), x)


def test_downgraded_scenario_drops_both_defenses_only():
    sc = _scenario("downgrade")
    weak = downgraded_scenario(sc)
    assert weak.defense.secure_aggregation == "none" and weak.defense.dp.mode == "none"
    assert weak.training == sc.training and weak.data == sc.data


@pytest.mark.parametrize(
    ("method", "overrides", "match"),
    [
        ("key_mitm", ['defense.secure_aggregation="masking"'], "additive"),
        ("isolation", ['defense.secure_aggregation="masking"'], "additive"),
        ("round_replay", ['defense.secure_aggregation="additive"'], "masking"),
        ("noise_strip", ['defense.dp.mode="none"'], "distributed"),
    ],
)
def test_an_attack_names_the_setting_it_needs(method, overrides, match):
    sc = _scenario(method, *overrides)
    with pytest.raises(ValueError, match=match):
        build_active_server(FedAvg(), scenario=sc, party_of={100: 0, 101: 1, 102: 2})


def test_target_must_be_held_by_a_node():
    with pytest.raises(ValueError, match="target_party"):
        build_active_server(FedAvg(), scenario=_scenario("isolation"), party_of={101: 1})


def test_server_grid_relays_whole_exchanges_only():
    grid = ServerGrid(LoopbackGrid(make_client_app(secret=SECRET), {1: 0}), lambda m, s: [])
    with pytest.raises(NotImplementedError):
        grid.push_messages([])
    assert list(grid.get_node_ids()) == [1]
