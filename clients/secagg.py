"""Client side of secure aggregation: a Flower mod plus stage handlers.

Wiring, on any ClientApp::

    app = ClientApp()

    @app.train(mods=[secagg_mod, <other mods>])
    def train(msg, context): ...

    register_secure_aggregation(app)

The mod lets the honest train handler run, turns its reply (full local weights and
metrics) into the weighted update ``w * (local - global)`` plus the coordinates ``w``
and ``w * train-loss``, encodes it in the ring (:mod:`privfl.fixedpoint`), optionally adds
distributed-DP integer noise, and replies with the protocol payload only: the server
never sees the weights, the number of examples or the loss of a single party. Party
secrets live in ``context.state`` and persist across rounds.

One file for the party's whole side of the protocol: the mod and every stage handler
load and save the same per-party state and check the same round binding.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from privfl.clients.policy import PartyRecord, party_record
from privfl.config import SCENARIO_KEY, Scenario, scenario_from_json
from privfl.dp import check_distributed, clip_l2, distributed_epsilon, distributed_noise
from privfl.errors import PrivflError
from privfl.fixedpoint import FixedPointCodec
from privfl.flower import side, wire
from privfl.flower.update import Update, UpdateError, coordinates
from privfl.refusal import RefusalError, refusal_reply
from privfl.secagg.additive import AdditiveParty
from privfl.secagg.channel import ChannelError
from privfl.secagg.identity import IdentityError, dh_private, dh_public, sign_keys, verify_keys
from privfl.secagg.masking import MaskingError, MaskingParty, fresh_static_key, neighbours_of
from privfl.seeding import parts_rng

NoiseFn = Callable[..., np.ndarray]


class SecAggClientError(PrivflError, RuntimeError):
    """A party cannot take its secure-aggregation step; the message names the party."""


@dataclass(frozen=True)
class SecAggSettings:
    """A party's own secure-aggregation settings, for a ClientApp without a privfl scenario.

    Parameters
    ----------
    protocol : {"additive", "masking"}
        Must match the server's :class:`~privfl.strategies.SecureAggregation`.
    codec : FixedPointCodec
        The ring the update is encoded in; must match the server's.
    equal_weights : bool
        Every party's update weighs 1 (party-level DP: the sensitivity is per party);
        otherwise it weighs its ``num-examples``.
    dither_seed : int
        Seed of the public rounding dither (not a secret: the same inputs re-encode alike).

    Distributed DP (integer noise inside the sum) is calibrated from a privfl scenario's
    ``defense.dp``: it is available through :data:`secagg_mod` without settings.
    """

    protocol: str = "additive"
    codec: FixedPointCodec = field(default_factory=FixedPointCodec)
    equal_weights: bool = False
    dither_seed: int = 0

    def __post_init__(self) -> None:
        if self.protocol not in ("additive", "masking"):
            raise ValueError(f"protocol must be 'additive' or 'masking', got {self.protocol!r}")

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> SecAggSettings:
        """The settings a scenario's ``defense`` section describes."""
        return cls(
            protocol=scenario.defense.secure_aggregation,
            codec=FixedPointCodec.from_section(scenario.defense.secagg),
            equal_weights=scenario.defense.dp.mode in ("global", "distributed"),
            dither_seed=scenario.scenario.seed,
        )


def _config(msg: Message) -> ConfigRecord | None:
    return msg.content.config_records.get("config") if msg.has_content() else None


def _scenario(cfg: ConfigRecord) -> Scenario:
    return scenario_from_json(str(cfg[SCENARIO_KEY]))


