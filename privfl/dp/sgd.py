"""DP-SGD (Abadi et al. 2016) on one model: Poisson-sampled batches, per-sample clipping,
Gaussian noise from a keyed AES-CTR stream, Opacus accounting. No Flower here: the
party-side round (:mod:`privfl.clients.dp_sgd`) and the membership harness both use it.

Batches are Poisson-sampled (each record joins a step with probability q = batch/N)
with coins from a :class:`~privfl.dp.noise.KeyStream`; the data stay on the device as
tensors (no DataLoader). Per-sample clipping: by default privfl's book-keeping clipping
(:mod:`privfl.dp.clip`: the clipped sum in one backward pass; models with layers it
cannot clip exactly fall back to ``hooks`` with a warning), or one of Opacus'
grad-sample engines (``hooks``, ``functorch``, ``ew``, ``ghost``). The noise step is
Opacus' ``DPOptimizer``; Opacus' Gaussian noise is drawn from the keystream, never from
torch's generator.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from opacus.grad_sample import prepare_module
from opacus.optimizers import get_optimizer_class
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn
from torch.nn import functional as F

from privfl.config import Scenario
from privfl.dp.accounting import calibrate_noise, epsilon_of_history
from privfl.dp.clip import BookkeepingClipper, UnsupportedLayerError
from privfl.dp.noise import KeyStream, noise_key, seed_secret
from privfl.errors import PrivflError

GRAD_SAMPLE_MODES = ("bookkeeping", "hooks", "functorch", "ew", "ghost")
DEFAULT_GRAD_SAMPLE_MODE = "bookkeeping"


class _Images(Protocol):
    images: torch.Tensor
    labels: torch.Tensor


@dataclass
class DPTrainResult:
    """Outcome of :func:`train_dp_sgd`."""

    model: nn.Module
    epsilon: float
    noise_multiplier: float
    steps: int
    loss: float


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


class BudgetExhaustedError(PrivflError, RuntimeError):
    """A round would take the party past its own ε budget; it refuses to train."""


def _keystream_noise(
    dp_opt: DPOptimizer,
    stream: KeyStream,
    insert: Callable[[], torch.Tensor | None] | None = None,
) -> None:
    """Make ``dp_opt`` draw its Gaussian noise from ``stream`` (a CSPRNG) instead of a
    torch generator; everything else of Opacus' step is unchanged. ``insert()`` (an
    auditor's canary records) may add clipped gradients to the sum before the noise."""

    def add_noise() -> None:
        std = dp_opt.noise_multiplier * dp_opt.max_grad_norm
        extra = insert() if insert is not None else None
        pos = 0
        for p in dp_opt.params:
            if extra is not None:
                size = p.numel()
                p.summed_grad.add_(extra[pos : pos + size].view_as(p.summed_grad))
                pos += size
            _check_processed_flag(p.summed_grad)
            ref = p.summed_grad
            z = torch.from_numpy(stream.normal(ref.numel())).to(ref.device, ref.dtype)
            p.grad = (ref + std * z.view_as(ref)).view_as(p)
            _mark_as_processed(p.summed_grad)

    dp_opt.add_noise = add_noise  # type: ignore[method-assign]


