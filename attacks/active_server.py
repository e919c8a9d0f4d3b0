"""Ground truth for the malicious-server attacks of :mod:`privfl.strategies.active_server`.

The evaluator is not the attacker: it rebuilds what a party really computed (its
honest local training from the model it was sent, deterministic by
:func:`privfl.training.train_local`) and judges what the attacker claims to have
recovered. The attacker never calls it during the run.

What a party contributes to a secure sum is ``[w·clip(Δ), w, w·loss]`` (see
:func:`privfl.clients.secagg.encode_update`): ``Δ`` the local update, ``w`` its number of
examples (1 under DP-FedAvg or distributed DP, where ``Δ`` is first clipped to L2 norm
``defense.dp.clip``), ``clip`` the codec's coordinate clip.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from privfl.architecture import build_model
from privfl.config import SCENARIO_KEY, Scenario, scenario_from_json
from privfl.data import load_federation
from privfl.dp import clip_l2, flatten, global_noise_multiplier
from privfl.fixedpoint import FixedPointCodec
from privfl.training import TrainConfig, resolve_device, train_local

# Recomputed training matches a party's to float rounding; relative tolerance of weights.
WEIGHT_RTOL = 1e-5
# Ring units a decoded input may be off by (stochastic rounding, < 1 unit per encoding).
RING_ATOL_UNITS = 4
# model_inconsistency: cosine the aggregate must reach with the target's honest update.
MIN_COSINE = 0.999


@dataclass(frozen=True)
class HonestUpdate:
    """What a party's honest local training produced from the model it was sent."""

    local: dict[str, np.ndarray]
    delta: np.ndarray  # local − sent, flat, float64
    num_examples: int
    loss: float


@dataclass
class Score:
    """The evaluator's verdict: how many inputs or noise vectors were really recovered."""

    recovered: int
    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0


