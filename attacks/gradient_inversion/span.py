"""Feature-span peeling: invert a whole FedAvg update through its first dense layer.

The first dense layer ``z = W·h + b`` after a ReLU block sees each sample's features
``h_i ≥ 0``, and every local SGD step adds ``−(lr·c_s/B)·δ_i h_iᵀ`` to ``ΔW`` per sample
(``δ_i = ∂ℓ_i/∂z``). So ``ΔW`` is a sum of one rank-one term per sample seen, whatever
the step sizes and however far the weights drift between the steps: its row space is
spanned by the features each sample had *at its own step*. As in the Cocktail Party Attack
(Kariyappa et al., ICML 2023), the update is a mixture to unmix; here the mixture is undone
with the structure of the model instead of independence:

1. **Features as vertices.** The non-negative vectors of the row space form a cone, and
   the samples' features are among its extreme rays: linear programs with random
   objectives (``min cᵀVk`` over ``Vk ≥ 0``, ``1ᵀVk = 1``) return them, with some spurious
   vertices.
2. **Which vertices, with which label, at which step.** A sample of step ``s`` contributes
   ``δ_i = ∂ℓ/∂z`` evaluated on the weights of step ``s``: for the right scale and label
   it lies exactly in the column space of ``ΔW``, which spurious vertices and features of
   other steps miss. The ``B`` vertices closest to it are step ``s``'s batch. The test
   always runs against the whole update (what is peeled off only measures how much of
   ``ΔW`` is explained), so rounding does not build up from step to step.
3. **Images.** Each of those features is inverted through the layers below it (cosine
   distance and a total-variation prior, Adam, box [0, 1], starts at the attacker's public
   images nearest in feature space).
4. **The next step.** The party's step ``s`` is replayed on the recovered batch (the dense
   layers from the exact features, the layers below from the images), which gives the
   weights of step ``s + 1``; back to 2 with the vertices not yet taken.

Exact for plain SGD (momentum is replayed too); weight decay adds a full-rank term, which
this attack refuses. A masked payload under secure aggregation has no non-negative vector
in its row space: nothing is returned but the attacker's blank guesses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linprog, minimize_scalar
from torch import Tensor, nn

from privfl import progress
from privfl.attacks.gradient_inversion.knowledge import AttackerKnowledge, Reconstruction
from privfl.attacks.gradient_inversion.objective import _clone, _tv_each
from privfl.errors import UserError

# Layers that may sit between the ReLU and the dense layer without making any feature
# negative.
_SIGN_KEEPING = (
    nn.Flatten,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Dropout,
    nn.Identity,
)
# Relative scales tried for a vertex (it is found only up to scale), then refined.
_SCALES = np.geomspace(0.25, 4.0, 65)
# Cosine above which two programs returned the same vertex (the solver's tolerance).
_SAME_VERTEX = 1.0 - 1e-8
# Cosine above which two vertices are taken for one sample: the update's rounding splits
# a sample's vertex into copies this alike, while distinct samples' features (all
# non-negative) stay below about 0.98. Which copy stands for the sample is left to the
# span test.
_SAME_SAMPLE = 0.99999
_EXACT = 1e-2  # span residual of δ above which a pick is taken to be no sample of the step
_MORE_ROUNDS = 2  # extra rounds of linear programs when a step's picks are not exact
_BLOCK = 32  # vertices tested at once (memory: block × scales × classes × dense width)


class SpanError(UserError, ValueError):
    """The model or the training plan does not fit the feature-span attack (the message
    says what would)."""


@dataclass
class _Split:
    """The attacked model cut at its first dense layer."""

    below: nn.Sequential  # input → features h (non-negative)
    head: nn.Sequential  # the dense layer and everything after it
    weight: str  # state_dict key of the dense layer's weight

    @property
    def dense(self) -> nn.Linear:
        return self.head[0]  # type: ignore[return-value]


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The modules a sequential model applies, in order, with their state_dict prefixes."""
    children = list(module.named_children())
    if not children:
        return [(prefix.rstrip("."), module)]
    out = []
    for name, child in children:
        out += _leaves(child, f"{prefix}{name}.")
    return out


