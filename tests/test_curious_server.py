"""The curious server with a fake grid: faithful protocol, exact view, exact update."""

import copy

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from privfl.clients.secagg import register_secure_aggregation, secagg_mod
from privfl.config import Scenario
from privfl.evaluation.inversion import InversionEvaluator
from privfl.flower import wire
from privfl.flower.loopback import LoopbackGrid
from privfl.flower.transcript import RecordingGrid
from privfl.flower.wire import curious_read
from privfl.strategies.curious_server import CuriousServer
from privfl.strategies.secure_aggregation import SecureAggregation

torch.set_num_threads(1)
LR = 0.1
NODES = {11: 0, 22: 1, 33: 2}  # node id -> party


pytestmark = pytest.mark.usefixtures("task_identity")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 64, 4)
    )


def _data(party: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + party)
    coarse = torch.rand((1, 1, 4, 4), generator=g)
    x = nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False)
    return x, torch.tensor([party % 4])


class FakeGrid(Grid):
    """Each node trains one SGD step on its fixed sample; replies are kept for checks."""

    def __init__(self) -> None:
        self.replies: list[Message] = []

    def set_run(self, run):
        pass

    @property
    def run(self):
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id
        )

    def get_node_ids(self):
        return list(NODES)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            party = NODES[msg.metadata.dst_node_id]
            if msg.metadata.message_type.startswith("train"):
                model = _model()
                model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
                x, y = _data(party)
                opt = torch.optim.SGD(model.parameters(), lr=LR)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                content = RecordDict(
                    {
                        "arrays": ArrayRecord(model.state_dict()),
                        "metrics": MetricRecord({"num-examples": 1}),
                    }
                )
            else:
                content = RecordDict({"metrics": MetricRecord({"num-examples": 1, "loss": 0.0})})
            out.append(Message(content, reply_to=msg))
        self.replies.extend(out)
        return out


def _scenario(**gi) -> Scenario:
    return Scenario.from_dict(
        {
            "scenario": {"rounds": 2, "device": "cpu"},
            "data": {"parties": 3, "samples_per_party": 1},
            "model": {"name": "lenet"},
            "training": {"batch_size": 1, "local_steps": 1, "lr": LR},
            "attack": {
                "kind": "gradient-inversion",
                "gradient_inversion": {
                    "target_party": 1,
                    "round": 2,
                    "iterations": 100,
                    "auxiliary_samples": 0,  # 8×8 toy model: no MNIST public set
                    **gi,
                },
            },
        }
    )


def _run(strategy, grid):
    return strategy.start(
        grid,
        ArrayRecord(_model().state_dict()),
        num_rounds=2,
        timeout=1.0,
        train_config=ConfigRecord({"x": 1}),
    )


def _curious(scenario=None) -> CuriousServer:
    return CuriousServer(
        FedAvg(fraction_evaluate=1.0),
        scenario=scenario or _scenario(),
        party_of=NODES,
        model=_model(),
        num_classes=4,
        input_shape=(1, 8, 8),
    )


def test_training_is_unaffected_and_records_exactly_what_was_received():
    plain = _run(FedAvg(fraction_evaluate=1.0), FakeGrid())
    grid = FakeGrid()
    cs = _curious()
    result = _run(cs, grid)
    for k, a in plain.arrays.items():  # same protocol, same model (float32 rounding aside)
        assert np.allclose(a.numpy(), result.arrays[k].numpy(), rtol=0, atol=1e-7)
    rec = cs.recording
    assert isinstance(rec, RecordingGrid) and sorted(rec.transcript.rounds) == [1, 2]
    from_target = [m for m in grid.replies if m.metadata.src_node_id == 22]
    recorded = [c for r in (1, 2) for ex in rec.transcript.rounds[r] for c in ex.received.values()]
    assert len(recorded) == len(from_target) == 4  # train + evaluate, two rounds
    for got, sent in zip(recorded, from_target, strict=True):
        assert got is not sent.content
        assert sorted(got.keys()) == sorted(sent.content.keys())
        for key, record in sent.content.array_records.items():
            for name, arr in record.items():
                assert got[key][name].data == arr.data  # same bytes
        for key, record in sent.content.metric_records.items():
            assert dict(got[key]) == dict(record)
    # deep copies: later tampering with the reply does not reach the record
    first = from_target[0].content["arrays"]
    name = next(iter(first.keys()))
    before = recorded[0]["arrays"][name].data
    first[name] = first[name].__class__(np.zeros_like(first[name].numpy()))
    assert recorded[0]["arrays"][name].data == before


def test_plain_path_extracts_minus_lr_times_the_gradient():
    cs = _curious()
    _run(cs, FakeGrid())
    update, sent, _ = cs.observed_update()
    model = _model()
    model.load_state_dict(sent.to_torch_state_dict())
    x, y = _data(1)
    nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert np.allclose(update[name], -LR * p.grad.numpy(), atol=1e-7)
    # round 2's sent model is the round-1 aggregate, not the initial one
    assert not np.array_equal(sent["3.weight"].numpy(), _model().state_dict()["3.weight"].numpy())


