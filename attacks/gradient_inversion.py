"""Gradient inversion: rebuild a party's training batch from the update it sent.

Threat model: an honest-but-curious server that knows the model architecture and the
weights it sent (always), plus what :class:`AttackerKnowledge` states explicitly. The
attack functions receive only the model, the observed update and that knowledge; they
never see the party's data.

Methods
-------
``dlg``
    Deep Leakage from Gradients (Zhu et al., 2019): dummy images (and, unless the labels
    are fixed, soft labels) optimised with L-BFGS on the squared L2 gradient distance.
``idlg``
    iDLG (Zhao et al., 2020): the label of a batch of one read from the sign of the last
    layer's gradient, then DLG on the image only.
``inverting-gradients``
    Geiping et al. (2020): cosine gradient distance over all layers plus a
    total-variation prior, Adam on the signed gradient with a stepped step size, box
    constraint [0, 1], the best of several random starts kept by its gradient distance.
    For a FedAvg update it unrolls the party's local steps, each on its own batch of
    the dummy images (``multi_step="simulate"``, :attr:`AttackerKnowledge.samples`).

Labels of larger batches are recovered first (:func:`recover_labels`, count-based from
the last-layer bias gradient, with the batch's mean prediction estimated on the
attacker's public images when it has them) and then held fixed, which removes most of
DLG's label/image ambiguity. One local SGD step gives the gradient exactly
(``Δ = −lr·g``); with several steps the update is inverted either as the average
gradient (``multi_step="average"``) or by unrolling the local steps
(``multi_step="simulate"``), as Inverting Gradients does for FedAvg. The party's SGD
momentum and weight decay, which the server sets with lr, are applied as the party's
optimiser applies them (:attr:`AttackerKnowledge.momentum`, ``weight_decay``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from privfl import progress

Method = Literal["dlg", "idlg", "inverting-gradients"]
MultiStep = Literal["average", "simulate"]
LabelRecovery = Literal["analytic", "joint"]


@dataclass(frozen=True)
class AttackerKnowledge:
    """What the attacker is assumed to know besides the model and its weights.

    Attributes
    ----------
    batch_size : int
        Samples in the party's (single) batch.
    labels_known : bool
        Whether the true labels are handed to the attack (strongest attacker).
    local_steps : int
        Local SGD steps the party took on that batch.
    lr : float
        The party's SGD learning rate.
    input_shape : tuple of int
        Shape of one input, e.g. ``(1, 28, 28)``.
    num_classes : int
        Number of output classes.
    auxiliary_images : Tensor, optional
        Public images of the task's distribution that the attacker holds (the server's
        public data), used only to estimate the batch's mean prediction when counting
        labels (LLG*-style); never the party's data.
    samples : int
        Distinct samples behind the update when the local steps are simulated (each step
        then takes ``batch_size`` of them, in turn); 0 means ``batch_size``.
    momentum, weight_decay : float
        The party's SGD momentum (heavy ball, no dampening) and L2 weight decay, as
        ``torch.optim.SGD`` applies them; the server set both with lr.
    """

    batch_size: int
    labels_known: bool = False
    local_steps: int = 1
    lr: float = 1.0
    input_shape: tuple[int, ...] = (1, 28, 28)
    num_classes: int = 10
    auxiliary_images: Tensor | None = field(default=None, compare=False, repr=False)
    samples: int = 0
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.samples < 0:
            raise ValueError(f"samples: must be >= 0 (0 = batch_size), got {self.samples}")
        if self.local_steps < 1:
            raise ValueError(f"local_steps: must be >= 1, got {self.local_steps}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes: must be >= 2, got {self.num_classes}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum: must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")

    @property
    def images(self) -> int:
        """How many images the attack reconstructs."""
        return self.samples or self.batch_size

    @property
    def step_weight(self) -> float:
        """``Σ_s`` of the weight each local step's gradient gets in ``−Δ/lr``.

        Plain SGD: ``S``. With momentum ``μ`` the gradient of step ``k`` is carried into
        the ``S − k`` later steps too, ``(1 − μ^(S−k+1)) / (1 − μ)`` in all, so equal
        gradients sum to ``Σ_j (1 − μ^j) / (1 − μ)``.
        """
        mu, steps = self.momentum, self.local_steps
        if mu == 0.0:
            return float(steps)
        return sum((1.0 - mu**j) / (1.0 - mu) for j in range(1, steps + 1))


@dataclass
class Reconstruction:
    """Outcome of one inversion: images in [0, 1] (CPU, float32), labels, the best
    gradient-matching objective reached (lower is better) and the wall time."""

    images: Tensor
    labels: Tensor
    objective: float
    seconds: float


# --------------------------------------------------------------------------- helpers


def _param_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def gradient_from_update(
    model: nn.Module, update: Mapping[str, Tensor], knowledge: AttackerKnowledge
) -> list[Tensor]:
    """The mean batch gradient implied by an SGD update, one tensor per parameter.

    ``update`` maps parameter names (``state_dict`` keys) to ``new − old`` weights; keys
    that are not trainable parameters (buffers) are ignored. With ``S`` local steps of
    learning rate ``lr``, ``Δ = −lr·Σ g_s``, so the average step gradient is
    ``−Δ / (lr·S)`` (exact for ``S = 1``); with momentum ``S`` becomes
    :attr:`AttackerKnowledge.step_weight`. Weight decay stays in: ``g_s`` includes
    ``wd·θ`` (see :func:`_decayed`).
    """
    names = _param_names(model)
    missing = [n for n in names if n not in update]
    if missing:
        raise KeyError(f"update lacks the model parameters {missing}; got keys {sorted(update)}")
    scale = -1.0 / (knowledge.lr * knowledge.step_weight)
    return [torch.as_tensor(update[n]).detach().double().cpu() * scale for n in names]


def _decayed(model: nn.Module, grads: Sequence[Tensor], weight_decay: float) -> list[Tensor]:
    """``grads − wd·θ``: the loss gradient alone, from an SGD step that also decayed
    the weights ``θ`` the server sent (exact for one step)."""
    if weight_decay == 0.0:
        return list(grads)
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    return [
        g - weight_decay * p.detach().to(device=g.device, dtype=g.dtype)
        for g, p in zip(grads, params, strict=True)
    ]


def _last_layer(grads: Sequence[Tensor], num_classes: int) -> tuple[Tensor | None, Tensor]:
    """(bias gradient or None, weight gradient) of the output layer."""
    for i in range(len(grads) - 1, -1, -1):
        g = grads[i]
        if g.ndim == 2 and g.shape[0] == num_classes:
            bias = grads[i + 1] if i + 1 < len(grads) else None
            if bias is not None and bias.shape != (num_classes,):
                bias = None
            return bias, g
    raise ValueError(f"no output layer with {num_classes} rows among the gradients")


def recover_labels(
    grads: Sequence[Tensor], knowledge: AttackerKnowledge, model: nn.Module | None = None
) -> Tensor:
    """Labels of the batch from the output layer's gradient (cross-entropy loss).

    For softmax cross-entropy averaged over a batch of ``B``, the bias gradient is
    ``g_c = (1/B) Σ_i p_ic − n_c/B``, so ``n_c = B·(m_c − g_c)`` with ``m_c`` the batch's
    mean predicted probability of class ``c``; every class with ``g_c < 0`` is present.
    ``m`` is estimated

    * from ``knowledge.auxiliary_images`` when they and ``model`` are given: the mean
      softmax of the model on the attacker's public images (LLG*, Wainakh et al. 2022).
      Needed for confident models such as the DLG-initialised sigmoid LeNet, whose
      predictions pile onto one or two classes, so that a present class can have
      ``g_c > 0``;
    * otherwise as the mean gradient of the classes with ``g_c >= 0`` (LLG+-like), which
      is right when predictions are spread evenly.

    The estimates are rounded to counts that sum to ``B`` (largest remainder), keeping
    every class with a negative gradient at least once. Without a bias, the row sums of
    the weight gradient (non-negative features) play its role, as in iDLG.

    Parameters
    ----------
    grads : sequence of Tensor
        Per-parameter gradients in ``model.parameters()`` order.
    knowledge : AttackerKnowledge
        Gives the batch size, the number of classes and any auxiliary images.
    model : nn.Module, optional
        The attacked model at the sent weights (for the auxiliary estimate, and to
        take the party's weight decay back out of ``grads``).

    Returns
    -------
    Tensor
        ``(batch_size,)`` int64 labels, sorted.
    """
    if model is not None:  # the decay term carries no label information
        grads = _decayed(model, grads, knowledge.weight_decay)
    bias, weight = _last_layer(grads, knowledge.num_classes)
    g = (bias if bias is not None else weight.sum(dim=1)).double().cpu()
    # Averaged over S steps of B, g_c = m_c − Σ_s n_sc/(S·B): each of the ``images``
    # distinct samples enters S·B/images times, so counts scale the same way.
    B, C = knowledge.images, knowledge.num_classes
    if B == 1:
        return g.argmin().reshape(1).long()
    present = g < 0
    aux = knowledge.auxiliary_images
    if aux is not None and model is not None and bias is not None:
        m = _mean_prediction(model, aux)
    else:
        absent = ~present
        m = g[absent].mean() if bool(absent.any()) else torch.zeros((), dtype=g.dtype)
    # A garbage target (e.g. decoded from masked traffic) gives absurd estimates: no class
    # can hold more than the whole batch, which also keeps the rounding loops short.
    est = torch.nan_to_num(B * (m - g), nan=0.0, posinf=float(B), neginf=0.0).clamp(0.0, B)
    floor = torch.zeros(C, dtype=torch.long)
    floor[torch.argsort(g)[: min(B, int(present.sum()))]] = 1  # most negative first
    counts = torch.maximum(est.round().long(), floor)
    while int(counts.sum()) < B:
        counts[int(torch.argmax(est - counts.double()))] += 1
    while int(counts.sum()) > B:
        spare = torch.where(counts > floor, est - counts.double(), torch.inf)
        counts[int(torch.argmin(spare))] -= 1
    return torch.repeat_interleave(torch.arange(C), counts)


def _mean_prediction(model: nn.Module, images: Tensor) -> Tensor:
    """Mean softmax of ``model`` over ``images`` (float64, CPU)."""
    net = _clone(model).to(device="cpu", dtype=torch.float64).eval()
    with torch.no_grad():
        out = torch.cat([net(x.double()) for x in torch.split(images.cpu(), 256)])
    return torch.softmax(out, -1).mean(0)


def _tv(x: Tensor) -> Tensor:
    """Anisotropic total variation, mean absolute difference of neighbours."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


class _GradientModel:
    """A frozen copy of the attacked model (double precision unless told), called
    functionally."""

    def __init__(
        self, model: nn.Module, device: torch.device, dtype: torch.dtype = torch.float64
    ) -> None:
        self.module = _clone(model).to(device=device, dtype=dtype)
        self.module.eval()  # no dropout; the privfl models have no batch-norm
        self.names = _param_names(self.module)
        self.params = {n: p.detach() for n, p in self.module.named_parameters()}
        self.buffers = {n: b.detach() for n, b in self.module.named_buffers()}

    def loss(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(self.module, ({**params}, self.buffers), (x,))
        if y.dtype == torch.long:
            return nn.functional.cross_entropy(out, y)
        # soft labels (DLG's joint optimisation): y are logits of the label distribution
        return torch.mean(torch.sum(-torch.softmax(y, -1) * torch.log_softmax(out, -1), -1))

    def grads(self, x: Tensor, y: Tensor) -> list[Tensor]:
        """Mean batch gradient at the sent weights, differentiable w.r.t. ``x`` and ``y``."""
        params = [self.params[n].requires_grad_(True) for n in self.names]
        loss = self.loss(dict(zip(self.names, params, strict=True)), x, y)
        return list(torch.autograd.grad(loss, params, create_graph=True))

    def simulated_gradient(
        self,
        x: Tensor,
        y: Tensor,
        steps: int,
        lr: float,
        batch: int | None = None,
        *,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        scale: float | None = None,
        create_graph: bool = True,
    ) -> list[Tensor]:
        """``−Δ/(lr·scale)`` of ``steps`` unrolled SGD steps (differentiable), with the
        party's momentum and weight decay as ``torch.optim.SGD`` applies them;
        ``scale`` defaults to ``steps``.

        With ``batch`` set, step ``s`` trains on rows ``s·batch … s·batch + batch − 1``
        of ``x`` (modulo its length), as a party walking through its shuffled data does;
        otherwise every step takes all of ``x``.
        """
        start = {n: self.params[n].requires_grad_(True) for n in self.names}
        params = dict(start)
        velocity: dict[str, Tensor] = {}
        for s in range(steps):
            if batch is None or batch >= len(x):
                xs, ys = x, y
            else:
                rows = (torch.arange(batch, device=x.device) + s * batch) % len(x)
                xs, ys = x[rows], y[rows]
            loss = self.loss(params, xs, ys)
            g = torch.autograd.grad(
                loss, [params[n] for n in self.names], create_graph=create_graph
            )
            new = {}
            for n, gi in zip(self.names, g, strict=True):
                if weight_decay:
                    gi = gi + weight_decay * params[n]
                if momentum:
                    gi = momentum * velocity[n] + gi if n in velocity else gi
                    velocity[n] = gi
                new[n] = params[n] - lr * gi
            params = new
        return [(start[n] - params[n]) / (lr * (scale or steps)) for n in self.names]


def _clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def _l2(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum(((x - y) ** 2).sum() for x, y in zip(a, b, strict=True))


def _cosine(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    dot = sum((x * y).sum() for x, y in zip(a, b, strict=True))
    na = sum((x * x).sum() for x in a)
    nb = sum((y * y).sum() for y in b)
    return 1.0 - dot / (na.sqrt() * nb.sqrt() + 1e-30)


def _outside_box(x: Tensor) -> Tensor:
    """Squared excess of the pixels outside [0, 1], summed per image, mean over images."""
    excess = (x - 1.0).clamp(min=0.0) ** 2 + (-x).clamp(min=0.0) ** 2
    return excess.flatten(1).sum(1).mean()


def _dummy(
    shape: tuple[int, ...],
    gen: torch.Generator,
    device: torch.device,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    return torch.rand(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- attacks


def _matcher(
    gm: _GradientModel,
    target: list[Tensor],
    knowledge: AttackerKnowledge,
    multi_step: MultiStep,
) -> Callable[[Tensor, Tensor], list[Tensor]]:
    if multi_step == "simulate" and knowledge.local_steps > 1:
        return lambda x, y: gm.simulated_gradient(
            x,
            y,
            knowledge.local_steps,
            knowledge.lr,
            knowledge.batch_size,
            momentum=knowledge.momentum,
            weight_decay=knowledge.weight_decay,
            scale=knowledge.step_weight,
        )
    wd = knowledge.weight_decay
    if wd:
        # the observed steps also decayed the weights: so must the dummy gradient
        return lambda x, y: [
            g + wd * gm.params[n] for g, n in zip(gm.grads(x, y), gm.names, strict=True)
        ]
    return gm.grads


def _lbfgs(
    variables: list[Tensor],
    objective: Callable[[], Tensor],
    iterations: int,
    *,
    lr: float,
    segment: int,
    on_iteration: Callable[[int], None] | None = None,
) -> None:
    """L-BFGS (strong-Wolfe line search) for ``iterations`` steps, its history cleared
    every ``segment`` steps. Each segment minimises the objective divided by its value at
    the segment's start: the distances reached (1e-6 … 1e-12) otherwise fall under
    L-BFGS's fixed tolerances and its line search stalls (measured: a seed that stayed at
    5.5e-8 over 1000 iterations went to 1.6e-8 once rescaled). ``on_iteration(k)`` is
    told the iterations done so far (for progress)."""
    done = 0
    while done < iterations:
        steps = min(segment, iterations - done)
        before = done
        done += steps
        start = float(objective().detach())  # needs autograd: it differentiates
        scale = 1.0 / start if math.isfinite(start) and start > 0 else 1.0
        opt = torch.optim.LBFGS(
            variables,
            lr=lr,
            max_iter=steps,
            max_eval=steps + steps // 4,
            history_size=100,
            tolerance_grad=1e-14,
            tolerance_change=1e-16,
            line_search_fn="strong_wolfe",
        )

        def closure(
            opt: torch.optim.LBFGS = opt, scale: float = scale, before: int = before
        ) -> Tensor:
            if on_iteration is not None:
                # LBFGS counts iterations in its state; a line search may evaluate the
                # objective several times per iteration.
                on_iteration(before + opt.state[variables[0]].get("n_iter", 0))
            opt.zero_grad()
            obj = objective() * scale
            obj.backward()
            return obj

        opt.step(closure)
        if on_iteration is not None:
            on_iteration(done)  # a segment that converged early still spent its budget


def duplicate_pairs(
    images: Tensor, labels: Tensor, threshold: float = 0.75
) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, of reconstructions with the same label whose centred
    pixels correlate above ``threshold``.

    Two dummies of one label that converge to the same image sit on a symmetric saddle of
    the gradient distance (it does not change along ``x_i − x_j`` to first order), so
    L-BFGS cannot pull them apart: it is the attacker's sign of a bad restart, seen on
    MNIST batches with duplicate labels. Uses only the reconstruction.
    """
    f = images.detach().clamp(0.0, 1.0).flatten(1).double()
    f = f - f.mean(1, keepdim=True)
    f = f / (f.norm(dim=1, keepdim=True) + 1e-12)
    corr = f @ f.T
    n = len(labels)
    return [
        (i, j)
        for i in range(n)
        for j in range(i + 1, n)
        if int(labels[i]) == int(labels[j]) and float(corr[i, j]) > threshold
    ]


def dlg(
    model: nn.Module,
    target: list[Tensor],
    knowledge: AttackerKnowledge,
    *,
    labels: Tensor | None = None,
    iterations: int = 300,
    restarts: int = 1,
    lr: float = 1.0,
    tv_weight: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    multi_step: MultiStep = "average",
    segment: int = 200,
    warmup: int = 400,
    init_scale: float = 0.1,
    duplicate_threshold: float = 0.75,
    duplicate_fixes: int = 3,
    box_weight: float = 1e-4,
) -> Reconstruction:
    """DLG: L-BFGS on the squared L2 distance between dummy and observed gradients.

    With ``labels=None`` soft labels are optimised jointly with the images (the original
    DLG); with labels given only the images are. The schedule, each step measured on the
    MNIST batches of 7 of ``dlg_batch7`` (seeds 0–4):

    1. ``restarts`` random starts run ``min(warmup, iterations)`` L-BFGS iterations each;
       the one with the lowest gradient distance (relative to ``‖g‖²``) is kept. Pixels
       are optimised directly and clamped to [0, 1] at the end: that reached 10× lower
       distances than a sigmoid parametrisation, which slows pixels near 0 and 1. Starts
       are dark noise ``init_scale·U(0, 1)``: a sample whose label the model already
       predicts confidently moves its gradient very little, so its pixels keep much of
       their start, and MNIST's background is 0 (one such image went from 5 to 14 dB).
    2. Duplicate check (fixed labels only): while two same-label reconstructions
       correlate above ``duplicate_threshold`` (:func:`duplicate_pairs`), the second is
       re-drawn and the batch optimised ``warmup`` more iterations; kept only if the
       distance drops (measured: 10× lower, duplicates gone), at most
       ``duplicate_fixes`` times.
    3. Polish: the kept batch runs the rest of ``iterations``, with a penalty
       ``box_weight·`` (squared pixel excess outside [0, 1]) so that the final clamp
       costs little (measured: the distance of the clamped batch fell 1.4e-5 → 4e-8).

    L-BFGS is restarted (history cleared, objective rescaled) every ``segment``
    iterations (:func:`_lbfgs`).

    Parameters
    ----------
    model : nn.Module
        The model with the weights the party received.
    target : list of Tensor
        The observed mean batch gradient (see :func:`gradient_from_update`).
    knowledge : AttackerKnowledge
        Batch size, input shape, classes, local steps and learning rate.
    labels : Tensor, optional
        Fixed labels (known or recovered beforehand).
    iterations, restarts, lr, tv_weight, seed, device, multi_step
        L-BFGS iterations of the kept start (warm-up + fixes + polish), random starts,
        L-BFGS step size, weight of a TV prior, RNG seed, device, and how several local
        steps are modelled.
    segment : int
        L-BFGS iterations between history resets.
    warmup : int
        Iterations of each random start before one is chosen (and of each fix).
    init_scale : float
        Starts are ``init_scale·U(0, 1)`` pixels.
    duplicate_threshold, duplicate_fixes
        Correlation above which two same-label reconstructions count as duplicates, and
        how many re-draws are tried.
    box_weight : float
        Weight of the out-of-box penalty while polishing (0 turns it off).

    Returns
    -------
    Reconstruction
    """
    if segment < 1:
        raise ValueError(f"segment: must be >= 1, got {segment}")
    if warmup < 1:
        raise ValueError(f"warmup: must be >= 1, got {warmup}")
    t0 = time.perf_counter()
    device = torch.device(device)
    gm = _GradientModel(model, device)
    tgt = [t.to(device=device, dtype=torch.float64) for t in target]
    norm = float(sum((t * t).sum() for t in tgt)) or 1.0
    match = _matcher(gm, tgt, knowledge, multi_step)
    shape = (knowledge.images, *knowledge.input_shape)
    gen = torch.Generator().manual_seed(seed)
    warm = min(warmup, iterations)

    def distance(x: Tensor, y: Tensor) -> float:
        obj = float(_l2(match(x, y), tgt).detach()) / norm
        return obj if math.isfinite(obj) else math.inf

    def optimise(x: Tensor, y: Tensor, steps: int, what: str, box: float = 0.0) -> None:
        opt_vars = [x] if labels is not None else [x, y]

        def objective() -> Tensor:
            obj = _l2(match(x, y), tgt) / norm
            if box > 0:
                obj = obj + box * _outside_box(x)
            return obj + tv_weight * _tv(x) if tv_weight > 0 else obj

        with progress.phase(f"gradient inversion: DLG {what}, L-BFGS", total=steps) as bar:
            _lbfgs(opt_vars, objective, steps, lr=lr, segment=segment, on_iteration=bar.update)

    def draw(n: int) -> Tensor:
        return (init_scale * _dummy((n, *shape[1:]), gen, device)).requires_grad_(True)

    best: tuple[float, Tensor, Tensor] | None = None
    for start in range(restarts):
        x = draw(shape[0])
        if labels is None:
            y = (
                torch.randn((shape[0], knowledge.num_classes), generator=gen, dtype=torch.float64)
                .to(device)
                .requires_grad_(True)
            )
        else:
            y = labels.to(device)
        optimise(x, y, warm, f"random start {start + 1}/{restarts}")
        obj = distance(x, y)
        if best is None or obj < best[0]:
            best = (obj, x.detach().clone(), y.detach().clone())
    assert best is not None
    left = iterations - warm
    if labels is not None:
        y = best[2]
        for _ in range(duplicate_fixes):
            pairs = duplicate_pairs(best[1], y.cpu(), duplicate_threshold)
            if not pairs or left <= 0:
                break
            x = best[1].clone()
            with torch.no_grad():
                for j in sorted({j for _, j in pairs}):
                    x[j] = draw(1)[0].detach()
            x.requires_grad_(True)
            steps = min(warm, left)
            left -= steps
            optimise(x, y, steps, f"re-drawing {len({j for _, j in pairs})} duplicate(s)")
            obj = distance(x, y)
            if obj >= best[0]:
                break
            best = (obj, x.detach().clone(), y)
    x = best[1].clone().requires_grad_(True)
    y = best[2].clone().requires_grad_(labels is None)
    if left > 0:
        optimise(x, y, left, "polish", box_weight)
        if not math.isfinite(distance(x, y)):  # a diverged polish keeps the kept start
            x, y = best[1].clone(), best[2].clone()
    x = x.detach().clamp(0.0, 1.0)
    lab = y.detach().argmax(-1) if labels is None else labels
    return Reconstruction(
        images=x.float().cpu(),
        labels=lab.long().cpu(),
        objective=distance(x, y.detach()),
        seconds=time.perf_counter() - t0,
    )


def idlg(
    model: nn.Module,
    target: list[Tensor],
    knowledge: AttackerKnowledge,
    **kwargs: object,
) -> Reconstruction:
    """iDLG: read the label of a single sample off the output layer, then run DLG on the
    image alone (keyword arguments as for :func:`dlg`)."""
    if knowledge.batch_size != 1:
        raise ValueError(f"idlg needs batch_size 1, got {knowledge.batch_size}; use dlg")
    labels = kwargs.pop("labels", None)
    if labels is None:
        labels = recover_labels(target, knowledge, model)
    return dlg(model, target, knowledge, labels=labels, **kwargs)  # type: ignore[arg-type]


def spread_labels(labels: Tensor, steps: int, batch: int) -> Tensor:
    """Deal the labels out over ``steps`` local batches of ``batch``, like cards.

    Which sample sat in which local batch is unknown to the attacker; a shuffled party's
    batches each hold a bit of every class, so dealing the sorted labels in turn (rather
    than giving the first step all the zeros) keeps the simulated trajectory close to the
    real one. Row ``s·batch + j`` of the result is used by step ``s``
    (:meth:`_GradientModel.simulated_gradient`). Labels that do not fill ``steps``
    disjoint batches exactly are returned sorted.
    """
    n = len(labels)
    if steps <= 1 or n != steps * batch:
        return torch.sort(labels).values
    k = torch.arange(n)
    out = torch.empty_like(labels)
    out[(k % steps) * batch + k // steps] = torch.sort(labels).values
    return out


def inverting_gradients(
    model: nn.Module,
    target: list[Tensor],
    knowledge: AttackerKnowledge,
    *,
    labels: Tensor | None = None,
    iterations: int = 2000,
    restarts: int = 4,
    lr: float = 0.1,
    tv_weight: float = 1e-4,
    seed: int = 0,
    device: torch.device | str = "cpu",
    multi_step: MultiStep = "average",
    trial_iterations: int = 0,
    tv_cut: float = 0.1,
) -> Reconstruction:
    """Inverting Gradients (Geiping et al., NeurIPS 2020).

    Minimises ``1 − cos(∇θ L(x, y), g)`` over all layers at once (the paper's equal layer
    weighting) plus ``tv_weight·TV(x)``, with Adam fed the *sign* of the gradient, pixels
    projected onto [0, 1] after every step, and the step size cut tenfold at 3/8, 5/8 and
    7/8 of ``iterations`` (the prior by ``tv_cut`` at the first of these). Labels default
    to :func:`recover_labels`.

    With ``multi_step="simulate"`` and several local steps, ``g`` is the party's weight
    difference (as ``−Δ/(lr·S)``) and the dummy batch is pushed through the same ``S``
    SGD steps of ``knowledge.batch_size`` at ``knowledge.lr`` (the paper's FedAvg
    experiments): ``knowledge.images`` dummies, step ``s`` taking rows
    ``s·B … s·B + B − 1``, labels dealt over the steps by :func:`spread_labels`.

    Restarts: each of ``restarts`` random starts (uniform pixels) runs
    ``trial_iterations`` steps at the full step size; the one with the lowest gradient
    distance (cosine, without the prior, as the paper scores restarts) continues to
    ``iterations``. ``trial_iterations = 0`` runs every start for the whole budget (the
    paper's protocol; ``restarts×`` the cost). Measured on the default CNN and MNIST
    (seeds 0–4, batch 1): the cosine a start reaches in its first few hundred steps
    already separates the starts that end above 25 dB from those stuck near 12 dB.

    Parameters
    ----------
    model, target, knowledge, labels, seed, device, multi_step
        As for :func:`dlg`.
    iterations : int
        Adam steps of the kept start, its trial included.
    restarts : int
        Random starts.
    lr : float
        Initial Adam step size (pixels are in [0, 1]).
    tv_weight : float
        Weight of the total-variation prior (:func:`_tv`, mean absolute difference).
    trial_iterations : int
        Steps each start runs before the best is chosen (0: all of ``iterations``).
    tv_cut : float
        Factor on ``tv_weight`` from the first step-size cut on (1 keeps it). The prior
        steers the early steps out of noisy minima, but at 0.1 it outweighs the cosine
        distance left near the solution and blurs the strokes; cut tenfold there, the
        batch-1 images of the default CNN gained 1–10 dB (seeds 0–4).

    Returns
    -------
    Reconstruction
        ``objective`` is the kept start's final cosine distance.
    """
    if trial_iterations < 0:
        raise ValueError(f"trial_iterations: must be >= 0, got {trial_iterations}")
    if tv_cut < 0:
        raise ValueError(f"tv_cut: must be >= 0, got {tv_cut}")
    t0 = time.perf_counter()
    device = torch.device(device)
    # Signed steps need only the gradient's direction: single precision is enough and
    # 1.7× faster on CPU (5 unrolled steps × 40 images).
    gm = _GradientModel(model, device, torch.float32)
    tgt = [t.to(device=device, dtype=torch.float32) for t in target]
    match = _matcher(gm, tgt, knowledge, multi_step)
    if labels is None:
        labels = recover_labels(target, knowledge, model)
    if multi_step == "simulate":
        labels = spread_labels(labels, knowledge.local_steps, knowledge.batch_size)
    y = labels.to(device)
    shape = (knowledge.images, *knowledge.input_shape)
    gen = torch.Generator().manual_seed(seed)
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    trial = min(trial_iterations or iterations, iterations)

    def distance(x: Tensor) -> float:
        obj = float(_cosine(match(x, y), tgt).detach())
        return obj if math.isfinite(obj) else math.inf

    def run(state: _Start, steps: int, what: str) -> None:
        with progress.phase(f"gradient inversion: Inverting Gradients {what}", total=steps) as bar:
            for _ in range(steps):
                state.opt.zero_grad()
                tv = tv_weight * (tv_cut if state.done >= milestones[0] else 1.0)
                obj = _cosine(match(state.x, y), tgt) + tv * _tv(state.x)
                (grad,) = torch.autograd.grad(obj, [state.x])
                state.x.grad = grad.sign()
                state.opt.step()
                state.sched.step()
                with torch.no_grad():
                    state.x.clamp_(0.0, 1.0)
                state.done += 1
                bar.advance()

    best: tuple[float, _Start] | None = None
    for start in range(restarts):
        state = _Start.draw(shape, gen, device, lr, milestones)
        run(state, trial, f"start {start + 1}/{restarts}, Adam")
        score = distance(state.x)
        if best is None or score < best[0]:
            best = (score, state)
    assert best is not None
    state = best[1]
    if iterations > trial:
        run(state, iterations - trial, f"best of {restarts} starts, Adam")
    x = state.x.detach()
    return Reconstruction(
        images=x.float().cpu(),
        labels=labels.long().cpu(),
        objective=distance(x),
        seconds=time.perf_counter() - t0,
    )


@dataclass
class _Start:
    """One random start of Inverting Gradients: its pixels, optimiser and schedule."""

    x: Tensor
    opt: torch.optim.Adam
    sched: torch.optim.lr_scheduler.MultiStepLR
    done: int = 0  # Adam steps taken

    @classmethod
    def draw(
        cls,
        shape: tuple[int, ...],
        gen: torch.Generator,
        device: torch.device,
        lr: float,
        milestones: list[int],
    ) -> _Start:
        x = _dummy(shape, gen, device, torch.float32).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        return cls(x, opt, sched)


def invert_update(
    model: nn.Module,
    update: Mapping[str, Tensor],
    knowledge: AttackerKnowledge,
    method: Method,
    *,
    iterations: int,
    restarts: int,
    lr: float,
    tv_weight: float,
    seed: int,
    device: torch.device | str = "cpu",
    labels: Tensor | None = None,
    multi_step: MultiStep = "average",
    label_recovery: LabelRecovery = "analytic",
    trial_iterations: int = 0,
) -> Reconstruction:
    """Invert one party's update: the single entry point of the curious server.

    Parameters
    ----------
    model : nn.Module
        Architecture with the weights the server sent to the party.
    update : dict of str to Tensor
        ``received − sent`` weights, keyed like ``model.state_dict()``.
    knowledge : AttackerKnowledge
        What the attacker knows (batch size, labels known, local steps, lr, shapes).
    method : {"dlg", "idlg", "inverting-gradients"}
        Which attack to run.
    iterations, restarts, lr, tv_weight, seed, device
        Optimiser settings; the same seed gives the same reconstruction.
    labels : Tensor, optional
        The true labels; only used (and required) when ``knowledge.labels_known``.
    multi_step : {"average", "simulate"}
        How several local steps are modelled.
    label_recovery : {"analytic", "joint"}
        For ``dlg`` with unknown labels: recover them from the output layer first and
        hold them fixed, or optimise soft labels jointly as the original DLG does.
    trial_iterations : int
        For ``inverting-gradients``: steps of each start before the best is kept
        (see :func:`inverting_gradients`).

    Returns
    -------
    Reconstruction
    """
    if knowledge.labels_known:
        if labels is None:
            raise ValueError("knowledge.labels_known is set but no labels were given")
        labels = torch.as_tensor(labels).long()
    else:
        labels = None
    common = dict(
        iterations=iterations,
        restarts=restarts,
        lr=lr,
        tv_weight=tv_weight,
        seed=seed,
        device=device,
        multi_step=multi_step,
    )
    # A target decoded from masked traffic is huge ring noise; its gradients underflow
    # into denormals, which are orders of magnitude slower on CPUs. Flush them.
    with _flushed_denormals():
        return _dispatch(
            model, update, knowledge, method, labels, label_recovery, common, trial_iterations
        )


@contextlib.contextmanager
def _flushed_denormals() -> Iterator[None]:
    flushed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def _dispatch(
    model: nn.Module,
    update: Mapping[str, Tensor],
    knowledge: AttackerKnowledge,
    method: Method,
    labels: Tensor | None,
    label_recovery: LabelRecovery,
    common: dict,
    trial_iterations: int = 0,
) -> Reconstruction:
    target = gradient_from_update(model, update, knowledge)
    if method == "dlg":
        if labels is None and label_recovery == "analytic":
            labels = recover_labels(target, knowledge, model)
        return dlg(model, target, knowledge, labels=labels, **common)  # type: ignore[arg-type]
    if method == "idlg":
        return idlg(model, target, knowledge, labels=labels, **common)
    if method == "inverting-gradients":
        return inverting_gradients(  # type: ignore[arg-type]
            model, target, knowledge, labels=labels, trial_iterations=trial_iterations, **common
        )
    raise ValueError(f"method: unknown {method!r}; accepted: dlg, idlg, inverting-gradients")
