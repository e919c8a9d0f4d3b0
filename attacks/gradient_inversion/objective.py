"""The gradient-matching objective: the target gradient an update implies, the attacked
model called functionally (one batch gradient or the party's unrolled local steps) and
the distances and priors the attacks minimise."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from privfl.attacks.gradient_inversion.knowledge import AttackerKnowledge, MultiStep


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


def _tv(x: Tensor) -> Tensor:
    """Anisotropic total variation, mean absolute difference of neighbours."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


def _tv_each(x: Tensor) -> Tensor:
    """:func:`_tv` of each image of the batch (an objective summed over images)."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
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
