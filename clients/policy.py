"""A party's own policy, enforced before anything derived from its data leaves it.

The party holds its defenses in its own copy of the scenario (handed to its ClientApp
locally, never taken from a server message). :func:`make_policy_mod` is the outermost
client mod: it checks every server message against that policy and either refuses it
(an error reply whose reason starts with :data:`REFUSAL_PREFIX`, nothing computed on the
data) or hands the inner handlers the party's own scenario, with only the training
hyper-parameters the server may choose taken from the message.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import os
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

from privfl.config import SCENARIO_KEY, Scenario, ScenarioError, scenario_from_json
from privfl.data import cache_dir
from privfl.dp import seed_secret
from privfl.flower import wire
from privfl.flower.wire import PREFIX as _SA
from privfl.refusal import (  # noqa: F401  (re-exported: the party side of refusals)
    REFUSAL_CODE,
    REFUSAL_PREFIX,
    RefusalError,
    refusal_reason,
    refusal_reply,
)
from privfl.results import atomic_write_private
from privfl.secagg.identity import IdentityError, derive_identity, derive_roster

# --------------------------------------------------------------------------- the policy

STATE_KEY = "privfl.party"  # in context.state: the party's local record (never sent)
LAB_SECRET_ENV = "PRIVFL_LAB_SECRET"
_STAGE_PREFIX = "train.privfl_secagg_"


@dataclass(frozen=True)
class PartyPolicy:
    """Everything a party holds locally: its scenario (its defenses), its keys, its secrets.

    Parameters
    ----------
    scenario : Scenario
        The party's own copy of the scenario; ``defense.*`` and ``party.*`` are its policy.
    party : int
        This party's index.
    identity_key : bytes
        Raw Ed25519 private key that signs its secure-aggregation keys.
    roster : Mapping[int, bytes]
        Every party's identity public key, obtained out of band.
    lab_secret : bytes, optional
        Keys reproducible noise when ``party.noise = "lab"``; never sent anywhere.
    """

    scenario: Scenario
    party: int
    identity_key: bytes
    roster: Mapping[int, bytes]
    lab_secret: bytes | None = None

    @functools.cached_property
    def roster_lists(self) -> tuple[tuple[int, ...], tuple[bytes, ...]]:
        """The roster as the party's state holds it: sorted parties, aligned keys."""
        parties = tuple(sorted(self.roster))
        return parties, tuple(self.roster[p] for p in parties)

    @property
    def trust_server(self) -> bool:
        """Teaching mode: the party does what the server's messages ask."""
        return self.scenario.party.trust_server

    @property
    def min_parties(self) -> int:
        """The fewest parties whose inputs a sum may hold before this party joins it.

        Automatic (0) sizes it for the parties of one round as the party's own scenario
        says (``scenario.parties_per_round``, else ``data.parties``), never the server.
        """
        own = self.scenario
        return own.party.resolve_min_parties(own.scenario.per_round(own.data.parties))

    def noise_secret(self, requested: Scenario | None) -> bytes | None:
        """The key material of this party's DP noise and sampling coins (None: the OS)."""
        if self.trust_server:
            return seed_secret(requested or self.scenario)
        if self.scenario.party.noise == "lab":
            if self.lab_secret is None:
                raise RefusalError(
                    'party.noise = "lab" but this party holds no lab secret '
                    f"(set {LAB_SECRET_ENV} or node config 'lab-secret')"
                )
            return self.lab_secret
        return None


def lab_secret() -> bytes:
    """This machine's lab secret: ``$PRIVFL_LAB_SECRET`` (hex), else a random secret kept
    (0600) in privfl's cache, created on first use. It keys reproducible noise and the
    simulated parties' identity keys; no message and no result holds it."""
    env = os.environ.get(LAB_SECRET_ENV, "").strip()
    if env:
        try:
            return bytes.fromhex(env)
        except ValueError as exc:
            raise RefusalError(f"{LAB_SECRET_ENV} must be hex, got {env[:8]!r}...") from exc
    path = cache_dir() / "lab-secret"
    if not path.is_file():
        atomic_write_private(path, os.urandom(32).hex())  # concurrent parties: one file wins
    return bytes.fromhex(path.read_text().strip())


def simulation_policy(scenario: Scenario, party: int, secret: bytes | None = None) -> PartyPolicy:
    """The policy of party ``party`` in a simulated federation: every party holds the
    scenario file and derives its identity key from the machine's lab secret."""
    secret = lab_secret() if secret is None else secret
    return PartyPolicy(
        scenario=scenario,
        party=party,
        identity_key=derive_identity(secret, party),
        roster=_roster(secret, scenario.data.parties),
        lab_secret=secret,
    )


