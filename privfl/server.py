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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from privfl import summary
from privfl.architecture import build_model
from privfl.audit import RunAuditor, audit_report
from privfl.config import SCENARIO_KEY, Scenario, load_scenario, resolve_scenario_path
from privfl.data import load_federation
from privfl.dp import utility_warning
from privfl.flower import wire
from privfl.report import write_run
from privfl.reporting import (
    ReportsAttacks,
    ReportsFaults,
    ReportsPrivacySpent,
    Stoppable,
    TakesCanaryParties,
)
from privfl.results import AttackReport
from privfl.strategies.factory import build_strategy
from privfl.strategies.wrapper import StrategyWrapper, strategy_chain
from privfl.training import evaluate, resolve_device, seed_torch

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
                got = wire.curious_read(msg.content, self._sent, self.scenario) or sent
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
    roster: Mapping[int, bytes] | None = None,
) -> dict[str, Any]:
    """Run ``scenario`` on ``grid`` and write results.json + report.md into ``out_dir``.

    ``auditor`` is the privacy audit whose canary records the parties were handed
    (``make_client_app(..., auditor=)``); it watches every global model the server
    releases and adds a ``privacy-audit`` entry. ``roster`` is the federation's public
    roster, where the server holds it (see :func:`build_strategy`).
    """
    if scenario.audit.enabled and auditor is None:
        raise ValueError(
            "audit.enabled: the parties need the auditor's canaries; run the scenario with "
            "privfl run (or privfl.run_scenario), which hands them out"
        )
    t_start = time.perf_counter()
    progress = sys.stderr.isatty() if progress is None else progress
    fed = load_federation(scenario)
    seed_torch(scenario.scenario.seed)
    reports: list[AttackReport] = []
    rounds: list[dict[str, Any]] = []
    final: dict[str, Any] = {}
    startup = 0.0
    round_0: dict[str, Any] = {}
    mia = scenario.attack.kind == "membership-inference"

    if mia and scenario.attack.membership.target == "single":
        # The hospital-API target is one model trained in-house: no federation involved.
        # sklearn and pandas (the membership harness) load only for a membership scenario.
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
        strategy = build_strategy(scenario, party_of, roster=roster)
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
        summary.merge_client_metrics(rounds, result)
        summary.merge_epsilon(rounds, strategy_chain(strategy))
        summary.merge_faults(rounds, strategy_chain(strategy), party_of)
        if scenario.scenario.parties_per_round:
            summary.merge_sampled(rounds, strategy_chain(strategy))
        if result.arrays:  # empty when no round released a model (DP budget)
            model.load_state_dict(result.arrays.to_torch_state_dict())
        for s in strategy_chain(strategy):
            if isinstance(s, ReportsAttacks):
                reports.extend(s.attack_reports())
        reports.extend(summary.participant_reports(scenario, strategy_chain(strategy)))
        if mia:
            # sklearn and pandas load only for a membership scenario.
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
        party_eps = summary.party_epsilon(strategy_chain(strategy))
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
        "privacy": summary.privacy_statement(scenario),
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
        "versions": summary.versions(),
    }
    figures = {name: fig for r in reports for name, fig in r.figures.items()}
    write_run(out_dir, results, figures, notes={r.name + ":" + r.target: r.notes for r in reports})
    return results


def model_utility_warning(scenario: Scenario, num_classes: int) -> str | None:
    """:func:`privfl.dp.utility_warning` for the scenario's own model."""
    dim = sum(p.numel() for p in build_model(scenario, num_classes).parameters())
    return utility_warning(scenario, dim)


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
    roster: Mapping[int, bytes] | None = None,
) -> ServerApp:
    """A ServerApp for a fixed scenario (``privfl run``) or one read from the run config;
    ``roster``: the federation's public roster, where the server is handed one."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            if scenario is None:
                sc, out = scenario_from_run_config(context.run_config)
                # Under `flwr run` Flower's grid waits 3 s between polls for replies. Flower's
                # deployment side (privfl.deployment) loads only there.
                from privfl.deployment import PollingGrid

                grid = PollingGrid(grid)
            else:
                sc, out = scenario, Path(out_dir or ".")
            results = run_federation(
                grid, sc, out, progress=progress, auditor=auditor, roster=roster
            )
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
