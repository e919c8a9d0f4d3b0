"""The privacy audit inside a live run: canary records in the parties' training, the
auditor's view of every round's aggregate, and a planted fault it must flag."""

from __future__ import annotations

import json

import pytest
import torch

from privfl.clients.app import make_client_app
from privfl.config import ScenarioError, load_scenario, resolve_scenario_path
from privfl.data import load_federation
from privfl.dp import sgd as dp_sgd
from privfl.flower.loopback import LoopbackGrid
from privfl.server import make_auditor, run_federation


def _run(tmp_path, name, *overrides):
    sc = load_scenario(resolve_scenario_path(name), ["scenario.rounds=3", *overrides])
    auditor = make_auditor(sc, load_federation(sc).num_classes)
    nodes = {100 + p: p for p in range(sc.data.parties)}
    grid = LoopbackGrid(make_client_app(sc, auditor=auditor), nodes)
    results = run_federation(grid, sc, tmp_path / name, auditor=auditor)
    (audit,) = [a for a in results["attacks"] if a["name"] == "privacy-audit"]
    return results, audit


def test_without_dp_the_audit_finds_leakage(tmp_path):
    results, audit = _run(tmp_path, "audit_nodp")
    m = audit["metrics"]
    assert m["epsilon_lower_bound"] > 0.5
    assert m["epsilon_accounted"] is None  # infinite: no claim to violate
    assert m["canaries"] == 4000 and m["guesses"] == 200 and m["correct"] == audit["recovered"]
    assert "privacy_violation" not in results["final"]
    on_disk = json.loads((tmp_path / "audit_nodp" / "results.json").read_text())
    assert on_disk["attacks"][-1]["name"] == "privacy-audit"
    assert (tmp_path / "audit_nodp" / "privacy_audit.png").is_file()


def test_a_correct_dp_sgd_run_is_not_flagged(tmp_path):
    results, audit = _run(tmp_path, "audit_dpsgd", "defense.dp.epsilon=1.0")
    m = audit["metrics"]
    assert m["epsilon_lower_bound"] <= m["epsilon_accounted"] <= 1.0
    assert not m["violation"] and "privacy_violation" not in results["final"]


def test_noise_switched_off_while_still_accounted_is_flagged(tmp_path, monkeypatch):
    real = dp_sgd._keystream_noise

    def broken(dp_opt, stream, insert=None):  # the bug: no noise, the accountant unaware
        real(dp_opt, stream, insert)
        add = dp_opt.add_noise
        sigma = dp_opt.noise_multiplier

        def silent() -> None:
            dp_opt.noise_multiplier = 0.0
            try:
                add()
            finally:
                dp_opt.noise_multiplier = sigma

        dp_opt.add_noise = silent

    monkeypatch.setattr(dp_sgd, "_keystream_noise", broken)
    results, audit = _run(tmp_path, "audit_dpsgd", "defense.dp.epsilon=0.5", "training.lr=0.05")
    m = audit["metrics"]
    assert m["violation"] and m["epsilon_lower_bound"] > m["epsilon_accounted"]
    assert "exceeds the accounted" in results["final"]["privacy_violation"]
    report = (tmp_path / "audit_dpsgd" / "report.md").read_text()
    assert "PRIVACY VIOLATION" in report


def test_canary_parties_under_dp_fedavg_stay_below_the_accounted_epsilon(tmp_path):
    _results, audit = _run(tmp_path, "audit_dpfedavg", "data.parties=4")
    m = audit["metrics"]
    assert 0 <= m["epsilon_lower_bound"] <= m["epsilon_accounted"]
    assert "canary parties" in m["view"]


def test_the_audit_is_validated():
    with pytest.raises(ScenarioError, match="audit.enabled"):
        load_scenario(resolve_scenario_path("audit_dpsgd"), ["attack.kind=imprint"])
    with pytest.raises(ScenarioError, match="audit.view"):
        load_scenario(resolve_scenario_path("audit_dpfedavg"), ["audit.view=final-model"])
    with pytest.raises(ScenarioError, match="audit.canaries"):
        load_scenario(resolve_scenario_path("audit_dpsgd"), ["audit.canaries=3"])


def test_privfl_run_exits_non_zero_on_a_violation(monkeypatch, capsys, tmp_path):
    from privfl import cli, runner

    def fake_run(scenario, out, **kw):
        return {"final": {"accuracy": 0.5, "privacy_violation": "bound 2 exceeds 0.5"}}

    monkeypatch.setattr(runner, "run_scenario", fake_run)
    assert cli.main(["run", "audit_dpsgd", "--out", str(tmp_path / "x")]) == 3
    assert "PRIVACY VIOLATION" in capsys.readouterr().err
    over = [
        "run",
        "audit_dpsgd",
        "--out",
        str(tmp_path / "y"),
        "--set",
        "audit.fail_on_violation=false",
    ]
    assert cli.main(over) == 0


def test_canary_coins_are_fresh_each_round():
    sc = load_scenario(resolve_scenario_path("audit_nodp"))
    auditor = make_auditor(sc, 10)
    a, b = auditor.party_inserter(0, 1), auditor.party_inserter(0, 2)
    draws_a = [x is not None and int(x.count_nonzero()) for x in (a(0.5) for _ in range(5))]
    draws_b = [x is not None and int(x.count_nonzero()) for x in (b(0.5) for _ in range(5))]
    assert draws_a != draws_b
    assert torch.is_tensor(a(1.0))


def test_one_partys_plain_update_leaks_and_secure_aggregation_hides_it(tmp_path):
    kw = ["audit.view=party-update", "defense.dp.mode=none", "training.lr=0.05"]
    _, plain = _run(tmp_path, "audit_dpsgd", *kw, "defense.secure_aggregation=none")
    _, masked = _run(tmp_path, "audit_dpsgd", *kw)  # masking: the server gets y = x + masks
    assert "party 0" in plain["metrics"]["view"]
    assert plain["metrics"]["epsilon_lower_bound"] > 2.0
    assert masked["metrics"]["epsilon_lower_bound"] < 0.5


def test_black_box_view_scores_mislabelled_records_by_the_final_models_loss(tmp_path):
    results, audit = _run(
        tmp_path,
        "audit_nodp",
        "audit.view=final-model",
        "audit.canaries=400",
        "scenario.rounds=5",
    )
    m = audit["metrics"]
    assert "black-box" in m["view"] and m["canaries"] == 400
    assert m["epsilon_lower_bound"] >= 0 and not m["violation"]
    arrays = (tmp_path / "audit_nodp" / results["attacks"][-1]["arrays"]).name
    assert arrays.endswith(".npz")


def test_the_black_box_view_needs_enough_public_records():
    from privfl.audit import RunAuditor

    with pytest.raises(ValueError, match="audit.canaries"):
        RunAuditor(
            mode="none",
            canaries=50,
            param_names=["w"],
            sizes=[4],
            clip=1.0,
            parties=2,
            view="final-model",
            records=(torch.zeros(10, 1, 28, 28), torch.zeros(10, dtype=torch.long)),
        )


def test_canary_parties_audit_distributed_dp_inside_secure_aggregation(tmp_path):
    over = ["defense.dp.mode=distributed", "defense.secure_aggregation=masking"]
    _, audit = _run(tmp_path, "audit_dpfedavg", *over, "data.parties=5")
    m = audit["metrics"]
    assert 0 <= m["epsilon_lower_bound"] <= m["epsilon_accounted"]
