"""Query-only membership inference: quantile regression (QMIA), LOSS and offline LiRA.

Threat model: the attacker can send images to the target and read its outputs (logits),
nothing else — :class:`QueryAPI` is the whole of its view. It also holds public data from
the same distribution that it knows was not trained on.

Attacks (all scores: higher = "member"):

- :class:`QuantileMIA` (Bertran et al., NeurIPS 2023): a regressor trained on public
  non-members predicts, for each (image, label), quantiles of the target's hinge score at
  many levels near 1. A record whose score exceeds its predicted ``1 - α`` quantile is
  flagged at FPR ``α``; no shadow model is trained. Optionally (``mimics``) the
  regressor works around a location: the hinge of mimics distilled from the target's
  logits on the same public records, so it only has to model what they miss.
- :func:`loss_attack` (Yeom et al. 2018): the negated cross-entropy, one global threshold
  calibrated on the public scores.
- :class:`OfflineLiRA` (Carlini et al. 2022): shadow models trained on public subsets give
  each target record a Gaussian of OUT scores; the one-sided z-score is the statistic.

:func:`run_membership` trains (or is handed) the target, runs the attacks named in
``attack.membership.attacks`` and returns one :class:`AttackReport` per attack.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
from scipy import stats
from torch import nn

from privfl import progress
from privfl.config import Scenario, ScenarioError
from privfl.metrics import roc
from privfl.results import AttackReport
from privfl.seeding import derive_seed

__all__ = [
    "LabelledImages",
    "OfflineLiRA",
    "QuantileMIA",
    "QueryAPI",
    "calibration_fraction",
    "hinge_score",
    "lira_offline_scores",
    "loss_attack",
    "run_membership",
    "train_classifier",
]


class LabelledImages(Protocol):
    """Anything with ``images`` (N, ...) and ``labels`` (N,) tensors (e.g. ``ImageSet``)."""

    images: torch.Tensor
    labels: torch.Tensor


# --------------------------------------------------------------------------- the view


class QueryAPI:
    """The attacker's view of a model: images in, logits out, nothing else.

    The model is copied when the API is built (later training does not leak through) and
    kept only inside a closure; the object has no attribute holding the model, its
    parameters, gradients or training data. Answers are detached float64 numpy arrays.

    Parameters
    ----------
    model : nn.Module
        The model to serve; it is deep-copied and put in eval mode.
    device : torch.device or str
        Where the copy runs.
    batch_size : int
        Images per forward pass.
    """

    __slots__ = ("_answer", "queries")

    def __init__(
        self, model: nn.Module, device: torch.device | str = "cpu", batch_size: int = 1024
    ) -> None:
        served = copy.deepcopy(model).to(device).eval()
        for p in served.parameters():
            p.requires_grad_(False)

        @torch.no_grad()
        def answer(images: torch.Tensor) -> np.ndarray:
            outs = [
                served(images[i : i + batch_size].to(device)).double().cpu()
                for i in range(0, images.shape[0], batch_size)
            ]
            return torch.cat(outs).numpy() if outs else np.zeros((0, 0))

        self._answer = answer
        self.queries = 0

    def query(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """The model's logits on ``images`` as a (N, num_classes) float64 array."""
        x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
        x = x.detach().to(torch.float32)
        self.queries += int(x.shape[0])
        return self._answer(x)

    def __repr__(self) -> str:
        return f"QueryAPI(queries={self.queries})"


# --------------------------------------------------------------------------- scores


def hinge_score(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Correct-class logit minus the largest other logit, per row.

    Parameters
    ----------
    logits : np.ndarray
        (N, C) model outputs, C >= 2.
    labels : np.ndarray
        (N,) integer labels.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64).ravel()
    if z.ndim != 2 or z.shape[1] < 2 or z.shape[0] != y.size:
        raise ValueError(f"hinge_score: logits (N, C>=2) and labels (N,), got {z.shape}, {y.shape}")
    rows = np.arange(y.size)
    correct = z[rows, y]
    others = z.copy()
    others[rows, y] = -np.inf
    return correct - others.max(axis=1)


def loss_attack(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LOSS attack statistic: the negated cross-entropy (higher = more likely a member)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64).ravel()
    if z.ndim != 2 or z.shape[0] != y.size:
        raise ValueError(f"loss_attack: logits (N, C) and labels (N,), got {z.shape}, {y.shape}")
    rows = np.arange(y.size)
    # log p_y = -log(1 + sum_{j != y} exp(z_j - z_y)): written with logaddexp (log1p
    # inside) it stays distinct for margins beyond ~37, where z_y - logsumexp(z) rounds
    # to exactly 0 and ties the most confident records.
    d = z - z[rows, y][:, None]
    d[rows, y] = -np.inf
    return -np.logaddexp(0.0, np.logaddexp.reduce(d, axis=1))


# --------------------------------------------------------------------------- QMIA


class _ImageRegressor(nn.Module):
    """Small CNN mapping a ``(C, H, W)`` image (MNIST: 1×28×28) to ``outputs`` numbers
    per class."""

    def __init__(
        self,
        num_classes: int,
        outputs: int,
        hidden: int,
        input_shape: tuple[int, ...] = (1, 28, 28),
    ) -> None:
        super().__init__()
        self.num_classes, self.outputs = num_classes, outputs
        c, h, w = input_shape
        self.body = nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * (h // 4) * (w // 4), hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes * outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).view(-1, self.num_classes, self.outputs)


class _VectorRegressor(nn.Module):
    """MLP for flat feature vectors (synthetic studies, tabular data)."""

    def __init__(self, in_features: int, num_classes: int, outputs: int, hidden: int) -> None:
        super().__init__()
        self.num_classes, self.outputs = num_classes, outputs
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes * outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).view(-1, self.num_classes, self.outputs)


def quantile_alphas(levels: int, alpha_min: float = 1e-3, alpha_max: float = 0.5) -> np.ndarray:
    """Tail probabilities ``α`` (quantile level ``1 - α``), log-spaced: dense near level 1."""
    if levels < 2:
        raise ValueError(f"levels: QMIA needs >= 2 quantile levels, got {levels}")
    if not 0 < alpha_min < alpha_max < 1:
        raise ValueError(
            f"alphas: need 0 < alpha_min < alpha_max < 1, got {alpha_min}, {alpha_max}"
        )
    return np.geomspace(alpha_max, alpha_min, levels)


