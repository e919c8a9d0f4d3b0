"""Pairwise authenticated encryption between parties, relayed by the server.

Each party holds a static X25519 key pair per key-setup epoch. The key of the pair
``{i, j}`` is ``HKDF-SHA256(X25519(sk_i, pk_j), salt=session, info=label|min|max)``, the
same on both ends. Messages are AES-256-GCM with

* nonce = ``sender (4 bytes) || counter (8 bytes)``: the sender's counter strictly
  increases over everything it seals, and the sender id separates the two directions
  of a pair, so a (key, nonce) pair is never reused;
* associated data binding the session, round, stage, sender, recipient and counter, so a
  ciphertext moved to another round, stage or recipient fails authentication;
* replay protection: the recipient keeps, per sender, the highest counter it accepted
  and refuses anything not above it.

The server relays ciphertexts and learns only their lengths.
"""

from __future__ import annotations

import struct
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privfl.errors import PrivflError

_LABEL = b"privfl-secagg-channel-v1"
_HEADER = struct.Struct(">Q")


class ChannelError(PrivflError, ValueError):
    """A ciphertext failed authentication or was replayed; the message names the parties."""


def private_bytes(key: X25519PrivateKey) -> bytes:
    """Raw 32-byte encoding of an X25519 private key."""
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def public_bytes(key: X25519PrivateKey) -> bytes:
    """Raw 32-byte encoding of the public key of ``key``."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def exchange(private: bytes, peer_public: bytes) -> bytes:
    """The raw X25519 shared secret of ``private`` and ``peer_public``."""
    try:
        peer = X25519PublicKey.from_public_bytes(peer_public)
    except ValueError as exc:
        raise ChannelError(f"invalid X25519 public key ({len(peer_public)} bytes)") from exc
    return X25519PrivateKey.from_private_bytes(private).exchange(peer)


def derive(shared: bytes, *, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """``length`` bytes of HKDF-SHA256 from a shared secret."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(shared)


def agree(private: bytes, peer_public: bytes, *, salt: bytes, info: bytes) -> bytes:
    """32 bytes from X25519 key agreement followed by HKDF-SHA256."""
    return derive(exchange(private, peer_public), salt=salt, info=info)


def _aad(
    session: bytes, rnd: int, stage: str, sender: int, recipient: int, ctr: int, bind: bytes
) -> bytes:
    return b"|".join(
        [_LABEL, session, stage.encode(), struct.pack(">qIIQ", rnd, sender, recipient, ctr), bind]
    )


class SecureChannel:
    """One party's end of its authenticated channels to every other party.

    Parameters
    ----------
    party : int
        This party's index.
    session : bytes
        Server-chosen public identifier of the key-setup epoch (bound into every key
        and ciphertext).
    private_key : bytes, optional
        Raw X25519 private key; a fresh one from the OS CSPRNG by default.
    """

    def __init__(self, party: int, session: bytes, private_key: bytes | None = None) -> None:
        self.party = party
        self.session = session
        self._sk = (
            private_key if private_key is not None else private_bytes(X25519PrivateKey.generate())
        )
        self.send_counter = 0
        self.recv_high: dict[int, int] = {}
        # Pair keys, kept with the party's state: one key agreement per peer and epoch,
        # not one per message.
        self._keys: dict[bytes, bytes] = {}
        self._ciphers: dict[bytes, AESGCM] = {}

    @property
    def public_key(self) -> bytes:
        """Raw X25519 public key to advertise."""
        return public_bytes(X25519PrivateKey.from_private_bytes(self._sk))

    def _aead(self, other: int, peer_public: bytes) -> AESGCM:
        lo, hi = sorted((self.party, other))
        cache_key = peer_public + struct.pack(">II", lo, hi)
        cipher = self._ciphers.get(cache_key)
        if cipher is None:
            key = self._keys.get(cache_key)
            if key is None:
                info = _LABEL + struct.pack(">II", lo, hi)
                key = self._keys[cache_key] = agree(
                    self._sk, peer_public, salt=self.session, info=info
                )
            cipher = self._ciphers[cache_key] = AESGCM(key)
        return cipher

    def seal(
        self,
        recipient: int,
        peer_public: bytes,
        plaintext: bytes,
        *,
        rnd: int,
        stage: str,
        bind: bytes = b"",
    ) -> bytes:
        """Encrypt ``plaintext`` for ``recipient`` in round ``rnd`` and ``stage``.

        ``bind`` is authenticated, not sent: the recipient opens the ciphertext only if it
        passes the same bytes (e.g. a digest of the global model both received), so two
        parties that were told different things cannot complete an exchange.
        """
        if recipient == self.party:
            raise ChannelError(f"party {self.party}: refusing to seal a message to itself")
        self.send_counter += 1
        ctr = self.send_counter
        nonce = struct.pack(">IQ", self.party, ctr)
        ct = self._aead(recipient, peer_public).encrypt(
            nonce, plaintext, _aad(self.session, rnd, stage, self.party, recipient, ctr, bind)
        )
        return _HEADER.pack(ctr) + ct

    def open(
        self,
        sender: int,
        peer_public: bytes,
        blob: bytes | memoryview,
        *,
        rnd: int,
        stage: str,
        bind: bytes = b"",
    ) -> bytes:
        """Decrypt and authenticate a ciphertext ``sender`` sealed for this party."""
        where = f"party {self.party}: ciphertext from party {sender} (round {rnd}, stage {stage!r})"
        if len(blob) < _HEADER.size + 16:
            raise ChannelError(f"{where} is truncated ({len(blob)} bytes)")
        (ctr,) = _HEADER.unpack_from(blob)
        nonce = struct.pack(">IQ", sender, ctr)
        try:
            pt = self._aead(sender, peer_public).decrypt(
                nonce,
                memoryview(blob)[_HEADER.size :],  # no copy of megabyte shares
                _aad(self.session, rnd, stage, sender, self.party, ctr, bind),
            )
        except InvalidTag:
            raise ChannelError(
                f"{where} failed authentication: tampered, misrouted, from another "
                "round/stage/session, not from that sender, or sealed over a different "
                "global model or party list"
            ) from None
        if ctr <= self.recv_high.get(sender, 0):
            raise ChannelError(
                f"{where} is a replay: counter {ctr} <= last accepted {self.recv_high[sender]}"
            )
        self.recv_high[sender] = ctr
        return pt

    # ------------------------------------------------------------ persistence
    def to_state(self) -> dict[str, Any]:
        """JSON-able state (kept in the node's ``context.state``)."""
        return {
            "party": self.party,
            "session": self.session.hex(),
            "sk": self._sk.hex(),
            "send_counter": self.send_counter,
            "recv_high": {str(k): v for k, v in self.recv_high.items()},
            "keys": {k.hex(): v.hex() for k, v in self._keys.items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SecureChannel:
        """Inverse of :meth:`to_state`."""
        ch = cls(state["party"], bytes.fromhex(state["session"]), bytes.fromhex(state["sk"]))
        ch.send_counter = state["send_counter"]
        ch.recv_high = {int(k): v for k, v in state["recv_high"].items()}
        ch._keys = {bytes.fromhex(k): bytes.fromhex(v) for k, v in state.get("keys", {}).items()}
        return ch
