"""Privacy auditing in one training run: an empirical ε lower bound beside the accounted ε.

The auditor plants m canaries, includes each one on a secret fair coin, lets the mechanism
run once, scores every canary from what its view shows, and guesses the coins of the most
confidently scored canaries (abstaining on the rest). Many correct guesses are evidence
against the privacy claim; the bounds below turn the count into an ε that a mechanism
meeting its claim could exceed only with probability ``1 - confidence``.

Bounds
    * :func:`epsilon_lower_bound` — Steinke, Nasr & Jagielski, "Privacy auditing with one
      (1) training run" (NeurIPS 2023): under (ε, δ)-DP the number of correct guesses is
      dominated by a binomial with success rate e^ε/(1+e^ε), plus a 2mδ-weighted term.
      Valid for every (ε, δ)-DP mechanism.
    * :func:`gaussian_epsilon_lower_bound` — Mahloujifar, Melis & Chaudhuri, "Auditing
      f-differential privacy in one run" (ICML 2025), with the Gaussian trade-off family:
      the largest μ for which μ-GDP is rejected, converted to ε at δ through the GDP
      privacy profile. Tighter; it tests a Gaussian-shaped privacy curve, which is exact
      for the Gaussian mechanism without subsampling and the CLT limit of DP-SGD.

Canaries
    * :func:`dirac_canaries` — gradient canaries for a white-box view of every released
      noisy sum (Nasr et al., USENIX Security 2023): one coordinate each, of size the clip
      norm; score = the sum over steps of that released coordinate.
    * :func:`canary_party_directions` — canary parties for party-level DP (Andrew et al.,
      ICLR 2024): a random unit direction each; score = the sum over rounds of its cosine
      with the released aggregate.
    * :func:`mislabelled_canaries` / :func:`loss_scores` — input-space canaries for the
      black-box view: relabelled records scored by the model's loss (low loss: included).

Secrets
    Coins, coordinates and directions come from the AES-CTR stream of
    :class:`privfl.dp.KeyStream` keyed from ``os.urandom`` unless a key is handed in (lab
    runs and tests); never from numpy or torch generators.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from opacus.grad_sample import prepare_module
from opacus.optimizers import DPOptimizer
from scipy import optimize, special, stats
from torch import nn

from privfl.dp import GaussianAggregateMechanism, KeyStream, calibrate_noise, epsilon_of_history
from privfl.results import AttackReport

# Bisection stops when the bracket is this narrow (in ε or μ).
_TOLERANCE = 1e-6
# Largest ε (and μ) searched: beyond it every bound here is numerically saturated.
_SEARCH_MAX = 100.0

# --------------------------------------------------------------------------- bounds


def _check_counts(canaries: int, guesses: int, correct: int, confidence: float) -> None:
    if not 0 <= correct <= guesses <= canaries or canaries < 1:
        raise ValueError(
            "need 0 <= correct <= guesses <= canaries and canaries >= 1, got "
            f"correct={correct}, guesses={guesses}, canaries={canaries}"
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def one_run_p_value(
    *, canaries: int, guesses: int, correct: int, epsilon: float, delta: float
) -> float:
    """Probability, under an (ε, δ)-DP mechanism, of at least ``correct`` right guesses.

    Steinke, Nasr & Jagielski (NeurIPS 2023), Theorem 5.2: with q = e^ε/(1+e^ε) and
    B ~ Binomial(guesses, q),
    P[W ≥ v] ≤ P[B ≥ v] + 2mδ · max_{1≤i≤v} P[v-i ≤ B < v] / i.

    Parameters
    ----------
    canaries : int
        m, canaries each included on an independent fair coin.
    guesses : int
        r, canaries guessed (the rest abstained on).
    correct : int
        v, guesses that match the coin.
    epsilon, delta : float
        The (ε, δ) hypothesis.

    Returns
    -------
    float
        The p-value, in [0, 1].
    """
    q = special.expit(epsilon)
    v = correct
    beta = float(stats.binom.sf(v - 1, guesses, q))
    if delta == 0 or v == 0:
        return min(1.0, beta)
    i = np.arange(1, v + 1)
    window = stats.binom.sf(v - i - 1, guesses, q) - beta  # P[v-i <= B < v]
    alpha = float(np.max(window / i))
    return min(1.0, beta + 2 * canaries * delta * alpha)


def _largest_rejected(reject: Callable[[float], bool]) -> float:
    """Sup of the parameters x ≥ 0 that ``reject`` refuses, for a test monotone in x
    (rejects a prefix [0, x*)). 0 when even x = 0 is not rejected."""
    if not reject(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while reject(hi):
        lo, hi = hi, 2 * hi
        if hi > _SEARCH_MAX:
            return _SEARCH_MAX
    while hi - lo > _TOLERANCE:
        mid = (lo + hi) / 2
        if reject(mid):
            lo = mid
        else:
            hi = mid
    return lo


def epsilon_lower_bound(
    *, canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95
) -> float:
    """Empirical ε lower bound of a one-run audit (Steinke, Nasr & Jagielski 2023).

    The largest ε for which ``correct`` right guesses out of ``guesses`` would have
    probability at most ``1 - confidence`` under (ε, δ)-DP (:func:`one_run_p_value`),
    found by bisection. With 2mδ < 1 the p-value grows with ε, so every smaller ε is
    rejected too and the answer is a valid lower bound at the stated confidence.

    Parameters
    ----------
    canaries : int
        m, the number of canaries (each included on a fair coin).
    guesses, correct : int
        Guesses made (abstentions excluded) and how many were right.
    delta : float
        δ of the hypothesis; needs 2·canaries·δ < 1.
    confidence : float
        1 minus the test's significance.

    Returns
    -------
    float
        ε ≥ 0; 0 when the guesses are no better than chance at this confidence.
    """
    _check_counts(canaries, guesses, correct, confidence)
    if delta < 0 or 2 * canaries * delta >= 1:
        raise ValueError(
            f"delta must be >= 0 with 2*canaries*delta < 1, got delta={delta} for "
            f"{canaries} canaries (use fewer canaries or a smaller delta)"
        )
    if guesses == 0:
        return 0.0
    significance = 1 - confidence
    return _largest_rejected(
        lambda eps: (
            one_run_p_value(
                canaries=canaries, guesses=guesses, correct=correct, epsilon=eps, delta=delta
            )
            <= significance
        )
    )


def gaussian_tradeoff_rejected(
    *, canaries: int, guesses: int, correct: int, mu: float, significance: float
) -> bool:
    """Whether ``correct`` of ``guesses`` right guesses refute μ-GDP at ``significance``.

    Mahloujifar, Melis & Chaudhuri (ICML 2025). Suppose P[W ≥ v] = τ = significance under
    an f-DP mechanism. For a uniformly random canary J, the mass of "J guessed right and
    W ≥ i" (r) and of "J guessed wrong and W ≥ i-1" (h) obey h ≥ f(1 - r): the event
    "J guessed +1 and the other guesses have ≥ i-1 right" is decided without J's coin.
    Starting from all of τ at W = v (the least demanding placement) and adding at each
    lower level i just the mass the constraint forces (it carries i right and k-i wrong
    guesses), the guesses must total r + h = k/m; needing more refutes the hypothesis.
    For μ-GDP, f(1 - r) = Φ(Φ⁻¹(r) - μ).
    """
    k, v, m = guesses, correct, canaries
    if v == 0:
        return False
    r = significance * v / m
    h = significance * (k - v) / m
    for i in range(v - 1, -1, -1):
        need = float(special.ndtr(special.ndtri(min(r, 1.0)) - mu))
        if need <= h:
            break  # nothing more is forced at this level or any lower one
        r = min(r + i / (k - i) * (need - h), 1.0)
        h = need
    return r + h > k / m


def gaussian_mu_lower_bound(
    *, canaries: int, guesses: int, correct: int, confidence: float = 0.95
) -> float:
    """The largest μ for which the audit refutes μ-GDP (Mahloujifar et al., ICML 2025).

    The test of :func:`gaussian_tradeoff_rejected` gets weaker as μ grows (the trade-off
    curve drops), so bisection finds the supremum of the refuted μ.
    """
    _check_counts(canaries, guesses, correct, confidence)
    if guesses == 0:
        return 0.0
    significance = 1 - confidence
    return _largest_rejected(
        lambda mu: gaussian_tradeoff_rejected(
            canaries=canaries, guesses=guesses, correct=correct, mu=mu, significance=significance
        )
    )


def gdp_delta(epsilon: float, mu: float) -> float:
    """δ(ε) of μ-GDP (Dong, Roth & Su 2022, Corollary 2.13):
    Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2), evaluated in log space."""
    if mu <= 0:
        return 0.0
    a = special.log_ndtr(-epsilon / mu + mu / 2)
    b = epsilon + special.log_ndtr(-epsilon / mu - mu / 2)
    return float(np.exp(a) * -np.expm1(b - a)) if b < a else 0.0


def gdp_epsilon(mu: float, delta: float) -> float:
    """The ε at which μ-GDP is (ε, δ)-DP (the smallest such ε); 0 when δ(0) ≤ δ."""
    if not 0 < delta < 1:
        raise ValueError(f"gdp_epsilon: delta must be in (0, 1), got {delta}")
    if mu <= 0 or gdp_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(hi, mu) > delta:
        hi *= 2
    return float(optimize.brentq(lambda e: gdp_delta(e, mu) - delta, 0.0, hi, xtol=1e-9))


def gaussian_epsilon_lower_bound(
    *, canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95
) -> float:
    """ε lower bound from the Gaussian f-DP one-run audit (Mahloujifar et al., ICML 2025).

    :func:`gaussian_mu_lower_bound` converted to (ε, δ) through the μ-GDP privacy profile:
    no μ'-GDP mechanism with μ' at or below the bound explains the guesses, and those are
    exactly the Gaussian curves whose ε at δ is at or below the value returned.
    """
    mu = gaussian_mu_lower_bound(
        canaries=canaries, guesses=guesses, correct=correct, confidence=confidence
    )
    return gdp_epsilon(mu, delta)


# --------------------------------------------------------------------------- keys


def subkey(key: bytes, purpose: str) -> bytes:
    """A 32-byte key for one stream, HKDF-SHA256 of ``key`` with ``purpose`` as info, so
    one audit key can drive its coins, coordinates, sampling and noise independently."""
    if len(key) != 32:
        raise ValueError(f"subkey: need a 32-byte key, got {len(key)} bytes")
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"privfl/audit/v1", info=purpose.encode()
    ).derive(key)


def _distinct(stream: KeyStream, count: int, population: int) -> np.ndarray:
    """``count`` distinct integers from ``range(population)``, a uniform random subset in
    random order."""
    if not 0 <= count <= population:
        raise ValueError(f"cannot draw {count} distinct values from {population}")
    if 4 * count > population:
        # Dense: the first entries of a random permutation (sort by random keys).
        return np.argsort(stream.uint64(population), kind="stable")[:count].astype(np.int64)
    out = np.zeros(0, dtype=np.int64)
    while out.size < count:
        # Sparse: draw with replacement, keep first occurrences (modulo bias < d/2^64).
        draw = stream.uint64(2 * (count - out.size) + 8) % np.uint64(population)
        merged = np.concatenate([out, draw.astype(np.int64)])
        _, first = np.unique(merged, return_index=True)
        out = merged[np.sort(first)][:count]
    return out


# --------------------------------------------------------------------------- the audit


@dataclass(frozen=True, eq=False)
class AuditResult:
    """What one audit found.

    ``epsilon_lower_bound`` (Steinke et al.) holds for any (ε, δ)-DP mechanism;
    ``epsilon_gaussian`` (Mahloujifar et al., μ-GDP) is tighter but tests a Gaussian
    privacy curve. ``guesses``/``correct`` are those of the guess count that gave
    ``epsilon_lower_bound``. The score arrays are there for histograms.
    """

    view: str
    canaries: int
    guesses: int
    correct: int
    confidence: float
    delta: float
    epsilon_lower_bound: float
    epsilon_gaussian: float
    mu_gaussian: float
    epsilon_accounted: float
    included_scores: np.ndarray
    excluded_scores: np.ndarray

    @property
    def violation(self) -> bool:
        """The run leaked more than its accountant says (at ``confidence``)."""
        return self.epsilon_lower_bound > self.epsilon_accounted


class OneRunAudit:
    """The auditor's secret coins and the guessing rule of a one-run audit.

    Parameters
    ----------
    canaries : int
        m; canary j is included when ``included[j]``.
    key : bytes, optional
        32 bytes keying the coins' AES-CTR stream; default ``os.urandom(32)``. Pass one
        only to reproduce a lab run: whoever holds it knows every coin.
    guess_fractions : sequence of float
        Guess counts to try, as fractions of m, fixed before any score is seen; the
        top half of each count is guessed included, the bottom half excluded, the rest
        abstained on. Several fractions share the significance (Bonferroni), so taking
        the best bound stays valid. The default, 5% of m, is a single test.
    """

    def __init__(
        self,
        canaries: int,
        *,
        key: bytes | None = None,
        guess_fractions: Sequence[float] = (0.05,),
    ) -> None:
        if canaries < 2:
            raise ValueError(f"OneRunAudit: need at least 2 canaries, got {canaries}")
        if not guess_fractions or any(not 0 < f <= 1 for f in guess_fractions):
            raise ValueError(
                f"guess_fractions must be non-empty fractions in (0, 1], got {guess_fractions}"
            )
        self.canaries = canaries
        self.guess_fractions = tuple(float(f) for f in guess_fractions)
        coins = KeyStream(key if key is not None else os.urandom(32)).uint64(canaries)
        self._included = (coins & np.uint64(1)).astype(bool)

    @property
    def included(self) -> np.ndarray:
        """The secret coins (a copy): what the canary-inserting harness needs."""
        return self._included.copy()

    def guess_counts(self) -> list[int]:
        """The guess counts the fractions stand for (at least 2, at most m)."""
        return sorted(
            {min(self.canaries, max(2, round(f * self.canaries))) for f in self.guess_fractions}
        )

    def evaluate(
        self,
        scores: np.ndarray,
        *,
        epsilon_accounted: float,
        delta: float,
        view: str,
        confidence: float = 0.95,
    ) -> AuditResult:
        """Guess from ``scores`` (higher: more likely included) and bound ε.

        Parameters
        ----------
        scores : np.ndarray
            One score per canary, in canary order.
        epsilon_accounted : float
            What the run's accountant claims (``inf`` without DP).
        delta : float
            δ of the claim, used by both bounds.
        view : str
            What the auditor saw, for the report.
        confidence : float
            Overall confidence, shared out over the guess counts.
        """
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        if s.size != self.canaries or not np.all(np.isfinite(s)):
            raise ValueError(
                f"evaluate: need {self.canaries} finite scores, got {s.size} "
                f"({int(np.sum(~np.isfinite(s)))} not finite)"
            )
        counts = self.guess_counts()
        each = 1 - (1 - confidence) / len(counts)
        order = np.argsort(s, kind="stable")
        best = (-1.0, 0, 0)
        mu_gauss = 0.0
        for k in counts:
            top, bottom = order[self.canaries - k // 2 :], order[: k - k // 2]
            right = int(self._included[top].sum() + (~self._included[bottom]).sum())
            eps = epsilon_lower_bound(
                canaries=self.canaries, guesses=k, correct=right, delta=delta, confidence=each
            )
            if eps > best[0]:
                best = (eps, k, right)
            mu = gaussian_mu_lower_bound(
                canaries=self.canaries, guesses=k, correct=right, confidence=each
            )
            mu_gauss = max(mu_gauss, mu)
        return AuditResult(
            view=view,
            canaries=self.canaries,
            guesses=best[1],
            correct=best[2],
            confidence=confidence,
            delta=delta,
            epsilon_lower_bound=best[0],
            epsilon_gaussian=gdp_epsilon(mu_gauss, delta),
            mu_gaussian=mu_gauss,
            epsilon_accounted=float(epsilon_accounted),
            included_scores=s[self._included],
            excluded_scores=s[~self._included],
        )


# --------------------------------------------------------------------------- canaries


@dataclass(frozen=True, eq=False)
class DiracCanaries:
    """Gradient canaries: canary j is the vector ``clip`` · e_{coordinates[j]} in R^dim.

    Coordinates index the model's parameters flattened in ``model.parameters()`` order.
    """

    coordinates: np.ndarray
    dim: int
    clip: float

    def __len__(self) -> int:
        return int(self.coordinates.size)

    def gradient(self, selected: np.ndarray) -> torch.Tensor:
        """The summed gradient of the canaries at ``selected`` (indices), float32 (dim,)."""
        out = torch.zeros(self.dim)
        out[torch.from_numpy(self.coordinates[selected])] = self.clip
        return out

    def scores(self, update: np.ndarray | torch.Tensor) -> np.ndarray:
        """Each canary's inner product with a flat ``update``, over ``clip``: its
        coordinate there."""
        u = torch.as_tensor(update).reshape(-1)
        return u[torch.from_numpy(self.coordinates)].double().numpy()


def dirac_canaries(
    m: int,
    dim: int,
    key: bytes,
    *,
    clip: float = 1.0,
    within: tuple[int, int] | None = None,
) -> DiracCanaries:
    """``m`` distinct Dirac directions in R^dim, each of norm ``clip``.

    Nasr et al. (USENIX Security 2023): a white-box auditor who sees every released
    (noisy) sum of clipped gradients can insert any gradient of norm at most the clip;
    one coordinate each keeps the canaries orthogonal to each other. ``within = (start,
    stop)`` draws the coordinates from that slice only, e.g. one large weight matrix where
    the data's own gradients are small next to the noise.
    """
    if clip <= 0:
        raise ValueError(f"dirac_canaries: clip must be > 0, got {clip}")
    start, stop = within if within is not None else (0, dim)
    if not 0 <= start < stop <= dim:
        raise ValueError(f"dirac_canaries: within must be a slice of [0, {dim}), got {within}")
    coords = _distinct(KeyStream(subkey(key, "dirac")), m, stop - start) + start
    return DiracCanaries(coords, dim, float(clip))


def parameter_slice(model: nn.Module, name: str) -> tuple[int, int]:
    """Where parameter ``name`` sits in the flat ``model.parameters()`` vector."""
    pos = 0
    for n, p in model.named_parameters():
        if n == name:
            return pos, pos + p.numel()
        pos += p.numel()
    names = [n for n, _ in model.named_parameters()]
    raise KeyError(f"parameter_slice: no parameter {name!r}; the model has {names}")


@dataclass(frozen=True, eq=False)
class CanaryParties:
    """Canary parties: party j's update is ``clip`` · u_j for a fixed unit direction u_j.

    u_j is sparse (``support`` random coordinates with random signs ±1/sqrt(support)): m
    directions over d weights then cost m·support numbers rather than m·d, and two of
    them share support²/d coordinates on average, so they stay nearly orthogonal to each
    other and to the real updates, which is all the cosine test needs.
    """

    coordinates: np.ndarray
    signs: np.ndarray
    dim: int
    clip: float

    def __len__(self) -> int:
        return int(self.coordinates.shape[0])

    def update_sum(self, selected: np.ndarray) -> np.ndarray:
        """Sum of the updates of the canary parties at ``selected``, float64 (dim,)."""
        out = np.zeros(self.dim)
        np.add.at(out, self.coordinates[selected].ravel(), self.clip * self.signs[selected].ravel())
        return out

    def cosines(self, aggregate: np.ndarray) -> np.ndarray:
        """cos(u_j, ``aggregate``) for every canary party (0 for a zero aggregate)."""
        a = np.asarray(aggregate, dtype=np.float64).reshape(-1)
        norm = float(np.linalg.norm(a))
        if norm == 0:
            return np.zeros(len(self))
        return (a[self.coordinates] * self.signs).sum(axis=1) / norm


def canary_party_directions(
    m: int, dim: int, key: bytes, *, clip: float = 1.0, support: int = 256
) -> CanaryParties:
    """``m`` canary parties with random unit directions (Andrew et al., ICLR 2024)."""
    if not 1 <= support <= dim:
        raise ValueError(f"support must be in [1, {dim}], got {support}")
    stream = KeyStream(subkey(key, "canary-parties"))
    coords = np.stack([_distinct(stream, support, dim) for _ in range(m)])
    signs = np.where(stream.uint64(m * support) & np.uint64(1), 1.0, -1.0).reshape(m, support)
    return CanaryParties(coords, signs / math.sqrt(support), dim, float(clip))


def mislabelled_canaries(labels: torch.Tensor, key: bytes, num_classes: int) -> torch.Tensor:
    """Input-space canaries: each record's label replaced by a different class, uniformly.

    A model that trained on such a record fits its wrong label far better than one that
    did not, so the loss on the wrong label is the black-box score (:func:`loss_scores`).
    """
    if num_classes < 2:
        raise ValueError(f"mislabelled_canaries: need >= 2 classes, got {num_classes}")
    shift = KeyStream(subkey(key, "mislabel")).uint64(labels.numel()) % np.uint64(num_classes - 1)
    return (labels + 1 + torch.from_numpy(shift.astype(np.int64))) % num_classes


def loss_scores(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Black-box score of each record: minus its cross-entropy loss (high: included)."""
    model.eval()
    with torch.no_grad():
        losses = nn.functional.cross_entropy(model(images), labels, reduction="none")
    return -losses.double().cpu().numpy()


