"""Additive secret sharing over Z_{2^k}, relayed through the server.

Protocol (one FL round, after a once-per-run key setup where every party advertises
an X25519 channel key):

1. Party ``i`` splits its encoded vector ``x_i`` into ``n`` additive shares
   ``x_i = sum_j s_ij``; ``s_ij`` for ``j != i`` is encrypted and authenticated for
   ``j`` (:mod:`privfl.secagg.channel`) and sent to the server; ``s_ii`` is kept (only
   its 16-byte PRG seed is stored).
2. The server routes the ciphertexts; party ``j`` decrypts the ``n - 1`` shares
   addressed to it and returns ``P_j = sum_i s_ij``.
3. The server outputs ``sum_j P_j = sum_i x_i``.

What the server learns: ciphertext lengths, and the partial sums ``P_j``. Any ``n - 1``
of the ``n`` shares of ``x_i`` are independent and uniform on the ring, so each
``P_j`` (and any ``n - 1`` of them) is uniform and independent of every single input;
all ``n`` reveal exactly the sum. Security holds against an honest-but-curious server
colluding with up to ``n - 2`` parties (the two remaining inputs stay hidden up to
their sum).

Dropouts: the sum needs every party's partial sum, so a missing party aborts the
attempt (:class:`RoundAbortedError`, never a wrong sum); the round is retried among the
survivors with *fresh* shares of the same vectors. Partial sums of an aborted attempt
that the server did receive are at most ``n - 1`` of that attempt's ``n`` share-sums,
so still uniform; re-sharing among a subset reveals only the subset's sum.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from privfl.errors import PrivflError
from privfl.fixedpoint import FixedPointCodec
from privfl.secagg import prg
from privfl.secagg.channel import SecureChannel


class RoundAbortedError(PrivflError, RuntimeError):
    """An attempt of a round cannot finish; ``missing`` are the parties it lacks."""

    def __init__(self, msg: str, missing: set[int]) -> None:
        super().__init__(msg)
        self.missing = set(missing)


def share_stage(attempt: int) -> str:
    """The channel stage label of an attempt's shares (bound into every share ciphertext)."""
    return f"additive/share#{attempt}"