class ActiveServerEvaluator:
    """Scores an active server's findings against the parties' honest computations.

    Parameters
    ----------
    scenario : Scenario
        The run's scenario (data, model, training and the codec of the parties).
    """

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.codec = FixedPointCodec.from_section(scenario.defense.secagg)

    def party_metrics(self) -> dict[str, float]:
        """What a report records of the parties' policy (known here, not to the attacker)."""
        return {"trust_server": float(self.scenario.party.trust_server)}

    # ------------------------------------------------------------------ ground truth
    def honest_update(
        self,
        party: int,
        server_round: int,
        sent: ArrayRecord,
        scenario: Scenario | None = None,
    ) -> HonestUpdate:
        """Party ``party``'s plain local training in ``server_round`` from ``sent``.

        ``scenario`` is the one the party trained under (default: the run's).
        """
        sc = scenario or self.scenario
        fed = load_federation(sc)
        model = build_model(sc, fed.num_classes)
        model.load_state_dict(sent.to_torch_state_dict())
        threads = torch.get_num_threads()
        # The party's thread count: the same reduction order, the same floats.
        torch.set_num_threads(sc.scenario.cpus_per_party)
        try:
            stats = train_local(
                model,
                fed.parties[party].train,
                TrainConfig.from_scenario(sc),
                party=party,
                server_round=server_round,
                device=resolve_device(sc.scenario.device),
            )
        finally:
            torch.set_num_threads(threads)
        local = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        delta = flatten([local[k] for k in sent]) - flatten(sent.to_numpy_ndarrays())
        return HonestUpdate(local, delta, stats.num_examples, stats.loss)

    def encoded_input(self, update: HonestUpdate) -> np.ndarray:
        """The real values a party's secure-aggregation mod encodes (before rounding and
        DP noise): ``[w·clip(Δ), w, w·loss]``."""
        dp = self.scenario.defense.dp
        delta, weight = update.delta, float(update.num_examples)
        if dp.mode == "distributed" or (dp.mode == "global" and dp.clipping == "client"):
            delta, _ = clip_l2(delta, dp.clip)
        if dp.mode in ("global", "distributed"):
            weight = 1.0
        c = self.codec.clip_range
        body = weight * np.clip(delta, -c, c)
        return np.concatenate([body, [weight, weight * update.loss]])

    def _ring_tolerance(self, want: np.ndarray) -> float:
        return RING_ATOL_UNITS / self.codec.scale + WEIGHT_RTOL * max(
            1.0, float(np.abs(want).max())
        )

    # ------------------------------------------------------------------ scores
    def score_plain_updates(
        self,
        server_round: int,
        sent: ArrayRecord | None,
        asked: Scenario | Mapping[str, Any],
        got: Mapping[int, tuple[Mapping[str, np.ndarray], float]],
    ) -> Score:
        """downgrade: which plain replies are the parties' honest, un-noised local weights.

        ``got[party] = (weights, num-examples)`` as received; ``asked`` is the scenario
        the server sent, or the config entries that carry it (the parties that trusted
        it trained under it).
        """
        if not isinstance(asked, Scenario):
            text = asked.get(SCENARIO_KEY)
            asked = scenario_from_json(str(text)) if text is not None else self.scenario
        if sent is None or not got:
            return Score(0, {"plain_replies": 0}, ["no party sent a plain update"])
        recovered, worst, notes = 0, 0.0, []
        for party in sorted(got):
            weights, examples = got[party]
            honest = self.honest_update(party, server_round, sent, asked)
            err = max(
                float(np.abs(np.asarray(weights[k], np.float64) - v).max())
                for k, v in honest.local.items()
            )
            scale = max(1.0, max(float(np.abs(v).max()) for v in honest.local.values()))
            worst = max(worst, err / scale)
            if err <= WEIGHT_RTOL * scale and examples == honest.num_examples:
                recovered += 1
            else:
                notes.append(
                    f"party {party}: the plain reply is not its honest update "
                    f"(max error {err:.3g}, num-examples {examples} vs {honest.num_examples})"
                )
        notes.insert(
            0,
            f"round {server_round}: {recovered} of {len(got)} plain replies equal the parties' "
            "honest non-DP local weights",
        )
        return Score(recovered, {"plain_replies": len(got), "max_rel_error": worst}, notes)

    def score_noise_strip(
        self, residual: np.ndarray | None, parties: Sequence[int], *, noise_norm: float
    ) -> Score:
        """noise_strip: did subtracting the regenerated noise leave a sum of clipped updates?

        A sum of ``n`` updates clipped to L2 norm ``C`` has norm at most ``n·C`` (plus
        fixed-point rounding, ``sqrt(d)·2^-f`` per party); the true noise has norm about
        ``σ·C·sqrt(d)``. All ``n`` noise vectors count as stripped if the residual is
        within the bound, none otherwise.
        """
        if residual is None or not parties:
            return Score(0, {}, ["no noisy sum was decoded in the attack round"])
        n, d = len(parties), residual.size
        clip = self.scenario.defense.dp.clip
        bound = n * (clip + math.sqrt(d) / self.codec.scale + 1e-3 * clip)
        norm = float(np.linalg.norm(residual))
        expected = global_noise_multiplier(self.scenario) * clip * math.sqrt(d)
        stripped = norm <= bound
        metrics = {
            "residual_norm": norm,
            "residual_bound": bound,
            "regenerated_noise_norm": noise_norm,
            "expected_noise_norm": expected,
        }
        verdict = "a sum of clipped updates" if stripped else "still noise"
        notes = [
            f"residual after subtracting the regenerated noise of parties {list(parties)}: "
            f"norm {norm:.4g} vs bound {bound:.4g} ({verdict}; the noise has norm ~{expected:.4g})"
        ]
        return Score(n if stripped else 0, metrics, notes)

    def score_input(
        self,
        party: int,
        server_round: int,
        sent: ArrayRecord | None,
        recovered: np.ndarray | None,
    ) -> Score:
        """key_mitm, isolation: is ``recovered`` the party's exact encoded input?"""
        if sent is None or recovered is None:
            return Score(0, {}, [f"no input of party {party} was recovered"])
        honest = self.honest_update(party, server_round, sent)
        want = self.encoded_input(honest)
        if recovered.shape != want.shape:
            return Score(
                0, {}, [f"recovered {recovered.size} values, party {party} sent {want.size}"]
            )
        err = float(np.abs(recovered - want).max())
        ok = err <= self._ring_tolerance(want)
        metrics = {
            "max_abs_error": err,
            "recovered_num_examples": float(recovered[-2]),
            "true_num_examples": float(want[-2]),
            "cosine": _cosine(recovered[:-2], want[:-2]),
        }
        notes = [
            f"party {party}, round {server_round}: recovered input "
            f"{'equals' if ok else 'differs from'} its weighted update (max error {err:.3g}; "
            f"w = {recovered[-2]:.6g}, true {want[-2]:.6g})"
        ]
        return Score(int(ok), metrics, notes)

    def score_differences(
        self,
        server_round: int,
        sent: ArrayRecord | None,
        replayed: ArrayRecord | None,
        differences: Mapping[int, np.ndarray],
    ) -> Score:
        """round_replay: is each recovered ``x - x'`` the difference of the party's two
        honest inputs (from the model of the round and the model of the replay)?"""
        if sent is None or replayed is None or not differences:
            return Score(0, {"differences": 0}, ["no input difference was recovered"])
        recovered, worst, notes = 0, 0.0, []
        for party in sorted(differences):
            a = self.encoded_input(self.honest_update(party, server_round, sent))
            b = self.encoded_input(self.honest_update(party, server_round, replayed))
            want, got = a - b, differences[party]
            err = float(np.abs(got - want).max())
            worst = max(worst, err)
            if err <= self._ring_tolerance(a) + self._ring_tolerance(b):
                recovered += 1
            else:
                notes.append(f"party {party}: recovered difference is off by {err:.3g}")
        notes.insert(
            0,
            f"round {server_round} replayed: {recovered} of {len(differences)} differences "
            "x - x' equal the parties' honest ones",
        )
        return Score(recovered, {"differences": len(differences), "max_abs_error": worst}, notes)

    def score_isolated_update(
        self,
        party: int,
        server_round: int,
        sent: ArrayRecord | None,
        aggregate: Mapping[str, np.ndarray] | None,
        *,
        exclude: Sequence[str] = (),
    ) -> Score:
        """model_inconsistency: is the aggregate (outside ``exclude``) the party's update?"""
        if sent is None or aggregate is None:
            return Score(0, {}, ["the attack round produced no aggregate"])
        honest = self.honest_update(party, server_round, sent)
        keys = [k for k in sent if k not in exclude]
        got = flatten([aggregate[k] for k in keys])
        want = flatten([honest.local[k].astype(np.float64) - sent[k].numpy() for k in keys])
        cos = _cosine(got, want)
        ok = cos > MIN_COSINE
        notes = [
            f"party {party}, round {server_round}: the aggregate outside {list(exclude)} has "
            f"cosine {cos:.6f} with its honest update ({'isolated' if ok else 'not isolated'})"
        ]
        return Score(int(ok), {"cosine": cos}, notes)
