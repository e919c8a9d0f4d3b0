"""The privfl ServerApp: builds the strategy a scenario asks for and runs it.

Composition (outermost first, :func:`privfl.strategies.factory.build_strategy`): the
attack wrapper (it *is* the server, and sees what the server sees) ⊃ SecureAggregation
⊃ DPGlobalUpdate ⊃ FederationRounds ⊃ the ``[strategy]`` class (FedAvg by default).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from privfl import __version__
from privfl.architecture import build_model
from privfl.audit import RunAuditor, audit_report
from privfl.config import SCENARIO_KEY, Scenario, load_scenario, resolve_scenario_path
from privfl.data import load_federation
from privfl.dp import utility_warning
from privfl.reporting import (
    CarriesSideChannel,
    ReportsAttacks,
    ReportsFaults,
    ReportsPrivacySpent,
    Stoppable,
    TakesCanaryParties,
)
from privfl.results import AttackReport
from privfl.strategies.factory import build_strategy
from privfl.strategies.rounds import FederationRounds
from privfl.strategies.secure_aggregation import curious_read
from privfl.strategies.wrapper import StrategyWrapper, strategy_chain
from privfl.training import evaluate, resolve_device

log = logging.getLogger("privfl")

HELLO = "query.privfl_hello"


def discover_parties(grid: Grid, parties: int, timeout: float) -> dict[int, int]:
    """Wait for every SuperNode and learn which party (partition) each node holds."""
    deadline = time.monotonic() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(node_ids)} of data.parties = {parties} SuperNodes connected "
                f"within {timeout:.0f} s; start the federation with num-supernodes={parties}"
            )
        time.sleep(0.2)
    if len(node_ids) > parties:
        raise RuntimeError(
            f"{len(node_ids)} SuperNodes are connected but the scenario has data.parties = "
            f"{parties}; run the federation with num-supernodes={parties}"
        )
    msgs = [Message(RecordDict(), dst_node_id=n, message_type=HELLO) for n in node_ids]
    party_of: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed: {reply.error.reason}")
        party_of[reply.metadata.src_node_id] = int(reply.content["hello"]["partition-id"])
    if sorted(party_of.values()) != list(range(parties)):
        raise RuntimeError(
            f"SuperNodes hold partitions {sorted(party_of.values())}, expected 0..{parties - 1}"
        )
    return party_of


class _RoundEvaluator:
    """Central evaluation after every round, timing and a progress display."""

    def __init__(self, scenario: Scenario, model: torch.nn.Module, progress: bool) -> None:
        self.scenario = scenario
        self.model = model
        self.fed = load_federation(scenario)
        self.device = resolve_device(scenario.scenario.device)
        self.rounds: list[dict[str, Any]] = []
        self.initial: dict[str, float] = {}
        self.stopped: str | None = None
        self.auditor: RunAuditor | None = None
        self._chain: list[Strategy] = []
        self._t = time.perf_counter()
        self._bar: Any = None
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                transient=False,
            )
            self._task = self._bar.add_task(
                scenario.scenario.name, total=scenario.scenario.rounds, status=""
            )
            self._bar.start()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if self.stopped is not None:  # the run ended early: later rounds ran nothing
            return MetricRecord({})
        self.model.load_state_dict(arrays.to_torch_state_dict())
        if self.auditor is not None:
            self.auditor.observe({k: v.numpy() for k, v in arrays.items()})
        self._check_divergence(server_round)
        loss, acc = evaluate(self.model, self.fed.server_test, self.device)
        now = time.perf_counter()
        if server_round == 0:
            self.initial = {"accuracy": acc, "loss": loss}
        else:
            self.rounds.append(
                {"round": server_round, "accuracy": acc, "loss": loss, "seconds": now - self._t}
            )
            if self._bar is not None:
                self._bar.update(self._task, advance=1, status=f"acc {acc:.2%}  loss {loss:.3f}")
            else:
                log.info("round %d: accuracy %.4f loss %.4f", server_round, acc, loss)
        self._t = now
        return MetricRecord({"accuracy": acc, "loss": loss})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()

    def watch(self, chain: list[Strategy]) -> None:
        """Stop the run cleanly (no more rounds) once a party reports divergence."""
        self._chain = chain

    def _check_divergence(self, server_round: int) -> None:
        chain = self._chain
        reasons = [
            f["reason"]
            for s in chain
            if isinstance(s, ReportsFaults)
            for f in s.faults.get(server_round, [])
            if str(f.get("reason", "")).startswith("diverged")
        ]
        if not all(torch.isfinite(v).all() for v in self.model.state_dict().values()):
            reasons.append("diverged: the global model has non-finite weights")
        if reasons and self.stopped is None:
            self.stopped = f"round {server_round}: {reasons[0]}"
            log.warning("stopping the run: %s", self.stopped)
            for s in chain:
                if isinstance(s, Stoppable):
                    s.stop_reason = self.stopped


class AuditPartyView(StrategyWrapper):
    """Hands the auditor what the server received from one party each round (outermost:
    the plain update, or under secure aggregation whatever its masked payload decodes to)."""

    def __init__(
        self, inner: Strategy, *, auditor: RunAuditor, node: int, scenario: Scenario
    ) -> None:
        super().__init__(inner)
        self.auditor, self.node, self.scenario = auditor, node, scenario
        self._sent: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Any:
        self._sent = arrays
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Any) -> Any:
        replies = list(replies)
        sent = {k: v.numpy() for k, v in self._sent.items()} if self._sent else None
        for msg in replies:
            if msg.metadata.src_node_id != self.node or msg.has_error() or sent is None:
                continue
            if "arrays" in msg.content.array_records:
                got = {k: v.numpy() for k, v in msg.content["arrays"].items()}
            else:
                # What a curious server decodes of a masked input (None: only ciphertexts).
                got = curious_read(msg.content, self._sent, self.scenario) or sent
            self.auditor.observe_party(sent, self.auditor.flatten(got))
        return self.inner.aggregate_train(server_round, replies)


def make_auditor(scenario: Scenario, num_classes: int) -> RunAuditor | None:
    """The privacy audit a scenario asks for (``audit.enabled``), or None."""
    au = scenario.audit
    if not au.enabled:
        return None
    params = list(build_model(scenario, num_classes).named_parameters())
    mode = scenario.defense.dp.mode
    public = load_federation(scenario).public
    return RunAuditor(
        view=au.view,
        target_party=au.target_party,
        records=(public.images, public.labels) if au.view == "final-model" else None,
        num_classes=num_classes,
        mode=mode,
        canaries=au.canaries,
        param_names=[n for n, _ in params],
        sizes=[p.numel() for _, p in params],
        clip=scenario.defense.dp.clip if mode != "none" else 1.0,
        parties=scenario.data.parties,
        confidence=au.confidence,
        guess_fraction=au.guess_fraction,
    )


def run_federation(
    grid: Grid | None,
    scenario: Scenario,
    out_dir: Path,
    *,
    progress: bool | None = None,
    auditor: RunAuditor | None = None,
) -> dict[str, Any]:
    """Run ``scenario`` on ``grid`` and write results.json + report.md into ``out_dir``.

    ``auditor`` is the privacy audit whose canary records the parties were handed
    (``make_client_app(..., auditor=)``); it watches every global model the server
    releases and adds a ``privacy-audit`` entry.
    """
    if scenario.audit.enabled and auditor is None:
        raise ValueError(
            "audit.enabled: the parties need the auditor's canaries; run the scenario with "
            "privfl run (or privfl.run_scenario), which hands them out"
        )
    from privfl.report import write_run

    t_start = time.perf_counter()
    progress = sys.stderr.isatty() if progress is None else progress
    fed = load_federation(scenario)
    torch.manual_seed(scenario.scenario.seed)
    reports: list[AttackReport] = []
    rounds: list[dict[str, Any]] = []
    final: dict[str, Any] = {}
    startup = 0.0
    round_0: dict[str, Any] = {}
    mia = scenario.attack.kind == "membership-inference"

    if mia and scenario.attack.membership.target == "single":
        # The hospital-API target is one model trained in-house: no federation involved.
        from privfl.evaluation.membership import run_membership

        reports = run_membership(scenario, device=resolve_device(scenario.scenario.device))
        target_acc = reports[0].metrics.get("target_test_accuracy") if reports else None
        final = {"accuracy": target_acc, "loss": None}
    else:
        if grid is None:
            raise ValueError("a federated scenario needs a Flower grid")
        party_of = discover_parties(grid, scenario.data.parties, scenario.scenario.timeout)
        startup = time.perf_counter() - t_start
        model = build_model(scenario, fed.num_classes)
        strategy = build_strategy(scenario, party_of)
        round_evaluator = _RoundEvaluator(
            scenario, build_model(scenario, fed.num_classes), progress
        )
        round_evaluator.watch(strategy_chain(strategy))
        round_evaluator.auditor = auditor
        if auditor is not None and auditor.view == "party-update":
            node = next(n for n, p in party_of.items() if p == auditor.target_party)
            strategy = AuditPartyView(strategy, auditor=auditor, node=node, scenario=scenario)
        if auditor is not None and auditor.canary_parties is not None:
            public = auditor.audit.canaries // 2  # the count they stand for is public
            for s in strategy_chain(strategy):
                if isinstance(s, TakesCanaryParties):
                    s.canary_parties = lambda: (auditor.canary_party_sum()[0], public)
        config = ConfigRecord({SCENARIO_KEY: scenario.to_json()})
        try:
            result = strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(model.state_dict()),
                num_rounds=scenario.scenario.rounds,
                timeout=scenario.scenario.timeout,
                train_config=config,
                evaluate_config=ConfigRecord({SCENARIO_KEY: scenario.to_json()}),
                evaluate_fn=round_evaluator,
            )
        finally:
            round_evaluator.close()
        rounds = round_evaluator.rounds
        round_0 = round_evaluator.initial
        _merge_client_metrics(rounds, result)
        _merge_epsilon(rounds, strategy_chain(strategy))
        _merge_faults(rounds, strategy_chain(strategy), party_of)
        if scenario.scenario.parties_per_round:
            _merge_sampled(rounds, strategy_chain(strategy))
        if result.arrays:  # empty when no round released a model (DP budget)
            model.load_state_dict(result.arrays.to_torch_state_dict())
        for s in strategy_chain(strategy):
            if isinstance(s, ReportsAttacks):
                reports.extend(s.attack_reports())
        reports.extend(_participant_reports(scenario, strategy_chain(strategy)))
        if mia:
            from privfl.evaluation.membership import run_membership

            reports.extend(
                run_membership(
                    scenario,
                    target_model=model,
                    federation=fed,
                    device=resolve_device(scenario.scenario.device),
                )
            )
        last = rounds[-1] if rounds else round_evaluator.initial
        final = {"accuracy": last.get("accuracy"), "loss": last.get("loss")}
        if any("epsilon" in r for r in rounds):
            final["epsilon"] = max(r["epsilon"] for r in rounds if "epsilon" in r)
            final["delta"] = scenario.defense.dp.delta
        party_eps = _party_epsilon(strategy_chain(strategy))
        if party_eps:
            final["party_epsilon"] = party_eps
        exhausted = [
            s
            for s in strategy_chain(strategy)
            if isinstance(s, ReportsPrivacySpent) and s.exhausted
        ]
        if exhausted:
            final["stopped_early"] = "privacy budget exhausted"
        if round_evaluator.stopped:
            final["stopped_early"] = f"training diverged in {round_evaluator.stopped}"
        if auditor is not None:
            if auditor.view == "final-model":
                auditor.observe_final(model)
            accounted = final.get("epsilon", math.inf)
            audit = auditor.result(
                epsilon_accounted=accounted if accounted is not None else math.inf,
                delta=scenario.defense.dp.delta,
            )
            reports.append(audit_report(audit))
            if audit.violation:
                final["privacy_violation"] = (
                    f"the audit's ε lower bound {audit.epsilon_lower_bound:.3g} exceeds the "
                    f"accounted ε {accounted:.3g}"
                )

    total = time.perf_counter() - t_start
    results = {
        "scenario": scenario.scenario.name,
        "seed": scenario.scenario.seed,
        "config": scenario.to_dict(),
        "privacy": privacy_statement(scenario),
        "warnings": [w for w in [model_utility_warning(scenario, fed.num_classes)] if w],
        "rounds": rounds,
        "round_0": round_0,
        "final": final,
        "attacks": [r.to_json() for r in reports],
        "timing": {
            "total_seconds": total,
            "startup_seconds": startup,
            "per_round_seconds": [r["seconds"] for r in rounds],
        },
        "versions": _versions(),
    }
    figures = {name: fig for r in reports for name, fig in r.figures.items()}
    write_run(out_dir, results, figures, notes={r.name + ":" + r.target: r.notes for r in reports})
    return results


def _merge_client_metrics(rounds: list[dict[str, Any]], result: Any) -> None:
    for row in rounds:
        ev = result.evaluate_metrics_clientapp.get(row["round"])
        if ev is not None and "eval-acc" in ev:
            row["party_accuracy"] = float(ev["eval-acc"])
        tr = result.train_metrics_clientapp.get(row["round"])
        if tr is not None and "train-loss" in tr:
            row["train_loss"] = float(tr["train-loss"])


def _side_channels(chain: list[Strategy]) -> list[CarriesSideChannel]:
    return [s for s in chain if isinstance(s, CarriesSideChannel)]


def _merge_epsilon(rounds: list[dict[str, Any]], chain: list[Strategy]) -> None:
    """ε per round: from a DP strategy's accountant, or the largest any DP-SGD party spent."""
    for s in _side_channels(chain):
        for rnd, records in s.side_channel.items():
            spent = [
                float(rec["epsilon"])
                for key, rec in records.items()
                if key.endswith("dp-epsilon") and "epsilon" in rec
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


def model_utility_warning(scenario: Scenario, num_classes: int) -> str | None:
    """:func:`privfl.dp.utility_warning` for the scenario's own model."""
    dim = sum(p.numel() for p in build_model(scenario, num_classes).parameters())
    return utility_warning(scenario, dim)


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


def _merge_sampled(rounds: list[dict[str, Any]], chain: list[Strategy]) -> None:
    """The parties sampled for each round (``scenario.parties_per_round``)."""
    for s in chain:
        if isinstance(s, FederationRounds):
            for row in rounds:
                if row["round"] in s.sampled:
                    row["parties"] = list(s.sampled[row["round"]])


def _merge_faults(
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


def _party_epsilon(chain: list[Strategy]) -> dict[str, float]:
    """Each party's own account of the ε it spent (the largest it reported)."""
    out: dict[str, float] = {}
    for s in _side_channels(chain):
        for records in s.side_channel.values():
            for key, rec in records.items():
                if key.endswith("dp-epsilon") and "party" in rec and "epsilon" in rec:
                    p = str(int(rec["party"]))
                    out[p] = max(out.get(p, 0.0), float(rec["epsilon"]))
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def _participant_reports(scenario: Scenario, chain: list[Strategy]) -> list[AttackReport]:
    if not (
        scenario.attack.kind == "imprint"
        and scenario.attack.imprint.role == "malicious-participant"
    ):
        return []
    from privfl.clients.malicious_participant import participant_report

    side: dict[int, dict[str, Any]] = {}
    for s in _side_channels(chain):
        for rnd, records in s.side_channel.items():
            side.setdefault(rnd, {}).update(records)
    return [participant_report(side, scenario)]


def _versions() -> dict[str, str]:
    import flwr

    return {"privfl": __version__, "flwr": flwr.__version__, "torch": torch.__version__}


# --------------------------------------------------------------------------- ServerApp


def scenario_from_run_config(run_config: Mapping[str, Any]) -> tuple[Scenario, Path]:
    """The scenario and output folder named by ``flwr run``'s run config."""
    overrides = [s for s in str(run_config.get("overrides", "")).split(";") if s.strip()]
    path = resolve_scenario_path(str(run_config.get("scenario", "three_hospitals")))
    scenario = load_scenario(path, overrides)
    out = str(run_config.get("out-dir", "")).strip()
    out_dir = (
        Path(out).expanduser() if out else Path.home() / "privfl-runs" / scenario.scenario.name
    )
    return scenario, out_dir.resolve()


def make_server_app(
    scenario: Scenario | None = None,
    out_dir: Path | None = None,
    *,
    progress: bool | None = None,
    on_done: Callable[[dict[str, Any] | BaseException], None] | None = None,
    auditor: RunAuditor | None = None,
) -> ServerApp:
    """A ServerApp for a fixed scenario (``privfl run``) or one read from the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            if scenario is None:
                sc, out = scenario_from_run_config(context.run_config)
                # Under `flwr run` Flower's grid waits 3 s between polls for replies.
                from privfl.deployment import PollingGrid

                grid = PollingGrid(grid)
            else:
                sc, out = scenario, Path(out_dir or ".")
            results = run_federation(grid, sc, out, progress=progress, auditor=auditor)
            if scenario is None:  # under `flwr run`, say where the outputs went
                print(f"privfl: results written to {out}", file=sys.stderr)
        except BaseException as exc:
            if on_done is not None:
                on_done(exc)
            raise
        if on_done is not None:
            on_done(results)

    return app


server_app = make_server_app()

__all__ = [
    "build_strategy",
    "make_server_app",
    "run_federation",
    "server_app",
    "strategy_chain",
]