def split_at_dense(model: nn.Module, example: Tensor) -> _Split:
    """Cut ``model`` before its first ``nn.Linear`` and check that the cut is faithful.

    Raises
    ------
    SpanError
        No dense layer; the layers do not compose sequentially to the model's output; or
        the dense layer's input can be negative (it must follow a ReLU, or be the pixels).
    """
    leaves = _leaves(model)
    first = next((i for i, (_, m) in enumerate(leaves) if isinstance(m, nn.Linear)), None)
    if first is None:
        raise SpanError("feature-span: the model has no dense (nn.Linear) layer")
    before = [m for _, m in leaves[:first] if not isinstance(m, _SIGN_KEEPING)]
    if before and not isinstance(before[-1], nn.ReLU):
        raise SpanError(
            f"feature-span: the first dense layer ({leaves[first][0]}) follows "
            f"{type(before[-1]).__name__}, not a ReLU: its inputs can be negative"
        )
    split = _Split(
        below=nn.Sequential(*[m for _, m in leaves[:first]]),
        head=nn.Sequential(*[m for _, m in leaves[first:]]),
        weight=f"{leaves[first][0]}.weight",
    )
    if split.dense.bias is None:
        raise SpanError(f"feature-span: the dense layer {leaves[first][0]} has no bias")
    with torch.no_grad():
        if not torch.allclose(split.head(split.below(example)), model(example), atol=1e-5):
            raise SpanError(
                "feature-span: the model's layers do not compose in the order they are "
                "declared; the attack needs a sequential model"
            )
    return split


