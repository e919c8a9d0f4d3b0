"""The imprint attack of a malicious server on a cross-device federation: parties sampled
per round, dropouts after the masked inputs, masking secure aggregation, with and without
party-level distributed DP (thousand_clinics_imprint scaled down, in process)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from privfl.architecture import build_model
from privfl.attacks.imprint import aggregate_noise_std, imprinted_samples, summed_parties
from privfl.clients.app import make_client_app
from privfl.clients.policy import drops_out
from privfl.config import SCENARIO_KEY, Scenario, load_scenario
from privfl.data import load_federation
from privfl.flower.loopback import LoopbackGrid
from privfl.strategies.factory import build_strategy
from privfl.strategies.imprint_server import ImprintServer
from privfl.strategies.rounds import sample_parties
from privfl.strategies.wrapper import strategy_chain

torch.set_num_threads(1)

SECRET = bytes(range(32))
PARTIES, PER_ROUND, BINS = 200, 24, 384  # N = 24 x 8 = 192 records a round, k = 2N
SEED = 2  # two of round 1's parties drop out at unmask
SMALL = [
    f"scenario.seed={SEED}",
    f"data.parties={PARTIES}",
    f"scenario.parties_per_round={PER_ROUND}",
    "scenario.rounds=1",
    "attack.imprint.round=1",
    f"attack.imprint.bins={BINS}",
    "data.server_test_samples=100",
]
DP = ["defense.dp.mode=distributed", "defense.dp.epsilon=3.0"]


def _small(*extra: str) -> Scenario:
    return load_scenario("scenarios/thousand_clinics_imprint.toml", [*SMALL, *extra])


def _attack(server: Scenario, parties: Scenario | None = None) -> ImprintServer:
    """One round of ``server``'s federation, the parties holding ``parties`` (default: the
    same scenario); returns the malicious server."""
    nodes = {100 + p: p for p in range(PARTIES)}
    grid = LoopbackGrid(make_client_app(parties or server, secret=SECRET), nodes)
    strategy = build_strategy(server, nodes)
    assert isinstance(strategy, ImprintServer)
    model = build_model(server, load_federation(server).num_classes)
    cfg = ConfigRecord({SCENARIO_KEY: server.to_json()})
    strategy.start(
        grid,
        ArrayRecord(model.state_dict()),
        num_rounds=1,
        train_config=cfg,
        evaluate_config=cfg,
    )
    return strategy


def test_expected_samples_follow_the_round_not_the_federation() -> None:
    sc = load_scenario("scenarios/thousand_clinics_imprint.toml")
    assert summed_parties(sc) == 100  # dropouts at unmask are still summed
    assert imprinted_samples(sc) == 800
    early = sc.replace(["scenario.dropout_stage=train"])
    assert summed_parties(early) == 95 and imprinted_samples(early) == 760
    # The rounding noise of a sum of 100, not 1,000, parties.
    assert aggregate_noise_std(sc) == pytest.approx(2.0**-20 / (12 * 100) ** 0.5)
    dp = load_scenario("scenarios/thousand_clinics_imprint_dp.toml")
    # The same defense but DP, and a 32-bit ring: the noisy sum of 100 parties fits it.
    assert dp.defense.dp == sc.replace(DP).defense.dp
    assert dp.defense.secure_aggregation == sc.defense.secure_aggregation
    assert (dp.defense.secagg.ring_bits, sc.defense.secagg.ring_bits) == (32, 62)
    assert dp.attack == sc.attack and dp.data == sc.data and dp.training == sc.training


def test_most_occupied_bins_give_a_record_without_dp() -> None:
    sc = _small()
    server = _attack(sc)
    (report,) = server.attack_reports()
    sampled = sample_parties(range(PARTIES), PER_ROUND, seed=SEED, server_round=1)
    dropped = [p for p in sampled if drops_out(sc, p, 1)]
    assert dropped
    # Scored against the records of the parties actually summed: every sampled party,
    # the ones that dropped out after their masked inputs included.
    (secagg,) = [s for s in strategy_chain(server) if hasattr(s, "included")]
    assert sorted(secagg.included[1]) == sampled
    assert report.total == PER_ROUND * 8
    occupied = report.metrics["occupied_bins"]
    assert report.recovered > 0.5 * occupied
    assert report.metrics["recovered_per_occupied_bin"] == report.recovered / occupied
    # k = 2N: about 0.6 N of the records are alone in a bin.
    assert report.recovered > 0.4 * report.total
    assert report.metrics["psnr_mean"] > 40


def test_distributed_dp_leaves_nothing_recognisable() -> None:
    server = _attack(_small(*DP))
    (report,) = server.attack_reports()
    assert report.total == PER_ROUND * 8
    assert report.recovered == 0
    assert any("no bin passed the single-sample test" in n for n in report.notes)
    assert report.metrics["psnr_mean"] < 15


def test_parties_holding_dp_refuse_a_server_that_drops_it() -> None:
    """The server may ship the rigged model and choose the learning rate; it may not
    take away the parties' noise: every train request without it is refused."""
    server = _attack(_small(), parties=_small(*DP))
    (report,) = server.attack_reports()
    assert report.recovered == 0 and report.total == 0
    (rounds,) = [s for s in strategy_chain(server) if hasattr(s, "sampled")]
    refused = [f for f in rounds.faults.get(1, []) if "downgrade refused" in f["reason"]]
    assert len(refused) == PER_ROUND
