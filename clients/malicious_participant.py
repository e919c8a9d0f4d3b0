"""A malicious participant: a party whose rigged model the federation adopted.

It sees only what every party sees — the global model each round — plus its own update.
Between two consecutive global models the change is the FedAvg of every party's update,
``G_{r+1} - G_r = Σ_p w_p Δ_p``; it subtracts its own ``w_own Δ_own`` and reads the other
parties' samples off the imprint block (:mod:`privfl.attacks.imprint`).

Assumption on the weights: FedAvg weights are ``num_examples / Σ num_examples``; the
participant does not see the others' counts, so it uses ``1 / parties`` (equal-size
parties, as in the scenarios with ``data.samples_per_party`` set). A wrong weight leaves
a fraction of its own samples in the bins, where they show as collisions or as extra
images, never as a silent error in the others'.

Wiring: :func:`participant_mod` goes on the ClientApp's train handler *inside* the
secure-aggregation mod (it needs the plaintext update) — ``@app.train(mods=[secagg_mod,
participant_mod, clip_update_mod])``. It is a no-op on every honest party.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from privfl.attacks.imprint import (
    BIAS_KEY,
    WEIGHT_KEY,
    ImprintInfo,
    ImprintReconstruction,
    aggregate_noise_std,
    reconstruct_from_update,
    state_update,
)
from privfl.data import sample_shape
from privfl.flower import side

SIDE_KEY = side.key(side.IMPRINT)
_BEFORE_KEY = "privfl.imprint.global-before"
_OWN_KEY = "privfl.imprint.own-update"
_KEYS = (WEIGHT_KEY, BIAS_KEY)


def participant_reconstruct(
    global_before: Mapping[str, torch.Tensor],
    global_after: Mapping[str, torch.Tensor],
    own_update: Mapping[str, torch.Tensor],
    n_parties: int,
    own_weight_fraction: float | None,
    block_info: ImprintInfo,
    *,
    noise_std: float = 0.0,
) -> ImprintReconstruction:
    """The other parties' samples, from two consecutive global models and one's own update.

    Parameters
    ----------
    global_before, global_after : Mapping[str, Tensor]
        Global state dicts of rounds ``r`` and ``r + 1`` (at least the imprint keys).
    own_update : Mapping[str, Tensor]
        The participant's local weights after round ``r`` minus ``global_before``.
    n_parties : int
        Parties in the aggregate (used for the weight when ``own_weight_fraction`` is None).
    own_weight_fraction : float or None
        The participant's FedAvg weight; ``None`` assumes equal-size parties, ``1/n``.
    block_info : ImprintInfo
        Layout of the imprint block.
    noise_std : float
        Rounding noise per coordinate of the global models (see
        :func:`privfl.attacks.imprint.aggregate_noise_std`).

    Returns
    -------
    ImprintReconstruction
        Samples of the other parties found alone in a bin.
    """
    if n_parties < 2:
        raise ValueError(f"n_parties: a participant needs others to attack, got {n_parties}")
    w = 1.0 / n_parties if own_weight_fraction is None else float(own_weight_fraction)
    if not 0 < w < 1:
        raise ValueError(f"own_weight_fraction: must be in (0, 1), got {w}")
    keys = (block_info.weight_key, block_info.bias_key)
    aggregate = state_update(global_before, global_after, keys)
    others = {k: aggregate[k] - w * own_update[k].double() for k in keys}
    return reconstruct_from_update(others, block_info, noise_std=noise_std)


def _imprint_arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(record[k].numpy().copy()) for k in _KEYS}


def participant_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod of the malicious party (``attack.imprint.participant``); passes through
    everywhere else.

    Round ``r = attack.imprint.round``: keeps the global model it received and its own
    update (imprint keys only) in ``context.state``. Round ``r + 1``: reconstructs from
    the new global model and attaches the images to its train reply as the ConfigRecord
    ``privfl.side.imprint`` (``images`` float32 bytes, ``shape``, ``round``, ``bins``,
    ``collisions``, ``occupied``, ``seconds``).
    """
    if msg.metadata.message_type != MessageType.TRAIN or "arrays" not in msg.content:
        return call_next(msg, context)
    # A cycle: privfl.clients.app imports this module for its mod.
    from privfl.clients.app import party_of, scenario_of

    scenario = scenario_of(msg)
    im = scenario.attack.imprint
    if (
        scenario.attack.kind != "imprint"
        or im.role != "malicious-participant"
        or party_of(context) != im.participant
    ):
        return call_next(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    exfiltrated = None
    if server_round == im.round + 1 and _BEFORE_KEY in context.state:
        recon = participant_reconstruct(
            _imprint_arrays(context.state[_BEFORE_KEY]),
            _imprint_arrays(msg.content["arrays"]),
            _imprint_arrays(context.state[_OWN_KEY]),
            scenario.data.parties,
            None,
            # The participant's own data tells it the shape of everyone's samples.
            ImprintInfo.from_state(_imprint_arrays(msg.content["arrays"]), sample_shape(scenario)),
            noise_std=aggregate_noise_std(scenario),
        )
        exfiltrated = _side_record(recon, im.round)
    reply = call_next(msg, context)
    if server_round == im.round and not reply.has_error():
        before = _imprint_arrays(msg.content["arrays"])
        after = _imprint_arrays(reply.content["arrays"])
        context.state[_BEFORE_KEY] = ArrayRecord(before)
        context.state[_OWN_KEY] = ArrayRecord({k: after[k] - before[k] for k in _KEYS})
    if exfiltrated is not None and not reply.has_error():
        reply.content[SIDE_KEY] = exfiltrated
    return reply


def _side_record(recon: ImprintReconstruction, attack_round: int) -> ConfigRecord:
    images = recon.images.detach().cpu().float().numpy()
    return ConfigRecord(
        {
            "images": images.tobytes(),
            "shape": [int(s) for s in images.shape],
            "round": attack_round,
            "bins": len(recon.bins_used) + recon.collisions,
            "collisions": recon.collisions,
            "occupied": recon.occupied,
            "seconds": float(recon.seconds),
        }
    )
