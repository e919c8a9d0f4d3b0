"""The privfl ClientApp: one honest party (a hospital) of a scenario.

Every message carries the resolved scenario; the party index is the SuperNode's
``partition-id``. Which defenses run is decided by the scenario, through the mods on
the train handler (outermost first): secure aggregation, then update clipping.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from privfl.config import SCENARIO_KEY, Scenario, scenario_from_json
from privfl.data import load_federation
from privfl.models import build_model
from privfl.training import evaluate, resolve_device, train_local

EPSILON_RECORD = "privfl.side.dp-epsilon"


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
    fed = load_federation(scenario)
    model = build_model(scenario, fed.num_classes)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return scenario, party, model, resolve_device(scenario.scenario.device)


def _train_mods() -> list:
    # Outermost first: secure aggregation encodes what the inner mods leave, so the
    # update is clipped (DP) before it is shared; the participant mod is a no-op on
    # honest parties.
    from privfl.clients.dp_mods import clip_update_mod
    from privfl.clients.malicious_participant import participant_mod
    from privfl.clients.secagg import secagg_mod

    return [secagg_mod, participant_mod, clip_update_mod]


app = ClientApp()


@app.query("privfl_hello")
def hello(msg: Message, context: Context) -> Message:
    """Tell the server which party this node is."""
    return Message(
        RecordDict({"hello": ConfigRecord({"partition-id": party_of(context)})}), reply_to=msg
    )


@app.train(mods=_train_mods())
def train(msg: Message, context: Context) -> Message:
    """One round of local training: plain SGD, or DP-SGD when ``defense.dp.mode = client``."""
    scenario, party, model, device = _setup(msg, context)
    data = load_federation(scenario).parties[party].train
    server_round = int(msg.content["config"]["server-round"])
    epsilon: float | None = None
    if scenario.defense.dp.mode == "client":
        from privfl.clients.dp_sgd import dp_sgd_round

        num, loss, epsilon = dp_sgd_round(
            model,
            data,
            scenario,
            party=party,
            server_round=server_round,
            state=context.state,
            device=device,
        )
        metrics = {"num-examples": num, "train-loss": loss}
    else:
        stats = train_local(
            model, data, scenario, party=party, server_round=server_round, device=device
        )
        metrics = {"num-examples": stats.num_examples, "train-loss": stats.loss}
    content = RecordDict(
        {"arrays": ArrayRecord(model.cpu().state_dict()), "metrics": MetricRecord(metrics)}
    )
    if epsilon is not None:
        # Privacy spent is public by design; the side channel reaches the server in the
        # clear even under secure aggregation, which hides metrics.
        content[EPSILON_RECORD] = ConfigRecord({"epsilon": epsilon})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this party's local test split."""
    scenario, party, model, device = _setup(msg, context)
    test = load_federation(scenario).parties[party].test
    loss, acc = evaluate(model, test, device)
    metrics = MetricRecord({"num-examples": len(test), "eval-loss": loss, "eval-acc": acc})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _register_protocols() -> None:
    from privfl.clients.secagg import register_secure_aggregation

    register_secure_aggregation(app)


_register_protocols()
