"""Book-keeping clipping (privfl.dp.clip): the clipped sum equals Opacus' hooks mode."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from flwr.app import RecordDict
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from privfl.clients.dp_sgd import STATE_KEY, dp_sgd_round
from privfl.config import Scenario
from privfl.dp import KeyStream
from privfl.dp.clip import BookkeepingClipper, UnsupportedLayerError
from privfl.dp.sgd import (
    DEFAULT_GRAD_SAMPLE_MODE,
    GRAD_SAMPLE_MODES,
    run_dp_sgd_steps,
    train_dp_sgd,
)
from privfl.models import build_task_model

warnings.filterwarnings("ignore", message="Optimal order")
warnings.filterwarnings("ignore", message="Full backward hook")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _opacus_clipped_sum(model: nn.Module, x, y, clip: float) -> tuple[list, torch.Tensor]:
    """Opacus hooks mode: per-sample gradients, flat clipping, the sum before noise."""
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    opt = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=len(y),
        loss_reduction="sum",
    )
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    norms = torch.stack(
        [p.grad_sample.reshape(len(y), -1).norm(2, dim=1) for p in opt.params], dim=1
    ).norm(2, dim=1)
    opt.clip_and_accumulate()
    sums = [p.summed_grad.clone() for p in opt.params]
    gsm._close()
    for p in model.parameters():
        p.grad = None
    return sums, norms


def _ours(model: nn.Module, x, y, clip: float) -> tuple[list, torch.Tensor]:
    with BookkeepingClipper(model) as clipper:
        norms = clipper.backward(F.cross_entropy(model(x), y, reduction="none"), clip)
    sums = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    for p in model.parameters():
        p.grad = None
    return sums, norms


def _loop_clipped_sum(model: nn.Module, x, y, clip: float) -> tuple[list, torch.Tensor]:
    """Ground truth: one backward pass per sample."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [
        torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        for i in range(len(y))
    ]
    norms = torch.stack([torch.cat([g.flatten() for g in gs]).norm() for gs in grads])
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    sums = [sum(f * gs[j] for f, gs in zip(factor, grads, strict=True)) for j in range(len(params))]
    return sums, norms


class _Zoo(nn.Module):
    """Every supported layer shape: grouped, dilated, 'same'-padded conv, Conv1d,
    LayerNorm and a Linear over a sequence (ghost norm), a frozen bias."""

    def __init__(self, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding="same", padding_mode=padding_mode)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, dilation=2, groups=4, padding=1)
        self.c3 = nn.Conv1d(8, 6, 2, stride=1)
        self.ln = nn.LayerNorm(6)
        self.seq = nn.Linear(6, 64)  # T·(6+64) < 6·64: ghost norm when not kept
        self.head = nn.Linear(64, 5)
        self.head.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.gn(self.c1(x)))
        h = torch.tanh(self.c2(h)).flatten(2)  # (B, 8, L)
        h = self.ln(self.c3(h)[..., ::6].transpose(1, 2))  # (B, T=4, 6)
        return self.head(torch.tanh(self.seq(h)).mean(1))


