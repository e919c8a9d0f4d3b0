"""The evaluator of the imprint attacks: it rebuilds the samples in the attacked aggregate
and scores what the attacker read out of it.

Not the attacker: it holds the run's scenario and rebuilds what the parties trained on in
the attack round (:func:`privfl.training.round_batch_data`). :func:`evaluate_imprint`
matches recovered samples against the true ones; :class:`ImprintServerEvaluator` scores
a malicious server (``privfl.strategies.imprint_server.ImprintServer``) and
:func:`participant_report` a malicious participant
(``privfl.clients.malicious_participant``) from the side record it sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord

from privfl.attacks.imprint import (
    attack_round_scenario,
    expected_fraction,
    imprint_bins_of,
    imprinted_samples,
)
from privfl.config import Scenario
from privfl.data import load_federation
from privfl.flower import side
from privfl.results import AttackReport
from privfl.training import round_batch_data

_PSNR_CAP = 100.0
# Pairs drawn in the report's figure: a grid of hundreds of panels takes minutes to draw.
_FIGURE_PAIRS = 64


def evaluate_imprint(
    images: torch.Tensor,
    truth: torch.Tensor,
    *,
    scenario: Scenario,
    role: str,
    bins: int,
    expected: float,
    seconds: float,
    collisions: int,
    notes: list[str] | None = None,
    verified: int | None = None,
    total: int | None = None,
    occupied: int | None = None,
) -> AttackReport:
    """Score recovered images against the union of the attacked batches.

    Each recovered image is matched to a distinct true sample (optimal assignment on
    PSNR, ``privfl.metrics.images``); a sample counts as recovered when its match reaches
    ``attack.imprint.recovered_psnr`` dB. Means are over the matched pairs (NaN when
    nothing was returned), PSNR capped at 100 dB (exact recoveries are infinite).

    Parameters
    ----------
    images : Tensor
        ``(M, *sample_shape)`` what the attacker returned (images ``(C, H, W)`` or rows
        ``(d,)``, scored as ``1 × 1 × d`` images by PSNR, without SSIM).
    truth : Tensor
        ``(N, *sample_shape)`` every sample in the aggregate (the evaluator's knowledge).
    scenario : Scenario
        Supplies the threshold and the attack round.
    role : str
        ``malicious-server`` or ``malicious-participant``.
    bins, expected, seconds, collisions : int, float, float, int
        The block's bins, the expected fraction ``(1-1/k)^(N-1)``, the reconstruction's
        wall time and the collisions it rejected.
    notes : list[str], optional
        Extra lines for the report.
    verified : int, optional
        Bins that passed the single-sample test when ``images`` also holds unverified
        readouts (default: all of ``images``).
    total : int, optional
        Samples in the aggregate when ``truth`` is a superset of them (default: all of
        ``truth``).
    occupied : int, optional
        Bins that carried signal (singles and collisions): reported with the fraction of
        them that gave a recovered sample.
    """
    im = scenario.attack.imprint
    total = int(truth.shape[0]) if total is None else int(total)
    rows = truth.ndim == 2
    if rows:  # tabular rows: PSNR of 1 x 1 x d "images"; SSIM needs a 2-D neighbourhood
        images, truth = images.reshape(-1, 1, 1, truth.shape[1]), truth[:, None, None]
    psnr_mean = ssim_mean = float("nan")
    recovered = 0
    figures = {}
    if images.shape[0] and total:
        # matplotlib, scipy and torchmetrics: kept off the import of the strategies
        from privfl.metrics.images import image_grid_figure, match_reconstructions, ssim

        perm, per = match_reconstructions(images, truth)
        hit = perm >= 0
        # Exact recoveries have infinite PSNR; cap so that means stay finite.
        psnr = per[hit].clamp(max=_PSNR_CAP)
        recovered = int((psnr >= im.recovered_psnr).sum())
        psnr_mean = float(psnr.mean())
        if not rows:
            ssim_mean = float(ssim(images[perm[hit]], truth[hit]).mean())
        shown = hit if total != truth.shape[0] else torch.ones_like(hit)  # matched ones only
        if int(shown.sum()) > _FIGURE_PAIRS:  # a large aggregate: its first matched samples
            shown = hit & (torch.cumsum(hit.long(), 0) <= _FIGURE_PAIRS)
        figures[f"imprint_{role}.png"] = image_grid_figure(
            truth[shown],
            images,
            perm=perm[shown].tolist(),
            psnr_per_image=per[shown].tolist(),
            title=f"imprint ({role}): {recovered}/{total} at PSNR ≥ {im.recovered_psnr:g} dB",
        )
    measured = recovered / total if total else float("nan")
    extra: dict[str, float] = {}
    bin_lines: list[str] = []
    if occupied is not None:
        extra = {
            "occupied_bins": int(occupied),
            "recovered_per_occupied_bin": recovered / occupied if occupied else float("nan"),
        }
        bin_lines = [
            f"{occupied} of {bins} bins carried signal; {recovered} of them "
            f"({extra['recovered_per_occupied_bin']:.3f}) gave a sample at PSNR >= "
            f"{im.recovered_psnr:g} dB"
        ]
    lines = [
        f"bins k = {bins}, samples N = {total}: expected fraction (1-1/k)^(N-1) = "
        f"{expected:.3f}, measured {measured:.3f} ({recovered}/{total} at PSNR >= "
        f"{im.recovered_psnr:g} dB)",
        f"{images.shape[0] if verified is None else verified} single-sample bins verified, "
        f"{collisions} collisions rejected",
    ]
    return AttackReport(
        name="imprint",
        role=role,
        target="aggregate",
        recovered=recovered,
        total=total,
        metrics={
            "expected_fraction": float(expected),
            "psnr_mean": psnr_mean,
            "ssim_mean": ssim_mean,
            "bins": int(bins),
            "seconds": float(seconds),
            **extra,
        },
        figures=figures,
        notes=lines + bin_lines + list(notes or []),
    )


class ImprintServerEvaluator:
    """Scores the readouts of an :class:`~privfl.strategies.imprint_server.ImprintServer`
    against the samples in the aggregate.

    Not the attacker: it holds the run's scenario and rebuilds what each party trained
    on in the attack round (``privfl.training.round_batch_data``; under DP-SGD, whose
    Poisson batches are the parties' secret, every record they hold).

    Parameters
    ----------
    scenario : Scenario
        The run's scenario (data, the attack round's training, ``attack.imprint``).
    """

    role = "malicious-server"  # the attacker it scores, ``ImprintServer``

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario

    def score(
        self,
        images: torch.Tensor,
        *,
        parties: list[int],
        attack_round: int,
        bins: int,
        seconds: float,
        collisions: int,
        verified: int,
        notes: list[str],
        occupied: int | None = None,
    ) -> AttackReport:
        """The report on ``images`` (what the attacker read off the aggregate of
        ``attack_round``), taken from the aggregate of ``parties`` (all when empty);
        ``occupied``: the bins that carried signal."""
        sc = self.scenario
        parties = parties or list(range(sc.data.parties))
        shown = f"{parties}" if len(parties) <= 12 else f"[{str(parties[:12])[1:-1]}, ...]"
        lines = [
            f"attacked the aggregate of round {attack_round} over {len(parties)} parties {shown}"
        ]
        total = None
        if sc.defense.dp.mode == "client":
            # The parties' Poisson batches are drawn from their own secrets: score
            # against every record they hold (a best match can only flatter the attacker).
            fed = load_federation(sc)
            truth = torch.cat([fed.parties[p].train.images for p in parties])
            total = imprinted_samples(sc)
            lines.append(
                f"DP-SGD batches are the parties' secret: readouts matched against all "
                f"{truth.shape[0]} records the parties hold; total = the {total} samples expected"
            )
        else:
            chosen = attack_round_scenario(sc)
            truth = torch.cat([round_batch_data(chosen, p, attack_round).images for p in parties])
        return evaluate_imprint(
            images,
            truth,
            scenario=sc,
            role=self.role,
            bins=bins,
            expected=expected_fraction(len(truth), bins),
            seconds=seconds,
            collisions=collisions,
            notes=[*lines, *notes],
            verified=verified,
            total=total,
            occupied=occupied,
        )


def _find_side(side_records: Mapping[Any, Any]) -> ConfigRecord | None:
    """The imprint record among ``{round: {side key: record}}`` (or a flat mapping)."""
    for key, value in side_records.items():
        if isinstance(key, str) and side.is_side(key) and side.name_of(key) == side.IMPRINT:
            return value
        if isinstance(value, Mapping) and not isinstance(value, ConfigRecord):
            found = _find_side(value)
            if found is not None:
                return found
    return None


def participant_report(side_records: Mapping[Any, Any], scenario: Scenario) -> AttackReport:
    """Evaluate what the malicious participant exfiltrated against the other parties'
    true batches of the attack round.

    Parameters
    ----------
    side_records : Mapping
        ``{round: {"privfl.side.<node>.imprint": ConfigRecord}}`` as the server's
        FedAvg collects them (a flat ``{"...privfl.side.imprint": record}`` works too).
    scenario : Scenario
        The run's scenario; the ground truth is rebuilt with
        ``privfl.training.round_batch_data`` — the evaluator's knowledge, not the attacker's.
    """
    im = scenario.attack.imprint
    others = [p for p in range(scenario.data.parties) if p != im.participant]
    truth = [round_batch_data(scenario, p, im.round) for p in others]
    truth_images = torch.cat([t.images for t in truth])
    record = _find_side(side_records)
    notes: list[str] = []
    if record is None:
        images = truth_images[:0]
        seconds, collisions = float("nan"), 0
        notes.append("no side-channel record arrived: the participant reported nothing")
    else:
        shape = [int(s) for s in record["shape"]]
        raw = np.frombuffer(record["images"], dtype=np.float32).reshape(shape)
        images = torch.from_numpy(raw.copy())
        seconds, collisions = float(record["seconds"]), int(record["collisions"])
    bins = imprint_bins_of(scenario)
    return evaluate_imprint(
        images,
        truth_images,
        scenario=scenario,
        role="malicious-participant",
        bins=bins,
        expected=expected_fraction(len(truth_images), bins),
        seconds=seconds,
        collisions=collisions,
        notes=notes,
    )
