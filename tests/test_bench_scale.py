"""``privfl bench scale``: the rows it writes, and the rows it refuses to fake."""

from __future__ import annotations

import json
import math

import pytest

from privfl.bench import scale
from privfl.cli import main as cli_main
from privfl.errors import UserError

FIELDS = {
    "method",
    "parties",
    "per_round",
    "round_seconds",
    "party_seconds",
    "server_seconds",
    "bytes_per_party",
    "peak_memory_bytes",
}


def test_small_bench_writes_the_schema_and_masking_bytes_grow_with_n(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--parties", "4,8", "--methods", "plain,masking", "--rounds", "1", "--out", str(out)]
    assert scale.main(argv) == 0
    rows = json.loads((out / "scale.json").read_text())
    assert [(r["method"], r["parties"]) for r in rows] == [
        ("plain", 4),
        ("masking", 4),
        ("plain", 8),
        ("masking", 8),
    ]
    for r in rows:
        assert set(r) == FIELDS
        assert r["per_round"] == r["parties"]
        assert r["round_seconds"] > 0 and r["party_seconds"] > 0 and r["server_seconds"] > 0
        assert r["round_seconds"] > r["server_seconds"]
        assert r["peak_memory_bytes"] > 2**20
    by = {(r["method"], r["parties"]): r for r in rows}
    # Each masking party sends its public keys and one Shamir share per neighbour.
    assert by[("masking", 8)]["bytes_per_party"] > by[("masking", 4)]["bytes_per_party"]
    # Plain FedAvg: one model per party whatever n.
    assert by[("plain", 8)]["bytes_per_party"] == pytest.approx(
        by[("plain", 4)]["bytes_per_party"], rel=0.01
    )
    text = capsys.readouterr().out
    # Each masking row says how it compares with plain FedAvg's round at the same n.
    row = next(line.split() for line in text.splitlines() if line.split()[3:4] == ["masking"])
    assert float(row[5]) == pytest.approx(
        by[("masking", 4)]["round_seconds"] / by[("plain", 4)]["round_seconds"], abs=0.01
    )
    assert "masking, party seconds above plain FedAvg's against the round's parties (4..8)" in text
    assert "per doubling of n" in text


def test_methods_that_cannot_run_are_absent_with_a_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(scale, "ADDITIVE_MAX", 1)
    rows, notes = scale.run([2], ["additive", "flower-secagg+"], 1, [])
    assert rows == []
    assert notes == [scale.ADDITIVE_WHY, scale.FLOWER_FEW]
    assert scale.skipped("additive", 1000) == scale.ADDITIVE_WHY  # 100 per round
    assert scale.skipped("masking", 1000) is None
    out = tmp_path / "bench"
    assert scale.main(["--parties", "1000", "--methods", "additive", "--out", str(out)]) == 0
    assert json.loads((out / "scale.json").read_text()) == []
    assert "each party sends a share of its whole update" in capsys.readouterr().out


def test_per_round_and_scenarios_follow_the_issue():
    assert [scale.per_round(n) for n in scale.PARTIES] == [10, 30, 100, 100, 100]
    sc = scale.scenario_for("masking+dp", 300, 3, [])
    assert sc.data.parties == 300 and sc.scenario.parties_per_round == 100
    assert sc.defense.secure_aggregation == "masking" and sc.defense.dp.mode == "distributed"
    assert sc.defense.secagg.neighbours > 0  # automatic O(log n) graph at 100 per round
    assert sc.model.hidden == 32 and sc.data.samples_per_party == 8
    plain = scale.scenario_for("plain", 10, 3, ["training.lr=0.05"])
    assert plain.scenario.parties_per_round == 0 and plain.training.lr == 0.05


def test_slopes_tell_log_n_from_n():
    ks = (8, 16, 32, 64, 128)
    rows = [scale.Row("masking", k, k, 1.0, 0.01 * math.log2(k), 0.1, 1.0, 1) for k in ks]
    s = scale.slopes(rows)
    assert not s.overhead and s.span == (8, 128)
    assert s.log2_slope == pytest.approx(0.01) and s.log2_r2 == pytest.approx(1.0)
    assert s.n_r2 < 0.95
    # With plain rows at the same n, the fit is to the cost above plain's.
    plain = [scale.Row("plain", k, k, 1.0, 0.005 * k, 0.1, 1.0, 1) for k in ks]
    mixed = [
        scale.Row("masking", k, k, 1.0, 0.005 * k + 0.01 * math.log2(k), 0.1, 1.0, 1) for k in ks
    ]
    s = scale.slopes(plain + mixed)
    assert s.overhead and s.log2_slope == pytest.approx(0.01)
    assert scale.slopes(rows[:1]) is None


def test_bad_options_are_user_errors(capsys):
    with pytest.raises(UserError, match="--methods: unknown method 'secagg'"):
        scale.parse_methods("plain,secagg")
    with pytest.raises(UserError, match="--parties: 'x'"):
        scale.parse_parties("10,x")
    assert cli_main(["bench", "scale", "--parties", "1"]) == 2
    assert "privfl: error: --parties" in capsys.readouterr().err