def _model(name: str, shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("zoo"):
        return _Zoo("reflect" if name == "zoo-reflect" else "zeros")
    return build_task_model(name, 5, 32, input_shape=shape)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("cnn", (1, 28, 28)),
        ("lenet", (1, 28, 28)),
        ("mlp", (1, 28, 28)),
        ("cnn", (3, 32, 32)),
        ("lenet", (3, 32, 32)),
        ("zoo", (3, 12, 12)),
    ],
)
def test_clipped_sum_equals_opacus_hooks(name, shape):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(24, *shape, generator=g)
    y = torch.randint(0, 5, (24,), generator=g)
    model = _model(name, shape)
    _, norms = _opacus_clipped_sum(model, x, y, 1.0)
    # A clip at the median norm: half the samples are clipped, half are not.
    clip = float(norms.median())
    assert (norms > clip * 1.01).sum() >= 8 and (norms < clip * 0.99).sum() >= 8
    want, want_norms = _opacus_clipped_sum(model, x, y, clip)
    got, got_norms = _ours(model, x, y, clip)
    torch.testing.assert_close(got_norms, want_norms, rtol=1e-5, atol=1e-6)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_reflect_padding_matches_per_sample_backward_passes():
    """Opacus' hooks unfold with zero padding whatever the padding_mode; book-keeping pads
    as the layer does, so it matches one backward pass per sample."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(12, 3, 12, 12, generator=g), torch.randint(0, 5, (12,), generator=g)
    model = _model("zoo-reflect", (3, 12, 12))
    _, norms = _loop_clipped_sum(model, x, y, 1.0)
    clip = float(norms.median())
    want, want_norms = _loop_clipped_sum(model, x, y, clip)
    got, got_norms = _ours(model, x, y, clip)
    torch.testing.assert_close(got_norms, want_norms, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    opacus, _ = _opacus_clipped_sum(model, x, y, clip)
    assert not torch.allclose(opacus[0], want[0], rtol=1e-3)


def test_large_layers_use_chunks_and_the_matmul_sum(monkeypatch):
    """Per-sample gradients too large to keep: chunked norms, the sum by one matmul."""
    import privfl.dp.clip as dc

    monkeypatch.setattr(dc, "KEEP_PER_SAMPLE", 0)
    monkeypatch.setattr(dc, "CHUNK_BYTES", 4000)
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(16, 3, 12, 12, generator=g), torch.randint(0, 5, (16,), generator=g)
    model = _model("zoo", (3, 12, 12))
    want, want_norms = _opacus_clipped_sum(model, x, y, 0.05)
    got, got_norms = _ours(model, x, y, 0.05)
    torch.testing.assert_close(got_norms, want_norms, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_clip_no_sample_reaches_gives_the_plain_gradient():
    """With nothing clipped, .grad is the ordinary gradient of the summed loss."""
    model = _model("cnn", (1, 28, 28))
    x, y = torch.rand(6, 1, 28, 28), torch.arange(6) % 5
    got, _ = _ours(model, x, y, 1e9)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    for a, p in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-6)


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.lin(x)))


def test_unsupported_layers_are_named():
    with pytest.raises(UnsupportedLayerError, match=r"'1' \(_Scale\)"):
        BookkeepingClipper(nn.Sequential(nn.Linear(3, 4), _Scale()))
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(Embedding\)"):
        BookkeepingClipper(nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 2)))
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    with pytest.raises(UnsupportedLayerError, match="'2' .Linear. shares a parameter with"):
        BookkeepingClipper(nn.Sequential(a, nn.Tanh(), b))
    with pytest.raises(UnsupportedLayerError, match="'2' .Linear. is also layer '0'"):
        BookkeepingClipper(nn.Sequential(a, nn.Tanh(), a))
    twice = _Twice()
    with BookkeepingClipper(twice), pytest.raises(UnsupportedLayerError, match="'lin'.*twice"):
        twice(torch.rand(2, 4))


def test_default_mode_falls_back_to_opacus_on_unsupported_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 4), _Scale(), nn.Linear(4, 2))
    data = _data()
    with pytest.warns(UserWarning, match=r"'2' \(_Scale\).*hooks"):
        run_dp_sgd_steps(
            model,
            data.images,
            data.labels,
            steps=2,
            sample_rate=0.1,
            noise_multiplier=1.0,
            clip=1.0,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            sampling=KeyStream(bytes(32)),
            noise=KeyStream(bytes([1]) * 32),
        )
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def _data(n: int = 300) -> SimpleNamespace:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = torch.rand(n, 1, 28, 28, generator=g) * 0.5
    images[labels == 1, :, :14] += 0.5
    return SimpleNamespace(images=images.clamp(0, 1), labels=labels)


def test_default_is_bookkeeping_and_config_accepts_it():
    assert DEFAULT_GRAD_SAMPLE_MODE == "bookkeeping" and "bookkeeping" in GRAD_SAMPLE_MODES
    sc = Scenario.from_dict({"defense": {"dp": {"mode": "client", "epsilon": 1.0}}})
    assert sc.defense.dp.grad_sample_mode == DEFAULT_GRAD_SAMPLE_MODE


def _loss(model: nn.Module, data: SimpleNamespace) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(data.images), data.labels).item()


def test_dp_sgd_round_default_mode_same_epsilon_as_hooks_and_trains():
    """Federated rounds with the scenario's default engine against Opacus hooks: same σ,
    accountant history and ε; the model learns."""
    data, out = _data(), {}
    for mode in (None, "hooks"):
        dp = {"mode": "client", "epsilon": 3.0, "clip": 1.0}
        if mode is not None:
            dp["grad_sample_mode"] = mode
        sc = Scenario.from_dict(
            {
                "scenario": {"rounds": 3, "seed": 1},
                "data": {"parties": 2},
                "training": {"batch_size": 30, "local_steps": 10, "lr": 0.5},
                "defense": {"dp": dp},
            }
        )
        torch.manual_seed(0)
        model, state = build_task_model("cnn", 2, 16), RecordDict()
        before = _loss(model, data)
        eps = [
            dp_sgd_round(
                model,
                data,
                sc,
                party=0,
                server_round=r,
                state=state,
                device="cpu",
                noise_secret=b"lab secret of party 0",
            )[2]
            for r in (1, 2, 3)
        ]
        out[mode] = (eps, list(state[STATE_KEY]["history"]), before, _loss(model, data))
    (eps, hist, before, after), (h_eps, h_hist, _, h_after) = out[None], out["hooks"]
    assert eps == h_eps and hist == h_hist and 3.0 * 0.99 <= eps[-1] <= 3.0
    assert after < 0.7 * before and after == pytest.approx(h_after, rel=1e-2)


def test_train_dp_sgd_same_epsilon_and_trains():
    """Same steps, sampling and noise as Opacus hooks: same ε, σ; the loss decreases."""
    out = {}
    for mode in ("hooks", "bookkeeping"):
        torch.manual_seed(0)
        model = build_task_model("cnn", 2, 16)
        res = train_dp_sgd(
            model,
            _data(),
            epochs=4,
            batch_size=30,
            lr=0.5,
            momentum=0.5,
            epsilon=4.0,
            delta=1e-5,
            clip=1.0,
            seed=3,
            grad_sample_mode=mode,
        )
        with torch.no_grad():
            loss = F.cross_entropy(model(_data().images), _data().labels).item()
        out[mode] = (res, loss, [p.detach().clone() for p in model.parameters()])
    hooks, ours = out["hooks"][0], out["bookkeeping"][0]
    assert ours.epsilon == hooks.epsilon and ours.noise_multiplier == hooks.noise_multiplier
    assert ours.steps == hooks.steps == 40 and 4.0 * 0.99 <= ours.epsilon <= 4.0
    assert out["bookkeeping"][1] < math.log(2) * 0.8
    # Same coins and the same keyed noise: the two engines train the same weights.
    for a, b in zip(out["bookkeeping"][2], out["hooks"][2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
