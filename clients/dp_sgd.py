"""Record-level DP-SGD on a party (Opacus), one-shot or across federated rounds.

Batches are Poisson-sampled (each record joins a step with probability q = batch/N)
with coins from the keyed AES-CTR stream of :mod:`privfl.dp`; the data stay on the
device as tensors (no DataLoader). Per-sample clipping and the Gaussian noise are
Opacus' (``DPOptimizer`` and its grad-sample engines: ``hooks``, ``functorch``, ``ew``,
``ghost``). Accounting: Opacus' RDP or PRV accountant over the steps actually taken.

Noise generator: in lab mode a ``torch.Generator`` seeded from the scenario key (same
seed, same numbers). With ``defense.dp.secure_noise`` Opacus runs in ``secure_mode``
(its floating-point-attack mitigation) with a ``torchcsprng`` generator when that
package is installed; otherwise a generator seeded from ``os.urandom``, and a warning.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ConfigRecord
from opacus.grad_sample import prepare_module
from opacus.optimizers import get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn

from privfl.config import Scenario
from privfl.dp import KeyStream, calibrate_noise, epsilon_of_history, noise_key
from privfl.training import make_optimizer

STATE_KEY = "privfl.dp-sgd"
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")


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


def _noise_generator(key: bytes, device: torch.device, secure: bool) -> torch.Generator:
    if secure:
        try:
            import torchcsprng  # type: ignore[import-not-found]

            return torchcsprng.create_random_device_generator("/dev/urandom")
        except ImportError:
            warnings.warn(
                "defense.dp.secure_noise: torchcsprng is not installed; Opacus' noise uses a "
                "torch generator seeded from os.urandom (unpredictable seed, not a CSPRNG)",
                stacklevel=3,
            )
            seed = int.from_bytes(os.urandom(8), "little") >> 1
    else:
        seed = int.from_bytes(key[:8], "little") >> 1
    return torch.Generator(device=device).manual_seed(seed)


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
    generator: torch.Generator,
    secure_mode: bool = False,
    grad_sample_mode: str = "hooks",
) -> float:
    """``steps`` DP-SGD steps on ``model`` (trained in place; Opacus hooks removed after).

    ``images``/``labels`` are on the model's device; ``optimizer`` is a plain optimizer
    over ``model.parameters()``. Returns the mean training loss.
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}"
        )
    n = labels.shape[0]
    ghost = grad_sample_mode == "ghost"
    extra: dict[str, Any] = {"max_grad_norm": clip} if ghost else {}
    module = prepare_module(
        model, grad_sample_mode, batch_first=True, loss_reduction="mean", **extra
    )
    dp_opt = get_optimizer_class("flat", False, grad_sample_mode)(
        optimizer=optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=clip,
        expected_batch_size=max(1, round(sample_rate * n)),
        loss_reduction="mean",
        generator=generator,
        secure_mode=secure_mode,
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
            loss = criterion(module(x), y)
            loss.backward()
            dp_opt.step()
            if idx.size:
                losses.append(float(loss.item()))
    finally:
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
    grad_sample_mode: str = "hooks",
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
        Keys the sampling coins and Opacus' noise generator (lab mode).
    secure_noise : bool
        Keys the coins from ``os.urandom`` and runs Opacus in ``secure_mode``.

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
    key = _key(seed, "dp-sgd", secure_noise)
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
        generator=_noise_generator(key, device, secure_noise),
        secure_mode=secure_noise,
        grad_sample_mode=grad_sample_mode,
    )
    eps = epsilon_of_history([(noise_multiplier, q, steps)], delta=delta, accountant=accountant)
    return DPTrainResult(model, eps, noise_multiplier, steps, loss)


def _key(seed: int, purpose: str, secure: bool) -> bytes:
    raw: dict[str, Any] = {"scenario": {"seed": seed}, "defense": {"dp": {"secure_noise": secure}}}
    return noise_key(Scenario.from_dict(raw), purpose, 0, 0)


# --------------------------------------------------------------------------- federated


def _load_history(
    state: MutableMapping[str, Any],
) -> tuple[float | None, list[tuple[float, float, int]]]:
    rec = state.get(STATE_KEY)
    if rec is None:
        return None, []
    flat = list(rec["history"]) if "history" in rec else []
    hist = [(float(flat[i]), float(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat), 3)]
    return float(rec["noise-multiplier"]), hist


def _store_history(
    state: MutableMapping[str, Any], sigma: float, hist: list[tuple[float, float, int]]
) -> None:
    flat = [float(v) for entry in hist for v in entry]
    state[STATE_KEY] = ConfigRecord({"noise-multiplier": sigma, "history": flat})