# --------------------------------------------------------------------------- DP-SGD, white box


class CanaryDPOptimizer(DPOptimizer):
    """Opacus' :class:`~opacus.optimizers.DPOptimizer` with the auditor between clipping
    and noise, and the noise drawn from a keyed CSPRNG.

    After Opacus has clipped and summed the per-sample gradients, ``insert()`` may return
    one more flat gradient (over the parameters in order), added to the sum as if it were
    further clipped records. The noise, N(0, noise_std²) per coordinate, comes from
    ``noise`` (as in :mod:`privfl.dp.sgd`), one draw over all parameters per step.
    ``observe(flat)`` then sees the released noisy sum (before Opacus divides it by the
    expected batch size, a public constant).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise_std: float,
        max_grad_norm: float,
        expected_batch_size: int,
        noise: KeyStream,
        insert: Callable[[], torch.Tensor | None],
        observe: Callable[[torch.Tensor], None],
    ) -> None:
        # Opacus' own noise is off (multiplier 0 draws nothing); ours is added below.
        super().__init__(
            optimizer,
            noise_multiplier=0.0,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
        )
        self.noise_std = noise_std
        self._noise = noise
        self._insert = insert
        self._observe = observe

    def add_noise(self) -> None:
        """Add the inserted gradient to the clipped sum, then the noise; show the result."""
        extra = self._insert()
        if extra is not None:
            pos = 0
            for p in self.params:
                size = p.numel()
                p.summed_grad.add_(extra[pos : pos + size].view_as(p.summed_grad))
                pos += size
        super().add_noise()  # moves the sum into p.grad, with Opacus' bookkeeping
        if self.noise_std > 0:
            z = torch.from_numpy(self._noise.normal(sum(p.numel() for p in self.params)))
            pos = 0
            for p in self.params:
                size = p.numel()
                p.grad.add_(
                    z[pos : pos + size].view_as(p.grad).to(p.grad.dtype), alpha=self.noise_std
                )
                pos += size
        self._observe(torch.cat([p.grad.reshape(-1) for p in self.params]))


@dataclass(frozen=True, eq=False)
class DPSGDAudit:
    """One audited DP-SGD run: the audit, the σ it ran with and what it cost."""

    result: AuditResult
    noise_multiplier: float
    steps: int
    sample_rate: float
    loss: float
    seconds: float
    released_norms: list[float] = field(default_factory=list)


def audit_dp_sgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    audit: OneRunAudit,
    canaries: DiracCanaries,
    steps: int,
    sample_rate: float,
    clip: float,
    lr: float,
    delta: float,
    epsilon: float | None,
    accountant: str = "rdp",
    noise_scale: float = 1.0,
    known_noise: bool = False,
    key: bytes | None = None,
    confidence: float = 0.95,
) -> DPSGDAudit:
    """DP-SGD (Opacus, Poisson sampling, per-sample clipping) with Dirac gradient
    canaries, audited in the white-box view of every released noisy gradient sum.

    Each included canary is one more record: it joins each step with probability
    ``sample_rate`` and its clipped gradient is its Dirac direction (norm ``clip``),
    added after clipping and before the noise (:class:`CanaryDPOptimizer`). A canary's
    score is the sum over steps of its coordinate of the released sum.

    Parameters
    ----------
    model : nn.Module
        Trained in place (Opacus-compatible); hooks removed afterwards.
    images, labels : torch.Tensor
        The training records (CPU tensors).
    audit : OneRunAudit
        The coins; ``len(canaries)`` must equal ``audit.canaries``.
    canaries : DiracCanaries
        Over the flat parameter vector of ``model``.
    steps, sample_rate, clip, lr
        DP-SGD: Poisson rate q per record, per-sample L2 clip, plain SGD step size.
    delta : float
        δ of the claim.
    epsilon : float or None
        Target ε: σ is calibrated (:func:`privfl.dp.calibrate_noise`) so that ``steps``
        steps at rate q spend it, and the accountant (:func:`privfl.dp.epsilon_of_history`)
        reports what was claimed. ``None``: no noise and no claim (ε accounted = ∞).
    noise_scale : float
        Planted fault: the optimizer adds ``noise_scale`` · σ while the accountant still
        counts σ (1 is correct; 0 switches the noise off).
    known_noise : bool
        Planted fault: the noise comes from a seed the auditor holds, so it replays the
        draws and subtracts them before scoring.
    key : bytes, optional
        Keys the batch sampling and the noise seed (default ``os.urandom(32)``).
    """
    if len(canaries) != audit.canaries:
        raise ValueError(f"{len(canaries)} canaries but the audit has coins for {audit.canaries}")
    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    if canaries.dim != dim:
        raise ValueError(f"canaries span {canaries.dim} coordinates, the model has {dim}")
    if not 0 < sample_rate <= 1 or steps < 1 or noise_scale < 0:
        raise ValueError(
            f"need 0 < sample_rate <= 1, steps >= 1, noise_scale >= 0; got {sample_rate}, "
            f"{steps}, {noise_scale}"
        )
    key = key if key is not None else os.urandom(32)
    if epsilon is None:
        sigma, accounted = 0.0, math.inf
    else:
        sigma = calibrate_noise(
            epsilon=epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
        accounted = epsilon_of_history(
            [(sigma, sample_rate, steps)], delta=delta, accountant=accountant
        )
    n = int(labels.shape[0])
    included = np.flatnonzero(audit.included)
    records = KeyStream(subkey(key, "dp-sgd-records"))
    canary_coins = KeyStream(subkey(key, "dp-sgd-canaries"))
    noise_key = subkey(key, "dp-sgd-noise")
    # The fault: a second stream on the same key gives the auditor every draw.
    twin = KeyStream(noise_key) if known_noise else None
    std = sigma * noise_scale * clip
    coords = torch.from_numpy(canaries.coordinates)
    total = torch.zeros(len(canaries), dtype=torch.float64)
    norms: list[float] = []

    def insert() -> torch.Tensor | None:
        chosen = included[canary_coins.uniform(included.size) < sample_rate]
        return canaries.gradient(chosen) if chosen.size else None

    def observe(released: torch.Tensor) -> None:
        seen = released[coords].double()
        if twin is not None and std > 0:
            seen -= std * torch.from_numpy(twin.normal(dim))[coords]
        total.add_(seen)
        norms.append(float(released.norm()))

    module = prepare_module(model, "hooks", batch_first=True, loss_reduction="mean")
    dp_opt = CanaryDPOptimizer(
        torch.optim.SGD(params, lr=lr),
        noise_std=std,
        max_grad_norm=clip,
        expected_batch_size=max(1, round(sample_rate * (n + included.size))),
        noise=KeyStream(noise_key),
        insert=insert,
        observe=observe,
    )
    losses = []
    start = time.perf_counter()
    module.train()
    try:
        for _ in range(steps):
            idx = torch.from_numpy(np.flatnonzero(records.uniform(n) < sample_rate))
            dp_opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(module(images[idx]), labels[idx])
            loss.backward()
            dp_opt.step()
            if idx.numel():
                losses.append(float(loss.item()))
    finally:
        module._close()
    seconds = time.perf_counter() - start
    result = audit.evaluate(
        total.numpy(),
        epsilon_accounted=accounted,
        delta=delta,
        view="white-box: every released noisy gradient sum, Dirac canaries",
        confidence=confidence,
    )
    return DPSGDAudit(
        result=result,
        noise_multiplier=sigma,
        steps=steps,
        sample_rate=sample_rate,
        loss=float(np.mean(losses)) if losses else math.nan,
        seconds=seconds,
        released_norms=norms,
    )


# --------------------------------------------------------------------------- party-level DP


def audit_gaussian_aggregate(
    party_updates: Callable[[int, np.ndarray], Sequence[np.ndarray]],
    initial: np.ndarray,
    *,
    audit: OneRunAudit,
    canaries: CanaryParties,
    rounds: int,
    clip: float,
    delta: float,
    epsilon: float,
    accountant: str = "rdp",
    noise_scale: float = 1.0,
    key: bytes | None = None,
    confidence: float = 0.95,
) -> AuditResult:
    """Party-level DP (DP-FedAvg's Gaussian mechanism, every party every round) with
    canary parties, audited in the view of every released noisy aggregate.

    Each round the real parties' updates (``party_updates(round, global_vector)``) and
    the included canary parties' updates are clipped and averaged over the public party
    count n = real + m/2, and :class:`privfl.dp.GaussianAggregateMechanism` adds
    N(0, (σC/n)²) (σ calibrated for ``epsilon`` over ``rounds`` rounds at sampling rate
    1); the global vector moves by the release. A canary party's score is the sum over
    rounds of the cosine between its direction and the release (Andrew et al., ICLR 2024).
    ``noise_scale`` plants the same fault as in :func:`audit_dp_sgd`.
    """
    if len(canaries) != audit.canaries:
        raise ValueError(f"{len(canaries)} canaries but the audit has coins for {audit.canaries}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    key = key if key is not None else os.urandom(32)
    sigma = calibrate_noise(
        epsilon=epsilon, delta=delta, sample_rate=1.0, steps=rounds, accountant=accountant
    )
    mechanism = GaussianAggregateMechanism(clip=clip, noise_multiplier=sigma * noise_scale)
    noise = KeyStream(subkey(key, "aggregate-noise"))
    canary_sum = canaries.update_sum(np.flatnonzero(audit.included))
    current = np.asarray(initial, dtype=np.float64).copy()
    scores = np.zeros(len(canaries))
    for rnd in range(1, rounds + 1):
        real = [mechanism.constrain_sensitivity(u)[0] for u in party_updates(rnd, current)]
        parties = len(real) + audit.canaries // 2
        mean = (np.sum(real, axis=0) + canary_sum) / parties if real else canary_sum / parties
        released = mechanism.add_noise(mean, num_parties=parties, stream=noise)
        scores += canaries.cosines(released)
        current = current + released
    accounted = epsilon_of_history([(sigma, 1.0, rounds)], delta=delta, accountant=accountant)
    return audit.evaluate(
        scores,
        epsilon_accounted=accounted,
        delta=delta,
        view="party-level: every released noisy aggregate, canary parties",
        confidence=confidence,
    )


# --------------------------------------------------------------------------- a live run


class CanaryInserter:
    """One party's included canary records: each joins a local step with probability q.

    Handed to the party locally by the auditor's harness (they are records of its data);
    ``__call__(rate)`` returns the summed clipped gradient of the canaries that join this
    step, or None.
    """

    def __init__(self, canaries: DiracCanaries, indices: np.ndarray, key: bytes) -> None:
        self.canaries = canaries
        self.indices = np.asarray(indices, dtype=np.int64)
        self._coins = KeyStream(key)

    def __call__(self, rate: float) -> torch.Tensor | None:
        if self.indices.size == 0:
            return None
        chosen = self.indices[self._coins.uniform(self.indices.size) < rate]
        return self.canaries.gradient(chosen) if chosen.size else None


class RunAuditor:
    """The auditor of one federated run (a lab instrument, apart from parties and server).

    It holds the secret coins; hands each party its canary records (Dirac gradient
    canaries, record-level DP-SGD or no DP) or adds the included canary parties to the
    server's DP-FedAvg sum (party-level DP); observes every global model the server
    releases (the aggregate of each round: the white-box view of a server under secure
    aggregation); and bounds ε at the end.

    Parameters
    ----------
    mode : {"none", "client", "global", "distributed"}
        The run's ``defense.dp.mode``: canary records for the first two, canary parties
        (added to the released sum, as a party's update would be) for the party-level ones.
    canaries : int
    param_names : sequence of str
        The model's parameter names, in ``model.parameters()`` order (the flat order of
        the canaries' coordinates).
    sizes : sequence of int
        Their sizes.
    clip : float
        The clip norm (per-sample under DP-SGD, per-party under DP-FedAvg; 1 without DP).
    parties : int
        Parties of the federation (canary record j belongs to party j mod parties).
    view : {"aggregate", "party-update", "final-model"}
        What the auditor is handed (see ``audit.view``).
    target_party : int
        The party whose update the ``party-update`` view sees (it holds every canary).
    records, num_classes
        Public records (images, labels) the ``final-model`` view mislabels as canaries.
    """

    def __init__(
        self,
        *,
        mode: str,
        canaries: int,
        param_names: Sequence[str],
        sizes: Sequence[int],
        clip: float,
        parties: int,
        confidence: float = 0.95,
        guess_fraction: float = 0.05,
        key: bytes | None = None,
        view: str = "aggregate",
        target_party: int = 0,
        records: tuple[torch.Tensor, torch.Tensor] | None = None,
        num_classes: int = 10,
    ) -> None:
        if mode not in ("none", "client", "global", "distributed"):
            raise ValueError(
                f"RunAuditor: mode must be none, client, global or distributed, got {mode!r}"
            )
        if view not in ("aggregate", "party-update", "final-model"):
            raise ValueError(
                f"RunAuditor: view must be aggregate, party-update or final-model, got {view!r}"
            )
        if view == "final-model" and (records is None or len(records[1]) < canaries):
            have = 0 if records is None else len(records[1])
            raise ValueError(
                f"audit.canaries: the final-model view needs {canaries} canary records, "
                f"the public data holds {have}"
            )
        self.mode = mode
        self.view = view
        self.target_party = target_party
        self.key = key if key is not None else os.urandom(32)
        self.audit = OneRunAudit(
            canaries, key=subkey(self.key, "coins"), guess_fractions=(guess_fraction,)
        )
        self.names = list(param_names)
        self.sizes = [int(s) for s in sizes]
        self.dim = sum(self.sizes)
        self.parties = parties
        self.confidence = confidence
        if mode in ("global", "distributed"):
            self.canary_parties: CanaryParties | None = canary_party_directions(
                canaries, self.dim, subkey(self.key, "parties"), clip=clip
            )
            self.records: DiracCanaries | None = None
        else:
            self.records = dirac_canaries(
                canaries, self.dim, subkey(self.key, "records"), clip=clip
            )
            self.canary_parties = None
        self.scores = np.zeros(canaries)
        self.rounds = 0
        self._previous: np.ndarray | None = None
        # Black box: mislabelled public records, in the parties' data when included.
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        if view == "final-model":
            assert records is not None
            images, labels = records[0][:canaries], records[1][:canaries]
            self.inputs = (
                images,
                mislabelled_canaries(labels, subkey(self.key, "labels"), num_classes),
            )

    # ------------------------------------------------------------------ handed out
    def _owned(self, party: int) -> np.ndarray:
        if self.view == "party-update":
            return np.full(self.audit.canaries, party == self.target_party)
        return np.arange(self.audit.canaries) % self.parties == party

    def party_records(self, party: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The mislabelled canary records (included ones) party ``party`` trains on, or
        None (black-box view only)."""
        if self.inputs is None:
            return None
        chosen = torch.from_numpy(np.flatnonzero(self._owned(party) & self.audit.included))
        return self.inputs[0][chosen], self.inputs[1][chosen]

    def party_inserter(self, party: int, server_round: int) -> CanaryInserter | None:
        """The canary records party ``party`` holds (included ones only) for one round, or
        None; their step coins are fresh each round (keyed by party and round)."""
        if self.records is None or self.view == "final-model":
            return None
        own = self._owned(party)
        chosen = np.flatnonzero(own & self.audit.included)
        key = subkey(self.key, f"party-{party}-round-{server_round}")
        return CanaryInserter(self.records, chosen, key)

    def canary_party_sum(self) -> tuple[np.ndarray, int] | None:
        """The included canary parties' summed updates and their count (DP-FedAvg)."""
        if self.canary_parties is None:
            return None
        chosen = np.flatnonzero(self.audit.included)
        return self.canary_parties.update_sum(chosen), int(chosen.size)

    # ------------------------------------------------------------------ the view
    def flatten(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """The parameters of a global model as one vector, in the canaries' order."""
        return np.concatenate(
            [np.asarray(arrays[n], dtype=np.float64).reshape(-1) for n in self.names]
        )

    def observe_party(self, sent: Mapping[str, np.ndarray], reply: np.ndarray) -> None:
        """Party-update view: score the canaries on what the server received from the
        target party (``reply``: its weights, flat, or whatever it could decode of a masked
        payload) against the model it was sent."""
        assert self.records is not None
        step = np.asarray(reply, dtype=np.float64)[: self.dim] - self.flatten(sent)
        self.scores += self.records.scores(-step)
        self.rounds += 1

    def observe_final(self, model: nn.Module) -> None:
        """Black-box view: score the mislabelled canaries by the released model's loss."""
        assert self.inputs is not None
        self.scores = loss_scores(model.cpu(), *self.inputs)
        self.rounds = 1

    def observe(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Score the canaries on the step from the previous global model to this one."""
        if self.view != "aggregate":
            return
        flat = self.flatten(arrays)
        if self._previous is not None:
            step = flat - self._previous
            if self.records is not None:
                # Descent moves a parameter against an included canary's gradient.
                self.scores += self.records.scores(-step)
            else:
                assert self.canary_parties is not None
                self.scores += self.canary_parties.cosines(step)
            self.rounds += 1
        self._previous = flat

    def result(self, *, epsilon_accounted: float, delta: float) -> AuditResult:
        """Guess and bound ε from the scores gathered so far."""
        if self.view == "final-model":
            view = "black-box: the released model's loss on mislabelled canary records"
        elif self.view == "party-update":
            view = (
                f"what the server received from party {self.target_party}, Dirac canary "
                "records in its training"
            )
        elif self.records is not None:
            view = (
                "white-box: every round's aggregate, Dirac canary records in the parties' training"
            )
        else:
            view = "white-box: every round's aggregate, canary parties in the sum"
        return self.audit.evaluate(
            self.scores,
            epsilon_accounted=epsilon_accounted,
            delta=delta,
            view=view,
            confidence=self.confidence,
        )


def audit_report(result: AuditResult) -> AttackReport:
    """results.json's ``privacy-audit`` entry: both ε side by side, the score histograms."""
    from matplotlib.figure import Figure  # drawn only for a report (slow to import)

    fig = Figure(figsize=(5.2, 3.2))
    ax = fig.subplots()
    both = np.concatenate([result.included_scores, result.excluded_scores])
    bins = np.linspace(float(both.min()), float(both.max()), 41) if both.size else 10
    ax.hist(result.excluded_scores, bins=bins, alpha=0.6, label="excluded canaries")
    ax.hist(result.included_scores, bins=bins, alpha=0.6, label="included canaries")
    acc = result.epsilon_accounted
    ax.set(
        xlabel="canary score",
        ylabel="canaries",
        title=f"audit: ε ≥ {result.epsilon_lower_bound:.2f} "
        f"(accounted {'∞' if math.isinf(acc) else f'{acc:.2f}'})",
    )
    ax.legend()
    fig.tight_layout()
    accounted = "∞ (no DP)" if math.isinf(acc) else f"{acc:.3g}"
    notes = [
        f"view: {result.view}",
        f"ε lower bound {result.epsilon_lower_bound:.3g} (one-run, Steinke et al.), "
        f"{result.epsilon_gaussian:.3g} (Gaussian one-run analysis, μ ≥ "
        f"{result.mu_gaussian:.3g}); accounted ε {accounted}; δ = {result.delta:g}, "
        f"{result.confidence:.0%} confidence",
        f"{result.correct} of {result.guesses} guesses right among {result.canaries} canaries",
    ]
    if result.violation:
        notes.insert(
            0,
            "PRIVACY VIOLATION: the empirical lower bound exceeds the accounted ε; "
            "the mechanism does not deliver what its accountant claims",
        )
    return AttackReport(
        name="privacy-audit",
        role="auditor",
        target="the run",
        recovered=result.correct,
        total=result.guesses,
        metrics={
            "epsilon_lower_bound": result.epsilon_lower_bound,
            "epsilon_gaussian": result.epsilon_gaussian,
            "epsilon_accounted": acc,
            "confidence": result.confidence,
            "canaries": result.canaries,
            "correct": result.correct,
            "guesses": result.guesses,
            "view": result.view,
            "violation": result.violation,
        },
        figures={"privacy_audit.png": fig},
        notes=notes,
        arrays={"included": result.included_scores, "excluded": result.excluded_scores},
    )
