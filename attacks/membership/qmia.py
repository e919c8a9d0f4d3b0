"""Quantile-regression membership inference (Bertran et al., NeurIPS 2023): a regressor
trained on public non-members predicts quantiles of the target's hinge score; no shadow
model is trained."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from scipy import stats
from torch import nn

from privfl import progress
from privfl.attacks.membership.query import hinge_score
from privfl.metrics import roc
from privfl.seeding import derive_seed


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
