"""Client mods for differential privacy.

Attach per handler, never app-wide: ``@app.train(mods=[secagg_mod, clip_update_mod])``.
Mods listed first wrap the ones after them, so the clip mod must come after (inside) the
secure-aggregation mod: the party's reply is clipped before it is encoded.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from privfl.config import SCENARIO_KEY, scenario_from_json
from privfl.dp import clip_l2, flatten, record_with_vector


def clip_update_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip the party's update Δ = reply weights − received weights to L2 norm
    ``defense.dp.clip``.

    Active for train messages when ``defense.dp.mode`` is ``global`` with
    ``clipping = "client"``, or ``distributed`` (the integer noise added inside secure
    aggregation is calibrated to that norm); a no-op otherwise. The norm itself is not
    reported: it is private.
    """
    reply = call_next(msg, context)
    if msg.metadata.message_type.split(".")[0] != "train" or reply.has_error():
        return reply
    config = msg.content.config_records.get("config")
    if config is None or SCENARIO_KEY not in config:
        return reply
    dp = scenario_from_json(str(config[SCENARIO_KEY])).defense.dp
    if not (dp.mode == "distributed" or (dp.mode == "global" and dp.clipping == "client")):
        return reply
    sent = msg.content.array_records["arrays"]
    name = (
        "arrays"
        if "arrays" in reply.content.array_records
        else next(iter(reply.content.array_records))
    )
    got = reply.content.array_records[name]
    base = flatten(sent.to_numpy_ndarrays())
    delta, _ = clip_l2(flatten(got.to_numpy_ndarrays()) - base, dp.clip)
    reply.content[name] = record_with_vector(got, base + delta)
    return reply
