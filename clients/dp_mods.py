"""Client mods for differential privacy.

Attach per handler, never app-wide: ``@app.train(mods=[secagg_mod, clip_update_mod])``.
Mods listed first wrap the ones after them, so the clip mod must come after (inside) the
secure-aggregation mod: the party's reply is clipped before it is encoded.

Flower's ``fixedclipping_mod`` is not used: it takes the clipping norm from the server's
message, and a party never takes its defenses from the server. :func:`make_clip_update_mod`
is built with the party's own norm; :func:`clip_update_mod` reads it from the party's own
scenario (which privfl's policy mod puts in the message in place of the server's).
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from privfl.config import SCENARIO_KEY, scenario_from_json
from privfl.dp import clip_l2
from privfl.flower.update import Update

Mod = Callable[[Message, Context, ClientAppCallable], Message]


def _clip_reply(msg: Message, reply: Message, clip: float) -> Message:
    """Clip the update Δ = reply weights − received weights to L2 norm ``clip``."""
    sent = msg.content.array_records["arrays"]
    update = Update.from_reply(sent, reply.content)
    update.delta, _ = clip_l2(update.delta, clip)
    update.write(sent, reply.content)
    return reply


def make_clip_update_mod(clipping_norm: float) -> Mod:
    """A train mod clipping every update Δ = reply weights − received weights to L2
    norm ``clipping_norm`` (party-level DP: DP-FedAvg with client-side clipping, or the
    sensitivity of distributed DP's integer noise). Evaluate and other messages pass
    untouched; the norm itself is not reported (it is private)."""
    if not clipping_norm > 0:
        raise ValueError(f"clipping_norm must be > 0, got {clipping_norm}")

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type.split(".")[0] != "train" or reply.has_error():
            return reply
        return _clip_reply(msg, reply, clipping_norm)

    return mod


def clip_update_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip the party's update Δ = reply weights − received weights to L2 norm
    ``defense.dp.clip`` of the scenario in the message (the party's own, put there by its
    policy mod).

    Active for train messages when ``defense.dp.mode`` is ``global`` with
    ``clipping = "client"``; a no-op otherwise. Under ``distributed`` the party's
    secure-aggregation encoder clips the update itself, in float64 right before it adds
    the noise calibrated to that norm (:func:`privfl.clients.secagg.encode_update`). The
    norm itself is not reported: it is private.
    """
    reply = call_next(msg, context)
    if msg.metadata.message_type.split(".")[0] != "train" or reply.has_error():
        return reply
    config = msg.content.config_records.get("config")
    if config is None or SCENARIO_KEY not in config:
        return reply
    dp = scenario_from_json(str(config[SCENARIO_KEY])).defense.dp
    if not (dp.mode == "global" and dp.clipping == "client"):
        return reply
    return _clip_reply(msg, reply, dp.clip)
