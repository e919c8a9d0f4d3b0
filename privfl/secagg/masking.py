"""Pairwise + self masking with static keys and per-round seeds (SecAgg / SecAgg+ style).

Keys: every party ``i`` holds a static X25519 key pair ``(sk_i, pk_i)`` for the run: its
identity key read on the Montgomery curve (:func:`privfl.secagg.identity.dh_private`),
so every party derives every other's ``pk_j`` from its own roster, and a server that
holds the public roster reads them there; a party without a roster registers a random
one with the server once. The pair secret
``K_ij = X25519(sk_i, pk_j)`` never leaves the two parties.

Per round (two exchanges), among the round's parties ``P`` and on the graph
``N(i)`` (all of ``P``, or a k-regular Harary graph on ``P`` as in SecAgg+):

1. *masked input*: party ``i`` draws a fresh 16-byte self-mask seed ``b_i`` and sends
   ``y_i = x_i + PRG(b_i) + sum_{j in N(i)} sign(i, j) PRG(s_ij,r)`` (mod 2^k) with
   ``s_ij,r = HKDF(K_ij, session, round, {i, j})``, ``sign = +1`` if ``i < j`` else
   ``-1``, together with Shamir shares (threshold ``t``) of ``b_i`` for
   ``M(i) = N(i) + {i}``, each sealed for its holder with AES-GCM under a key derived
   from ``K_ij`` and the round. PRG is AES-128-CTR (:mod:`privfl.secagg.prg`).
2. *unmask*: the server names the survivors ``S`` (sent ``y``) and the dropped ``D``.
   Each responding party reveals, for its neighbours, its share of ``b_i`` if ``i`` in
   ``S`` and its round seed ``s_id,r`` if ``d`` in ``D`` -- never both for one party.
   With ``t`` shares per self-mask seed the server removes the self masks of ``S``, and
   with the revealed round seeds the masks between ``S`` and ``D``; pairwise masks
   inside ``S`` cancel.

What the server learns: every ``y_i`` is uniform on the ring (the self mask alone makes
it so) and independent of ``x_i``; after unmasking it learns ``sum_{i in S} x_i`` and the
round seeds of the pairs a dropped party had with survivors. Those seeds serve that
round only (HKDF of the pair secret with the round), so no key is ever revealed and no
party is re-keyed: a party's static key serves every sample of parties it is in. A
party masks a round number once: a second masking of the round would reuse seeds the
server may hold. Parties refuse to unmask when fewer than ``t`` of their
neighbourhood survived, so no aggregate of fewer than ``t`` inputs is revealed; fewer
than ``t`` unmask replies, or a survivor that drops out of the unmask stage while a
neighbour of it dropped out before (its round seed with that neighbour is known to no
one else), make the server raise :class:`MaskingError` rather than output a wrong sum.

Security is against an honest-but-curious server colluding with fewer than ``t``
parties. A server that lies about ``S`` to different parties needs, to strip party
``i``'s masks, every pair seed of ``i`` (revealed only by a party told the other one
dropped) and ``t`` shares of ``b_i`` (revealed only by parties told ``i`` survived);
``i`` itself reveals only while ``t`` of its neighbourhood survived. That needs
``2t <= k + 2``: with ``t`` above ``(k + 2) / 2`` (the default is more than two thirds of
a neighbourhood; an automatic threshold lowered for dropouts stays above it) it cannot be
had, as in SecAgg. SecAgg's consistency round (signed survivor lists), which
also covers colluding parties, is not run here.

The party and the server side live in one file so that the protocol reads in one place:
each side's checks are the other side's assumptions.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from privfl.errors import PrivflError
from privfl.fixedpoint import FixedPointCodec
from privfl.secagg import prg, shamir
from privfl.secagg.channel import ChannelError, derive, private_bytes, public_bytes

BSHARE_STAGE = "masking/bshare"
# Subsets of revealed shares tried to find the consistent ones when a share is corrupt.
_MAX_SUBSETS = 4096
# Pair secrets a party keeps between rounds beyond its current neighbours' (one X25519
# agreement saved per neighbour met again); the oldest go first.
PAIR_CACHE = 64
# Rounds whose self-mask share a party keeps while it waits for their unmask stage.
_KEEP_ROUNDS = 4
_NONCE = 12


def commit_seed(session: bytes, rnd: int, party: int, seed: bytes) -> bytes:
    """Hiding, binding commitment to a self-mask seed (SHA-256 of a 256-bit secret).

    Sent with the masked input, it lets the server tell a correctly reconstructed seed
    from one corrupted by a bad share, even with exactly ``t`` shares.
    """
    return hashlib.sha256(
        b"privfl-bseed|" + session + struct.pack(">qI", rnd, party) + seed
    ).digest()


class MaskingError(PrivflError, RuntimeError):
    """The sum cannot be recovered (too few survivors or shares, inconsistent shares)."""


def neighbourhoods(parties: Sequence[int], k: int) -> dict[int, list[int]]:
    """Each party's neighbours (itself excluded).

    ``k == 0`` or ``k >= len(parties) - 1``: everyone. Otherwise a k-regular Harary graph
    on the sorted parties (offsets ``+-1 .. +-k/2`` around a ring); ``k`` must be even.
    ``defense.secagg.auto_neighbours`` sizes ``k`` as SecAgg+ does (O(log n), see
    :meth:`privfl.config.SecAggSection.log_neighbours`).

    Security caveat: SecAgg+ (Bell et al. 2020) draws a *random* graph the server cannot
    predict; this one is deterministic and public. A server colluding with the ``k``
    parties placed around a victim holds all of the victim's pairwise masks and recovers
    its input from its masked input once its self mask is removed, so with
    ``0 < k < n - 1`` the guarantee holds only against collusions that do not cover a
    whole neighbourhood (all pairs: fewer than ``t`` parties).
    """
    ps = sorted(parties)
    return {p: _ring_neighbours(ps, k, idx) for idx, p in enumerate(ps)}


def neighbours_of(parties: Sequence[int], k: int, party: int) -> list[int]:
    """``neighbourhoods(parties, k)[party]``, without building the other parties' lists
    (a party needs only its own)."""
    ps = sorted(parties)
    if party not in ps:
        raise ValueError(f"party {party}: not among the parties {ps}")
    return _ring_neighbours(ps, k, ps.index(party))


def _ring_neighbours(ps: list[int], k: int, idx: int) -> list[int]:
    n, p = len(ps), ps[idx]
    if k == 0 or k >= n - 1:
        return [q for q in ps if q != p]
    if k % 2:
        raise ValueError(f"defense.secagg.neighbours must be even, got {k}")
    nb = {ps[(idx + o) % n] for o in range(1, k // 2 + 1)}
    nb |= {ps[(idx - o) % n] for o in range(1, k // 2 + 1)}
    return sorted(nb)


def resolve_threshold(threshold: int, neighbourhood_size: int) -> int:
    """Configured ``t`` or ``floor(2m/3) + 1`` for neighbourhoods of ``m`` (self included)."""
    t = threshold if threshold > 0 else (2 * neighbourhood_size) // 3 + 1
    if not 1 <= t <= neighbourhood_size:
        raise ValueError(
            f"defense.secagg.threshold: {t} must be in [1, {neighbourhood_size}] "
            "(the neighbourhood size, self included)"
        )
    return t


def round_seed(shared: bytes, *, session: bytes, rnd: int, i: int, j: int) -> bytes:
    """Seed of the round-``rnd`` mask between ``i`` and ``j`` from their pair secret."""
    lo, hi = sorted((i, j))
    info = b"privfl-mask|" + struct.pack(">qII", rnd, lo, hi)
    return derive(shared, salt=session, info=info, length=prg.SEED_BYTES)


def _share_aead(shared: bytes, session: bytes, rnd: int, sender: int, recipient: int) -> AESGCM:
    # One key per (round, sender, recipient): a share is sealed under it once.
    info = b"privfl-bshare|" + struct.pack(">qII", rnd, sender, recipient)
    return AESGCM(derive(shared, salt=session, info=info))


def _share_aad(session: bytes, rnd: int, sender: int, recipient: int, bind: bytes) -> bytes:
    return b"|".join(
        [BSHARE_STAGE.encode(), session, struct.pack(">qII", rnd, sender, recipient), bind]
    )


def _x(party: int) -> int:
    return party + 1  # Shamir point of a party (0 holds the secret)


def fresh_static_key() -> bytes:
    """A fresh static X25519 private key from the OS CSPRNG (a party without a roster)."""
    return private_bytes(X25519PrivateKey.generate())


class MaskingParty:
    """One party of the masking protocol (no networking; the caller relays bytes).

    Parameters
    ----------
    party : int
        This party's index.
    codec : FixedPointCodec
        The ring its input is encoded in.
    session : bytes
        The server's public identifier of the run's masking (salt of every seed and key).
    static_key : bytes
        Raw X25519 private key, static for the run (:func:`privfl.secagg.identity.dh_private`
        of the identity key, or :func:`fresh_static_key`).
    repeat_rounds : bool
        Mask a round number more than once (a party that trusts the server): a repeated
        round reuses its pairwise seeds, which the round replay attack exploits.
    """

    def __init__(
        self,
        party: int,
        codec: FixedPointCodec,
        session: bytes,
        static_key: bytes,
        *,
        repeat_rounds: bool = False,
    ) -> None:
        self.party = party
        self.codec = codec
        self.session = session
        self._sk = static_key
        self._key: X25519PrivateKey | None = None
        self.repeat_rounds = repeat_rounds
        # Pair secrets by peer public key, kept with the party's state (as secret as the
        # static key itself); expanded per round by HKDF.
        self._shared: dict[bytes, bytes] = {}
        # round -> (own share of b, neighbours' public keys, threshold)
        self._rounds: dict[int, tuple[bytes, dict[int, bytes], int]] = {}
        self.last_round = -1
        self.last_commitment = b""

    @property
    def static_key(self) -> bytes:
        """The raw static X25519 private key (kept in the party's own state only)."""
        return self._sk

    @property
    def public_key(self) -> bytes:
        """The static X25519 public key (registered with the server by a roster-less party)."""
        return public_bytes(self._private())

    def _private(self) -> X25519PrivateKey:
        if self._key is None:  # parsed once per message, not once per neighbour
            self._key = X25519PrivateKey.from_private_bytes(self._sk)
        return self._key

    def _pair(self, peer_public: bytes) -> bytes:
        shared = self._shared.get(peer_public)
        if shared is None:
            try:
                shared = self._private().exchange(X25519PublicKey.from_public_bytes(peer_public))
            except ValueError as exc:
                raise ChannelError(
                    f"party {self.party}: unusable X25519 public key of a neighbour: {exc}"
                ) from None
            self._shared[peer_public] = shared
        return shared

    def _trim(self, keep: set[bytes]) -> None:
        # The oldest pair secrets go first; those of the current round stay.
        extra = len(self._shared) - max(PAIR_CACHE, len(keep))
        for pk in [k for k in self._shared if k not in keep][: max(extra, 0)]:
            del self._shared[pk]

    def mask(
        self,
        encoded: np.ndarray,
        *,
        rnd: int,
        parties: Sequence[int],
        keys: Mapping[int, bytes],
        neighbours: int,
        threshold: int,
        overwrite: bool = False,
        bind: bytes = b"",
    ) -> tuple[np.ndarray, dict[int, bytes]]:
        """Masked input ``y`` and sealed shares of the fresh self-mask seed.

        ``parties`` are the round's parties, ``neighbours`` and ``threshold`` as in
        ``defense.secagg``; ``keys`` holds the static public key of every neighbour.
        :attr:`last_commitment` then holds the seed's commitment (:func:`commit_seed`) to
        send with ``y``; ``bind`` is authenticated into every share ciphertext.
        ``overwrite=True`` masks ``encoded`` in place (it must be writeable and
        contiguous) and returns it: no second vector of ``d`` words, for callers that
        drop the plain input anyway.
        """
        me = f"party {self.party}"
        if rnd <= self.last_round and not self.repeat_rounds:
            raise MaskingError(
                f"{me}: already masked round {self.last_round}; refusing round {rnd} "
                "(a repeated round would reuse seeds the server may hold)"
            )
        hood = neighbours_of(parties, neighbours, self.party)
        missing = [j for j in hood if j not in keys]
        if missing:
            raise MaskingError(f"{me}: no static key for neighbours {missing}")
        t = resolve_threshold(threshold, len(hood) + 1)
        x = np.asarray(encoded)
        if x.dtype != self.codec.dtype or x.ndim != 1:
            raise ValueError(
                f"{me}: encoded input must be a 1-d {self.codec.dtype} vector, "
                f"got {x.dtype} {x.shape}"
            )
        b = os.urandom(prg.SEED_BYTES)
        seeds = self.mask_seeds(rnd, {j: keys[j] for j in hood}, b)
        # One pass over y: all masks expanded chunk-wise and added to x on the fly.
        if overwrite:
            y = prg.accumulate(x, seeds, self.codec.ring_bits)
        else:
            y = prg.accumulate(np.empty_like(x), seeds, self.codec.ring_bits, base=x)
        shares = shamir.share_bytes(b, [_x(p) for p in [self.party, *hood]], t)
        self._rounds[rnd] = (shares[_x(self.party)], {j: keys[j] for j in hood}, t)
        for old in sorted(self._rounds)[:-_KEEP_ROUNDS]:
            del self._rounds[old]
        self.last_round = max(self.last_round, rnd)
        self.last_commitment = commit_seed(self.session, rnd, self.party, b)
        cts = {}
        for j in hood:
            nonce = os.urandom(_NONCE)
            aad = _share_aad(self.session, rnd, self.party, j, bind)
            aead = _share_aead(self._pair(keys[j]), self.session, rnd, self.party, j)
            cts[j] = nonce + aead.encrypt(nonce, shares[_x(j)], aad)
        self._trim({keys[j] for j in hood})
        return y, cts

    def mask_seeds(
        self, rnd: int, keys: Mapping[int, bytes], self_seed: bytes
    ) -> list[tuple[bytes, int]]:
        """``(seed, sign)`` of every mask this party adds in round ``rnd`` with the
        neighbours whose static keys are ``keys``: the self mask first."""
        out = [(self_seed, 1)]
        for j, pk in keys.items():
            seed = round_seed(self._pair(pk), session=self.session, rnd=rnd, i=self.party, j=j)
            out.append((seed, 1 if self.party < j else -1))
        return out

    def _open(self, sender: int, shared: bytes, blob: bytes, rnd: int, bind: bytes) -> bytes:
        if len(blob) < _NONCE + 16:
            raise ChannelError(f"share from party {sender} is truncated ({len(blob)} bytes)")
        aad = _share_aad(self.session, rnd, sender, self.party, bind)
        aead = _share_aead(shared, self.session, rnd, sender, self.party)
        try:
            return aead.decrypt(bytes(blob[:_NONCE]), bytes(blob[_NONCE:]), aad)
        except InvalidTag:
            raise ChannelError(
                f"share from party {sender} (round {rnd}) failed authentication: tampered, "
                "misrouted, from another round or session, not from that sender, or sealed "
                "over a different global model or party list"
            ) from None

    def unmask(
        self,
        *,
        rnd: int,
        survivors: Sequence[int],
        dropped: Sequence[int],
        incoming: Mapping[int, bytes],
        bind: bytes = b"",
    ) -> dict[str, Any]:
        """Reveal, per neighbour, its self-mask share if it survived, else the round seed.

        Returns ``{"b": {owner: share}, "seed": {dropped: round seed}, "bad": {sender:
        reason}}``. A share ciphertext that fails authentication is left out and its
        sender named under ``"bad"``: the honest recipient still reveals the rest, so one
        bad share costs at most that one share, never this party's whole reply.
        """
        S, D = set(survivors), set(dropped)
        me = f"party {self.party}"
        if S & D:
            raise MaskingError(f"{me}: parties {sorted(S & D)} named both survivor and dropped")
        if self.party not in S:
            raise MaskingError(f"{me}: asked to unmask round {rnd} without being a survivor")
        if rnd not in self._rounds:
            raise MaskingError(f"{me}: no masked input of mine awaits unmasking in round {rnd}")
        own_share, keys, t = self._rounds.pop(rnd)
        hood = set(keys) | {self.party}
        if len(S & hood) < t:
            raise MaskingError(
                f"{me}: only {len(S & hood)} of my neighbourhood survived round {rnd}, "
                f"threshold is {t}; refusing to unmask"
            )
        if not hood <= (S | D):
            raise MaskingError(
                f"{me}: neighbours {sorted(hood - S - D)} neither survived nor dropped"
            )
        expected = (S & hood) - {self.party}
        if set(incoming) != expected:
            raise MaskingError(
                f"{me}: expected self-mask shares from {sorted(expected)}, got {sorted(incoming)}"
            )
        bshares = {self.party: own_share}
        bad: dict[int, str] = {}
        for s, ct in incoming.items():
            try:
                bshares[s] = self._open(s, self._pair(keys[s]), ct, rnd, bind)
            except ChannelError as exc:
                bad[s] = str(exc)
        seeds = {
            d: round_seed(self._pair(keys[d]), session=self.session, rnd=rnd, i=self.party, j=d)
            for d in sorted(D & hood)
        }
        return {"b": bshares, "seed": seeds, "bad": bad}

    def to_state(self) -> dict[str, Any]:
        """JSON-able state for ``context.state``."""
        return {
            "party": self.party,
            "session": self.session.hex(),
            "sk": self._sk.hex(),
            "repeat": self.repeat_rounds,
            "last": self.last_round,
            "rounds": {
                str(r): [s.hex(), {str(p): k.hex() for p, k in keys.items()}, t]
                for r, (s, keys, t) in self._rounds.items()
            },
            "shared": [[k.hex(), v.hex()] for k, v in self._shared.items()],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], codec: FixedPointCodec) -> MaskingParty:
        """Inverse of :meth:`to_state`."""
        p = cls(
            int(state["party"]),
            codec,
            bytes.fromhex(state["session"]),
            bytes.fromhex(state["sk"]),
            repeat_rounds=bool(state["repeat"]),
        )
        p.last_round = int(state["last"])
        p._rounds = {
            int(r): (bytes.fromhex(s), {int(q): bytes.fromhex(k) for q, k in keys.items()}, t)
            for r, (s, keys, t) in state["rounds"].items()
        }
        p._shared = {bytes.fromhex(k): bytes.fromhex(v) for k, v in state["shared"]}
        return p