def simulation_roster(parties: int, secret: bytes | None = None) -> Mapping[int, bytes]:
    """The public roster of a simulated federation (party -> identity public key): what
    :func:`simulation_policy` hands every party, and what the operator of a deployment
    hands everyone. Public keys only."""
    return _roster(lab_secret() if secret is None else secret, parties)


@functools.lru_cache(maxsize=4)
def _roster(secret: bytes, parties: int) -> Mapping[int, bytes]:
    # Simulated parties in one process share one roster: n parties, not n^2 key derivations.
    return types.MappingProxyType(derive_roster(secret, parties))


# --------------------------------------------------------------------------- dropouts

DROPOUT_CODE = 4408
DROPOUT_PREFIX = "privfl dropout: "
# Where each message falls in a round; a party that drops out answers nothing from its
# dropout stage on.
_STAGE_ORDER = {"advertise": 0, "train": 1, "sum": 2, "reshare": 2, "unmask": 2}


def drops_out(scenario: Scenario, party: int, server_round: int) -> bool:
    """Whether simulated ``party`` drops out of ``server_round`` (``scenario.dropout_rate``).

    A public, reproducible coin from the seed, the round and the party: a dropout is a
    simulated network failure, not a secret.
    """
    rate = scenario.scenario.dropout_rate
    if not rate:
        return False
    label = f"privfl-dropout|{scenario.scenario.seed}|{server_round}|{party}".encode()
    coin = int.from_bytes(hashlib.sha256(label).digest()[:8], "big") / 2.0**64
    return coin < rate


def _message_stage(mtype: str, cfg: ConfigRecord) -> str | None:
    if mtype == "train":
        return "train"
    if not mtype.startswith(_STAGE_PREFIX):
        return None
    stage = mtype.removeprefix(_STAGE_PREFIX)
    return str(cfg.get(_SA + "stage", "")) if stage == "setup" else stage


def _dropped(policy: PartyPolicy, mtype: str, cfg: ConfigRecord) -> bool:
    own = policy.scenario.scenario
    stage = _message_stage(mtype, cfg)
    if not own.dropout_rate or stage not in _STAGE_ORDER:
        return False
    if _STAGE_ORDER[stage] < _STAGE_ORDER[own.dropout_stage]:
        return False
    return drops_out(policy.scenario, policy.party, int(cfg.get("server-round", 0)))


def _check_defenses(own: Scenario, requested: Scenario) -> None:
    mine, asked = own.to_dict()["defense"], requested.to_dict()["defense"]
    diffs = sorted(_diff(mine, asked, "defense"))
    if diffs:
        shown = "; ".join(f"{k} = {a!r} (my policy: {m!r})" for k, m, a in diffs[:4])
        more = f"; and {len(diffs) - 4} more" if len(diffs) > 4 else ""
        raise RefusalError(f"downgrade refused: the server asked for {shown}{more}")


def _diff(mine: Any, asked: Any, key: str) -> list[tuple[str, Any, Any]]:
    if isinstance(mine, dict) and isinstance(asked, dict):
        out = []
        for k in sorted(set(mine) | set(asked)):
            out += _diff(mine.get(k), asked.get(k), f"{key}.{k}")
        return out
    return [] if mine == asked else [(key, mine, asked)]


def _check_training(policy: PartyPolicy, requested: Scenario) -> None:
    p, t = policy.scenario.party, requested.training
    if p.max_local_steps and (t.local_steps == 0 or t.local_steps > p.max_local_steps):
        raise RefusalError(
            f"training.local_steps = {t.local_steps} exceeds party.max_local_steps = "
            f"{p.max_local_steps}"
        )
    if t.batch_size < p.min_batch_size:
        raise RefusalError(
            f"training.batch_size = {t.batch_size} is below party.min_batch_size = "
            f"{p.min_batch_size}"
        )
    if p.max_lr and t.lr > p.max_lr:
        raise RefusalError(f"training.lr = {t.lr} exceeds party.max_lr = {p.max_lr}")


@functools.lru_cache(maxsize=64)
def _effective(own_json: str, training_json: str) -> Scenario:
    raw = json.loads(own_json)
    raw["training"] = json.loads(training_json)
    return Scenario.from_dict(raw)


def effective_scenario(own: Scenario, requested: Scenario | None) -> Scenario:
    """The party's own scenario with the training hyper-parameters the server chose."""
    if requested is None:
        return own
    return _effective(own.to_json(), json.dumps(requested.to_dict()["training"]))


