"""The privfl ClientApp: one honest party (a hospital) of a scenario.

A party's defenses come from its own copy of the scenario, never from a server message:
:func:`make_client_app` hands every simulated party its policy directly, and the app
``flwr run`` loads reads it from the SuperNode's node config (``policy``: a scenario
file or the name of a shipped one, ``policy-overrides``; ``data-root``, the folder of
its own data; ``own-data=true`` when every record there is this party's, rather than a
federation to take its partition of; ``identity-key``, ``roster`` and ``lab-secret`` for
its keys) or, failing that, from the run config of a local simulation. The party index
is the SuperNode's ``partition-id``. Mods on the train handler, outermost first: the
policy (refuses what would weaken it), secure aggregation, the malicious participant (a
no-op on honest parties), update clipping.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from privfl.architecture import build_model
from privfl.audit import RunAuditor
from privfl.clients.dp_mods import clip_update_mod
from privfl.clients.dp_sgd import BudgetExhaustedError, dp_sgd_round
from privfl.clients.malicious_participant import participant_mod
from privfl.clients.policy import (
    PartyPolicy,
    RefusalError,
    make_policy_mod,
    party_record,
    refusal_reply,
    simulation_policy,
)
from privfl.clients.secagg import EPSILON_SIDE, register_secure_aggregation, secagg_mod
from privfl.config import (
    SCENARIO_KEY,
    Scenario,
    load_scenario,
    resolve_scenario_path,
    scenario_from_json,
)
from privfl.data import ImageSet, PartyData, load_federation, own_data
from privfl.refusal import diverged_reply
from privfl.secagg.identity import load_roster
from privfl.training import TrainConfig, evaluate, resolve_device, train_local


def scenario_of(msg: Message) -> Scenario:
    """The scenario a server message carries."""
    try:
        text = str(msg.content["config"][SCENARIO_KEY])
    except KeyError as exc:
        raise ValueError(
            f"message {msg.metadata.message_type!r} carries no '{SCENARIO_KEY}' config"
        ) from exc
    return scenario_from_json(text)


def party_of(context: Context) -> int:
    """This node's party index."""
    try:
        return int(context.node_config["partition-id"])
    except KeyError as exc:
        raise ValueError(
            "node_config has no 'partition-id': run privfl parties as simulated SuperNodes "
            "or set --node-config 'partition-id=N'"
        ) from exc


def _setup(msg: Message, context: Context) -> tuple[Scenario, int, torch.nn.Module, torch.device]:
    scenario = scenario_of(msg)
    party = party_of(context)
    if party >= scenario.data.parties:
        raise ValueError(
            f"partition-id {party} but the scenario has {scenario.data.parties} parties"
        )
    torch.set_num_threads(scenario.scenario.cpus_per_party)
    _, num_classes = _my_data(scenario, party, context)
    model = build_model(scenario, num_classes)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return scenario, party, model, resolve_device(scenario.scenario.device)


def _my_data(scenario: Scenario, party: int, context: Context) -> tuple[PartyData, int]:
    # A deployed hospital with only its own records at its data-root trains on all of them
    # (node config own-data=true); otherwise its partition of the scenario's federation.
    if str(context.node_config.get("own-data", "false")).lower() in ("true", "1", "yes"):
        return own_data(scenario)
    fed = load_federation(scenario)
    return fed.parties[party], fed.num_classes


def hello(msg: Message, context: Context) -> Message:
    """Tell the server which party this node is."""
    return Message(
        RecordDict({"hello": ConfigRecord({"partition-id": party_of(context)})}), reply_to=msg
    )