class QuantileMIA:
    """Quantile-regression membership inference (Bertran et al., NeurIPS 2023).

    Trained only on public non-members: for each (input, label) it predicts the target's
    score quantiles at levels ``1 - α_k`` with ``α_k`` log-spaced from 0.5 down to
    ``alpha_min``. Quantiles are monotone by construction (a base plus softplus
    increments). ``head="gaussian"`` instead predicts a mean and a standard deviation and
    trains on the Gaussian likelihood; its quantiles are ``μ + σ Φ⁻¹(1 - α)``.

    With ``mimics = M > 0`` the quantiles are ``g(x, y) + r_k(x, y)``: ``g`` is the mean
    hinge score of ``M`` mimic classifiers, each distilled (mean squared error on
    row-centred logits) from the target's logits on the public training split, and the
    regressor fits the residual quantiles ``r_k``. A mimic reproduces the target's
    behaviour on records it did not train on, including atypical ones that a regressor
    fitted to scores alone extrapolates to; it never sees a member, so a member's
    memorised margin stays in the residual.

    Parameters
    ----------
    num_classes : int
        Labels index the regressor's per-class outputs.
    levels : int
        Number of quantile levels (pinball head).
    alpha_min : float
        Smallest tail probability modelled; smaller FPRs are reached by extrapolation.
    head : {"pinball", "gaussian"}
    epochs, lr, batch_size, hidden, weight_decay
        Regressor training; the epoch with the best loss on a held-out split of the
        public data is kept.
    schedule : {"cosine", "constant"}
        Learning rate over the epochs. Cosine annealing settles the extreme quantile
        outputs, whose pinball gradients are tiny and which jitter at a constant rate.
    ensemble : int
        Regressors trained (different initialisation and batch order, the same held-out
        split) whose predictions are averaged. Each fits the target's scores with its own
        error; the mean's is smaller, which sharpens the per-record quantiles.
    mimics : int
        Mimic classifiers averaged for the location (0: none, the regressor fits the
        scores themselves). :meth:`fit` then needs the target's logits on the public
        records.
    mimic_factory : callable, optional
        Builds one untrained mimic (input -> ``num_classes`` logits). Default: a CNN like
        the regressor's body for images, an MLP otherwise.
    val_fraction : float
        Share of the public data held out: it picks the epoch and calibrates the operating
        point (:meth:`operating_threshold`), so it must hold at least ``1 / fpr`` records
        to resolve a target FPR ``fpr``. Mimics never train on it either.
    seed : int
        Seeds the validation split and the first regressor's initialisation and batch
        order; further ensemble members and the mimics use seeds derived from it.
    device : torch.device or str
    """

    def __init__(
        self,
        num_classes: int,
        *,
        levels: int = 32,
        alpha_min: float = 1e-3,
        head: Literal["pinball", "gaussian"] = "pinball",
        epochs: int = 30,
        lr: float = 1e-3,
        batch_size: int = 128,
        hidden: int = 128,
        weight_decay: float = 1e-4,
        schedule: Literal["constant", "cosine"] = "cosine",
        ensemble: int = 1,
        mimics: int = 0,
        mimic_factory: Callable[[], nn.Module] | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction: must be in (0, 1), got {val_fraction}")
        if head not in ("pinball", "gaussian"):
            raise ValueError(f"head: must be 'pinball' or 'gaussian', got {head!r}")
        if epochs < 1:
            raise ValueError(f"epochs: must be >= 1, got {epochs}")
        self.num_classes = num_classes
        self.alphas = quantile_alphas(levels, alpha_min)
        self.head = head
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size
        self.hidden, self.weight_decay = hidden, weight_decay
        if schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule: must be 'constant' or 'cosine', got {schedule!r}")
        self.schedule = schedule
        if ensemble < 1:
            raise ValueError(f"ensemble: must be >= 1 regressor, got {ensemble}")
        self.ensemble = ensemble
        if mimics < 0:
            raise ValueError(f"mimics: must be >= 0, got {mimics}")
        self.mimics, self.mimic_factory = mimics, mimic_factory
        self.val_fraction = val_fraction
        self.seed = seed
        self.device = torch.device(device)
        self._nets: list[nn.Module] = []
        # (mimic, its logit scale): outputs times scale are in the target's logit units.
        self._mimic_nets: list[tuple[nn.Module, float]] = []
        self._shift = 0.0
        self._scale = 1.0
        self._val_scores: np.ndarray | None = None

    # ---------------------------------------------------------------- training
    def _build(self, inputs: torch.Tensor, seed: int, outputs: int | None = None) -> nn.Module:
        """The regressor (``outputs`` per class; default: what the head needs) for these
        inputs, initialised from ``seed``."""
        torch.manual_seed(seed)
        if outputs is None:
            outputs = 2 if self.head == "gaussian" else self.alphas.size
        if inputs.ndim == 4 and min(inputs.shape[2:]) >= 4:
            shape = tuple(int(s) for s in inputs.shape[1:])
            return _ImageRegressor(self.num_classes, outputs, self.hidden, shape)
        return _VectorRegressor(
            int(np.prod(inputs.shape[1:])), self.num_classes, outputs, self.hidden
        )

    def _raw(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = net(x)[torch.arange(y.shape[0], device=y.device), y]
        if self.head == "gaussian":
            return out
        # Monotone in the level: lowest quantile plus positive increments.
        return torch.cat(
            [out[:, :1], out[:, :1] + torch.cumsum(nn.functional.softplus(out[:, 1:]) + 1e-4, 1)],
            dim=1,
        )

    def _loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.head == "gaussian":
            mu, log_sigma = pred[:, 0], pred[:, 1].clamp(-7.0, 7.0)
            return (log_sigma + 0.5 * ((target - mu) / log_sigma.exp()) ** 2).mean()
        tau = torch.as_tensor(1.0 - self.alphas, dtype=pred.dtype, device=pred.device)
        diff = target[:, None] - pred
        return torch.maximum(tau * diff, (tau - 1.0) * diff).mean()

    def fit(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        scores: np.ndarray,
        logits: np.ndarray | None = None,
    ) -> QuantileMIA:
        """Train on public non-members: their inputs, labels and the target's scores.

        Parameters
        ----------
        inputs, labels : torch.Tensor
            The public records.
        scores : np.ndarray
            (N,) the target's scores of them (hinge).
        logits : np.ndarray, optional
            (N, num_classes) the target's outputs for them; required when ``mimics > 0``.

        Returns
        -------
        QuantileMIA
            ``self``, fitted.
        """
        x = torch.as_tensor(inputs, dtype=torch.float32)
        y = torch.as_tensor(labels, dtype=torch.int64)
        s = np.asarray(scores, dtype=np.float64).ravel()
        if not (x.shape[0] == y.shape[0] == s.size) or s.size < 10:
            raise ValueError(
                f"QuantileMIA.fit: needs >= 10 matching inputs/labels/scores, got "
                f"{x.shape[0]}, {y.shape[0]}, {s.size}"
            )
        gen = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(s.size, generator=gen)
        n_val = min(s.size - 1, max(1, int(s.size * self.val_fraction)))
        val, tr = perm[:n_val], perm[n_val:]
        self._mimic_nets = []
        if self.mimics:
            if logits is None:
                raise ValueError(
                    f"QuantileMIA.fit: mimics = {self.mimics} needs the target's logits on "
                    f"the public records (logits=...)"
                )
            z = np.asarray(logits, dtype=np.float64)
            if z.shape != (s.size, self.num_classes) or not np.all(np.isfinite(z)):
                raise ValueError(
                    f"QuantileMIA.fit: logits must be finite, shape ({s.size}, "
                    f"{self.num_classes}), got {z.shape}"
                )
            with progress.phase("membership: QMIA mimics", total=self.mimics) as bar:
                for j in range(self.mimics):
                    seed_j = derive_seed(self.seed, "qmia-mimic", j)
                    self._mimic_nets.append(self._train_mimic(x, z, tr, val, seed_j))
                    bar.advance()
        # The regressor models what the mimics miss: the residual of the target's score.
        r = s - self._location(x, y)
        self._shift, self._scale = float(r.mean()), float(r.std() + 1e-8)
        t = torch.as_tensor((r - self._shift) / self._scale, dtype=torch.float32)
        nets = []
        with progress.phase("membership: QMIA regressors", total=self.ensemble) as bar:
            for m in range(self.ensemble):
                # Every member holds out the same split, so it stays unseen by the ensemble
                # and still calibrates it; members differ in initialisation and batch order.
                seed_m = self.seed if m == 0 else derive_seed(self.seed, "qmia-member", m)
                g = gen if m == 0 else torch.Generator().manual_seed(seed_m)
                nets.append(self._train_one(x, y, t, tr, val, seed_m, g))
                bar.advance()
        self._nets = nets
        self._val_scores = self.membership_scores(x[val], y[val], s[val.numpy()])
        return self

    def _train_mimic(
        self, x: torch.Tensor, logits: np.ndarray, tr: torch.Tensor, val: torch.Tensor, seed: int
    ) -> tuple[nn.Module, float]:
        """Distil the target's logits on the training split (the epoch with the best
        held-out error is kept). Rows are centred (the hinge ignores a shared offset) and
        scaled to unit spread; the scale is returned to map outputs back."""
        dev = self.device
        z = torch.as_tensor(logits - logits.mean(1, keepdims=True), dtype=torch.float32)
        scale = float(z[tr].std() + 1e-8)
        z = z / scale
        if self.mimic_factory is not None:
            torch.manual_seed(seed)
            net = self.mimic_factory()
        else:  # the regressor's body with one output per class: logits
            net = nn.Sequential(self._build(x, seed, outputs=1), nn.Flatten())
        xv, zv = x[val].to(dev), z[val].to(dev)
        net = self._train_best(
            net.to(dev),
            tr,
            torch.Generator().manual_seed(seed),
            lambda n, b: nn.functional.mse_loss(n(x[b].to(dev)), z[b].to(dev)),
            lambda n: nn.functional.mse_loss(n(xv), zv),
            cosine=True,
        )
        return net, scale

    def _location(self, inputs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        """The mimics' mean hinge score per record, in the target's units (zeros without
        mimics)."""
        x = torch.as_tensor(inputs, dtype=torch.float32)
        y = np.asarray(labels, dtype=np.int64).ravel()
        if not self._mimic_nets:
            return np.zeros(y.size)
        total = np.zeros(y.size)
        with torch.no_grad():
            for net, scale in self._mimic_nets:
                out = torch.cat(
                    [net(x[i : i + 1024].to(self.device)).cpu() for i in range(0, len(x), 1024)]
                )
                total += hinge_score(out.double().numpy() * scale, y)
        return total / len(self._mimic_nets)

    def _train_one(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor,
        tr: torch.Tensor,
        val: torch.Tensor,
        seed: int,
        gen: torch.Generator,
    ) -> nn.Module:
        dev = self.device
        xv, yv, tv = x[val].to(dev), y[val].to(dev), t[val].to(dev)
        return self._train_best(
            self._build(x, seed).to(dev),
            tr,
            gen,
            lambda n, b: self._loss(self._raw(n, x[b].to(dev), y[b].to(dev)), t[b].to(dev)),
            lambda n: self._loss(self._raw(n, xv, yv), tv),
            cosine=self.schedule == "cosine",
        )

    def _train_best(
        self,
        net: nn.Module,
        tr: torch.Tensor,
        gen: torch.Generator,
        batch_loss: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        val_loss: Callable[[nn.Module], torch.Tensor],
        *,
        cosine: bool,
    ) -> nn.Module:
        """Adam over ``self.epochs`` shuffled passes of the training indices ``tr``; the
        epoch with the lowest held-out loss is kept (regressors and mimics alike)."""
        opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = (
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs) if cosine else None
        )
        best, best_state = math.inf, copy.deepcopy(net.state_dict())
        for _ in range(self.epochs):
            net.train()
            order = tr[torch.randperm(tr.numel(), generator=gen)]
            for i in range(0, order.numel(), self.batch_size):
                opt.zero_grad(set_to_none=True)
                batch_loss(net, order[i : i + self.batch_size]).backward()
                opt.step()
            if sched is not None:
                sched.step()
            net.eval()
            with torch.no_grad():
                v = float(val_loss(net))
            if v < best:
                best, best_state = v, copy.deepcopy(net.state_dict())
        net.load_state_dict(best_state)
        return net.eval()

    # ---------------------------------------------------------------- prediction
    def _predict(self, inputs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        if not self._nets:
            raise RuntimeError("QuantileMIA: call fit() before predicting")
        x = torch.as_tensor(inputs, dtype=torch.float32)
        y = torch.as_tensor(labels, dtype=torch.int64)
        outs = []
        with torch.no_grad():
            for i in range(0, x.shape[0], 1024):
                xb, yb = x[i : i + 1024].to(self.device), y[i : i + 1024].to(self.device)
                # The ensemble's prediction is its members' mean (of monotone quantile
                # rows it is monotone; for the Gaussian head, of μ and log σ).
                raw = torch.stack([self._raw(net, xb, yb).double() for net in self._nets])
                outs.append(raw.mean(0).cpu())
        return torch.cat(outs).numpy()

    def predict_quantiles(
        self, inputs: torch.Tensor, labels: torch.Tensor, alphas: Sequence[float] | None = None
    ) -> np.ndarray:
        """Predicted score quantiles at levels ``1 - alphas`` (default: the fitted levels).

        Returns
        -------
        np.ndarray
            (N, len(alphas)) in the target's score units.
        """
        raw = self._predict(inputs, labels)
        a = self.alphas if alphas is None else np.asarray(alphas, dtype=np.float64)
        if self.head == "gaussian":
            mu, sigma = raw[:, :1], np.exp(np.clip(raw[:, 1:2], -7.0, 7.0))
            q = mu + sigma * stats.norm.isf(a)[None, :]
        else:
            q = np.stack([self._interp_quantile(row, a) for row in raw])
        return q * self._scale + self._shift + self._location(inputs, labels)[:, None]

    def _interp_quantile(self, q_row: np.ndarray, a: np.ndarray) -> np.ndarray:
        # Quantile as a function of -log α, linear between levels, extrapolated outside.
        u = -np.log(self.alphas)
        return _interp_extrap(-np.log(a), u, q_row)

    def membership_scores(
        self, inputs: torch.Tensor, labels: torch.Tensor, scores: np.ndarray
    ) -> np.ndarray:
        """``-log α̂``: how far into its predicted non-member tail each score lies.

        A record is flagged at FPR ``α`` exactly when its score exceeds its predicted
        ``1 - α`` quantile, i.e. when the membership score exceeds ``-log α``.
        """
        r = np.asarray(scores, dtype=np.float64).ravel() - self._location(inputs, labels)
        s = (r - self._shift) / self._scale
        raw = self._predict(inputs, labels)
        if self.head == "gaussian":
            z = (s - raw[:, 0]) / np.exp(np.clip(raw[:, 1], -7.0, 7.0))
            return -stats.norm.logsf(z)
        u = -np.log(self.alphas)
        return np.array([_interp_extrap(si, qi, u) for si, qi in zip(s, raw, strict=True)])

    @staticmethod
    def threshold(fpr: float) -> float:
        """Membership-score threshold at which the predicted quantiles give FPR ``fpr``."""
        return -math.log(fpr)

    def operating_threshold(self, fpr: float) -> float:
        """The operating point at FPR ``fpr``, calibrated on public data only.

        When the held-out public split resolves ``fpr`` (at least one allowed false
        positive, ``fpr · n_val >= 1``) the threshold is the split's empirical ``1 - fpr``
        quantile of membership scores: the regressor's extreme quantiles are fitted on
        a handful of records and can be off either way (too high, it flags nothing; too
        low, it flags non-members). Below that resolution the split's "quantile" is just
        its largest score, which would flag almost nothing, so the regressor's own
        quantile is used.
        """
        if self._val_scores is None:
            raise RuntimeError("QuantileMIA: call fit() before asking for a threshold")
        if fpr * self._val_scores.size < 1:
            return self.threshold(fpr)
        return roc.threshold_at_fpr(self._val_scores, fpr)


def _interp_extrap(x: np.ndarray | float, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Piecewise-linear interpolation through (xp, fp) (xp increasing), extrapolated linearly."""
    x = np.asarray(x, dtype=np.float64)
    y = np.interp(x, xp, fp)
    lo_slope = (fp[1] - fp[0]) / (xp[1] - xp[0])
    hi_slope = (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    y = np.where(x < xp[0], fp[0] + (x - xp[0]) * lo_slope, y)
    return np.where(x > xp[-1], fp[-1] + (x - xp[-1]) * hi_slope, y)


# --------------------------------------------------------------------------- LiRA


def lira_offline_scores(
    target_scores: np.ndarray,
    shadow_scores: np.ndarray,
    *,
    fixed_variance: bool = True,
    sigma: float | None = None,
) -> np.ndarray:
    """Offline LiRA statistic: one-sided z-score of the target's score under the OUT Gaussian.

    Parameters
    ----------
    target_scores : np.ndarray
        (N,) the target model's score of each record.
    shadow_scores : np.ndarray
        (S, N) scores of S >= 2 shadow models, none of which trained on the records.
    fixed_variance : bool
        Use one pooled within-record standard deviation for all records (more stable
        with few shadows) instead of each record's own.
    sigma : float, optional
        The pooled deviation, fixed beforehand (:meth:`OfflineLiRA.fit` estimates it on
        public records). Without it the pooled deviation is taken over these records, so
        two calls (members, non-members) would each get their own.
    """
    s = np.asarray(target_scores, dtype=np.float64).ravel()
    sh = np.asarray(shadow_scores, dtype=np.float64)
    if sh.ndim != 2 or sh.shape[1] != s.size or sh.shape[0] < 2:
        raise ValueError(
            f"lira_offline_scores: shadow_scores must be (S>=2, N={s.size}), got {sh.shape}"
        )
    mu = sh.mean(axis=0)
    var = sh.var(axis=0, ddof=1)
    if not fixed_variance:
        spread = np.sqrt(var)
    elif sigma is not None:
        spread = np.full_like(mu, float(sigma))
    else:
        spread = np.full_like(mu, np.sqrt(var.mean()))
    return (s - mu) / np.maximum(spread, 1e-6)


class OfflineLiRA:
    """Offline likelihood-ratio attack (Carlini et al., S&P 2022) with OUT shadows only.

    Parameters
    ----------
    train_fn : Callable
        ``train_fn(data) -> nn.Module``: trains one shadow model the way the target was
        trained, on ``data`` (an object with ``images`` and ``labels``).
    shadow_models : int
        How many shadows (>= 2).
    fixed_variance : bool
        See :func:`lira_offline_scores`.
    seed : int
        Seeds the shadows' data subsets.
    device : torch.device or str
        Where shadows are queried.
    """

    def __init__(
        self,
        train_fn: Callable[[Any], nn.Module],
        *,
        shadow_models: int = 8,
        fixed_variance: bool = True,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if shadow_models < 2:
            raise ValueError(f"shadow_models: LiRA needs >= 2, got {shadow_models}")
        self.train_fn = train_fn
        self.shadow_models = shadow_models
        self.fixed_variance = fixed_variance
        self.seed = seed
        self.device = device
        self._shadows: list[QueryAPI] = []
        self.sigma: float | None = None

    def fit(self, public: LabelledImages, subset_size: int) -> OfflineLiRA:
        """Train the shadows, each on a random ``subset_size`` records of ``public``."""
        n = int(public.labels.shape[0])
        if not 1 <= subset_size <= n:
            raise ValueError(
                f"subset_size: must be in [1, {n}] (public records), got {subset_size}"
            )
        rng = np.random.default_rng(self.seed)
        self._shadows = []
        trained_on = np.zeros((self.shadow_models, n), dtype=bool)
        with progress.phase("membership: LiRA shadow models", total=self.shadow_models) as bar:
            for i in range(self.shadow_models):
                idx = np.sort(rng.choice(n, size=subset_size, replace=False))
                trained_on[i, idx] = True
                t = torch.as_tensor(idx)
                model = self.train_fn(_Labelled(public.images[t], public.labels[t]))
                self._shadows.append(QueryAPI(model, self.device))
                bar.advance()
        self.sigma = None
        if self.fixed_variance:
            # One pooled OUT deviation for every record the attack will ever score, taken
            # from each public record's scores under the shadows that did not train on it.
            out = np.ma.masked_array(
                self.shadow_scores(public.images, public.labels), mask=trained_on
            )
            ok = out.count(axis=0) >= 2
            if not ok.any():
                raise ValueError(
                    "OfflineLiRA.fit: no public record is OUT for two shadows; use a "
                    "smaller subset_size or more public records"
                )
            self.sigma = float(np.sqrt(out.var(axis=0, ddof=1)[ok].mean()))
        return self

    def shadow_scores(self, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        """(S, N) hinge scores of every shadow on the records."""
        if not self._shadows:
            raise RuntimeError("OfflineLiRA: call fit() before scoring")
        y = np.asarray(labels)
        return np.stack([hinge_score(api.query(images), y) for api in self._shadows])

    def membership_scores(
        self, images: torch.Tensor, labels: torch.Tensor, target_scores: np.ndarray
    ) -> np.ndarray:
        """z-scores of the target's hinge scores against each record's OUT Gaussian."""
        return lira_offline_scores(
            target_scores,
            self.shadow_scores(images, labels),
            fixed_variance=self.fixed_variance,
            sigma=self.sigma,
        )

    @staticmethod
    def threshold(fpr: float) -> float:
        """z threshold of the operating point at FPR ``fpr`` (one-sided Gaussian test)."""
        return float(stats.norm.isf(fpr))

    def operating_threshold(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        target_scores: np.ndarray,
        fpr: float,
        *,
        shadow_scores: np.ndarray | None = None,
    ) -> float:
        """The operating point at FPR ``fpr``, calibrated on public non-members that no
        shadow trained on: their empirical ``1 - fpr`` quantile of membership scores.

        The Gaussian z of :meth:`threshold` assumes each record's OUT scores are exactly
        Gaussian with the fitted spread; on real targets it flags about ten times the
        aimed FPR. Falls back to it when the records cannot resolve ``fpr`` (fewer than
        one allowed false positive). ``shadow_scores``: the shadows' (S, N) scores of these
        records (:meth:`shadow_scores`) when one calibration set serves several targets.
        """
        n = int(np.asarray(target_scores).size)
        if fpr * n < 1:
            return self.threshold(fpr)
        if shadow_scores is None:
            z = self.membership_scores(images, labels, target_scores)
        else:
            z = lira_offline_scores(
                target_scores, shadow_scores, fixed_variance=self.fixed_variance, sigma=self.sigma
            )
        return roc.threshold_at_fpr(z, fpr)


@dataclass(frozen=True, eq=False)
class _Labelled:
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# --------------------------------------------------------------------------- training


def train_classifier(
    model: nn.Module,
    data: LabelledImages,
    scenario: Scenario,
    *,
    epochs: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Plain mini-batch training for ``epochs`` with the scenario's optimiser settings.

    Used for the over-fit single target and for LiRA's shadows; returns ``model``
    (trained in place, left in eval mode).
    """
    from privfl.training import make_optimizer

    model.to(device).train()
    opt = make_optimizer(model, scenario)
    bs = scenario.training.batch_size
    x, y = data.images.to(device), data.labels.to(device)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen).to(device)
        for i in range(0, order.numel(), bs):
            b = order[i : i + bs]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    return model.eval()


# --------------------------------------------------------------------------- harness


@dataclass(frozen=True, eq=False)
class _Split:
    """Who is who in one membership experiment."""

    members: _Labelled  # what the target trained on
    eval_in: _Labelled  # members that are scored
    eval_out: _Labelled  # non-members that are scored (never trained on, not public)
    public: _Labelled  # the attacker's own non-member data
    target: str  # how the report names the target


def _cat(*sets: LabelledImages) -> _Labelled:
    return _Labelled(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]))


def _take(s: LabelledImages, idx: np.ndarray) -> _Labelled:
    t = torch.as_tensor(np.asarray(idx, dtype=np.int64))
    return _Labelled(s.images[t], s.labels[t])


def _stratified(idx: np.ndarray, labels: np.ndarray, first: int) -> np.ndarray:
    """Reorder ``idx`` so its first ``first`` records hold each label in the same share as
    the rest (up to rounding), keeping the given order within a label.

    A target trained on a random half of a small pool inherits that half's class
    histogram: a weak model (DP-SGD on 250 records) then scores over-represented classes
    higher, which separates members from non-members as a group, not record by record.
    Splitting every label in the same proportion removes that channel, so the evaluation
    measures what record-level DP bounds.
    """
    frac = first / max(1, idx.size)
    head, tail, carry = [], [], 0.0
    for c in np.unique(labels[idx]):
        of_c = idx[labels[idx] == c]
        # The rounding remainder carries over to the next label, so the head ends at
        # ``first`` records (bar float error, mended below).
        want = of_c.size * frac + carry
        n = int(np.floor(want + 1e-9))
        carry = want - n
        head.append(of_c[:n])
        tail.append(of_c[n:])
    h, t = np.concatenate(head), np.concatenate(tail)
    if h.size < first:  # float leftovers: move the last ones over
        h, t = np.concatenate([h, t[: first - h.size]]), t[first - h.size :]
    return np.concatenate([h, t])


def _split(scenario: Scenario, federation: Any, rng: np.random.Generator) -> list[_Split]:
    """One :class:`_Split` per target; all share the attacker's public data, which is
    disjoint from every target's members and scored non-members."""
    mi = scenario.attack.membership
    pool = federation.train_pool
    n_pool = int(pool.labels.shape[0])
    if mi.target == "single":
        # No federation trains here: the train pool is split into each target's members and
        # held-out non-members, the rest is public like federation.public.
        need = mi.members + mi.non_members
        if need * mi.targets > n_pool:
            raise ScenarioError(
                f"attack.membership: {mi.targets} target(s) x (members + non-members scored "
                f"= {need}) = {need * mi.targets} exceeds the train pool ({n_pool} records)"
            )
        perm = rng.permutation(n_pool)
        labels = pool.labels.numpy()
        picks = []
        for k in range(mi.targets):
            mine = _stratified(perm[k * need : (k + 1) * need], labels, mi.members)
            members = _take(pool, mine[: mi.members])
            eval_in = _take(members, rng.choice(mi.members, size=mi.eval_samples, replace=False))
            eval_out = _take(pool, mine[mi.members :])
            picks.append((members, eval_in, eval_out))
        public = _cat(federation.public, _take(pool, perm[need * mi.targets :]))
        targets = (
            ["hospital-api"]
            if mi.targets == 1
            else [f"hospital-api-{k}" for k in range(mi.targets)]
        )
    else:
        party = federation.parties[mi.target_party]
        members = _Labelled(party.train.images, party.train.labels)
        n_mem = int(members.labels.shape[0])
        if mi.eval_samples > n_mem:
            raise ScenarioError(
                f"attack.membership.eval_samples: {mi.eval_samples} requested but party "
                f"{mi.target_party} has {n_mem} train records"
            )
        eval_in = _take(members, rng.choice(n_mem, size=mi.eval_samples, replace=False))
        used = np.zeros(n_pool, dtype=bool)
        for p in federation.parties:
            used[np.asarray(p.indices)] = True
        unused = rng.permutation(np.flatnonzero(~used))
        # Held-out non-members: records no party holds, then the server's test split;
        # whatever is left over is the attacker's, like federation.public.
        candidates = _cat(_take(pool, unused), federation.server_test)
        n_cand = int(candidates.labels.shape[0])
        if mi.non_members > n_cand:
            raise ScenarioError(
                f"attack.membership: {mi.non_members} non-members to score requested but only "
                f"{n_cand} held-out non-members exist (unused train records + server_test)"
            )
        eval_out = _take(candidates, np.arange(mi.non_members))
        spare = _take(candidates, np.arange(mi.non_members, n_cand))
        public = _cat(federation.public, spare)
        picks = [(members, eval_in, eval_out)]
        targets = [f"global-model/party-{mi.target_party}"]
    n_pub = int(public.labels.shape[0])
    if n_pub > mi.public_samples:
        public = _take(public, np.sort(rng.choice(n_pub, size=mi.public_samples, replace=False)))
    return [_Split(m, i, o, public, t) for (m, i, o), t in zip(picks, targets, strict=True)]


def _train_model(
    scenario: Scenario, model: nn.Module, data: LabelledImages, device: torch.device, seed: int
) -> tuple[nn.Module, float | None]:
    """Train like the single target: over-fit SGD for ``attack.membership.epochs``, or
    DP-SGD under ``defense.dp.mode = "client"``. Returns the model and its epsilon."""
    mi, dp = scenario.attack.membership, scenario.defense.dp
    if dp.mode == "client":
        from privfl.dp.sgd import train_dp_sgd

        t = scenario.training
        res = train_dp_sgd(
            model,
            data,
            epochs=mi.epochs,
            batch_size=t.batch_size,
            lr=t.lr,
            momentum=t.momentum,
            epsilon=dp.epsilon,
            delta=dp.delta,
            clip=dp.clip,
            accountant=dp.accountant,
            seed=seed,
            device=device,
            noise_multiplier=dp.noise_multiplier,
        )
        return res.model.eval(), float(res.epsilon)
    return train_classifier(model, data, scenario, epochs=mi.epochs, seed=seed, device=device), None


def _shadow_trainer(
    scenario: Scenario, num_classes: int, device: torch.device, base_seed: int
) -> Callable[[Any], nn.Module]:
    """Shadows mimic the target's training from their own random initialisation. A
    federated target is mimicked by central training for ``rounds × local_epochs`` epochs."""
    from privfl.models import build_task_model

    mi = scenario.attack.membership
    epochs = scenario.scenario.rounds * scenario.training.local_epochs
    counter = iter(range(1_000_000))

    def train(data: Any) -> nn.Module:
        seed = base_seed + next(counter)
        torch.manual_seed(seed)
        model = build_task_model(
            scenario.model.name,
            num_classes,
            scenario.model.hidden,
            input_shape=tuple(data.images.shape[1:]),
        )
        if mi.target == "single":
            return _train_model(scenario, model, data, device, seed)[0]
        return train_classifier(model, data, scenario, epochs=epochs, seed=seed, device=device)

    return train


def calibration_fraction(fpr: float, public_records: int) -> float:
    """Public share held out to calibrate an operating point (QMIA's validation split,
    the public records no LiRA shadow trains on): 10%, raised (up to 30%) until it allows
    two false positives at ``fpr``, so the threshold is an empirical quantile of public
    non-members rather than a model's least reliable tail."""
    return min(0.3, max(0.1, 2.0 / (fpr * max(1, public_records))))


def _accuracy(api: QueryAPI, data: LabelledImages) -> float:
    if int(data.labels.shape[0]) == 0:
        return math.nan
    return float(np.mean(api.query(data.images).argmax(1) == data.labels.numpy()))


def _put_estimate(m: dict[str, Any], key: str, est: Any) -> None:
    """``key``, ``key_low``, ``key_high`` from an estimate with a confidence interval."""
    m.update({key: est.value, f"{key}_low": est.low, f"{key}_high": est.high})


def _evaluate(
    name: str,
    scores_in: np.ndarray,
    scores_out: np.ndarray,
    flag_in: np.ndarray,
    flag_out: np.ndarray,
    *,
    seed: int,
) -> dict[str, Any]:
    """ROC metrics of the statistics and the operating point given by the flags (each
    target's own calibrated threshold, so pooled targets keep their own operating points)."""
    m: dict[str, Any] = {"attack": name}
    _put_estimate(m, "auc", roc.auc_ci(scores_in, scores_out, seed=seed))
    for key, f in (("tpr_at_0.1pct_fpr", 0.001), ("tpr_at_1pct_fpr", 0.01)):
        _put_estimate(m, key, roc.tpr_at_fpr(scores_in, scores_out, f))
    f_in, f_out = flag_in.astype(np.float64), flag_out.astype(np.float64)
    tp = int(flag_in.sum())
    p = roc.precision_at(f_in, f_out, 0.5)
    _put_estimate(m, "precision", p)
    _put_estimate(m, "precision_balanced", roc.balanced_precision_at(f_in, f_out, 0.5))
    _put_estimate(m, "operating_observed_fpr", roc.fpr_at(f_out, 0.5))
    m.update(
        operating_tpr=tp / scores_in.size,
        flagged=p.trials,
        true_positives=tp,
    )
    return m


def run_membership(
    scenario: Scenario,
    *,
    target_model: nn.Module | None = None,
    federation: Any = None,
    device: torch.device | str = "cpu",
) -> list[AttackReport]:
    """Run the scenario's membership-inference attacks; one report per attack.

    Parameters
    ----------
    scenario : Scenario
        ``attack.membership`` says which attacks, which target and how many records.
    target_model : nn.Module, optional
        ``target = "federated"``: the global model after the Flower run (required).
        ``target = "single"``: must be None; the target is trained here on ``members``
        records of the train pool (DP-SGD when ``defense.dp.mode = "client"``).
    federation : Federation, optional
        Defaults to ``privfl.data.load_federation(scenario)``.
    device : torch.device or str

    Returns
    -------
    list[AttackReport]
        ``name = "membership-inference"``, ``role = "query-only"``, ``target`` =
        ``"<hospital-api | hospital-api-xK | global-model/party-i>/<attack>"``;
        ``recovered`` = members flagged at the attack's operating point (FPR
        ``operating_fpr`` as calibrated by the attacker on public data), ``total`` =
        members scored. With ``attack.membership.targets = K > 1`` (single targets) K
        independent hospitals are attacked, each with its own QMIA regressor and
        thresholds (LiRA's shadows are shared: they never see a target) and the records
        of all K are pooled into one ROC, as in the LiRA paper's many-target evaluation.
        The first report carries the combined log-log ROC figure.
    """
    mi = scenario.attack.membership
    device = torch.device(device)
    if federation is None:
        from privfl.data import load_federation

        federation = load_federation(scenario)
    if mi.target == "federated" and target_model is None:
        raise ValueError(
            "attack.membership.target = 'federated' needs the global model (target_model)"
        )
    if mi.target == "single" and target_model is not None:
        raise ValueError(
            "attack.membership.target = 'single' trains its own target; pass no target_model"
        )
    given_model = target_model

    seed = scenario.scenario.seed
    rng = np.random.default_rng(derive_seed(seed, "membership-split"))
    splits = _split(scenario, federation, rng)
    public = splits[0].public
    num_classes = int(federation.num_classes)
    y_pub = public.labels.numpy()
    n_pub = int(y_pub.size)

    def mimic_factory() -> nn.Module:
        # Like LiRA's shadows, QMIA's mimics know the target's architecture, not its weights.
        from privfl.models import build_task_model

        return build_task_model(
            scenario.model.name,
            num_classes,
            scenario.model.hidden,
            input_shape=tuple(public.images.shape[1:]),
        )

    lira: OfflineLiRA | None = None
    lira_notes: list[str] = []
    cal = torch.zeros(0, dtype=torch.int64)
    cal_shadow = np.zeros((0, 0))
    if "lira" in mi.attacks:
        # Shadows depend only on the public data and the training recipe, so one set
        # serves every target. Public records held out from every shadow calibrate the
        # operating point (calibration_fraction); the shadows sample the rest.
        n_trained = int(splits[0].members.labels.shape[0])
        if mi.target == "federated":
            n_trained = sum(int(p.train.labels.shape[0]) for p in federation.parties)
        n_cal = int(n_pub * calibration_fraction(mi.operating_fpr, n_pub))
        gen = torch.Generator().manual_seed(derive_seed(seed, "lira-calibration"))
        perm = torch.randperm(n_pub, generator=gen)
        cal, pool = perm[:n_cal], perm[n_cal:]
        shadow_pool = _Labelled(public.images[pool], public.labels[pool])
        subset = max(1, min(n_trained, int(pool.numel()) // 2))
        lira = OfflineLiRA(
            _shadow_trainer(scenario, num_classes, device, derive_seed(seed, "lira-shadows")),
            shadow_models=mi.shadow_models,
            fixed_variance=mi.fixed_variance,
            seed=derive_seed(seed, "lira"),
            device=device,
        ).fit(shadow_pool, subset)
        # The same for every target: only the target's own scores of these records differ.
        cal_shadow = lira.shadow_scores(public.images[cal], public.labels[cal])
        var = (
            f"fixed variance (σ = {lira.sigma:.3g}, pooled OUT scores of the shadows' public "
            f"records)"
            if lira.sigma is not None
            else "per-record variance"
        )
        lira_notes = [
            f"offline, {mi.shadow_models} shadows on {subset} public records, {var}; "
            f"operating point calibrated on {n_cal} public records no shadow "
            f"trained on"
        ]

    # Per attack: pooled statistics of members and non-members, and whether the attack
    # flagged each record at its own target's operating point.
    pooled: dict[str, dict[str, list[np.ndarray]]] = {
        a: {"in": [], "out": [], "flag_in": [], "flag_out": []} for a in mi.attacks
    }
    notes_of: dict[str, list[str]] = {"lira": lira_notes}
    train_acc, test_acc, epsilons = [], [], []
    for k, split in enumerate(splits):
        target_model = given_model
        if target_model is None:
            from privfl.architecture import build_model

            # Target 0 uses the single target's seed tag: K = 1 is the single-target attack.
            tag = "mia-target" if k == 0 else f"mia-target-{k}"
            with progress.phase(f"membership: target model {k + 1}/{len(splits)}"):
                target_model, eps = _train_model(
                    scenario,
                    build_model(scenario, num_classes),
                    split.members,
                    device,
                    derive_seed(seed, tag),
                )
            if eps is not None:
                epsilons.append(eps)
        api = QueryAPI(target_model, device)
        del target_model  # from here on the attacker only queries
        train_acc.append(_accuracy(api, split.members))
        test_acc.append(_accuracy(api, split.eval_out))

        y_in, y_out = split.eval_in.labels.numpy(), split.eval_out.labels.numpy()
        logits_in = api.query(split.eval_in.images)
        logits_out = api.query(split.eval_out.images)
        logits_pub = api.query(public.images)
        h_in, h_out, h_pub = (
            hinge_score(z, y)
            for z, y in ((logits_in, y_in), (logits_out, y_out), (logits_pub, y_pub))
        )
        for name in mi.attacks:
            if name == "qmia":
                qmia = QuantileMIA(
                    num_classes,
                    levels=mi.quantile_levels,
                    head=mi.qmia_head,
                    epochs=mi.qmia_epochs,
                    ensemble=mi.qmia_ensemble,
                    mimics=mi.qmia_mimics,
                    mimic_factory=mimic_factory,
                    val_fraction=calibration_fraction(mi.operating_fpr, n_pub),
                    seed=derive_seed(seed, "qmia") if k == 0 else derive_seed(seed, "qmia", k),
                    device=device,
                ).fit(public.images, public.labels, h_pub, logits=logits_pub)
                s_in = qmia.membership_scores(split.eval_in.images, split.eval_in.labels, h_in)
                s_out = qmia.membership_scores(split.eval_out.images, split.eval_out.labels, h_out)
                thr = qmia.operating_threshold(mi.operating_fpr)
                n_val = 0 if qmia._val_scores is None else qmia._val_scores.size
                per = " per target" if len(splits) > 1 else ""
                ens = f", mean of {mi.qmia_ensemble} regressors" if mi.qmia_ensemble > 1 else ""
                loc = (
                    f"; location: mean hinge of {mi.qmia_mimics} mimic(s) of the target's "
                    f"architecture distilled from its public logits"
                    if mi.qmia_mimics
                    else ""
                )
                notes_of[name] = [
                    f"hinge score; {mi.qmia_head} head, {mi.quantile_levels} levels{ens}{loc}; "
                    f"operating point calibrated on {n_val} held-out public records{per}"
                ]
            elif name == "loss":
                thr = roc.threshold_at_fpr(loss_attack(logits_pub, y_pub), mi.operating_fpr)
                s_in, s_out = loss_attack(logits_in, y_in), loss_attack(logits_out, y_out)
                notes_of[name] = ["negated cross-entropy; threshold = public non-members' quantile"]
            else:
                assert lira is not None
                s_in = lira.membership_scores(split.eval_in.images, split.eval_in.labels, h_in)
                s_out = lira.membership_scores(split.eval_out.images, split.eval_out.labels, h_out)
                thr = lira.operating_threshold(
                    public.images[cal],
                    public.labels[cal],
                    h_pub[cal.numpy()],
                    mi.operating_fpr,
                    shadow_scores=cal_shadow,
                )
            # Each statistic is kept as its distance past this target's own calibrated
            # threshold: one target's ROC is unchanged by the shift, and pooled targets
            # are ranked on a common scale anchored at the operating point instead of a
            # scale that drifts from one regressor (or one target's scores) to the next.
            got = pooled[name]
            got["in"].append(s_in - thr)
            got["out"].append(s_out - thr)
            got["flag_in"].append(s_in > thr)
            got["flag_out"].append(s_out > thr)

    common: dict[str, Any] = {
        "targets": len(splits),
        "members_scored": int(sum(s.eval_in.labels.shape[0] for s in splits)),
        "non_members_scored": int(sum(s.eval_out.labels.shape[0] for s in splits)),
        "public_records": n_pub,
        "operating_fpr": mi.operating_fpr,
        "target_train_accuracy": float(np.mean(train_acc)),
        "target_test_accuracy": float(np.mean(test_acc)),
    }
    if epsilons:
        common["epsilon"] = float(max(epsilons))
    target_name = splits[0].target if len(splits) == 1 else f"hospital-api-x{len(splits)}"
    results: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]] = []
    for name in mi.attacks:
        got = pooled[name]
        notes = list(notes_of[name])
        if len(splits) > 1:
            notes.append(
                f"{len(splits)} independent targets, each trained on its own "
                f"{mi.members} records; statistics and operating-point flags pooled"
            )
        results.append(
            (
                name,
                np.concatenate(got["in"]),
                np.concatenate(got["out"]),
                np.concatenate(got["flag_in"]),
                np.concatenate(got["flag_out"]),
                notes,
            )
        )

    reports = []
    curves = {}
    for name, s_in, s_out, f_in, f_out, notes in results:
        metrics = _evaluate(
            name, s_in, s_out, f_in, f_out, seed=derive_seed(seed, "auc-boot", name)
        )
        metrics.update(common)
        curve = roc.roc_curve(s_in, s_out)
        curves[f"{name} (AUC {metrics['auc']:.3f})"] = curve
        notes = [
            *notes,
            f"AUC {metrics['auc']:.3f} [{metrics['auc_low']:.3f}, {metrics['auc_high']:.3f}]; "
            f"TPR@0.1%FPR {metrics['tpr_at_0.1pct_fpr']:.3f}; "
            f"TPR@1%FPR {metrics['tpr_at_1pct_fpr']:.3f}",
            f"operating point (aimed FPR {mi.operating_fpr:g}): observed FPR "
            f"{metrics['operating_observed_fpr']:.4f}, {metrics['true_positives']} of "
            f"{metrics['flagged']} flagged are members: precision {metrics['precision']:.3f} "
            f"[{metrics['precision_low']:.3f}, {metrics['precision_high']:.3f}] at "
            f"{s_in.size} members : {s_out.size} non-members, "
            f"{metrics['precision_balanced']:.3f} "
            f"[{metrics['precision_balanced_low']:.3f}, "
            f"{metrics['precision_balanced_high']:.3f}] at 1 : 1",
        ]
        reports.append(
            AttackReport(
                name="membership-inference",
                role="query-only",
                target=f"{target_name}/{name}",
                recovered=metrics["true_positives"],
                total=int(s_in.size),
                metrics=metrics,
                notes=notes,
                # Saved beside results.json, so ROC curves can be redrawn and pooled.
                arrays={
                    "scores_in": s_in,
                    "scores_out": s_out,
                    "flagged_in": f_in,
                    "flagged_out": f_out,
                    "roc_fpr": curve.fpr,
                    "roc_tpr": curve.tpr,
                    "roc_thresholds": curve.thresholds,
                },
            )
        )
    if reports:
        fig = roc.roc_figure(curves, title=f"Membership inference: {target_name}")
        reports[0].figures[f"membership_roc_{target_name.replace('/', '_')}.png"] = fig
    return reports
