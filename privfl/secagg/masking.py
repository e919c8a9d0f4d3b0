"""Pairwise + self masking with Shamir-shared recovery (SecAgg / SecAgg+ style).

Key setup (once per epoch; a new epoch after any party's mask key was revealed):
every party ``i`` advertises an X25519 channel key and an X25519 mask key
``pk_i``, then Shamir-shares its mask private key ``sk_i`` (threshold ``t``) among its
neighbourhood ``M(i) = N(i) + {i}`` (all parties, or a k-regular Harary graph as in
SecAgg+), each share encrypted for its holder.

Per round (two exchanges):

1. *masked input*: party ``i`` draws a fresh 32-byte self-mask seed ``b_i`` and sends
   ``y_i = x_i + PRG(b_i) + sum_{j in N(i)} sign(i, j) PRG(s_ij,r)`` (mod 2^k) with
   ``s_ij,r = HKDF(X25519(sk_i, pk_j), session, round, {i, j})`` (fresh every round),
   ``sign = +1`` if ``i < j`` else ``-1``, together with encrypted Shamir shares of
   ``b_i`` for ``M(i)``. PRG is AES-256-CTR (:mod:`privfl.secagg.prg`).
2. *unmask*: the server names the survivors ``S`` (sent ``y``) and the dropped ``D``.
   Each responding party reveals, for its neighbours, its share of ``b_i`` if ``i`` in
   ``S`` and its share of ``sk_d`` if ``d`` in ``D`` -- never both for one party. With
   ``t`` shares per secret the server removes the self masks of ``S`` and the pairwise
   masks between ``S`` and ``D``; pairwise masks inside ``S`` cancel.

What the server learns: every ``y_i`` is uniform on the ring (the self mask alone
makes it so) and independent of ``x_i``; after unmasking it learns ``sum_{i in S} x_i``
and the mask keys of dropped parties (so they are re-keyed before they take part
again). Parties refuse to unmask when fewer than ``t`` of their neighbourhood
survived, so no aggregate of fewer than ``t`` inputs is revealed; fewer than ``t``
unmask replies make the server raise :class:`MaskingError` rather than output a wrong
sum. Security is against an honest-but-curious server colluding with fewer than ``t``
parties; against a server that lies about ``S`` to different parties SecAgg's extra
consistency round would be needed (not done here).

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
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from privfl.errors import PrivflError
from privfl.fixedpoint import FixedPointCodec
from privfl.secagg import prg, shamir
from privfl.secagg.channel import (
    ChannelError,
    SecureChannel,
    derive,
    exchange,
    private_bytes,
    public_bytes,
)

KEYSHARE_STAGE = "masking/keyshare"
BSHARE_STAGE = "masking/bshare"
# Subsets of revealed shares tried to find the consistent ones when a share is corrupt.
_MAX_SUBSETS = 4096


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
    predict at key setup; this one is deterministic and public. A server colluding with
    the ``k`` parties placed around a victim holds all of the victim's pairwise masks and
    recovers its input from its masked input once its self mask is removed, so with
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


def pairwise_seed(sk: bytes, peer_pk: bytes, *, session: bytes, rnd: int, i: int, j: int) -> bytes:
    """Seed of the round-``rnd`` mask between ``i`` and ``j`` (same for both)."""
    return _round_seed(exchange(sk, peer_pk), session=session, rnd=rnd, i=i, j=j)


def _round_seed(shared: bytes, *, session: bytes, rnd: int, i: int, j: int) -> bytes:
    lo, hi = sorted((i, j))
    return derive(shared, salt=session, info=b"privfl-mask|" + struct.pack(">qII", rnd, lo, hi))


def _x(party: int) -> int:
    return party + 1  # Shamir point of a party (0 holds the secret)


def _mask_public(key: bytes) -> bytes:
    try:
        return public_bytes(X25519PrivateKey.from_private_bytes(key))
    except ValueError:
        return b""


class MaskingParty:
    """One party of the masking protocol (no networking; the caller relays bytes)."""

    def __init__(
        self,
        party: int,
        codec: FixedPointCodec,
        session: bytes,
        *,
        channel: SecureChannel | None = None,
        mask_key: bytes | None = None,
    ) -> None:
        self.party = party
        self.codec = codec
        self.session = session
        self.channel = channel if channel is not None else SecureChannel(party, session)
        self._mask_sk = mask_key or private_bytes(X25519PrivateKey.generate())
        self.directory: dict[int, tuple[bytes, bytes]] = {}
        self.neighbours: list[int] = []
        self.threshold = 0
        self.held_keyshares: dict[int, bytes] = {}
        self._own_bshares: dict[int, tuple[bytes, list[int]]] = {}
        # X25519 secrets shared with each neighbour: agreed once per epoch, kept with the
        # party's state (as secret as the mask key itself), expanded per round by HKDF.
        self._shared: dict[int, bytes] = {}
        self.last_commitment = b""

    @property
    def public_keys(self) -> tuple[bytes, bytes]:
        """``(channel key, mask key)`` to advertise."""
        return self.channel.public_key, public_bytes(
            X25519PrivateKey.from_private_bytes(self._mask_sk)
        )

    def share_keys(
        self, directory: Mapping[int, tuple[bytes, bytes]], *, threshold: int, neighbours: int
    ) -> dict[int, bytes]:
        """Adopt the key directory; Shamir-share the mask key among the neighbourhood."""
        if self.party not in directory:
            raise ValueError(f"party {self.party}: not in the key directory")
        if directory[self.party] != self.public_keys:
            raise ValueError(f"party {self.party}: the directory holds someone else's keys for me")
        self._shared = {}
        self.neighbours = neighbours_of(list(directory), neighbours, self.party)
        # Only the neighbourhood's keys are ever used again: keep the party's state small.
        self.directory = {p: directory[p] for p in [self.party, *self.neighbours]}
        self.threshold = resolve_threshold(threshold, len(self.neighbours) + 1)
        xs = [_x(p) for p in [self.party, *self.neighbours]]
        shares = shamir.share_bytes(self._mask_sk, xs, self.threshold)
        self.held_keyshares = {self.party: shares[_x(self.party)]}
        return {
            p: self.channel.seal(
                p, self.directory[p][0], shares[_x(p)], rnd=0, stage=KEYSHARE_STAGE
            )
            for p in self.neighbours
        }

    def receive_keyshares(self, incoming: Mapping[int, bytes]) -> None:
        """Decrypt and keep the mask-key shares neighbours sent."""
        if set(incoming) != set(self.neighbours):
            raise ValueError(
                f"party {self.party}: expected key shares from {self.neighbours}, "
                f"got {sorted(incoming)}"
            )
        for s, ct in incoming.items():
            self.held_keyshares[s] = self.channel.open(
                s, self.directory[s][0], ct, rnd=0, stage=KEYSHARE_STAGE
            )

    def mask(
        self,
        encoded: np.ndarray,
        *,
        rnd: int,
        parties: Sequence[int] | None = None,
        overwrite: bool = False,
        bind: bytes = b"",
    ) -> tuple[np.ndarray, dict[int, bytes]]:
        """Masked input ``y`` and encrypted shares of the fresh self-mask seed.

        :attr:`last_commitment` then holds the seed's commitment (:func:`commit_seed`) to
        send with ``y``; ``bind`` is authenticated into every share ciphertext.

        Only neighbours among this round's ``parties`` (default: all) take part, so
        parties not selected this round are not treated as dropped. ``overwrite=True``
        masks ``encoded`` in place (it must be writeable and contiguous) and returns it:
        no second vector of ``d`` words, for callers that drop the plain input anyway.
        """
        if len(self.held_keyshares) != len(self.neighbours) + 1:
            raise ValueError(f"party {self.party}: key setup incomplete, cannot mask")
        active = [j for j in self.neighbours if parties is None or j in parties]
        if len(active) + 1 < self.threshold:
            raise MaskingError(
                f"party {self.party}: only {len(active) + 1} of my neighbourhood take part "
                f"in round {rnd}, threshold is {self.threshold}"
            )
        x = np.asarray(encoded)
        if x.dtype != self.codec.dtype or x.ndim != 1:
            raise ValueError(
                f"party {self.party}: encoded input must be a 1-d {self.codec.dtype} vector, "
                f"got {x.dtype} {x.shape}"
            )
        b = os.urandom(prg.SEED_BYTES)
        # One pass over y: all masks expanded chunk-wise and added to x on the fly.
        seeds = self.mask_seeds(rnd, active, b)
        if overwrite:
            y = prg.accumulate(x, seeds, self.codec.ring_bits)
        else:
            y = prg.accumulate(np.empty_like(x), seeds, self.codec.ring_bits, base=x)
        shares = shamir.share_bytes(b, [_x(p) for p in [self.party, *active]], self.threshold)
        self._own_bshares[rnd] = (shares[_x(self.party)], active)
        self.last_commitment = commit_seed(self.session, rnd, self.party, b)
        cts = {
            p: self.channel.seal(
                p, self.directory[p][0], shares[_x(p)], rnd=rnd, stage=BSHARE_STAGE, bind=bind
            )
            for p in active
        }
        return y, cts

    def mask_seeds(
        self, rnd: int, active: Sequence[int], self_seed: bytes
    ) -> list[tuple[bytes, int]]:
        """``(seed, sign)`` of every mask this party adds in round ``rnd``: self mask first."""
        out = [(self_seed, 1)]
        for j in active:
            shared = self._shared.get(j)
            if shared is None:
                shared = self._shared[j] = exchange(self._mask_sk, self.directory[j][1])
            seed = _round_seed(shared, session=self.session, rnd=rnd, i=self.party, j=j)
            out.append((seed, 1 if self.party < j else -1))
        return out

    def unmask(
        self,
        *,
        rnd: int,
        survivors: Sequence[int],
        dropped: Sequence[int],
        incoming: Mapping[int, bytes],
        bind: bytes = b"",
    ) -> dict[str, Any]:
        """Reveal shares: of ``b_i`` for surviving neighbours, of ``sk_d`` for dropped ones.

        A share ciphertext that fails authentication is left out and its sender named
        under ``"bad"`` (``{sender: reason}``): the honest recipient still reveals the rest,
        so one bad share costs at most that one share, never this party's whole reply.
        """
        S, D = set(survivors), set(dropped)
        me = f"party {self.party}"
        if S & D:
            raise MaskingError(f"{me}: parties {sorted(S & D)} named both survivor and dropped")
        if self.party not in S:
            raise MaskingError(f"{me}: asked to unmask round {rnd} without being a survivor")
        if rnd not in self._own_bshares:
            raise MaskingError(f"{me}: I sent no masked input in round {rnd}")
        own_share, active = self._own_bshares.pop(rnd)
        hood = set(active) | {self.party}
        if len(S & hood) < self.threshold:
            raise MaskingError(
                f"{me}: only {len(S & hood)} of my neighbourhood survived round {rnd}, "
                f"threshold is {self.threshold}; refusing to unmask"
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
                bshares[s] = self.channel.open(
                    s, self.directory[s][0], ct, rnd=rnd, stage=BSHARE_STAGE, bind=bind
                )
            except ChannelError as exc:
                bad[s] = str(exc)
        skshares = {d: self.held_keyshares[d] for d in sorted(D & hood)}
        return {"b": bshares, "sk": skshares, "bad": bad}

    def to_state(self) -> dict[str, Any]:
        """JSON-able state for ``context.state``."""
        return {
            "channel": self.channel.to_state(),
            "mask_sk": self._mask_sk.hex(),
            "directory": {str(p): [a.hex(), b.hex()] for p, (a, b) in self.directory.items()},
            "neighbours": self.neighbours,
            "threshold": self.threshold,
            "held": {str(p): v.hex() for p, v in self.held_keyshares.items()},
            "own_b": {str(r): [v.hex(), a] for r, (v, a) in self._own_bshares.items()},
            "shared": {str(p): v.hex() for p, v in self._shared.items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], codec: FixedPointCodec) -> MaskingParty:
        """Inverse of :meth:`to_state`."""
        ch = SecureChannel.from_state(state["channel"])
        p = cls(ch.party, codec, ch.session, channel=ch, mask_key=bytes.fromhex(state["mask_sk"]))
        p.directory = {
            int(k): (bytes.fromhex(a), bytes.fromhex(b)) for k, (a, b) in state["directory"].items()
        }
        p.neighbours = list(state["neighbours"])
        p.threshold = state["threshold"]
        p.held_keyshares = {int(k): bytes.fromhex(v) for k, v in state["held"].items()}
        p._own_bshares = {
            int(k): (bytes.fromhex(v), list(a)) for k, (v, a) in state["own_b"].items()
        }
        p._shared = {int(k): bytes.fromhex(v) for k, v in state.get("shared", {}).items()}
        return p


class MaskingServer:
    """The server's side: plan the unmask stage and remove the masks.

    Parameters
    ----------
    codec : FixedPointCodec
        The public codec.
    session : bytes
        The key-setup epoch's identifier.
    directory : Mapping[int, tuple[bytes, bytes]]
        ``party -> (channel key, mask key)`` of this epoch.
    threshold, neighbours : int
        As in ``defense.secagg`` (0 = automatic / all pairs).
    """

    def __init__(
        self,
        codec: FixedPointCodec,
        session: bytes,
        directory: Mapping[int, tuple[bytes, bytes]],
        *,
        threshold: int,
        neighbours: int,
    ) -> None:
        self.codec = codec
        self.session = session
        self.directory = dict(directory)
        self.graph = neighbourhoods(list(directory), neighbours)
        size = len(next(iter(self.graph.values()))) + 1
        self.threshold = resolve_threshold(threshold, size)
        self.revealed: set[int] = set()
        # What went wrong, and who is to blame where that can be told: {party, stage, reason}.
        self.faults: list[dict[str, Any]] = []

    def plan_unmask(
        self,
        masked: Mapping[int, np.ndarray],
        bshares: Mapping[int, Mapping[int, bytes]],
        parties: Sequence[int],
    ) -> tuple[list[int], list[int], dict[int, dict[int, bytes]]]:
        """Survivors, dropped, and per survivor the self-mask share ciphertexts to forward."""
        S = sorted(p for p in parties if p in masked and p in bshares)
        D = sorted(set(parties) - set(S))
        if len(S) < self.threshold:
            raise MaskingError(
                f"masking: only {len(S)} parties sent masked input (dropped: {D}); "
                f"threshold is {self.threshold}, the sum cannot be recovered"
            )
        for s in S:
            if set(bshares[s]) != set(self.graph[s]) & set(parties):
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
            for x in sorted(set(pts) - set(subset)):
                probe = {**{y: pts[y] for y in subset[: t - 1]}, x: pts[x]}
                try:
                    ok = shamir.reconstruct_bytes(probe, t) == secret
                except shamir.ShamirError:
                    ok = False
                if not ok:
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
            nbs = [s for s in self.graph[d] if s in survivors]
            if not nbs:
                continue
            shares = {r: rv["sk"][d] for r, rv in reveals.items() if d in rv.get("sk", {})}
            sk = self._recover(
                "the mask key",
                d,
                shares,
                lambda key, d=d: _mask_public(key) == self.directory[d][1],
            )
            self.revealed.add(d)
            for s in nbs:
                seed = pairwise_seed(
                    sk, self.directory[s][1], session=self.session, rnd=rnd, i=d, j=s
                )
                # Survivor s added +m if s < d, -m otherwise: undo it.
                undo.append((seed, -1 if s < d else 1))
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