def run_dp_sgd_steps(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    sample_rate: float,
    noise_multiplier: float,
    clip: float,
    optimizer: torch.optim.Optimizer,
    sampling: KeyStream,
    noise: KeyStream,
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE,
    insert: Callable[[float], torch.Tensor | None] | None = None,
) -> float:
    """``steps`` DP-SGD steps on ``model`` (trained in place; Opacus hooks removed after).

    ``images``/``labels`` are on the model's device; ``optimizer`` is a plain optimizer
    over ``model.parameters()``; ``sampling`` draws the Poisson coins and ``noise`` the
    Gaussian noise; ``insert(rate)`` (an auditor's canary records, each joining a step at
    ``rate``) may add clipped gradients before the noise. Returns the mean training loss.

    ``grad_sample_mode="bookkeeping"`` on a model with a layer book-keeping clipping cannot
    clip exactly warns, naming the layer, and uses Opacus' ``hooks`` instead.
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}"
        )
    n = labels.shape[0]
    clipper = None
    if grad_sample_mode == "bookkeeping":
        try:
            clipper = BookkeepingClipper(model)
        except UnsupportedLayerError as exc:
            warnings.warn(f"{exc}; DP-SGD uses Opacus' 'hooks' mode instead", stacklevel=2)
            grad_sample_mode = "hooks"
    ghost = grad_sample_mode == "ghost"
    module: Any = model
    if clipper is None:
        extra: dict[str, Any] = {"max_grad_norm": clip} if ghost else {}
        module = prepare_module(
            model, grad_sample_mode, batch_first=True, loss_reduction="mean", **extra
        )
    # Book-keeping leaves the clipped sum in .grad, as ghost clipping does: the same
    # optimiser then adds the noise and scales by the expected batch size.
    opt_mode = "ghost" if clipper is not None else grad_sample_mode
    dp_opt = get_optimizer_class("flat", False, opt_mode)(
        optimizer=optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=clip,
        expected_batch_size=max(1, round(sample_rate * n)),
        loss_reduction="mean",
    )
    _keystream_noise(
        dp_opt,
        noise,
        None if insert is None else (lambda: _on(insert(sample_rate), images.device)),
    )
    criterion = nn.CrossEntropyLoss()
    if ghost:
        criterion = DPLossFastGradientClipping(module, dp_opt, criterion, "mean")
    losses = []
    module.train()
    try:
        for _ in range(steps):
            idx = poisson_batch(sampling, n, sample_rate)
            # An empty Poisson batch still releases a (noise-only) step.
            idx_t = torch.from_numpy(idx).to(images.device)
            x, y = images[idx_t], labels[idx_t]
            dp_opt.zero_grad(set_to_none=True)
            if clipper is not None:
                per_sample = F.cross_entropy(model(x), y, reduction="none")
                clipper.backward(per_sample, clip)
                loss = per_sample.detach().mean()
            else:
                loss = criterion(module(x), y)
                loss.backward()
            dp_opt.step()
            if idx.size:
                losses.append(float(loss.item()))
    finally:
        if clipper is not None:
            clipper.close()
        else:
            module._close()
    return float(np.mean(losses)) if losses else math.nan


def train_dp_sgd(
    model: nn.Module,
    data: _Images,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    epsilon: float,
    delta: float,
    clip: float,
    accountant: str = "rdp",
    seed: int = 0,
    device: str | torch.device = "cpu",
    noise_multiplier: float = 0.0,
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE,
    secure_noise: bool = False,
) -> DPTrainResult:
    """Centralised DP-SGD (SGD with momentum) on all of ``data`` for ``epochs`` epochs.

    Parameters
    ----------
    model : nn.Module
        Trained in place (Opacus-compatible: no BatchNorm).
    data
        Any object with ``.images`` (N, 1, 28, 28) and ``.labels`` (N,) tensors.
    epochs, batch_size
        ``steps = round(epochs · N / batch_size)`` Poisson-sampled steps at rate
        ``batch_size / N`` (the expected batch size).
    epsilon, delta
        Target budget for the whole training; σ is calibrated from it unless
        ``noise_multiplier > 0`` is given (then ``epsilon`` is ignored).
    clip : float
        Per-sample gradient norm bound.
    accountant : {"rdp", "prv"}
    seed : int
        Keys the sampling coins and the noise (reproducible; this is one in-house model,
        not a federated party).
    secure_noise : bool
        Keys the coins and the noise from ``os.urandom`` instead.

    Returns
    -------
    DPTrainResult
        The model, ε spent (Opacus accountant), σ, steps and mean loss.
    """
    n = int(data.labels.shape[0])
    if n < 1 or batch_size < 1 or epochs < 1:
        raise ValueError(f"train_dp_sgd: need data, batch_size >= 1, epochs >= 1 (N={n})")
    q = min(1.0, batch_size / n)
    steps = max(1, round(epochs * n / batch_size))
    if noise_multiplier <= 0:
        if epsilon <= 0:
            raise ValueError("train_dp_sgd: give a target epsilon > 0 or a noise_multiplier > 0")
        noise_multiplier = calibrate_noise(
            epsilon=epsilon, delta=delta, sample_rate=q, steps=steps, accountant=accountant
        )
    device = torch.device(device)
    model.to(device)
    loss = run_dp_sgd_steps(
        model,
        data.images.to(device),
        data.labels.to(device),
        steps=steps,
        sample_rate=q,
        noise_multiplier=noise_multiplier,
        clip=clip,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum),
        sampling=KeyStream(_key(seed, "dp-sgd-sampling", secure_noise)),
        noise=KeyStream(_key(seed, "dp-sgd", secure_noise)),
        grad_sample_mode=grad_sample_mode,
    )
    eps = epsilon_of_history([(noise_multiplier, q, steps)], delta=delta, accountant=accountant)
    return DPTrainResult(model, eps, noise_multiplier, steps, loss)


def _key(seed: int, purpose: str, secure: bool) -> bytes:
    sc = Scenario.from_dict({"scenario": {"seed": seed}})
    return noise_key(sc, purpose, 0, 0, secret=None if secure else seed_secret(sc))


def poisson_batch(sampling: KeyStream, n: int, sample_rate: float) -> np.ndarray:
    """Indices of one Poisson batch: each of ``n`` records independently at ``sample_rate``."""
    return np.flatnonzero(sampling.uniform(n) < sample_rate)