def train(msg: Message, context: Context, *, auditor: RunAuditor | None = None) -> Message:
    """One round of local training: plain SGD, or DP-SGD when ``defense.dp.mode = client``.

    ``auditor`` (a lab run's privacy audit) hands the party its canary records.
    """
    scenario, party, model, device = _setup(msg, context)
    data = _my_data(scenario, party, context)[0].train
    server_round = int(msg.content["config"]["server-round"])
    epsilon: float | None = None
    record = party_record(context)
    dp_mode = scenario.defense.dp.mode
    insert = auditor.party_inserter(party, server_round) if auditor is not None else None
    extra = auditor.party_records(party) if auditor is not None else None
    if extra is not None and len(extra[1]):
        # The auditor's canary records join this party's data like its own.
        data = ImageSet(torch.cat([data.images, extra[0]]), torch.cat([data.labels, extra[1]]))
    if dp_mode == "client":
        try:
            num, loss, epsilon = dp_sgd_round(
                model,
                data,
                scenario,
                party=party,
                server_round=server_round,
                state=context.state,
                device=device,
                noise_secret=record.noise_secret if record else None,
                insert=insert,
            )
        except BudgetExhaustedError as exc:
            return refusal_reply(msg, str(exc))
        metrics = {"num-examples": num, "train-loss": loss}
    else:
        stats = train_local(
            model,
            data,
            TrainConfig.from_scenario(scenario),
            party=party,
            server_round=server_round,
            device=device,
            insert=insert,
            # FedProx's proximal weight: a training hyperparameter, not a defense.
            proximal_mu=float(msg.content["config"].get("proximal-mu", 0.0)),
        )
        metrics = {"num-examples": stats.num_examples, "train-loss": stats.loss}
    bad = [k for k, v in model.state_dict().items() if not torch.isfinite(v).all()]
    if bad:
        return diverged_reply(
            msg,
            f"party {party}: local training in round {server_round} produced non-finite "
            f"weights in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}",
        )
    if dp_mode != "none" and not (record and record.trust_server):
        # Under DP nothing un-noised leaves the party: every party weighs 1 and the
        # training loss is withheld.
        metrics = {"num-examples": 1, "train-loss": 0.0}
    content = RecordDict(
        {"arrays": ArrayRecord(model.cpu().state_dict()), "metrics": MetricRecord(metrics)}
    )
    if epsilon is not None:
        # Privacy spent is public by design; the side channel reaches the server in the
        # clear even under secure aggregation, which hides metrics.
        content[EPSILON_SIDE] = ConfigRecord({"epsilon": epsilon, "party": party})
    return Message(content, reply_to=msg)


def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this party's local test split."""
    scenario, party, model, device = _setup(msg, context)
    test = _my_data(scenario, party, context)[0].test
    loss, acc = evaluate(model, test, device)
    metrics = MetricRecord({"num-examples": len(test), "eval-loss": loss, "eval-acc": acc})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def node_policy(context: Context) -> PartyPolicy:
    """The policy of a SuperNode started by ``flwr run`` or by hand (see the module doc)."""
    party = party_of(context)
    nc, rc = context.node_config, context.run_config
    if "policy" in nc:
        overrides = [o for o in str(nc.get("policy-overrides", "")).split(";") if o.strip()]
        scenario = load_scenario(resolve_scenario_path(str(nc["policy"])), overrides)
    elif "scenario" in rc:
        # A local simulation: the operator's run config is the lab's own scenario.
        overrides = [o for o in str(rc.get("overrides", "")).split(";") if o.strip()]
        scenario = load_scenario(resolve_scenario_path(str(rc["scenario"])), overrides)
    else:
        raise RefusalError(
            "node config has no 'policy' (the scenario file this party holds) and the run "
            "config names no scenario"
        )
    if "data-root" in nc:
        # The hospital's own data folder: what the node trains on never comes from the
        # server's messages.
        scenario = scenario.replace([f"data.root={json.dumps(str(nc['data-root']))}"])
    secret = bytes.fromhex(str(nc["lab-secret"])) if "lab-secret" in nc else None
    policy = simulation_policy(scenario, party, secret)
    if "identity-key" in nc or "roster" in nc:
        if not ("identity-key" in nc and "roster" in nc):
            raise RefusalError("node config needs both 'identity-key' and 'roster', or neither")
        key = bytes.fromhex(Path(str(nc["identity-key"])).read_text().strip())
        policy = PartyPolicy(
            scenario=scenario,
            party=party,
            identity_key=key,
            roster=load_roster(str(nc["roster"])),
            lab_secret=policy.lab_secret,
        )
    return policy


def make_client_app(
    scenario: Scenario | None = None,
    *,
    secret: bytes | None = None,
    auditor: RunAuditor | None = None,
) -> ClientApp:
    """The privfl ClientApp.

    Parameters
    ----------
    scenario : Scenario, optional
        Every party's own copy of the scenario (a simulated federation: the runner hands
        it to the parties directly). None: each SuperNode reads its policy from its node
        config (:func:`node_policy`).
    secret : bytes, optional
        The lab secret the simulated parties derive their identity keys and lab-mode
        noise from (default: this machine's, :func:`privfl.clients.policy.lab_secret`).
    auditor : RunAuditor, optional
        A privacy audit's canary records, handed to the parties with their data.
    """
    if scenario is None:
        policy_of = node_policy
    else:
        cache: dict[int, PartyPolicy] = {}

        def policy_of(context: Context) -> PartyPolicy:
            party = party_of(context)
            if party not in cache:
                cache[party] = simulation_policy(scenario, party, secret)
            return cache[party]

    policy = make_policy_mod(policy_of)
    app = ClientApp()
    app.query("privfl_hello")(hello)
    app.train(mods=[policy, secagg_mod, participant_mod, clip_update_mod])(
        functools.partial(train, auditor=auditor)
    )
    app.evaluate(mods=[policy])(evaluate_local)
    register_secure_aggregation(app, mods=[policy])
    return app


app = make_client_app()
