"""The curious server's single entry point: invert one party's update with the chosen
method."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from privfl.attacks.gradient_inversion.dlg import dlg, idlg
from privfl.attacks.gradient_inversion.inverting import inverting_gradients
from privfl.attacks.gradient_inversion.knowledge import (
    AttackerKnowledge,
    LabelRecovery,
    Method,
    MultiStep,
    Reconstruction,
)
from privfl.attacks.gradient_inversion.labels import recover_labels
from privfl.attacks.gradient_inversion.objective import gradient_from_update
from privfl.attacks.gradient_inversion.span import feature_span


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
    method : {"dlg", "idlg", "inverting-gradients", "feature-span"}
        Which attack to run. ``feature-span`` reads the update itself (not a gradient
        to match): ``iterations``, ``restarts``, ``lr`` and ``tv_weight`` then set its
        feature inversion, and it recovers the labels exactly whether or not they are
        known.
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
    if method == "feature-span":
        # it peels the steps off one by one: there is no multi-step model to choose
        span = {k: v for k, v in common.items() if k != "multi_step"}
        return feature_span(model, update, knowledge, **span)
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
    raise ValueError(
        f"method: unknown {method!r}; accepted: dlg, idlg, inverting-gradients, feature-span"
    )