class AdditiveParty:
    """One party of the additive protocol.

    Parameters
    ----------
    party : int
        This party's index.
    codec : FixedPointCodec
        The public codec (gives the ring).
    session : bytes
        Public identifier of the key-setup epoch.
    """

    def __init__(
        self,
        party: int,
        codec: FixedPointCodec,
        session: bytes,
        *,
        channel: SecureChannel | None = None,
    ) -> None:
        self.party = party
        self.codec = codec
        self.channel = channel if channel is not None else SecureChannel(party, session)
        self._own_seeds: dict[str, bytes] = {}

    @property
    def public_key(self) -> bytes:
        """The channel key to advertise at setup."""
        return self.channel.public_key

    def share(
        self,
        encoded: np.ndarray,
        *,
        rnd: int,
        attempt: int,
        parties: Sequence[int],
        directory: Mapping[int, bytes],
        bind: bytes = b"",
    ) -> dict[int, bytes]:
        """Split ``encoded`` among ``parties``; return ``{recipient: ciphertext}``.

        The party's own share is derived from a fresh seed kept for :meth:`partial_sum`.
        ``bind`` is authenticated into every share (see :meth:`SecureChannel.seal`).
        """
        others = [p for p in parties if p != self.party]
        if self.party not in parties or len(others) != len(set(others)) or not others:
            raise ValueError(f"party {self.party}: bad party list {list(parties)} for sharing")
        missing = [p for p in others if p not in directory]
        if missing:
            raise ValueError(f"party {self.party}: no channel key for parties {missing}")
        x = np.asarray(encoded)
        if x.dtype != self.codec.dtype or x.ndim != 1:
            raise ValueError(
                f"party {self.party}: encoded input must be a 1-d {self.codec.dtype} vector, "
                f"got {x.dtype} {x.shape}"
            )
        bits = self.codec.ring_bits
        own_seed = os.urandom(prg.SEED_BYTES)
        self._own_seeds[f"{rnd}/{attempt}"] = own_seed
        # residual = x - own share - the uniform shares, built in place in one buffer.
        residual = prg.accumulate(np.empty_like(x), [(own_seed, -1)], bits, base=x)
        out: dict[int, bytes] = {}
        # Uniform shares to all but the last peer, who gets what makes the sum x.
        for p in others[:-1]:
            s = prg.expand(os.urandom(prg.SEED_BYTES), x.size, bits)
            self.codec.sub(residual, s, out=residual)
            out[p] = self.channel.seal(
                p,
                directory[p],
                memoryview(s).cast("B"),
                rnd=rnd,
                stage=share_stage(attempt),
                bind=bind,
            )
        last = others[-1]
        out[last] = self.channel.seal(
            last,
            directory[last],
            memoryview(residual).cast("B"),
            rnd=rnd,
            stage=share_stage(attempt),
            bind=bind,
        )
        return out

    def partial_sum(
        self,
        incoming: Mapping[int, bytes | memoryview],
        *,
        rnd: int,
        attempt: int,
        parties: Sequence[int],
        directory: Mapping[int, bytes],
        dim: int,
        bind: bytes = b"",
    ) -> np.ndarray:
        """Sum of this party's own share and the shares addressed to it.

        Every share is opened before anything is summed: one that fails authentication
        raises :class:`~privfl.secagg.channel.ChannelError` naming its sender, and no
        partial sum is released.
        """
        key = f"{rnd}/{attempt}"
        if key not in self._own_seeds:
            raise ValueError(
                f"party {self.party}: no shares were made for round {rnd} attempt {attempt}"
            )
        expected = {p for p in parties if p != self.party}
        if set(incoming) != expected:
            raise ValueError(
                f"party {self.party}: expected shares from {sorted(expected)}, "
                f"got {sorted(incoming)}"
            )
        acc = prg.expand(self._own_seeds.pop(key), dim, self.codec.ring_bits)
        item = self.codec.dtype.itemsize
        for sender in sorted(incoming):
            pt = self.channel.open(
                sender,
                directory[sender],
                incoming[sender],
                rnd=rnd,
                stage=share_stage(attempt),
                bind=bind,
            )
            if len(pt) != item * dim:
                raise ValueError(
                    f"party {self.party}: share from party {sender} has {len(pt)} bytes, "
                    f"expected {dim} elements of {item} bytes"
                )
            self.codec.add(acc, np.frombuffer(pt, dtype=self.codec.dtype), out=acc)
        return acc

    def to_state(self) -> dict[str, Any]:
        """JSON-able state for ``context.state``."""
        return {
            "channel": self.channel.to_state(),
            "own_seeds": {k: v.hex() for k, v in self._own_seeds.items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], codec: FixedPointCodec) -> AdditiveParty:
        """Inverse of :meth:`to_state`."""
        ch = SecureChannel.from_state(state["channel"])
        p = cls(ch.party, codec, ch.session, channel=ch)
        p._own_seeds = {k: bytes.fromhex(v) for k, v in state["own_seeds"].items()}
        return p


class AdditiveServer:
    """The server's side: route ciphertexts, add partial sums; refuse anything incomplete."""

    def __init__(self, codec: FixedPointCodec) -> None:
        self.codec = codec

    def route(
        self, shares: Mapping[int, Mapping[int, bytes | memoryview]], parties: Sequence[int]
    ) -> dict[int, dict[int, bytes | memoryview]]:
        """``{sender: {recipient: ct}}`` to ``{recipient: {sender: ct}}``.

        Raises
        ------
        RoundAbortedError
            When a party sent nothing or not one ciphertext per other party.
        """
        pset = set(parties)
        missing = {p for p in parties if p not in shares}
        for s, cts in shares.items():
            if s in pset and set(cts) != pset - {s}:
                missing.add(s)
        if missing:
            raise RoundAbortedError(
                f"additive: parties {sorted(missing)} did not deliver their shares", missing
            )
        routed: dict[int, dict[int, bytes | memoryview]] = {p: {} for p in parties}
        for s in parties:
            for r, ct in shares[s].items():
                routed[r][s] = ct
        return routed

    def combine(
        self, partials: Mapping[int, np.ndarray], parties: Sequence[int], dim: int
    ) -> np.ndarray:
        """Sum of all partial sums (ring elements).

        Raises
        ------
        RoundAbortedError
            When a party's partial sum is missing or malformed.
        """
        missing = set()
        for p in parties:
            v = partials.get(p)
            if (
                v is None
                or np.asarray(v).shape != (dim,)
                or np.asarray(v).dtype != self.codec.dtype
            ):
                missing.add(p)
        if missing:
            raise RoundAbortedError(
                f"additive: partial sums of parties {sorted(missing)} missing or malformed",
                missing,
            )
        acc = np.zeros(dim, dtype=self.codec.dtype)
        for p in parties:
            self.codec.add(acc, partials[p], out=acc)
        return acc
