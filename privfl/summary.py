"""What the strategies of a finished run report, merged into results.json.

:func:`privfl.server.run_federation` runs the rounds; this module turns what its strategy
chain collected — per-round ε (an accountant's or the parties' own), the parties sampled,
every fault and refusal, each party's ε, a malicious participant's side-channel report —
into the ``rounds`` rows and ``final`` entries, and states what the DP guarantee covers.
Strategies are read through the protocols of :mod:`privfl.reporting`, never by attribute
probing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flwr
import torch
from flwr.serverapp.strategy import Strategy

from privfl import __version__
from privfl.config import Scenario
from privfl.evaluation.imprint import participant_report
from privfl.flower import side
from privfl.reporting import CarriesSideChannel, ReportsFaults, ReportsPrivacySpent
from privfl.results import AttackReport
from privfl.strategies.rounds import FederationRounds


def merge_client_metrics(rounds: list[dict[str, Any]], result: Any) -> None:
    for row in rounds:
        ev = result.evaluate_metrics_clientapp.get(row["round"])
        if ev is not None and "eval-acc" in ev:
            row["party_accuracy"] = float(ev["eval-acc"])
        tr = result.train_metrics_clientapp.get(row["round"])
        if tr is not None and "train-loss" in tr:
            row["train_loss"] = float(tr["train-loss"])


def _side_channels(chain: list[Strategy]) -> list[CarriesSideChannel]:
    return [s for s in chain if isinstance(s, CarriesSideChannel)]


def merge_epsilon(rounds: list[dict[str, Any]], chain: list[Strategy]) -> None:
    """ε per round: from a DP strategy's accountant, or the largest any DP-SGD party spent."""
    for s in _side_channels(chain):
        for rnd, records in s.side_channel.items():
            spent = [
                float(rec["epsilon"])
                for key, rec in records.items()
                if side.name_of(key) == side.EPSILON and "epsilon" in rec
            ]
            for row in rounds:
                if row["round"] == rnd and spent:
                    row["epsilon"] = max(spent)
    for s in chain:
        history = s.epsilon_history if isinstance(s, ReportsPrivacySpent) else None
        if history:
            for row in rounds:
                if row["round"] in history:
                    row["epsilon"] = float(history[row["round"]])


NEIGHBOURING = {
    "none": "no DP guarantee",
    "client": (
        "record-level: datasets differing by adding or removing one record of one party "
        "(replacing a record costs twice the ε)"
    ),
    "global": (
        "party-level: federations differing by adding or removing one party's whole "
        "data (replacing a party costs twice the ε); the server adds the noise, so it must "
        "be trusted to"
    ),
    "distributed": (
        "party-level: federations differing by adding or removing one party's whole "
        "data (replacing a party costs twice the ε); the parties add the noise inside "
        "secure aggregation, so it holds against the server"
    ),
}


def privacy_statement(scenario: Scenario) -> dict[str, Any]:
    """What the run's DP guarantee covers, whose noise it is, and what the parties enforce."""
    party = scenario.party
    if party.trust_server:
        noise = "keyed from the scenario seed (the parties trust the server: it can regenerate it)"
    elif party.noise == "lab":
        noise = "lab: keyed from each party's local secret and the seed (reproducible there)"
    else:
        noise = "os: each party's OS CSPRNG (secret, not reproducible)"
    return {
        "dp_mode": scenario.defense.dp.mode,
        "neighbouring": NEIGHBOURING[scenario.defense.dp.mode],
        "noise": noise,
        "parties_trust_server": party.trust_server,
        "min_parties": party.resolve_min_parties(scenario.data.parties),
    }


def merge_sampled(rounds: list[dict[str, Any]], chain: list[Strategy]) -> None:
    """The parties sampled for each round (``scenario.parties_per_round``)."""
    for s in chain:
        if isinstance(s, FederationRounds):
            for row in rounds:
                if row["round"] in s.sampled:
                    row["parties"] = list(s.sampled[row["round"]])


def merge_faults(
    rounds: list[dict[str, Any]], chain: list[Strategy], party_of: Mapping[int, int]
) -> None:
    """Every refusal, failed reply, exclusion and skipped round, per round."""
    for s in chain:
        if not isinstance(s, ReportsFaults):
            continue
        for rnd, faults in s.faults.items():
            for row in rounds:
                if row["round"] == rnd:
                    for f in faults:
                        f = dict(f)
                        if "node" in f:
                            f["party"] = party_of.get(f.pop("node"))
                        row.setdefault("faults", []).append(f)


def party_epsilon(chain: list[Strategy]) -> dict[str, float]:
    """Each party's own account of the ε it spent (the largest it reported)."""
    out: dict[str, float] = {}
    for s in _side_channels(chain):
        for records in s.side_channel.values():
            for key, rec in records.items():
                if side.name_of(key) == side.EPSILON and "party" in rec and "epsilon" in rec:
                    p = str(int(rec["party"]))
                    out[p] = max(out.get(p, 0.0), float(rec["epsilon"]))
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def participant_reports(scenario: Scenario, chain: list[Strategy]) -> list[AttackReport]:
    if not (
        scenario.attack.kind == "imprint"
        and scenario.attack.imprint.role == "malicious-participant"
    ):
        return []
    by_round: dict[int, dict[str, Any]] = {}
    for s in _side_channels(chain):
        for rnd, records in s.side_channel.items():
            by_round.setdefault(rnd, {}).update(records)
    return [participant_report(by_round, scenario)]


def versions() -> dict[str, str]:
    return {"privfl": __version__, "flwr": flwr.__version__, "torch": torch.__version__}
