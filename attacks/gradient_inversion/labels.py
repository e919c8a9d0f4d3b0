"""Label recovery from the output layer's gradient: counts from the bias gradient for a
batch, the most negative entry for a batch of one (iDLG)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from privfl.attacks.gradient_inversion.knowledge import AttackerKnowledge
from privfl.attacks.gradient_inversion.objective import _clone, _decayed


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