def feature_vertices(basis: np.ndarray, trials: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-norm extreme rays of the non-negative cone of ``span(basis)``.

    ``trials`` linear programs with Gaussian objectives; rows of ``basis`` that are zero
    throughout (features no sample activates) are left out of the constraints. Returns an
    ``(N, d)`` array, ``N = 0`` when the span holds no non-negative vector.
    """
    d, r = basis.shape
    live = np.abs(basis).max(1) > 1e-12 * max(np.abs(basis).max(), 1e-300)
    v = basis[live]
    ones = v.sum(0)
    found: list[np.ndarray] = []
    for _ in range(trials):
        c = rng.standard_normal(len(v)) @ v
        res = linprog(
            c,
            A_ub=-v,
            b_ub=np.zeros(len(v)),
            A_eq=ones[None],
            b_eq=[1.0],
            bounds=[(None, None)] * r,
            method="highs",
        )
        if res.status == 2:  # infeasible: no non-negative vector at all
            break
        if res.status != 0:
            continue
        h = np.zeros(d)
        h[live] = np.clip(v @ res.x, 0.0, None)
        norm = np.linalg.norm(h)
        if norm == 0:
            continue
        h /= norm
        if all(float(h @ g) < _SAME_VERTEX for g in found):
            found.append(h)
    return np.array(found).reshape(len(found), d)


def _head_deltas(head: nn.Sequential, h: Tensor, labels: Tensor) -> Tensor:
    """``∂ℓ_i/∂z`` of the dense layer's output for each row of ``h`` and its label."""
    return _deltas_at(head, head[0](h), labels)


def _deltas_at(head: nn.Sequential, z: Tensor, labels: Tensor) -> Tensor:
    """``∂ℓ_i/∂z`` for dense-layer outputs ``z`` (rows) and their labels."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        loss = nn.functional.cross_entropy(head[1:](z), labels, reduction="sum")
        (d,) = torch.autograd.grad(loss, z)
    return d


def _span_residual(d: Tensor, u: Tensor) -> Tensor:
    """Share of each row of ``d`` outside the column space ``u`` (orthonormal)."""
    off = d - (d @ u) @ u.T
    return off.norm(dim=-1) / d.norm(dim=-1).clamp_min(1e-300)


def pick_batch(
    head: nn.Sequential, vertices: Tensor, u: Tensor, size: int, ref_norm: float, classes: int
) -> tuple[list[int], Tensor, Tensor, Tensor]:
    """The ``size`` vertices whose ``δ`` (best scale and label) lies closest to ``span(u)``.

    Returns the vertex indices, their labels, their scaled features ``h`` and the
    residuals (0 for a sample of this step, exactly).
    """
    n = len(vertices)
    scales = torch.as_tensor(_SCALES * ref_norm, dtype=vertices.dtype, device=vertices.device)
    dense = head[0]
    with torch.no_grad():
        wh = dense(vertices) - dense.bias  # W·ĥ: the dense layer at scale s is s·W·ĥ + b
    y = torch.arange(classes).repeat(len(scales))
    res = torch.empty((n, len(scales), classes), dtype=vertices.dtype, device=vertices.device)
    # A block of vertices at a time: every vertex × scale × label at once would take
    # gigabytes when the programs return many spurious vertices.
    for lo in range(0, n, _BLOCK):
        block = wh[lo : lo + _BLOCK]
        z = block[:, None, None, :] * scales[None, :, None, None] + dense.bias
        z = z.expand(-1, -1, classes, -1).reshape(-1, z.shape[-1])
        d = _deltas_at(head, z, y.repeat(len(block)))
        res[lo : lo + len(block)] = _span_residual(d, u).view(len(block), len(scales), classes)
    best = res.flatten(1).min(1)
    # The grid is coarse: refine the scale of the most likely vertices before ranking, or
    # a rounding-split copy of a vertex can beat the vertex itself.
    shortlist = torch.argsort(best.values)[: 10 * size + 16].tolist()
    refined = []
    for i in shortlist:
        s_idx, label = divmod(int(best.indices[i]), classes)
        lo = scales[max(s_idx - 1, 0)].item()
        hi = scales[min(s_idx + 1, len(scales) - 1)].item()
        yi = torch.tensor([label])

        def residual(s: float, i: int = i, yi: Tensor = yi) -> float:
            return float(_span_residual(_head_deltas(head, vertices[i : i + 1] * s, yi), u)[0])

        opt = minimize_scalar(
            residual, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10 * hi}
        )
        grid = float(res[i, s_idx, label])
        if opt.fun < grid:
            scale, r = float(opt.x), float(opt.fun)
        else:
            scale, r = scales[s_idx].item(), grid
        refined.append((r, i, label, scale))
    refined.sort()
    taken: list[tuple[float, int, int, float]] = []
    for pick in refined:
        if len(taken) < size and all(
            float(vertices[pick[1]] @ vertices[t[1]]) < _SAME_SAMPLE for t in taken
        ):
            taken.append(pick)
    # Fewer distinct samples than the batch in the shortlist: fill it with the best
    # remaining vertices rather than replay the step without one of them.
    for pick in refined:
        if len(taken) < size and pick not in taken:
            taken.append(pick)
    order = [i for _, i, _, _ in taken]
    labels = torch.tensor([label for _, _, label, _ in taken])
    feats = torch.stack([vertices[i] * scale for _, i, _, scale in taken])
    return order, labels, feats, torch.tensor([r for r, _, _, _ in taken])


def invert_features(
    below: nn.Module,
    targets: Tensor,
    starts: Tensor,
    *,
    iterations: int,
    lr: float,
    tv_weight: float,
) -> tuple[Tensor, Tensor]:
    """Images whose features point along ``targets``: ``1 − cos + tv·TV`` by Adam from
    ``starts`` (``(n, k, *shape)``: k starts per target), box [0, 1]; the best start of
    each target by its cosine distance. Returns the images and their distances."""
    n, k = starts.shape[:2]
    x = starts.flatten(0, 1).clone().requires_grad_(True)
    goal = (targets / targets.norm(dim=1, keepdim=True)).repeat_interleave(k, 0)
    opt = torch.optim.Adam([x], lr=lr)
    cuts = [int(iterations * f) for f in (0.5, 0.75, 0.9)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, cuts, gamma=0.3)
    for _ in range(iterations):
        f = below(x).flatten(1)
        dist = 1.0 - (f * goal).sum(1) / f.norm(dim=1).clamp_min(1e-12)
        loss = (dist + tv_weight * _tv_each(x)).sum() if tv_weight else dist.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
    with torch.no_grad():
        f = below(x).flatten(1)
        dist = (1.0 - (f * goal).sum(1) / f.norm(dim=1).clamp_min(1e-12)).view(n, k)
    best = dist.argmin(1)
    images = x.detach().view(n, k, *x.shape[1:])[torch.arange(n), best]
    return images, dist[torch.arange(n), best]


def feature_span(
    model: nn.Module,
    update: Mapping[str, Tensor],
    knowledge: AttackerKnowledge,
    *,
    iterations: int = 600,
    restarts: int = 4,
    lr: float = 0.05,
    tv_weight: float = 0.01,
    seed: int = 0,
    device: torch.device | str = "cpu",
    vertex_trials: int = 0,
) -> Reconstruction:
    """Invert one party's update by feature-span peeling (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        The weights the server sent; a sequential model whose first dense layer follows a
        ReLU (privfl's ``cnn`` and ``mlp``).
    update : dict of str to Tensor
        ``received − sent`` weights.
    knowledge : AttackerKnowledge
        Batch size, local steps, lr and momentum the server set; ``knowledge.images``
        distinct samples, each in one local step (step ``s`` takes the next batch).
    iterations, restarts, lr, tv_weight
        Adam steps, starts per feature, step size and total-variation weight of the
        feature inversion.
    seed : int
        Seeds the linear programs' objectives and the starts when there are no public
        images: the same seed gives the same reconstruction.
    vertex_trials : int
        Linear programs with random objectives; 0 = 24 per sample.

    Returns
    -------
    Reconstruction
        ``objective``: the share of the dense layer's update left unexplained (0 when
        every sample was peeled off exactly).

    Raises
    ------
    SpanError
        Weight decay, a model that does not fit, or more samples than the steps take.
    """
    t0 = time.perf_counter()
    kn = knowledge
    n, batch, steps = kn.images, kn.batch_size, kn.local_steps
    if kn.weight_decay:
        raise SpanError(
            "feature-span: weight decay adds a full-rank term to the dense layer's update; "
            "use training.weight_decay = 0 or another method"
        )
    if steps > 1 and n > steps * batch:
        raise SpanError(f"feature-span: {n} samples cannot fit {steps} steps of batch {batch}")
    if steps > 1 and n < steps * batch - batch + 1:
        # the same sample at two steps is two vertices that the span test cannot tell
        # apart from two samples
        raise SpanError(
            f"feature-span: {steps} steps of batch {batch} over {n} samples reuse samples; "
            "the attack needs each sample in one step"
        )
    sizes = [min(batch, n - s * batch) for s in range(steps)]
    device = torch.device(device)
    net = _clone(model).to(device=device, dtype=torch.float64).eval()
    shape = kn.input_shape
    aux = kn.auxiliary_images
    gen = torch.Generator().manual_seed(seed)
    pool = _starts_pool(aux, shape, gen, device)  # public images: where inversions start
    split = split_at_dense(net, pool[:4])
    rest = torch.as_tensor(update[split.weight]).to(device=device, dtype=torch.float64).clone()
    total = float(rest.norm())
    rng = np.random.default_rng(seed)
    mu = kn.momentum
    velocity: dict[int, Tensor] = {}
    peeled: list[Tensor] = []  # unit vertices already peeled off
    images: list[Tensor] = []
    labels: list[Tensor] = []
    u_all, sv, vh = torch.linalg.svd(rest, full_matrices=False)
    rank = min(n, int((sv > sv[0] * 1e-9).sum())) if sv.numel() and sv[0] > 0 else 0
    # Every sample's δ lies in the update's column space, at its own step: the test runs
    # against the whole update, so rounding in what was peeled off does not build up.
    u = u_all[:, :rank]
    verts = torch.zeros((0, rest.shape[1]), dtype=torch.float64, device=device)
    trials = vertex_trials or 24 * rank
    if rank:
        # Once, on the whole update: its span holds every sample's features exactly (to
        # the update's float precision), so they are vertices; a span with earlier steps
        # peeled off is off by the peeling's rounding, which splits them into many.
        found = feature_vertices(vh[:rank].T.cpu().numpy(), trials, rng)
        verts = torch.as_tensor(found, device=device)
    with progress.phase("gradient inversion: feature-span peeling", total=len(sizes)) as bar:
        for s, size in enumerate(sizes):
            if len(verts) < size:
                break  # no non-negative structure left: nothing more to read
            coef = kn.lr * (1.0 - mu ** (steps - s)) / (1.0 - mu) if mu else kn.lr
            with torch.no_grad():
                ref = split.below(pool).flatten(1)  # the pool's features at this step
            ref_norm = float(ref.norm(dim=1).mean())
            idx, y, h, res = pick_batch(split.head, verts, u, size, ref_norm, kn.num_classes)
            for _ in range(_MORE_ROUNDS):
                if float(res.max()) < _EXACT:
                    break
                # a sample's vertex was missed (the random programs hit some vertices
                # rarely): draw more before peeling a wrong term off the update
                more = feature_vertices(vh[:rank].T.cpu().numpy(), trials, rng)
                more_t = torch.as_tensor(more, device=device)
                if len(verts):
                    more_t = more_t[(more_t @ verts.T).max(1).values < _SAME_VERTEX]
                verts = torch.cat([verts, more_t])
                if len(peeled):
                    verts = verts[(verts @ torch.stack(peeled).T).max(1).values < _SAME_SAMPLE]
                again = pick_batch(split.head, verts, u, size, ref_norm, kn.num_classes)
                if len(again[0]) == size and float(again[3].sum()) < float(res.sum()):
                    idx, y, h, res = again
            a = -(coef / size) * _head_deltas(split.head, h, y)
            rest -= a.T @ h
            picked = verts[idx]
            peeled += list(picked)
            verts = verts[(verts @ picked.T).max(1).values < _SAME_SAMPLE]
            x = _invert(split.below, h, ref, pool, restarts, iterations, lr, tv_weight)
            images.append(x)
            labels.append(y)
            _replay_step(split, velocity, x, h, y, kn.lr, mu)
            bar.advance()
    found = sum(len(x) for x in images)
    if found < n:  # blank guesses for what could not be read
        images.append(torch.zeros((n - found, *shape), dtype=torch.float64, device=device))
        labels.append(torch.zeros(n - found, dtype=torch.long))
    return Reconstruction(
        images=torch.cat(images).float().cpu(),
        labels=torch.cat(labels).long().cpu(),
        objective=float(rest.norm()) / total if total > 0 else math.inf,
        seconds=time.perf_counter() - t0,
    )


def _starts_pool(
    aux: Tensor | None, shape: tuple[int, ...], gen: torch.Generator, device: torch.device
) -> Tensor:
    """The attacker's public images, or uniform noise images when it has none."""
    pool = aux if aux is not None and len(aux) else torch.rand((64, *shape), generator=gen)
    return pool.to(device=device, dtype=torch.float64)


def _invert(
    below: nn.Module,
    h: Tensor,
    ref: Tensor,
    pool: Tensor,
    restarts: int,
    iterations: int,
    lr: float,
    tv_weight: float,
) -> Tensor:
    """Invert the features ``h`` from the ``pool`` images nearest to them in feature
    space (``ref``: the pool's features)."""
    k = min(restarts, len(pool))
    goal = h / h.norm(dim=1, keepdim=True)
    near = (goal @ (ref / ref.norm(dim=1, keepdim=True).clamp_min(1e-300)).T).topk(k, 1).indices
    below32 = _clone(below).float()
    x, _ = invert_features(
        below32,
        goal.float(),
        pool[near].float(),
        iterations=iterations,
        lr=lr,
        tv_weight=tv_weight,
    )
    return x.double()


def _replay_step(
    split: _Split,
    velocity: dict[int, Tensor],
    x: Tensor,
    h: Tensor,
    y: Tensor,
    lr: float,
    mu: float,
) -> None:
    """The party's SGD step on the recovered batch, in place: the dense layers' gradients
    from the exact features ``h``, the layers below from the images ``x``."""
    below = [p for p in split.below.parameters() if p.requires_grad]
    head = [p for p in split.head.parameters() if p.requires_grad]
    with torch.enable_grad():
        g_below = torch.autograd.grad(
            nn.functional.cross_entropy(split.head(split.below(x)), y), below, allow_unused=True
        )
        g_head = torch.autograd.grad(nn.functional.cross_entropy(split.head(h), y), head)
    with torch.no_grad():
        for p, g in zip(below + head, list(g_below) + list(g_head), strict=True):
            if g is None:
                continue
            if mu:
                g = mu * velocity[id(p)] + g if id(p) in velocity else g
                velocity[id(p)] = g
            p -= lr * g
