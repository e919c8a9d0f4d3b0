"""Feature-span peeling on small ReLU models and synthetic images (no spine needed)."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from privfl.attacks.gradient_inversion import (
    AttackerKnowledge,
    SpanError,
    feature_span,
    invert_update,
)
from privfl.attacks.gradient_inversion.span import feature_vertices, split_at_dense
from privfl.bench.inversion import gradient_inversion_bench_rows
from privfl.config import ScenarioError, load_scenario, resolve_scenario_path
from privfl.metrics import match_reconstructions

torch.set_num_threads(1)
SHAPE = (1, 8, 8)


def _cnn(seed: int = 0, classes: int = 10) -> nn.Module:
    """Conv-ReLU-pool then two dense layers, like privfl's default CNN, on 8×8. The
    convolution's biases are negative so that, as on MNIST digits, a blank background
    gives zero features: the attack needs features with zeros (vertices of the cone)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 16, 64),
        nn.ReLU(),
        nn.Linear(64, classes),
    )
    with torch.no_grad():
        net[0].bias.uniform_(-0.3, -0.05)
    return net


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 1, 4, 4), generator=g)
    smooth = nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False)
    return (2.0 * smooth - 0.8).clamp(0.0, 1.0)  # strokes on a blank background


def _fedavg(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    batch: int,
    lr: float,
    momentum: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The party's update: ``steps`` SGD steps, step ``s`` on the next ``batch`` samples."""
    local = copy.deepcopy(model)
    opt = torch.optim.SGD(local.parameters(), lr=lr, momentum=momentum)
    for s in range(steps):
        xb, yb = x[s * batch : (s + 1) * batch], y[s * batch : (s + 1) * batch]
        opt.zero_grad()
        nn.functional.cross_entropy(local(xb), yb).backward()
        opt.step()
    sent = model.state_dict()
    return {k: (v - sent[k]).detach() for k, v in local.state_dict().items()}


def _case(seed: int = 0, steps: int = 3, batch: int = 3, momentum: float = 0.0):
    model = _cnn(seed)
    x = _images(steps * batch, seed + 100)
    y = torch.arange(steps * batch) % 10
    update = _fedavg(model, x, y, steps, batch, lr=0.1, momentum=momentum)
    kn = AttackerKnowledge(
        batch_size=batch,
        local_steps=steps,
        lr=0.1,
        input_shape=SHAPE,
        num_classes=10,
        samples=steps * batch,
        momentum=momentum,
        auxiliary_images=_images(64, seed + 7),
    )
    return model, update, kn, x, y


def _step_labels(labels: torch.Tensor, steps: int, batch: int) -> list[list[int]]:
    return [sorted(labels[s * batch : (s + 1) * batch].tolist()) for s in range(steps)]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_peels_every_step_exactly(momentum):
    """Every sample's label, at its own step, and an update fully explained; the images
    match the truth far above chance."""
    model, update, kn, x, y = _case(momentum=momentum)
    rec = feature_span(model, update, kn, iterations=300, restarts=2, seed=0)
    assert rec.images.shape == x.shape
    assert _step_labels(rec.labels, 3, 3) == _step_labels(y, 3, 3)
    assert rec.objective < 1e-3
    _, scores = match_reconstructions(rec.images, x)
    blank = match_reconstructions(torch.zeros_like(x), x)[1]
    assert float(scores.median()) > float(blank.median()) + 5.0, (scores, blank)


def test_same_seed_same_reconstruction():
    model, update, kn, _, _ = _case(seed=1, steps=2)
    a = feature_span(model, update, kn, iterations=50, restarts=1, seed=3)
    b = feature_span(model, update, kn, iterations=50, restarts=1, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_features_are_vertices_of_the_span():
    """The samples' features (ReLU outputs) are extreme rays of the non-negative cone of
    the dense layer's row space, found by the random linear programs."""
    model, update, _, x, _ = _case(steps=1, batch=6)
    split = split_at_dense(model, x[:2])
    feats = split.below(x).flatten(1).detach().double()
    feats /= feats.norm(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(update[split.weight].double(), full_matrices=False)
    verts = feature_vertices(vh[:6].T.numpy(), 200, np.random.default_rng(0))
    best = (feats.numpy() @ verts.T).max(1)
    assert best.min() > 0.9999


def test_masked_noise_reads_nothing():
    """A payload without the structure (ring noise under secure aggregation) has no
    non-negative vector in its row space: blank guesses, nothing explained."""
    model, update, kn, x, _ = _case()
    g = torch.Generator().manual_seed(0)
    noise = {k: torch.randn(v.shape, generator=g) * 1e3 for k, v in update.items()}
    rec = feature_span(model, noise, kn, iterations=20, restarts=1)
    assert rec.images.shape == x.shape
    assert float(rec.images.abs().max()) == 0.0
    assert rec.objective == pytest.approx(1.0)


def test_through_invert_update():
    model, update, kn, _, y = _case(steps=2)
    rec = invert_update(
        model,
        update,
        kn,
        "feature-span",
        iterations=30,
        restarts=1,
        lr=0.05,
        tv_weight=0.01,
        seed=0,
        multi_step="simulate",
    )
    assert _step_labels(rec.labels, 2, 3) == _step_labels(y, 2, 3)


def test_refuses_what_breaks_the_structure():
    model, update, kn, _, _ = _case()
    with pytest.raises(SpanError, match="weight decay"):
        feature_span(model, update, dataclasses.replace(kn, weight_decay=1e-4))
    with pytest.raises(SpanError, match="reuse samples"):
        feature_span(model, update, dataclasses.replace(kn, samples=6, batch_size=4))
    with pytest.raises(SpanError, match="reuse samples"):  # every step on one batch
        feature_span(model, update, dataclasses.replace(kn, samples=3))
    sigmoid = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Sigmoid(), nn.Linear(8, 4))
    split = split_at_dense(sigmoid, torch.rand(2, *SHAPE))  # the pixels are non-negative
    assert split.weight == "1.weight"
    tanh_first = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(72, 4))
    with pytest.raises(SpanError, match="not a ReLU"):
        split_at_dense(tanh_first, torch.rand(2, *SHAPE))
    with pytest.raises(SpanError, match="no dense"):
        split_at_dense(nn.Sequential(nn.Conv2d(1, 4, 8), nn.Flatten()), torch.rand(2, *SHAPE))


def test_scenario_refuses_weight_decay():
    path = resolve_scenario_path("span_fedavg")
    sc = load_scenario(path)
    assert sc.attack.gradient_inversion.method == "feature-span"
    with pytest.raises(ScenarioError, match="attack.gradient_inversion.method"):
        load_scenario(path, ["training.weight_decay=0.0001"])


SMALL = [
    "data.samples_per_party=8",
    "training.local_steps=2",
    "training.batch_size=4",
    "attack.gradient_inversion.iterations=150",
    "attack.gradient_inversion.auxiliary_samples=200",
    "scenario.rounds=1",
]


def test_live_run_reads_the_update_and_nothing_under_secure_aggregation():
    """Through the curious server on a live (loopback) run of the MNIST sample: the
    plain update gives up images and labels; the masked payload gives up nothing."""
    (plain,) = gradient_inversion_bench_rows(["span_fedavg"], [0], SMALL)
    assert plain["total"] == 8 and plain["recovered"] >= 2
    (masked,) = gradient_inversion_bench_rows(
        ["ig_fedavg_secagg"], [0], ["attack.gradient_inversion.method=feature-span", *SMALL]
    )
    assert masked["secure_aggregation"] == "masking"
    assert masked["total"] == 8 and masked["recovered"] == 0
