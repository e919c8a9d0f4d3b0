"""Imprint-layer extraction: exact recovery from an analytic aggregate, collision
detection, the malicious participant's two-global-model view, and the sizing formula."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from privfl.attacks.imprint import (
    BIAS_KEY,
    WEIGHT_KEY,
    ImprintBlock,
    RiggedModel,
    bin_edges,
    bins_for_fraction,
    expected_fraction,
    measurement_vector,
    reconstruct_from_update,
)
from privfl.clients.malicious_participant import participant_reconstruct

torch.set_num_threads(1)


def _rigged(edges: torch.Tensor, kind: str = "brightness", seed: int = 0) -> RiggedModel:
    torch.manual_seed(seed)
    task = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    block = ImprintBlock(measurement_vector(kind, seed=seed), edges, probe_seed=seed)
    return RiggedModel(block, task)


def _images(n: int, gen: torch.Generator) -> torch.Tensor:
    """Random images in [0, 1] with spread-out brightness."""
    scale = torch.rand(n, 1, 1, 1, generator=gen) * 0.8 + 0.2
    return torch.rand(n, 1, 28, 28, generator=gen) * scale


def _edges_isolating(m: torch.Tensor) -> torch.Tensor:
    """Edges that put every value of ``m`` in its own bin (plus a low sentinel)."""
    s = m.sort().values
    return torch.cat([s[:1] - 1.0, (s[1:] + s[:-1]) / 2])


def _sgd_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> dict:
    """One local SGD step's update ``-lr · grad`` of the batch-mean cross-entropy."""
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return {k: -lr * p.grad.detach().double() for k, p in model.named_parameters()}


def _fedavg(updates: list[dict], weights: list[float]) -> dict:
    return {k: sum(w * u[k] for w, u in zip(weights, updates, strict=True)) for k in updates[0]}


