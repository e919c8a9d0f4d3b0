import json

import pytest
import torch
from opacus.validators import ModuleValidator

from privfl.architecture import build_model
from privfl.cli import main as cli_main
from privfl.config import Scenario
from privfl.models import build_task_model
from privfl.report import write_run
from privfl.training import local_batches, round_batch_data, train_local


@pytest.mark.parametrize("name", ["cnn", "mlp", "lenet"])
def test_models_are_opacus_compatible_and_shape_right(name):
    model = build_task_model(name, 26)
    assert ModuleValidator.validate(model, strict=True) == []
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, 26)


def test_build_model_is_seeded():
    sc = Scenario.from_dict({"scenario": {"seed": 3}})
    a, b = build_model(sc, 10), build_model(sc, 10)
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)


def test_local_batches_deterministic_and_cover_epoch():
    sc = Scenario.from_dict({"training": {"batch_size": 7}})
    b1 = local_batches(50, sc, party=1, server_round=2)
    assert [len(b) for b in b1] == [7] * 7 + [1]
    assert sorted(torch.cat(b1).tolist()) == list(range(50))
    assert all(torch.equal(x, y) for x, y in zip(b1, local_batches(50, sc, 1, 2), strict=True))
    assert not torch.equal(torch.cat(b1), torch.cat(local_batches(50, sc, 1, 3)))
    steps = Scenario.from_dict({"training": {"batch_size": 4, "local_steps": 3}})
    assert [len(b) for b in local_batches(50, steps, 0, 1)] == [4, 4, 4]


def test_train_local_same_seed_same_weights():
    sc = Scenario.from_dict({"data": {"samples_per_party": 200}, "training": {"local_steps": 3}})
    data = round_batch_data(sc, 0, 1)
    assert len(data) == 3 * 32
    outs = []
    for _ in range(2):
        model = build_model(sc, 10)
        stats = train_local(model, data, sc, party=0, server_round=1, device=torch.device("cpu"))
        assert stats.steps == 3
        outs.append(torch.cat([p.flatten() for p in model.parameters()]))
    assert torch.equal(outs[0], outs[1])


def _fake_results():
    return {
        "scenario": "x",
        "seed": 0,
        "config": {},
        "final": {"accuracy": 0.5, "loss": 1.0},
        "rounds": [{"round": 1, "accuracy": 0.5, "loss": 1.0, "seconds": 1.0, "epsilon": 0.3}],
        "attacks": [],
        "timing": {"total_seconds": 1.0},
        "versions": {},
    }


def test_write_run_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "run"
    write_run(out, _fake_results(), {})
    first = (out / "results.json").read_text()

    class Boom:
        def savefig(self, *a, **k):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_run(out, {**_fake_results(), "seed": 9}, {"bad.png": Boom()})
    assert (out / "results.json").read_text() == first  # previous run untouched
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging left behind


def test_report_rerenders(tmp_path, capsys):
    write_run(tmp_path / "r", _fake_results(), {})
    (tmp_path / "r" / "report.md").unlink()
    assert cli_main(["report", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    assert "50.00%" in text and "training.png" in text
    assert cli_main(["report", str(tmp_path / "nope")]) == 2


def test_cli_scenarios_lists_descriptions(capsys):
    assert cli_main(["scenarios"]) == 0
    out = capsys.readouterr().out
    assert "three_hospitals" in out and "Three hospitals" in out


def test_cli_run_rejects_bad_override(capsys):
    assert cli_main(["run", "three_hospitals", "--set", "data.parties=0"]) == 2
    assert "data.parties" in capsys.readouterr().err
    json.dumps(_fake_results())