def test_attack_runs_on_the_recorded_update_and_reports(monkeypatch):
    cs = _curious()
    _run(cs, FakeGrid())
    assert cs.reconstruction is not None and cs.reconstruction.labels.tolist() == [1]
    monkeypatch.setattr(InversionEvaluator, "truth", lambda self: _data(1))
    (report,) = cs.attack_reports()
    j = report.to_json()
    assert (j["name"], j["role"], j["total"]) == ("gradient-inversion", "curious-server", 1)
    assert j["recovered"] == 1 and report.metrics["psnr_mean"] > 25
    assert set(report.metrics) >= {
        "psnr_mean",
        "psnr_max",
        "ssim_mean",
        "label_accuracy",
        "seconds",
    }
    assert "gradient_inversion.png" in report.figures


def test_secure_aggregation_reader_gets_exactly_the_recorded_payload():
    scenario = _scenario().replace(['defense.secure_aggregation="masking"'])
    cs = _curious(scenario)
    grid = FakeGrid()
    _run(cs, grid)  # FedAvg stands in for the protocol: only the plug-in point is tested
    seen = []

    def reader(content, template, sc):
        seen.append((content, template, sc))
        return {k: np.full(a.shape, 7.0) for k, a in template.items()}

    update, sent, reply = cs.observed_update(reader=reader)
    (content, template, sc), *_ = seen
    target_reply = [m for m in grid.replies if m.metadata.src_node_id == 22][2]  # round 2 train
    assert content is reply and sc is scenario and template is sent
    assert content["arrays"]["0.weight"].data == target_reply.content["arrays"]["0.weight"].data
    assert all(np.all(v == 7.0) for v in update.values())


def test_missing_target_node_is_an_error():
    with pytest.raises(ValueError, match="target_party"):
        CuriousServer(FedAvg(), scenario=_scenario(), party_of={11: 0}, model=_model())


def test_copy_of_scenario_is_unchanged():
    sc = _scenario()
    assert copy.deepcopy(sc) == sc


class CapturingLoopback(LoopbackGrid):
    """The in-process protocol grid, keeping what each node really answered."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.answers: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.answers.extend(replies)
        return replies


def _party_train(msg: Message, context) -> Message:
    """Honest party: one SGD step of the tiny model on its fixed sample."""
    model = _model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = _data(int(context.node_config["partition-id"]))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return Message(
        RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"num-examples": 1, "train-loss": 1.0}),
            }
        ),
        reply_to=msg,
    )


@pytest.mark.parametrize("protocol", ["masking", "additive"])
def test_under_real_secure_aggregation_the_attack_reads_the_payload_and_gets_nothing(
    protocol, monkeypatch
):
    sc = _scenario(iterations=60, round=1).replace(
        [f'defense.secure_aggregation="{protocol}"', "scenario.rounds=1"]
    )
    app = ClientApp()
    app.train(mods=[secagg_mod])(_party_train)
    register_secure_aggregation(app)
    grid = CapturingLoopback(app, {n: p for n, p in NODES.items()})
    secure = SecureAggregation.from_scenario(
        FedAvg(fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3),
        sc,
        party_of=NODES,
    )
    cs = CuriousServer(
        secure, scenario=sc, party_of=NODES, model=_model(), num_classes=4, input_shape=(1, 8, 8)
    )
    cs.start(
        grid,
        ArrayRecord(_model().state_dict()),
        num_rounds=1,
        train_config=ConfigRecord({"privfl.scenario": sc.to_json()}),
    )
    assert not grid.errors
    update, sent, reply = cs.observed_update()
    # The attacked reply is byte for byte what node 22 sent, with no plaintext weights.
    assert "arrays" not in reply.array_records and wire.VECTOR in reply.array_records
    vec = reply[wire.VECTOR]
    (answer,) = [
        m
        for m in grid.answers
        if m.metadata.src_node_id == 22
        and wire.VECTOR in m.content.array_records
        and m.content[wire.VECTOR].keys() == vec.keys()
        and all(m.content[wire.VECTOR][k].data == vec[k].data for k in vec)
    ]
    direct = curious_read(answer.content, sent, sc)
    assert direct is not None and set(direct) == set(update)
    for k in update:
        assert np.array_equal(update[k], direct[k])  # attacked exactly those bytes
    # ... and they are ring noise, not -lr times the target's gradient.
    model = _model()
    x, y = _data(1)
    nn.functional.cross_entropy(model(x), y).backward()
    true = np.concatenate([-LR * p.grad.numpy().ravel() for p in model.parameters()])
    seen = np.concatenate([update[n].ravel() for n, _ in model.named_parameters()])
    assert np.abs(seen).max() > 1e3 > np.abs(true).max() * 1e3
    assert abs(np.corrcoef(seen.astype(float), true)[0, 1]) < 0.5
    monkeypatch.setattr(InversionEvaluator, "truth", lambda self: _data(1))
    (report,) = cs.attack_reports()
    assert report.recovered == 0 and report.metrics["psnr_mean"] < 12
    assert any(protocol in n for n in report.notes)
