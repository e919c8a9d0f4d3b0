"""Inverting Gradients on the default CNN and FedAvg updates: the mechanics, on the
shipped ``ig_*`` scenarios with tiny budgets (the attack's figures are in
``privfl bench inversion``)."""

import copy
import dataclasses

import pytest
import torch

from privfl.architecture import build_model
from privfl.attacks.gradient_inversion import (
    AttackerKnowledge,
    gradient_from_update,
    inverting_gradients,
    recover_labels,
    spread_labels,
)
from privfl.attacks.gradient_inversion.objective import _cosine, _GradientModel, _l2
from privfl.bench.inversion import gradient_inversion_bench_rows
from privfl.config import Scenario, load_scenario, resolve_scenario_path
from privfl.data import load_federation
from privfl.training import round_batch_data, train_local

torch.set_num_threads(1)


def _fedavg_round(name: str = "ig_fedavg", seed: int = 0, *overrides: str):
    """The party-0 round-1 update of a scenario, computed by the party's own trainer."""
    sc = load_scenario(resolve_scenario_path(name), [f"scenario.seed={seed}", *overrides])
    fed = load_federation(sc)
    model = build_model(sc, fed.num_classes)
    sent = copy.deepcopy(model.state_dict())
    party = copy.deepcopy(model)
    train_local(
        party, fed.parties[0].train, sc, party=0, server_round=1, device=torch.device("cpu")
    )
    update = {k: party.state_dict()[k] - sent[k] for k in sent}
    return sc, fed, model, update, round_batch_data(sc, 0, 1)


def _knowledge(sc: Scenario, num_classes: int, aux=None) -> AttackerKnowledge:
    t = sc.training
    return AttackerKnowledge(
        batch_size=t.batch_size,
        lr=t.lr,
        local_steps=t.local_steps,
        samples=t.local_steps * t.batch_size,
        num_classes=num_classes,
        auxiliary_images=aux,
    )


def test_simulating_the_local_steps_reproduces_the_party_update_exactly():
    # a large step size, where the trajectory bends: exactness is then telling
    sc, fed, model, update, truth = _fedavg_round("ig_fedavg", 0, "training.lr=0.1")
    kn = _knowledge(sc, fed.num_classes)
    assert (kn.local_steps, kn.batch_size, kn.images, len(truth)) == (5, 8, 40, 40)
    observed = gradient_from_update(model, update, kn)
    gm = _GradientModel(model, torch.device("cpu"))
    x, y = truth.images.double(), truth.labels
    sim = [t.detach() for t in gm.simulated_gradient(x, y, 5, kn.lr, kn.batch_size)]
    one_batch = [t.detach() for t in gm.simulated_gradient(x, y, 5, kn.lr)]
    # float32 party against the float64 attacker: equal to rounding
    assert float(_cosine(sim, observed)) < 1e-9
    assert float(_cosine(one_batch, observed)) > 0.1  # the batches matter
    assert float(_cosine(gm.grads(x, y), observed).detach()) > 0.1  # and so do the steps


def test_at_the_partys_step_size_which_step_saw_which_image_matters():
    # lr 0.05 on the round-1 model: the per-step gradients are nearly orthogonal, so the
    # update is not the mean gradient, nor the same images dealt over other steps
    sc, fed, model, update, truth = _fedavg_round()
    kn = _knowledge(sc, fed.num_classes)
    observed = gradient_from_update(model, update, kn)
    gm = _GradientModel(model, torch.device("cpu"))
    x, y = truth.images.double(), truth.labels

    def distance(order: torch.Tensor) -> float:
        sim = gm.simulated_gradient(x[order], y[order], 5, kn.lr, 8, create_graph=False)
        return float(_cosine([t.detach() for t in sim], observed))

    assert distance(torch.arange(40)) < 1e-9
    # the same label multiset in every step, the images of each class moved between steps
    gen = torch.Generator().manual_seed(0)
    order = torch.arange(40)
    for c in y.unique():
        idx = (y == c).nonzero().flatten()
        order[idx] = idx[torch.randperm(len(idx), generator=gen)]
    assert distance(order) > 0.05  # measured 0.26 (seed 0)
    assert float(_cosine(gm.grads(x, y), observed).detach()) > 0.5  # measured 0.81