def _state(context: Context) -> ConfigRecord:
    rec = context.state.config_records.get(STATE_KEY)
    if rec is None:
        rec = ConfigRecord({"last-round": 0, "sum-released": 0})
        context.state.config_records[STATE_KEY] = rec
    return rec


def _parties(cfg: ConfigRecord, key: str) -> list[int]:
    return wire.ids(cfg.get(key, []))


def _check_masking_graph(policy: PartyPolicy, cfg: ConfigRecord) -> None:
    # The Shamir threshold and the neighbour graph decide how many colluders can unmask
    # a party: they come from the party's own policy, never from the server's message.
    sec = policy.scenario.defense.secagg
    t, k = int(cfg.get(_SA + "threshold", -1)), int(cfg.get(_SA + "neighbours", -1))
    if (t, k) != (sec.threshold, sec.neighbours):
        raise RefusalError(
            f"masking with threshold {t} and {k} neighbours refused: my policy "
            f"says threshold {sec.threshold} and {sec.neighbours} neighbours (0 = automatic / "
            "all pairs)"
        )


def _check_stage(policy: PartyPolicy, mtype: str, cfg: ConfigRecord, state: ConfigRecord) -> None:
    own = policy.scenario.defense.secure_aggregation
    if own == "none":
        raise RefusalError(
            f"{mtype}: my policy runs no secure aggregation, so I join no protocol stage"
        )
    stage = mtype.removeprefix(_STAGE_PREFIX)
    m = policy.min_parties
    if stage == "setup":
        n = int(cfg.get(_SA + "n", 0))
        if n < m and policy.scenario.defense.secure_aggregation == "additive":
            raise RefusalError(f"key setup among {n} parties refused: party.min_parties is {m}")
        return
    rnd, current = int(cfg.get("server-round", -1)), int(state["last-round"])
    if rnd != current:
        raise RefusalError(
            f"{stage} for round {rnd} refused: my current round is {current} "
            "(rounds only move forward)"
        )
    key = _SA + ("survivors" if stage == "unmask" else "parties")
    n = len(_parties(cfg, key))
    if n < m:
        raise RefusalError(
            f"{stage} over {n} parties refused: party.min_parties is {m} "
            "(a smaller sum would expose too few inputs)"
        )
    if stage in ("reshare", "sum") and int(state["sum-released"]) == rnd:
        raise RefusalError(
            f"{stage} in round {rnd} refused: I already released a partial sum this round, "
            "so my input may already be in a completed sum"
        )


def make_policy_mod(policy_of: Callable[[Context], PartyPolicy]) -> Mod:
    """The outermost client mod: enforce the party's own policy on every server message.

    ``policy_of(context)`` returns the party's :class:`PartyPolicy` (held locally). With
    ``party.trust_server`` the message passes as sent (teaching mode). Otherwise the mod
    refuses a train or evaluate request whose ``defense`` differs from the party's own,
    whose training hyper-parameters break the policy's bounds, that repeats a round, or
    whose secure-aggregation sum is smaller than ``party.min_parties``; a protocol stage
    for another round, or a re-share after a released partial sum. What passes reaches the
    inner handlers with the party's own scenario in its config.
    """

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        mtype = msg.metadata.message_type
        if mtype.startswith("query"):
            return call_next(msg, context)
        try:
            policy = policy_of(context)
        except (RefusalError, ScenarioError, IdentityError, OSError) as exc:
            return refusal_reply(msg, f"no party policy: {exc}")
        cfg = msg.content.config_records.get("config")
        if cfg is None:
            cfg = ConfigRecord()
            msg.content["config"] = cfg
        if _dropped(policy, mtype, cfg):
            # A dropped party sends nothing; an error reply stands in for the silence so
            # the server need not wait out its timeout.
            reason = f"party {policy.party} dropped out of round {cfg.get('server-round')}"
            return Message(Error(code=DROPOUT_CODE, reason=DROPOUT_PREFIX + reason), reply_to=msg)
        requested = scenario_from_json(str(cfg[SCENARIO_KEY])) if SCENARIO_KEY in cfg else None
        state = _state(context)
        _publish(context, policy, requested, state)
        if policy.trust_server:
            if requested is None:
                cfg[SCENARIO_KEY] = policy.scenario.to_json()
            if mtype == "train":
                state["last-round"] = int(cfg.get("server-round", 0))
            return call_next(msg, context)
        try:
            if mtype.startswith(_STAGE_PREFIX):
                _check_stage(policy, mtype, cfg, state)
            else:
                if requested is not None:
                    _check_defenses(policy.scenario, requested)
                    _check_training(policy, requested)
                if mtype == "evaluate" and _withhold_evaluation(policy.scenario):
                    raise RefusalError(
                        "evaluation withheld: my policy releases no evaluation under DP "
                        '(party.evaluation = "release" allows it)'
                    )
                if mtype == "train":
                    _check_train_round(policy, cfg, state)
        except RefusalError as exc:
            return refusal_reply(msg, str(exc))
        cfg[SCENARIO_KEY] = effective_scenario(policy.scenario, requested).to_json()
        try:
            reply = call_next(msg, context)
        except RefusalError as exc:  # a guard inside (e.g. an unsigned key directory)
            return refusal_reply(msg, str(exc))
        if mtype == _STAGE_PREFIX + "sum" and not reply.has_error():
            state["sum-released"] = int(cfg["server-round"])
        return reply

    return mod


