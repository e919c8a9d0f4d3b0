"""Record-level DP-SGD on a federated party: one round of :mod:`privfl.dp.sgd` per server
round, with the party's own accountant kept in its Flower context and its own refusal
past its budget.

Noise and sampling coins are keyed from the party's own secret (``party.noise = "lab"``:
reproducible on its machine) or from the OS (``"os"``, the default); the key never comes
from a server message.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord
from torch import nn

from privfl.config import Scenario
from privfl.dp import KeyStream, calibrate_noise, epsilon_of_history, noise_key
from privfl.dp.sgd import (
    BudgetExhaustedError,
    _Images,
    poisson_batch,
    run_dp_sgd_steps,
)
from privfl.training import local_steps, make_optimizer

STATE_KEY = "privfl.dp-sgd"


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
    scenario: Scenario, party: int, server_round: int, n: int, *, secret: bytes
) -> list[np.ndarray]:
    """The Poisson batches (indices into the party's ``n`` train records) of one round of
    :func:`dp_sgd_round`, as a party whose coins are keyed by ``secret`` draws them.

    For evaluators (ground truth of what a party trained on, in a lab run whose parties
    key their coins from the lab secret), never for attackers.
    """
    q, sampling = _round_sampling(scenario, party, server_round, n, secret)
    return [poisson_batch(sampling, n, q) for _ in range(local_steps(n, scenario))]


def _round_sampling(
    scenario: Scenario, party: int, server_round: int, n: int, secret: bytes | None
) -> tuple[float, KeyStream]:
    """Sampling rate and batch-sampling stream of a party's DP-SGD round."""
    q = min(1.0, scenario.training.batch_size / n)
    key = noise_key(scenario, "dp-sgd-sampling", party, server_round, secret=secret)
    return q, KeyStream(key)


def dp_sgd_round(
    model: nn.Module,
    data: _Images,
    scenario: Scenario,
    *,
    party: int,
    server_round: int,
    state: MutableMapping[str, Any],
    device: str | torch.device,
    noise_secret: bytes | None,
    insert: Callable[[float], torch.Tensor | None] | None = None,
) -> tuple[int, float, float]:
    """One round of local DP-SGD for a party (``defense.dp.mode = "client"``).

    ``noise_secret`` keys the party's sampling coins and noise (None: the OS CSPRNG).

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
    BudgetExhaustedError
        The round would take the party past ``defense.dp.epsilon`` (more rounds or steps
        than it calibrated for); the party refuses to train.
    """
    dp = scenario.defense.dp
    if dp.mode != "client":
        raise ValueError(f"dp_sgd_round: defense.dp.mode is {dp.mode!r}, not 'client'")
    n = int(data.labels.shape[0])
    steps = local_steps(n, scenario)
    q, sampling = _round_sampling(scenario, party, server_round, n, noise_secret)
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
            raise BudgetExhaustedError(
                f"party {party}: round {server_round} would spend ε={after:.4f} > my budget "
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
        noise=KeyStream(
            noise_key(scenario, "dp-sgd-noise", party, server_round, secret=noise_secret)
        ),
        grad_sample_mode=dp.grad_sample_mode,
        insert=insert,
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