def test_momentum_and_weight_decay_are_simulated_as_the_party_applied_them():
    over = ("training.lr=0.05", "training.momentum=0.9", "training.weight_decay=0.001")
    sc, fed, model, update, truth = _fedavg_round("ig_fedavg", 0, *over)
    plain = _knowledge(sc, fed.num_classes)
    kn = dataclasses.replace(plain, momentum=0.9, weight_decay=0.001)
    observed = gradient_from_update(model, update, kn)
    gm = _GradientModel(model, torch.device("cpu"))
    x, y = truth.images.double(), truth.labels

    def simulated(k: AttackerKnowledge) -> list[torch.Tensor]:
        sim = gm.simulated_gradient(
            x,
            y,
            5,
            k.lr,
            8,
            momentum=k.momentum,
            weight_decay=k.weight_decay,
            scale=k.step_weight,
            create_graph=False,
        )
        return [t.detach() for t in sim]

    assert kn.step_weight == pytest.approx(sum((1 - 0.9**j) / 0.1 for j in range(1, 6)))
    assert float(_cosine(simulated(kn), observed)) < 1e-9
    assert float(_cosine(simulated(plain), observed)) > 1e-3  # momentum ignored: off
    # and the scale is right, so that L2 distances (DLG) match too
    assert float(_l2(simulated(kn), observed) / _l2(observed, [0 * t for t in observed])) < 1e-9


def test_labels_of_a_five_step_update_are_mostly_recovered():
    sc, fed, model, update, truth = _fedavg_round()
    kn = _knowledge(sc, fed.num_classes, fed.public.images[:1000])
    labels = recover_labels(gradient_from_update(model, update, kn), kn, model)
    assert len(labels) == 40
    got, want = (torch.bincount(v, minlength=fed.num_classes) for v in (labels, truth.labels))
    assert int(torch.minimum(got, want).sum()) >= 28  # measured 30–36 of 40 on seeds 0–4


def test_labels_are_dealt_over_the_local_steps():
    labels = torch.tensor([3, 0, 0, 1, 1, 2])
    dealt = spread_labels(labels, steps=2, batch=3)
    assert sorted(dealt.tolist()) == sorted(labels.tolist())
    assert dealt.tolist() == [0, 1, 2, 0, 1, 3]  # each step gets a bit of every class
    assert spread_labels(labels, steps=4, batch=3).tolist() == [0, 0, 1, 1, 2, 3]


def test_best_start_is_kept_and_the_run_is_deterministic():
    sc, fed, model, update, truth = _fedavg_round("ig_cnn_b1", seed=2)
    kn = _knowledge(sc, fed.num_classes)
    target = gradient_from_update(model, update, kn)
    runs = [
        inverting_gradients(
            model, target, kn, iterations=30, restarts=3, trial_iterations=10, lr=0.01, seed=1
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0].images, runs[1].images)
    rec = runs[0]
    assert rec.labels.tolist() == truth.labels.tolist()
    assert rec.images.shape == (1, 1, 28, 28)
    assert float(rec.images.min()) >= 0 and float(rec.images.max()) <= 1
    assert 0 < rec.objective < 1


def test_under_secure_aggregation_the_fedavg_attack_recovers_nothing():
    (row,) = gradient_inversion_bench_rows(
        ["ig_fedavg_secagg"],
        [0],
        ["attack.gradient_inversion.iterations=4", "scenario.rounds=1"],
    )
    assert row["secure_aggregation"] == "masking"
    assert row["total"] == 40 and row["recovered"] == 0
    assert row["psnr_max"] < 12


def test_bench_keeps_the_run_folder_with_the_reconstruction_grid(tmp_path):
    over = [
        "attack.gradient_inversion.iterations=4",
        "attack.gradient_inversion.restarts=1",
        "scenario.rounds=1",
    ]
    (row,) = gradient_inversion_bench_rows(["ig_cnn_b1"], [3], over, keep=tmp_path)
    run = tmp_path / "ig_cnn_b1_seed3"
    assert row["seed"] == 3 and (run / "results.json").is_file()
    assert (run / "gradient_inversion.png").stat().st_size > 0


def test_a_later_round_is_attacked_through_the_live_server_stack():
    # round 2 broadcasts an aggregated model: the recording grid must copy it as sent
    (row,) = gradient_inversion_bench_rows(
        ["ig_cnn_b1"],
        [0],
        [
            "attack.gradient_inversion.round=2",
            "attack.gradient_inversion.iterations=4",
            "attack.gradient_inversion.restarts=1",
            "scenario.rounds=2",
        ],
    )
    assert row["total"] == 1 and row["label_accuracy"] == 1.0