def _withhold_evaluation(own: Scenario) -> bool:
    ev = own.party.evaluation
    return ev == "withhold" or (ev == "auto" and own.defense.dp.mode != "none")


def _check_train_round(policy: PartyPolicy, cfg: ConfigRecord, state: ConfigRecord) -> None:
    if "server-round" not in cfg:
        raise RefusalError("train request without a server-round")
    rnd, last = int(cfg["server-round"]), int(state["last-round"])
    if rnd <= last:
        raise RefusalError(
            f"round {rnd} refused: I already trained in round {last} and rounds only move "
            "forward (a replayed round would reuse its masks)"
        )
    if policy.scenario.defense.secure_aggregation == "masking":
        _check_masking_graph(policy, cfg)
    if policy.scenario.defense.secure_aggregation != "none":
        n = len(_parties(cfg, _SA + "parties"))
        if n < policy.min_parties:
            raise RefusalError(
                f"round {rnd} refused: its sum would hold {n} parties, "
                f"party.min_parties is {policy.min_parties}"
            )
    # The round is taken once accepted, whatever happens next: it can never be replayed.
    state["last-round"] = rnd


# --------------------------------------------------------------------------- local record


class RosterView(Mapping[int, bytes]):
    """The roster as the party's state holds it (sorted parties, aligned keys), read
    without building a dict of every party of the federation on each message."""

    def __init__(self, parties: list[int], keys: list[bytes]) -> None:
        if len(parties) != len(keys):
            raise ValueError(f"roster of {len(parties)} parties and {len(keys)} keys")
        self._parties, self._keys = parties, keys

    def __getitem__(self, party: int) -> bytes:
        i = bisect.bisect_left(self._parties, party)
        if i == len(self._parties) or self._parties[i] != party:
            raise KeyError(party)
        return bytes(self._keys[i])

    def __iter__(self) -> Iterator[int]:
        return iter(self._parties)

    def __len__(self) -> int:
        return len(self._parties)


@dataclass(frozen=True)
class PartyRecord:
    """What the inner handlers and mods read of the policy (from ``context.state``)."""

    party: int
    trust_server: bool
    min_parties: int
    noise_secret: bytes | None
    identity_key: bytes
    roster: Mapping[int, bytes]


def _publish(
    context: Context, policy: PartyPolicy, requested: Scenario | None, state: ConfigRecord
) -> None:
    # The inner mods and handlers read the policy from the node's own state; it never
    # leaves the node.
    noise = policy.noise_secret(requested)
    state["party"] = policy.party
    state["trust"] = policy.trust_server
    state["min-parties"] = (
        (requested or policy.scenario).data.parties if policy.trust_server else policy.min_parties
    )
    state["noise-secret"] = noise if noise is not None else b""
    state["identity-key"] = policy.identity_key
    parties, keys = policy.roster_lists
    # Written only when changed: a record type-checks every item of a list it is given.
    if state.get("roster-parties") != list(parties) or state.get("roster-keys") != list(keys):
        state["roster-parties"] = list(parties)
        state["roster-keys"] = list(keys)


def party_record(context: Context) -> PartyRecord | None:
    """The party's local record, or None when no policy mod runs in front."""
    rec = context.state.config_records.get(STATE_KEY)
    if rec is None or "party" not in rec:
        return None
    secret = bytes(rec["noise-secret"])
    return PartyRecord(
        party=int(rec["party"]),
        trust_server=bool(rec["trust"]),
        min_parties=int(rec["min-parties"]),
        noise_secret=secret or None,
        identity_key=bytes(rec["identity-key"]),
        roster=RosterView(rec["roster-parties"], rec["roster-keys"]),
    )