def _party(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise SecAggClientError(f"node {context.node_id}: node_config has no 'partition-id'")
    return int(context.node_config["partition-id"])


def _load(context: Context, party: int, codec: FixedPointCodec) -> tuple[Any, dict[str, Any]]:
    rec = context.state.config_records.get(wire.STATE)
    if rec is None:
        raise SecAggClientError(f"party {party}: no secure-aggregation key setup happened")
    st = json.loads(str(rec["json"]))
    cls = MaskingParty if st["protocol"] == "masking" else AdditiveParty
    return cls.from_state(st["party"], codec), st


def _save(context: Context, proto: Any, st: dict[str, Any]) -> None:
    st["party"] = proto.to_state()
    # The session beside the JSON: read on every train message without parsing it.
    context.state.config_records[wire.STATE] = ConfigRecord(
        {"json": json.dumps(st), "session": st["session"]}
    )


def encode_update(
    msg: Message,
    reply: Message,
    scenario: Scenario | SecAggSettings,
    party: int,
    parties: int,
    *,
    noise_fn: NoiseFn | None = None,
    noise_secret: bytes | None = None,
    min_parties: int | None = None,
) -> np.ndarray:
    """The ring vector a party contributes: ``[w * clip(Δ), w, w * loss]`` (+ DP noise).

    ``w`` is ``num-examples``, or 1 when ``defense.dp.mode`` is ``global`` or
    ``distributed`` (the DP sensitivity is per party; ``equal_weights`` when ``scenario``
    is the party's :class:`SecAggSettings`). Distributed noise is keyed by
    ``noise_secret`` (None: the OS) and sized for ``min_parties`` parties (default
    ``data.parties``). Raises
    :class:`~privfl.fixedpoint.EncodingError` (naming the party) on NaN/inf or a
    shape mismatch, before anything is shared.
    """
    glob = msg.content.array_records.get("arrays")
    if glob is None or not reply.has_content():
        raise SecAggClientError(f"party {party}: train message or reply lacks 'arrays'")
    try:
        update = Update.from_reply(glob, reply.content)
    except UpdateError as exc:
        raise SecAggClientError(f"party {party}: {exc}") from None
    delta, metrics = update.delta, update.metrics
    distributed = isinstance(scenario, Scenario) and scenario.defense.dp.mode == "distributed"
    if distributed:
        # The noise below is calibrated to this norm: clip here, in float64, so that what
        # is encoded is within it exactly (not through a float32 copy of the weights).
        delta, _ = clip_l2(delta, scenario.defense.dp.clip)
    own = (
        scenario if isinstance(scenario, SecAggSettings) else SecAggSettings.from_scenario(scenario)
    )
    weight = 1.0 if own.equal_weights else update.weight
    loss = float(metrics.get("train-loss", 0.0))
    codec = own.codec
    server_round = int(msg.content["config"]["server-round"])
    # The rounding dither is public, not a secret: seed it so a scenario re-encodes alike.
    dither = parts_rng(own.dither_seed, party, server_round)
    # Encoded straight into the message vector: no concatenation copy.
    vec = np.empty(delta.size + wire.EXTRA_COORDS, dtype=codec.dtype)
    body = codec.encode(
        delta, weight=weight, parties=parties, party=party, rng=dither, out=vec[: delta.size]
    )
    codec.encode(
        np.array([1.0, loss]),
        weight=weight,
        parties=parties,
        party=party,
        clip=False,
        rng=dither,
        out=vec[delta.size :],
    )
    if distributed:
        noise_fn = noise_fn or distributed_noise
        noise = noise_fn(
            delta.size,
            scenario=scenario,
            party=party,
            server_round=server_round,
            scale=codec.scale,
            secret=noise_secret,
            min_parties=min_parties or scenario.data.parties,
        )
        noise = np.asarray(noise)
        if noise.shape != (delta.size,) or noise.dtype.kind != "i":
            raise SecAggClientError(
                f"party {party}: distributed noise must be {delta.size} integers, "
                f"got {noise.dtype} {noise.shape}"
            )
        codec.add(body, codec.from_signed(noise), out=body)
    return vec


_DDP_STATE = "privfl.distributed-dp"  # in context.state: rounds this party added noise in
EPSILON_SIDE = side.key(side.EPSILON)


def _distributed_budget(
    msg: Message, scenario: Scenario, party: int, context: Context
) -> float | Message:
    """ε this party will have spent after this round, or its refusal past its budget.

    The party accounts for itself: one Gaussian release of its clipped update per round
    it joins, with the noise it adds sized so any sum it enters carries at least σ (no
    amplification is credited for the server's sampling).
    """
    rec = context.state.config_records.get(_DDP_STATE)
    if rec is None:
        rec = ConfigRecord({"rounds": 0})
        context.state.config_records[_DDP_STATE] = rec
    arrays = msg.content.array_records.get("arrays")
    dim = coordinates(arrays) if arrays is not None else 1
    after = distributed_epsilon(scenario, dim, int(rec["rounds"]) + 1)
    budget = scenario.defense.dp.epsilon
    if budget > 0 and after > budget * (1 + 1e-9):
        return refusal_reply(
            msg,
            f"party {party}: another round would spend ε={after:.4f} > my budget "
            f"defense.dp.epsilon={budget}",
        )
    return after


def _binding(msg: Message, rnd: int, parties: list[int], record: PartyRecord | None) -> bytes:
    """Digest of what this party was told this round: the global model and the parties.

    Bound into every ciphertext it seals this round (and expected on every one it opens),
    so parties that were sent different models or party lists (the model inconsistency
    attack) cannot complete the sum. Empty for a party that trusts the server.
    """
    if record is None or record.trust_server:
        return b""
    h = hashlib.sha256(b"privfl-round-binding-v1")
    h.update(struct.pack(">q", rnd))
    h.update(json.dumps(sorted(parties)).encode())
    arrays = msg.content.array_records.get("arrays")
    for key in sorted(arrays.keys()) if arrays is not None else []:
        a = arrays[key]
        h.update(json.dumps([key, a.dtype, list(a.shape)]).encode())
        h.update(_digest(a.data))
    return h.digest()


_DIGESTS: dict[int, tuple[bytes, bytes]] = {}
_DIGESTS_MAX_BYTES = 1 << 28  # the arrays kept alive for it, at most


def _digest(data: bytes) -> bytes:
    # SHA-256 of an array's bytes. Simulated parties of one process receive the same
    # immutable bytes object, so it is hashed once a round rather than once a party.
    if type(data) is not bytes:  # only immutable bytes can be remembered
        return hashlib.sha256(data).digest()
    hit = _DIGESTS.get(id(data))
    if hit is None or hit[0] is not data:
        hit = _DIGESTS[id(data)] = (data, hashlib.sha256(data).digest())
        held = sum(len(d) for d, _ in _DIGESTS.values())
        while held > _DIGESTS_MAX_BYTES and len(_DIGESTS) > 1:
            held -= len(_DIGESTS.pop(next(iter(_DIGESTS)))[0])
    return hit[1]


def _check_directory(
    cfg: ConfigRecord,
    directory: dict[int, tuple[bytes, ...]],
    *,
    session: bytes,
    me: AdditiveParty,
    record: PartyRecord | None,
) -> None:
    """Refuse an additive key directory unless every entry is signed by the party the
    roster names."""
    own = directory.get(me.party)
    if own is not None and tuple(own) != (me.public_key,):
        raise SecAggClientError(
            f"party {me.party}: the key directory holds someone else's keys for me"
        )
    if record is None or record.trust_server:
        return
    sigs = [bytes(x) for x in cfg.get(wire.PREFIX + "dir_sigs", [])]
    order = list(directory)
    if len(sigs) != len(order):
        raise RefusalError(
            f"party {me.party}: the key directory carries {len(sigs)} signatures for "
            f"{len(order)} parties; refusing unsigned keys"
        )
    try:
        for p, sig in zip(order, sigs, strict=True):
            verify_keys(record.roster, sig, session=session, party=p, keys=list(directory[p]))
    except IdentityError as exc:
        raise RefusalError(f"party {me.party}: {exc}") from None


def make_secagg_mod(
    noise_fn: NoiseFn | None = None,
    *,
    settings: SecAggSettings | None = None,
    check_fn: Callable[..., None] | None = None,
) -> Callable[[Message, Context, Callable[[Message, Context], Message]], Message]:
    """A :func:`secagg_mod` with an injected distributed-DP noise function or setup
    check (tests), or built with the party's own ``settings`` (a ClientApp without a
    privfl scenario: the party then releases its update only inside secure aggregation)."""

    def mod(
        msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        cfg = _config(msg)
        if msg.metadata.message_type != "train" or cfg is None:
            return call_next(msg, context)
        scenario: Scenario | None = None
        if settings is None:
            if SCENARIO_KEY not in cfg:
                return call_next(msg, context)
            scenario = _scenario(cfg)
            if scenario.defense.secure_aggregation == "none":
                return call_next(msg, context)
        party = _party(context)
        if wire.PREFIX + "session" not in cfg:
            raise SecAggClientError(
                f"party {party}: train message without a secure-aggregation session; "
                "this party releases its update only inside secure aggregation"
            )
        own = settings or SecAggSettings.from_scenario(scenario)
        session = bytes(cfg[wire.PREFIX + "session"])
        rnd = int(cfg["server-round"])
        parties = wire.ids(cfg[wire.PREFIX + "parties"])
        if party not in parties:
            raise SecAggClientError(f"party {party}: not among this round's parties {parties}")
        record = party_record(context)
        if own.protocol == "masking" and record is not None and not _in_session(context, session):
            # Not asked to register: a server that holds the federation's public roster
            # knows this party's static key already. Set up as registration would.
            _setup_masking(
                msg, context, scenario, party, own.codec, session, record, check_fn=check_fn
            )
        proto, st = _load(context, party, own.codec)
        if session != bytes.fromhex(st["session"]):
            raise SecAggClientError(
                f"party {party}: train message is for another key-setup session"
            )
        if wire.PREFIX + "dir_parties" in cfg:  # first round of an epoch (additive)
            directory = {
                int(p): (bytes(k),)
                for p, k in zip(
                    wire.ids(cfg[wire.PREFIX + "dir_parties"]),
                    cfg[wire.PREFIX + "dir_keys"],
                    strict=True,
                )
            }
            _check_directory(
                cfg, directory, session=bytes.fromhex(st["session"]), me=proto, record=record
            )
            st["directory"] = {str(p): k[0].hex() for p, k in directory.items()}
        if isinstance(proto, MaskingParty):
            k, t = _graph_settings(cfg, scenario, party, record)
            keys = _neighbour_keys(cfg, proto, neighbours_of(parties, k, party), record)
        bind = _binding(msg, rnd, parties, record)
        st.setdefault("bind", {})[str(rnd)] = bind.hex()
        spent = None
        if scenario is not None and scenario.defense.dp.mode == "distributed":
            spent = _distributed_budget(msg, scenario, party, context)
            if isinstance(spent, Message):
                _save(context, proto, st)
                return spent
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        vec = encode_update(
            msg,
            reply,
            settings or scenario,
            party,
            len(parties),
            noise_fn=noise_fn,
            noise_secret=record.noise_secret if record else None,
            min_parties=record.min_parties if record else None,
        )
        content = RecordDict()
        if isinstance(proto, MaskingParty):
            try:
                y, cts = proto.mask(
                    vec,
                    rnd=rnd,
                    parties=parties,
                    keys=keys,
                    neighbours=k,
                    threshold=t,
                    overwrite=True,
                    bind=bind,
                )
            except MaskingError as exc:
                raise SecAggClientError(str(exc)) from None
            content[wire.VECTOR] = wire.vector_record(y)
        else:
            context.state.array_records[wire.CACHE] = wire.vector_record(vec)
            directory = {int(p): bytes.fromhex(k) for p, k in st["directory"].items()}
            cts = proto.share(
                vec, rnd=rnd, attempt=0, parties=parties, directory=directory, bind=bind
            )
        if isinstance(proto, MaskingParty):
            content[wire.PAYLOAD] = ConfigRecord(
                {"round": rnd, "commit": proto.last_commitment, **wire.pack_cts(cts)}
            )
        else:
            content[wire.PAYLOAD] = ConfigRecord({"round": rnd, "attempt": 0})
            content[wire.SHARES] = wire.pack_shares(cts)
        for key, rec in side.records_of(reply.content).items():
            content[key] = rec
        if spent is not None:
            # The party's own account of what it released; public by design.
            rounds = int(context.state.config_records[_DDP_STATE]["rounds"]) + 1
            context.state.config_records[_DDP_STATE] = ConfigRecord({"rounds": rounds})
            content[EPSILON_SIDE] = ConfigRecord({"epsilon": spent, "party": party})
        _save(context, proto, st)
        return Message(content, reply_to=msg)

    return mod


secagg_mod = make_secagg_mod()
secagg_mod.__doc__ = (
    """Flower mod for the default train handler (no-op unless secure aggregation is on)."""
)


def _stage_context(
    msg: Message, context: Context, settings: SecAggSettings | None = None
) -> tuple[ConfigRecord, Scenario | None, int, SecAggSettings]:
    """The stage's config, the scenario it carries (None with the party's own
    ``settings``), the party index and its settings."""
    cfg = _config(msg)
    if cfg is None or (settings is None and SCENARIO_KEY not in cfg):
        raise SecAggClientError(
            f"node {context.node_id}: {msg.metadata.message_type} message without a scenario"
        )
    if settings is not None:
        return cfg, None, _party(context), settings
    scenario = _scenario(cfg)
    return cfg, scenario, _party(context), SecAggSettings.from_scenario(scenario)


def _masking_party(
    context: Context,
    party: int,
    codec: FixedPointCodec,
    session: bytes,
    record: PartyRecord | None,
) -> MaskingParty:
    """The party's masking side for ``session``: its static key is its identity key's
    (a roster party), else the random one it registered before, else a fresh one. The
    last round it masked carries over, so no session change lets a round be masked twice."""
    last, key = -1, None
    rec = context.state.config_records.get(wire.STATE)
    if rec is not None:
        st = json.loads(str(rec["json"]))
        if st.get("protocol") == "masking":
            old = MaskingParty.from_state(st["party"], codec)
            last, key = old.last_round, old.static_key
    if record is not None:
        key = dh_private(record.identity_key)
    proto = MaskingParty(
        party,
        codec,
        session,
        key or fresh_static_key(),
        repeat_rounds=record is not None and record.trust_server,
    )
    proto.last_round = last
    return proto


def _graph_settings(
    cfg: ConfigRecord, scenario: Scenario | None, party: int, record: PartyRecord | None
) -> tuple[int, int]:
    """``(neighbours, threshold)`` of the masking graph: the party's own scenario's where
    it has one (the server's must agree), else, or when it trusts the server, the server's."""
    asked = (int(cfg[wire.PREFIX + "neighbours"]), int(cfg[wire.PREFIX + "threshold"]))
    if scenario is None or (record is not None and record.trust_server):
        return asked
    own = (scenario.defense.secagg.neighbours, scenario.defense.secagg.threshold)
    if asked != own:
        raise RefusalError(
            f"party {party}: the server asks for masking with (neighbours, threshold) = "
            f"{asked}; my defense.secagg says {own}"
        )
    return own


def _neighbour_keys(
    cfg: ConfigRecord, proto: MaskingParty, hood: list[int], record: PartyRecord | None
) -> dict[int, bytes]:
    """The static keys of this round's neighbours: from the party's own roster, where it
    holds one (a relayed key that differs is refused), else as the server relays them."""
    try:
        relayed = wire.unpack_cts(cfg, wire.PREFIX + "nb_")
    except ValueError as exc:
        raise SecAggClientError(f"party {proto.party}: {exc}") from None
    mine = proto.public_key
    if relayed.pop(proto.party, mine) != mine:
        # Its neighbours would mask with a key this party does not hold: no sum.
        raise SecAggClientError(
            f"party {proto.party}: the server holds another static key for me than mine"
        )
    if record is None or record.trust_server:
        return relayed
    keys = {}
    for j in hood:
        if j not in record.roster:
            raise RefusalError(f"party {proto.party}: neighbour {j} is not on my roster")
        keys[j] = dh_public(record.roster[j])
        if j in relayed and relayed[j] != keys[j]:
            raise RefusalError(
                f"party {proto.party}: the server relayed a masking key for party {j} that "
                "is not the one its identity key on my roster gives: a forged or altered key "
                "directory"
            )
    return keys


def _check_setup(
    scenario: Scenario | None, dim: int, parties: int, check_fn: Callable[..., None] | None
) -> None:
    """The party's own distributed-DP check before it joins a session (raises)."""
    if scenario is not None and scenario.defense.dp.mode == "distributed":
        (check_fn or check_distributed)(scenario, dim=dim, parties=parties)


def _in_session(context: Context, session: bytes) -> bool:
    rec = context.state.config_records.get(wire.STATE)
    return rec is not None and rec.get("session") == session.hex()


def _setup_masking(
    msg: Message,
    context: Context,
    scenario: Scenario | None,
    party: int,
    codec: FixedPointCodec,
    session: bytes,
    record: PartyRecord | None,
    *,
    dim: int | None = None,
    parties: int = 0,
    check_fn: Callable[..., None] | None = None,
) -> MaskingParty:
    """This party's masking state for ``session``, checked against its own DP policy
    first; its static key is public (see :func:`_masking_party`)."""
    if dim is None:
        arrays = msg.content.array_records.get("arrays")
        dim = coordinates(arrays) if arrays else 0
    _check_setup(scenario, dim, record.min_parties if record else parties, check_fn)
    proto = _masking_party(context, party, codec, session, record)
    context.state.array_records.pop(wire.CACHE, None)
    _save(context, proto, {"protocol": "masking", "session": session.hex()})
    return proto


def handle_setup(
    msg: Message,
    context: Context,
    *,
    check_fn: Callable[..., None] | None = None,
    settings: SecAggSettings | None = None,
) -> Message:
    """Key setup (``advertise``): a fresh signed channel key (additive), or this party's
    static masking key (masking; once per run)."""
    cfg, scenario, party, own = _stage_context(msg, context, settings)
    codec = own.codec
    stage = str(cfg[wire.PREFIX + "stage"])
    session = bytes(cfg[wire.PREFIX + "session"])
    protocol = own.protocol
    if stage == "advertise":
        record = party_record(context)
        dim, n = int(cfg[wire.PREFIX + "dim"]), int(cfg[wire.PREFIX + "n"])
        if protocol == "masking":
            proto: Any = _setup_masking(
                msg,
                context,
                scenario,
                party,
                codec,
                session,
                record,
                dim=dim,
                parties=n,
                check_fn=check_fn,
            )
            return Message(
                RecordDict({wire.PAYLOAD: ConfigRecord({"dh_pk": proto.public_key})}),
                reply_to=msg,
            )
        _check_setup(scenario, dim, record.min_parties if record else n, check_fn)
        proto = AdditiveParty(party, codec, session)
        keys = [proto.public_key]
        out = ConfigRecord({"chan_pk": keys[0]})
        if record is not None:
            out["sig"] = sign_keys(record.identity_key, session=session, party=party, keys=keys)
        st: dict[str, Any] = {"protocol": protocol, "session": session.hex(), "directory": {}}
        context.state.array_records.pop(wire.CACHE, None)
        _save(context, proto, st)
        return Message(RecordDict({wire.PAYLOAD: out}), reply_to=msg)
    raise SecAggClientError(f"party {party}: unknown setup stage {stage!r}")


def handle_reshare(
    msg: Message, context: Context, *, settings: SecAggSettings | None = None
) -> Message:
    """Additive retry: fresh shares of the cached vector among the surviving parties."""
    cfg, _, party, own = _stage_context(msg, context, settings)
    proto, st = _load(context, party, own.codec)
    rnd, attempt = int(cfg["server-round"]), int(cfg[wire.PREFIX + "attempt"])
    cache = context.state.array_records.get(wire.CACHE)
    if cache is None:
        raise SecAggClientError(f"party {party}: nothing cached to re-share in round {rnd}")
    parties = wire.ids(cfg[wire.PREFIX + "parties"])
    directory = {int(p): bytes.fromhex(k) for p, k in st["directory"].items()}
    # Sealed under the round's binding, as the partial sums that open them expect.
    cts = proto.share(
        cache["v"].numpy(),
        rnd=rnd,
        attempt=attempt,
        parties=parties,
        directory=directory,
        bind=_stored_bind(st, rnd),
    )
    _save(context, proto, st)
    payload = ConfigRecord({"round": rnd, "attempt": attempt})
    content = RecordDict({wire.PAYLOAD: payload, wire.SHARES: wire.pack_shares(cts)})
    return Message(content, reply_to=msg)


def handle_partial_sum(
    msg: Message, context: Context, *, settings: SecAggSettings | None = None
) -> Message:
    """Additive: decrypt the routed shares, return their sum with the own share."""
    cfg, _, party, own = _stage_context(msg, context, settings)
    proto, st = _load(context, party, own.codec)
    directory = {int(p): bytes.fromhex(k) for p, k in st["directory"].items()}
    rnd = int(cfg["server-round"])
    try:
        total = proto.partial_sum(
            wire.unpack_shares(msg.content),
            rnd=rnd,
            attempt=int(cfg[wire.PREFIX + "attempt"]),
            parties=wire.ids(cfg[wire.PREFIX + "parties"]),
            directory=directory,
            dim=int(cfg[wire.PREFIX + "dim"]),
            bind=_stored_bind(st, rnd),
        )
    except ChannelError as exc:
        _save(context, proto, st)
        raise SecAggClientError(f"no partial sum released: {exc}") from None
    _save(context, proto, st)
    return Message(RecordDict({wire.VECTOR: wire.vector_record(total)}), reply_to=msg)


def handle_unmask(
    msg: Message, context: Context, *, settings: SecAggSettings | None = None
) -> Message:
    """Masking: reveal self-mask shares of survivors and round seeds with dropped parties."""
    cfg, _, party, own = _stage_context(msg, context, settings)
    proto, st = _load(context, party, own.codec)
    rnd = int(cfg["server-round"])
    rev = proto.unmask(
        rnd=rnd,
        survivors=wire.ids(cfg[wire.PREFIX + "survivors"]),
        dropped=wire.ids(cfg.get(wire.PREFIX + "dropped", [])),
        incoming=wire.unpack_cts(cfg, wire.PREFIX + "in_"),
        bind=_stored_bind(st, rnd),
    )
    _save(context, proto, st)
    payload = ConfigRecord(
        {
            **wire.pack_cts(rev["b"], "b_"),
            **wire.pack_cts(rev["seed"], "seed_"),
            "bad_from": sorted(rev["bad"]),
            "bad_why": [rev["bad"][p] for p in sorted(rev["bad"])],
        }
    )
    return Message(RecordDict({wire.PAYLOAD: payload}), reply_to=msg)


def _stored_bind(st: dict[str, Any], rnd: int) -> bytes:
    return bytes.fromhex(st.get("bind", {}).get(str(rnd), ""))


def register_secure_aggregation(
    app: Any,
    *,
    check_fn: Callable[..., None] | None = None,
    mods: list[Any] | None = None,
    settings: SecAggSettings | None = None,
) -> None:
    """Register the secure-aggregation stage handlers on a Flower ``ClientApp``
    (``mods``: the party's policy mod, so it guards every stage too; ``settings``: the
    party's own, as given to :func:`make_secagg_mod`, instead of the scenario in the
    messages)."""

    def setup(msg: Message, context: Context) -> Message:
        return handle_setup(msg, context, check_fn=check_fn, settings=settings)

    def reshare(msg: Message, context: Context) -> Message:
        return handle_reshare(msg, context, settings=settings)

    def partial_sum(msg: Message, context: Context) -> Message:
        return handle_partial_sum(msg, context, settings=settings)

    def unmask(msg: Message, context: Context) -> Message:
        return handle_unmask(msg, context, settings=settings)

    for msg_type, fn in zip(wire.STAGE_TYPES, (setup, reshare, partial_sum, unmask), strict=True):
        app.train(msg_type.split(".", 1)[1], mods=list(mods or []))(fn)