def dp_sgd_round_batches(
    scenario: Scenario, party: int, server_round: int, n: int
) -> list[np.ndarray]:
    """The Poisson batches (indices into the party's ``n`` train records) of one round of
    :func:`dp_sgd_round`, as its lab-mode sampling stream draws them.

    For evaluators (ground truth of what a party trained on), never for attackers.

    Raises
    ------
    ValueError
        Under ``defense.dp.secure_noise`` the stream is keyed from the OS: not reproducible.
    """
    from privfl.training import local_steps

    if scenario.defense.dp.secure_noise:
        raise ValueError("defense.dp.secure_noise: DP-SGD batches are not reproducible")
    q, sampling = _round_sampling(scenario, party, server_round, n)
    return [poisson_batch(sampling, n, q) for _ in range(local_steps(n, scenario))]


def poisson_batch(sampling: KeyStream, n: int, sample_rate: float) -> np.ndarray:
    """Indices of one Poisson batch: each of ``n`` records independently at ``sample_rate``."""
    return np.flatnonzero(sampling.uniform(n) < sample_rate)


def _round_sampling(
    scenario: Scenario, party: int, server_round: int, n: int
) -> tuple[float, KeyStream]:
    """Sampling rate and batch-sampling stream of a party's DP-SGD round."""
    q = min(1.0, scenario.training.batch_size / n)
    return q, KeyStream(noise_key(scenario, "dp-sgd-sampling", party, server_round))


def dp_sgd_round(
    model: nn.Module,
    data: _Images,
    scenario: Scenario,
    *,
    party: int,
    server_round: int,
    state: MutableMapping[str, Any],
    device: str | torch.device,
) -> tuple[int, float, float]:
    """One round of local DP-SGD for a party (``defense.dp.mode = "client"``).

    σ is calibrated once, for the whole run: ``scenario.rounds`` × local steps
    (:func:`privfl.training.local_steps`) at Poisson rate batch/N, to spend
    ``defense.dp.epsilon``; it and the accountant history live in ``state`` (the
    node's ``context.state``, a ConfigRecord under ``"privfl.dp-sgd"``).

    Returns
    -------
    tuple[int, float, float]
        ``(num_examples, mean loss, ε spent by this party so far)``.

    Raises
    ------
    RuntimeError
        The round would take the party past ``defense.dp.epsilon`` (more rounds than
        ``scenario.rounds``); the party refuses to train.
    """
    from privfl.training import local_steps  # the spine's step rule, shared with plain SGD

    dp = scenario.defense.dp
    if dp.mode != "client":
        raise ValueError(f"dp_sgd_round: defense.dp.mode is {dp.mode!r}, not 'client'")
    n = int(data.labels.shape[0])
    steps = local_steps(n, scenario)
    q, sampling = _round_sampling(scenario, party, server_round, n)
    sigma, hist = _load_history(state)
    if sigma is None:
        sigma = dp.noise_multiplier
        if sigma <= 0:
            sigma = calibrate_noise(
                epsilon=dp.epsilon,
                delta=dp.delta,
                sample_rate=q,
                steps=scenario.scenario.rounds * steps,
                accountant=dp.accountant,
            )
    new_hist = _merge(hist, (sigma, q, steps))
    if dp.epsilon > 0:
        after = epsilon_of_history(new_hist, delta=dp.delta, accountant=dp.accountant)
        if after > dp.epsilon * (1 + 1e-9):
            raise RuntimeError(
                f"party {party}: round {server_round} would spend ε={after:.4f} > "
                f"defense.dp.epsilon={dp.epsilon} (scenario.rounds={scenario.scenario.rounds})"
            )
    device = torch.device(device)
    model.to(device)
    opt = make_optimizer(model, scenario)
    loss = run_dp_sgd_steps(
        model,
        data.images.to(device),
        data.labels.to(device),
        steps=steps,
        sample_rate=q,
        noise_multiplier=sigma,
        clip=dp.clip,
        optimizer=opt,
        sampling=sampling,
        generator=_noise_generator(
            noise_key(scenario, "dp-sgd-noise", party, server_round), device, dp.secure_noise
        ),
        secure_mode=dp.secure_noise,
        grad_sample_mode=dp.grad_sample_mode,
    )
    _store_history(state, sigma, new_hist)
    eps = epsilon_of_history(new_hist, delta=dp.delta, accountant=dp.accountant)
    return n, loss, eps


def _merge(
    hist: list[tuple[float, float, int]], entry: tuple[float, float, int]
) -> list[tuple[float, float, int]]:
    if hist and hist[-1][:2] == entry[:2]:
        return [*hist[:-1], (entry[0], entry[1], hist[-1][2] + entry[2])]
    return [*hist, entry]