def _match_error(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """For each recovered image, the max-abs error to its closest true image."""
    d = (recon[:, None] - truth[None]).abs().flatten(2).amax(-1)
    return d.min(1).values


def test_sizing_formula() -> None:
    assert expected_fraction(1, 5) == 1.0
    assert expected_fraction(24, 449) == pytest.approx((1 - 1 / 449) ** 23)
    k = bins_for_fraction(24, 0.95)
    assert expected_fraction(24, k) >= 0.95 > expected_fraction(24, k - 1)
    assert k == 449
    assert bins_for_fraction(24, 0.99) > bins_for_fraction(48, 0.95) > k
    with pytest.raises(ValueError, match="target"):
        bins_for_fraction(24, 1.0)


@pytest.mark.parametrize("kind", ["brightness", "random", "dct"])
def test_block_is_identity_at_shipped_weights(kind: str) -> None:
    gen = torch.Generator().manual_seed(1)
    x = _images(16, gen)
    a = measurement_vector(kind, seed=3)
    model = _rigged(bin_edges(x.flatten(1) @ a, 8), kind)
    with torch.no_grad():
        torch.testing.assert_close(model.imprint(x), x, atol=1e-5, rtol=0)


def test_differencing_recovers_exact_samples_from_fedavg_aggregate() -> None:
    gen = torch.Generator().manual_seed(0)
    parts = [_images(4, gen) for _ in range(3)]
    labels = [torch.randint(0, 10, (4,), generator=gen) for _ in range(3)]
    truth = torch.cat(parts)
    a = measurement_vector("brightness")
    model = _rigged(_edges_isolating(truth.flatten(1) @ a))
    updates = [_sgd_update(model, x, y, lr=0.1) for x, y in zip(parts, labels, strict=True)]
    # Unequal FedAvg weights and batch means only rescale each sample's bin.
    aggregate = _fedavg(updates, [0.5, 0.3, 0.2])
    rec = reconstruct_from_update(aggregate, model.info)
    assert rec.collisions == 0
    assert len(rec.images) == 12
    assert _match_error(rec.images, truth).max() < 1e-4
    # Every true sample is found once.
    nearest = (rec.images[:, None] - truth[None]).abs().flatten(2).amax(-1).argmin(1)
    assert sorted(nearest.tolist()) == list(range(12))


def test_collisions_are_detected_not_reported() -> None:
    gen = torch.Generator().manual_seed(2)
    x = _images(5, gen)
    y = torch.randint(0, 10, (5,), generator=gen)
    a = measurement_vector("brightness")
    m = x.flatten(1) @ a
    order = m.argsort()
    # Edges isolate samples order[0], order[1], order[2]; order[3] and order[4] share a bin.
    s = m[order]
    edges = torch.stack([s[0] - 1, (s[0] + s[1]) / 2, (s[1] + s[2]) / 2, (s[2] + s[3]) / 2])
    model = _rigged(edges)
    rec = reconstruct_from_update(_sgd_update(model, x, y, lr=0.05), model.info)
    assert rec.collisions == 1
    assert rec.occupied == 4
    assert len(rec.images) == 3
    singles = x[order[:3]]
    assert _match_error(rec.images, singles).max() < 1e-4
    # Neither colliding sample, nor a blend of them, is returned as a recovery.
    assert _match_error(rec.images, x[order[3:]]).min() > 0.1


def test_collisions_found_with_any_sign_mix() -> None:
    """Two samples in one bin are rejected whatever their gradients' signs and sizes."""
    for seed in range(10):
        gen = torch.Generator().manual_seed(100 + seed)
        x = _images(2, gen)
        y = torch.randint(0, 10, (2,), generator=gen)
        m = x.flatten(1) @ measurement_vector("brightness")
        model = _rigged(torch.stack([m.min() - 1]), seed=seed)
        rec = reconstruct_from_update(_sgd_update(model, x, y, lr=0.05), model.info)
        assert (len(rec.images), rec.collisions) == (0, 1), seed


def test_empty_update_reports_nothing() -> None:
    model = _rigged(torch.linspace(0, 1, 6))
    zero = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    rec = reconstruct_from_update(zero, model.info)
    assert (len(rec.images), rec.collisions, rec.occupied) == (0, 0, 0)


def test_participant_uses_two_consecutive_global_models_only() -> None:
    gen = torch.Generator().manual_seed(5)
    parts = [_images(4, gen) for _ in range(3)]
    labels = [torch.randint(0, 10, (4,), generator=gen) for _ in range(3)]
    truth = torch.cat(parts)
    model = _rigged(_edges_isolating(truth.flatten(1) @ measurement_vector("brightness")))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    updates = [_sgd_update(model, x, y, lr=0.05) for x, y in zip(parts, labels, strict=True)]
    after = {k: before[k].double() + v for k, v in _fedavg(updates, [1 / 3] * 3).items()}
    # What party 0 can see: the two global models (imprint keys) and its own update.
    keys = (WEIGHT_KEY, BIAS_KEY)
    rec = participant_reconstruct(
        {k: before[k] for k in keys},
        {k: after[k].float() for k in keys},
        {k: updates[0][k].float() for k in keys},
        3,
        None,
        model.info,
    )
    others = torch.cat(parts[1:])
    assert len(rec.images) == 8 and rec.collisions == 0
    assert _match_error(rec.images, others).max() < 1e-3
    assert _match_error(rec.images, parts[0]).min() > 0.1
    # Without removing its own contribution, its samples come back too.
    plain = reconstruct_from_update({k: after[k] - before[k].double() for k in keys}, model.info)
    assert len(plain.images) == 12


def test_measured_fraction_matches_formula_over_20_seeds() -> None:
    n, k = 24, 60
    expected = expected_fraction(n, k)
    a = measurement_vector("random", seed=9)
    fractions = []
    for seed in range(20):
        gen = torch.Generator().manual_seed(1000 + seed)
        public = _images(4000, gen)
        batch = _images(n, gen)
        labels = torch.randint(0, 10, (n,), generator=gen)
        model = _rigged(bin_edges(public.flatten(1) @ a, k), "random", seed=9)
        rec = reconstruct_from_update(_sgd_update(model, batch, labels, 0.05), model.info)
        good = int((_match_error(rec.images, batch) < 1e-3).sum())
        assert good == len(rec.images), "every returned image must be a true sample"
        fractions.append(good / n)
    mean = sum(fractions) / len(fractions)
    # Per-seed std of the fraction is about 0.1 here; 20 seeds -> about 0.025.
    assert abs(mean - expected) < 0.08, (mean, expected)
    assert math.isfinite(mean)


def test_strongest_bins_readout_exact_when_clean_and_garbage_under_noise() -> None:
    from privfl.attacks.imprint import strongest_bins_readout

    gen = torch.Generator().manual_seed(5)
    x = _images(6, gen)
    y = torch.randint(0, 10, (6,), generator=gen)
    a = measurement_vector("brightness")
    # Spare empty bins beside the six occupied ones: the readout must find the occupied.
    edges = _edges_isolating(x.flatten(1) @ a)
    edges = torch.cat([edges[:1] - 2.0, edges, edges[-1:] + 50.0])
    model = _rigged(edges)
    update = _sgd_update(model, x, y, lr=0.05)
    clean = strongest_bins_readout(update, model.info, 6)
    assert clean.shape == (6, 1, 28, 28)
    assert _match_error(clean, x).max() < 1e-4
    # Gaussian noise far above the bin signal (what a DP update carries): the readout
    # returns the requested count, and none of it is close to a true sample.
    scale = 20 * float(update[BIAS_KEY].abs().max())
    noisy = {
        k: v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in update.items()
    }
    assert len(reconstruct_from_update(noisy, model.info).images) == 0
    guess = strongest_bins_readout(noisy, model.info, 6)
    assert guess.shape == (6, 1, 28, 28)
    assert _match_error(guess, x).min() > 0.3


def test_malicious_server_rearms_block_and_keeps_task_aggregate() -> None:
    from flwr.app import Array, ArrayRecord

    from privfl.config import load_scenario
    from privfl.strategies.imprint_server import ImprintServer
    from privfl.strategies.wrapper import StrategyWrapper

    shipped = ArrayRecord(
        {
            WEIGHT_KEY: Array(torch.ones(3, 4).numpy()),
            "imprint.probes": Array(torch.ones(4, 3).numpy()),
            "task.0.weight": Array(torch.zeros(2, 2).numpy()),
        }
    )
    drifted = ArrayRecord({k: Array(a.numpy() + 0.5) for k, a in shipped.items()})

    class Inner(StrategyWrapper):
        def configure_train(self, server_round, arrays, config, grid):
            return []

        def aggregate_train(self, server_round, replies):
            return drifted, None

    for rearm in (True, False):
        sc = load_scenario(
            "scenarios/imprint_secagg.toml",
            [f"attack.imprint.rearm={str(rearm).lower()}", "attack.imprint.round=2"],
        )
        server = ImprintServer.from_scenario(Inner(None), sc, {})
        server.configure_train(1, shipped, None, None)
        out, _ = server.aggregate_train(1, [])
        assert (out["task.0.weight"].numpy() == 0.5).all()
        for key in (WEIGHT_KEY, "imprint.probes"):
            want = shipped[key].numpy() if rearm else drifted[key].numpy()
            assert (out[key].numpy() == want).all()


def test_attack_round_uses_server_hyper_parameters_and_is_rolled_back() -> None:
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from privfl.attacks.imprint import attack_round_scenario
    from privfl.config import Scenario, load_scenario
    from privfl.server import SCENARIO_KEY
    from privfl.strategies.imprint_server import ImprintServer
    from privfl.strategies.wrapper import StrategyWrapper

    sc = load_scenario("scenarios/imprint_secagg.toml")
    im = sc.attack.imprint
    assert (im.local_steps, im.batch_size, im.lr) == (1, 8, 1.0)
    chosen = attack_round_scenario(sc)
    assert (chosen.training.local_steps, chosen.training.batch_size, chosen.training.lr) == (
        1,
        8,
        1.0,
    )
    shipped = ArrayRecord(
        {
            WEIGHT_KEY: Array(torch.zeros(12, 784).numpy()),
            BIAS_KEY: Array(torch.zeros(12).numpy()),
            "task.0.weight": Array(torch.zeros(2, 2).numpy()),
        }
    )
    drifted = ArrayRecord({k: Array(a.numpy() + 0.5) for k, a in shipped.items()})
    seen: list[Scenario] = []

    class Inner(StrategyWrapper):
        def configure_train(self, server_round, arrays, config, grid):
            seen.append(Scenario.from_json(str(config[SCENARIO_KEY])))
            return []

        def aggregate_train(self, server_round, replies):
            return drifted, None

    server = ImprintServer.from_scenario(Inner(None), sc, {})
    for rnd in (im.round - 1, im.round):
        server.configure_train(rnd, shipped, ConfigRecord({SCENARIO_KEY: sc.to_json()}), None)
        out, _ = server.aggregate_train(rnd, [])
        if rnd < im.round:  # an ordinary round: the honest aggregate, block re-armed
            assert (out["task.0.weight"].numpy() == 0.5).all()
    assert seen[0].training == sc.training
    assert seen[1].training == chosen.training
    # The attack round's update is attacked, then discarded: the model sent stays.
    assert (out["task.0.weight"].numpy() == 0).all()
    assert (out[WEIGHT_KEY].numpy() == 0).all()
    assert len(server.attack_reports()) == 1


def test_server_only_keys_are_validated() -> None:
    from privfl.config import ScenarioError, load_scenario

    with pytest.raises(ScenarioError, match=r"attack\.imprint\.lr"):
        load_scenario("scenarios/imprint_participant.toml", ["attack.imprint.lr=1.0"])
    with pytest.raises(ScenarioError, match=r"attack\.imprint\.batch_size"):
        load_scenario("scenarios/imprint_secagg.toml", ["attack.imprint.batch_size=-1"])
    with pytest.raises(ScenarioError, match=r"attack\.imprint\.round"):
        load_scenario("scenarios/imprint_dpsgd.toml", ["attack.imprint.round=1"])


def test_block_trains_only_its_encoder() -> None:
    model = _rigged(torch.linspace(0.0, 1.0, 5))
    names = {n for n, _ in model.imprint.named_parameters()}
    assert names == {"encoder.weight", "encoder.bias"}
    assert "probes" in dict(model.imprint.named_buffers())