class MaskingServer:
    """The server's side of one round: plan the unmask stage and remove the masks.

    Parameters
    ----------
    codec : FixedPointCodec
        The public codec.
    session : bytes
        The run's masking session.
    parties : Sequence[int]
        The round's parties (those asked for a masked input).
    threshold, neighbours : int
        As in ``defense.secagg`` (0 = automatic / all pairs).
    """

    def __init__(
        self,
        codec: FixedPointCodec,
        session: bytes,
        parties: Sequence[int],
        *,
        threshold: int,
        neighbours: int,
    ) -> None:
        self.codec = codec
        self.session = session
        self.parties = sorted(parties)
        self.graph = neighbourhoods(self.parties, neighbours)
        size = len(next(iter(self.graph.values()))) + 1
        self.threshold = resolve_threshold(threshold, size)
        # What went wrong, and who is to blame where that can be told: {party, stage, reason}.
        self.faults: list[dict[str, Any]] = []

    def plan_unmask(
        self,
        masked: Mapping[int, np.ndarray],
        bshares: Mapping[int, Mapping[int, bytes]],
    ) -> tuple[list[int], list[int], dict[int, dict[int, bytes]]]:
        """Survivors, dropped, and per survivor the self-mask share ciphertexts to forward."""
        S = [p for p in self.parties if p in masked and p in bshares]
        D = sorted(set(self.parties) - set(S))
        if len(S) < self.threshold:
            raise MaskingError(
                f"masking: only {len(S)} parties sent masked input (dropped: {D}); "
                f"threshold is {self.threshold}, the sum cannot be recovered"
            )
        for s in S:
            if set(bshares[s]) != set(self.graph[s]):
                raise MaskingError(f"masking: party {s} sent self-mask shares to the wrong parties")
        routed: dict[int, dict[int, bytes]] = {p: {} for p in S}
        for s in S:
            for r, ct in bshares[s].items():
                if r in routed:
                    routed[r][s] = ct
        return S, D, routed

    def _recover(
        self,
        what: str,
        owner: int,
        shares: dict[int, bytes],
        check: Callable[[bytes], bool],
    ) -> bytes:
        """The secret behind ``shares``, verified by ``check``; corrupt shares are named.

        ``check`` (a commitment or a public key) tells a right secret from a wrong one, so
        a corrupted share is always detected. With more than ``t`` shares the consistent
        ``t``-subset is searched for and the holders of the others are recorded in
        :attr:`faults`; with exactly ``t`` it cannot be told whose share is bad, and
        :class:`MaskingError` says so.
        """
        t = self.threshold
        if len(shares) < t:
            raise MaskingError(
                f"masking: {len(shares)} shares of {what} of party {owner} arrived, "
                f"threshold is {t}; the sum cannot be recovered"
            )
        pts = {_x(p): v for p, v in shares.items()}
        for tries, subset in enumerate(itertools.combinations(sorted(pts), t)):
            if tries >= _MAX_SUBSETS:
                break
            try:
                secret = shamir.reconstruct_bytes({x: pts[x] for x in subset}, t)
            except shamir.ShamirError:
                continue
            if not check(secret):
                continue
            extra = {x: pts[x] for x in sorted(set(pts) - set(subset))}
            fits = shamir.on_polynomial({x: pts[x] for x in subset}, extra)
            for x in sorted(x for x, ok in fits.items() if not ok):
                self.faults.append(
                    {
                        "party": x - 1,
                        "stage": "unmask",
                        "reason": f"revealed a corrupted share of {what} of party {owner}",
                    }
                )
            return secret
        holders = sorted(x - 1 for x in pts)
        raise MaskingError(
            f"masking: inconsistent shares of {what} of party {owner}: they do not "
            f"reconstruct it; a share from parties {holders} is corrupted"
            + ("" if len(pts) > t else f"; with exactly t = {t} shares it cannot be told whose")
        )

    def unmask(
        self,
        rnd: int,
        masked: Mapping[int, np.ndarray],
        survivors: Sequence[int],
        dropped: Sequence[int],
        reveals: Mapping[int, Mapping[str, Mapping[int, bytes]]],
        commitments: Mapping[int, bytes] | None = None,
    ) -> np.ndarray:
        """The sum of the survivors' encoded inputs (ring elements).

        ``commitments`` (survivor -> :func:`commit_seed` sent with its masked input) let
        every reconstructed self-mask seed be checked; without one a seed is accepted
        only if two different share subsets agree on it.
        """
        dim = np.asarray(masked[survivors[0]]).size
        acc = np.zeros(dim, dtype=self.codec.dtype)
        for s in survivors:
            y = np.asarray(masked[s])
            if y.dtype != self.codec.dtype or y.shape != (dim,):
                raise MaskingError(f"masking: masked input of party {s} is malformed")
            np.add(acc, y, out=acc)  # wraps modulo the word size; reduced by accumulate
        if len(reveals) < self.threshold:
            raise MaskingError(
                f"masking: only {len(reveals)} parties answered the unmask stage "
                f"(threshold {self.threshold}); the sum cannot be recovered"
            )
        undo: list[tuple[bytes, int]] = []
        for s in survivors:
            shares = {r: rv["b"][s] for r, rv in reveals.items() if s in rv.get("b", {})}
            undo.append(
                (
                    self._recover(
                        "the self-mask seed",
                        s,
                        shares,
                        self._seed_check(rnd, s, shares, commitments),
                    ),
                    -1,
                )
            )
        for d in dropped:
            for s in self.graph[d]:
                if s not in survivors:
                    continue
                rv = reveals.get(s)
                if rv is None:
                    raise MaskingError(
                        f"masking: party {s} did not answer the unmask stage, and only it "
                        f"holds its round seed with dropped party {d}; the sum cannot be "
                        "recovered"
                    )
                seed = rv.get("seed", {}).get(d)
                if seed is None or len(seed) != prg.SEED_BYTES:
                    raise MaskingError(
                        f"masking: party {s} did not reveal its round seed with dropped party {d}"
                    )
                # Survivor s added +m if s < d, -m otherwise: undo it.
                undo.append((bytes(seed), -1 if s < d else 1))
        return prg.accumulate(acc, undo, self.codec.ring_bits)

    def _seed_check(
        self,
        rnd: int,
        owner: int,
        shares: Mapping[int, bytes],
        commitments: Mapping[int, bytes] | None,
    ) -> Callable[[bytes], bool]:
        if commitments is not None and owner in commitments:
            want = commitments[owner]
            return lambda seed: (
                len(seed) == prg.SEED_BYTES and commit_seed(self.session, rnd, owner, seed) == want
            )
        # No commitment: accept a seed only if every revealed share lies on its polynomial.
        t = self.threshold
        pts = {_x(p): v for p, v in shares.items()}

        def all_consistent(seed: bytes) -> bool:
            if len(seed) != prg.SEED_BYTES:
                return False
            first = sorted(pts)[: t - 1]
            for x in pts:
                probe = {y: pts[y] for y in first if y != x}
                probe[x] = pts[x]
                extra = [y for y in sorted(pts) if y not in probe]
                while len(probe) < t:
                    y = extra.pop(0)
                    probe[y] = pts[y]
                try:
                    if shamir.reconstruct_bytes(probe, t) != seed:
                        return False
                except shamir.ShamirError:
                    return False
            return True

        return all_consistent
