"""Opacus DP-SGD on a party: one-shot training and the per-round federated version."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from flwr.app import RecordDict
from torch import nn

from privfl.clients.dp_sgd import STATE_KEY, dp_sgd_round
from privfl.config import Scenario
from privfl.dp.sgd import BudgetExhaustedError, train_dp_sgd

warnings.filterwarnings("ignore", message="Optimal order")


def _data(n: int = 300, seed: int = 0) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = torch.rand(n, 1, 28, 28, generator=g) * 0.5
    images[labels == 1, :, :14] += 0.5  # class 1: bright top half
    return SimpleNamespace(images=images.clamp(0, 1), labels=labels)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.Tanh(), nn.Linear(8, 2))


def _acc(model: nn.Module, data: SimpleNamespace) -> float:
    with torch.no_grad():
        return (model(data.images).argmax(1) == data.labels).float().mean().item()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_train_dp_sgd_respects_target_and_learns(mode):
    data, model = _data(), _model()
    before = _acc(model, data)
    res = train_dp_sgd(
        model,
        data,
        epochs=3,
        batch_size=30,
        lr=0.5,
        momentum=0.5,
        epsilon=4.0,
        delta=1e-5,
        clip=1.0,
        seed=3,
        grad_sample_mode=mode,
    )
    assert res.steps == 30
    assert 4.0 * 0.99 <= res.epsilon <= 4.0
    assert res.noise_multiplier > 0.5
    assert _acc(model, data) > max(0.8, before + 0.2)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # hooks removed


def test_train_dp_sgd_is_reproducible_in_lab_mode():
    a, b = _model(), _model()
    kw = dict(
        epochs=1, batch_size=30, lr=0.5, momentum=0.0, epsilon=2.0, delta=1e-5, clip=1.0, seed=5
    )
    train_dp_sgd(a, _data(), **kw)
    train_dp_sgd(b, _data(), **kw)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_train_dp_sgd_needs_a_privacy_target():
    with pytest.raises(ValueError, match="epsilon"):
        train_dp_sgd(
            _model(),
            _data(),
            epochs=1,
            batch_size=30,
            lr=0.1,
            momentum=0.0,
            epsilon=0.0,
            delta=1e-5,
            clip=1.0,
        )


def _client_dp(seed: int, **training: float) -> Scenario:
    """Two parties, two rounds, DP-SGD on every party at ε = 3."""
    return Scenario.from_dict(
        {
            "scenario": {"rounds": 2, "seed": seed},
            "data": {"parties": 2},
            "training": training,
            "defense": {"dp": {"mode": "client", "epsilon": 3.0, "clip": 1.0}},
        }
    )


def test_dp_sgd_round_keeps_state_and_epsilon_grows():
    sc = _client_dp(1, batch_size=30, local_steps=5, lr=0.3)
    data, model, state = _data(), _model(), RecordDict()
    kw = {"state": state, "device": "cpu", "noise_secret": None}
    n1, loss1, eps1 = dp_sgd_round(model, data, sc, party=0, server_round=1, **kw)
    sigma = float(state[STATE_KEY]["noise-multiplier"])
    n2, _, eps2 = dp_sgd_round(model, data, sc, party=0, server_round=2, **kw)
    assert n1 == n2 == 300 and loss1 > 0
    assert 0 < eps1 < eps2 <= 3.0
    assert eps2 >= 3.0 * 0.99  # σ was calibrated for exactly the 2 rounds × 5 steps
    assert float(state[STATE_KEY]["noise-multiplier"]) == sigma
    assert list(state[STATE_KEY]["history"]) == [sigma, 0.1, 10.0]
    with pytest.raises(BudgetExhaustedError, match="defense.dp.epsilon"):
        dp_sgd_round(model, data, sc, party=0, server_round=3, **kw)


def test_dp_sgd_round_batches_are_the_batches_trained_on():
    from privfl.clients.dp_sgd import dp_sgd_round_batches

    sc = _client_dp(3, batch_size=20, local_steps=4, lr=0.1)
    n = 200
    data = _data(n)
    # Pixel (0, 0) of image i carries i, so the inputs the model sees name the records.
    data.images[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32) / n
    model, seen = _model(), []
    model[1].register_forward_pre_hook(lambda _m, args: seen.append(args[0][:, 0].clone()))
    secret = b"party-local lab secret"
    dp_sgd_round(
        model,
        data,
        sc,
        party=1,
        server_round=2,
        state=RecordDict(),
        device="cpu",
        noise_secret=secret,
    )
    trained = [sorted(torch.round(x * n).long().tolist()) for x in seen]
    expected = [sorted(b.tolist()) for b in dp_sgd_round_batches(sc, 1, 2, n, secret=secret)]
    assert len(expected) == 4 and sum(map(len, expected)) > 0
    assert trained == expected
    other = dp_sgd_round_batches(sc, 0, 2, n, secret=secret)
    assert expected != [sorted(b.tolist()) for b in other]
    # Whoever holds only the scenario (its seed) draws other batches.
    from privfl.dp import seed_secret

    guess = dp_sgd_round_batches(sc, 1, 2, n, secret=seed_secret(sc))
    assert expected != [sorted(b.tolist()) for b in guess]
