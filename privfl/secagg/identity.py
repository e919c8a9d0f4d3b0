"""Long-term party identities: Ed25519 keys, and the X25519 keys they stand for.

Every party holds an Ed25519 identity key and, out of band, the roster: every party's
identity public key. Two uses:

* additive secret sharing: at key setup a party signs its fresh channel key together
  with the session and its index; before it uses a key directory the server relays, it
  checks every entry against the roster. A server that swaps a key (to sit in the middle
  of two parties' channels) cannot sign the swap, so the party refuses the directory.
* masking: a party's static X25519 key is its identity key read on the Montgomery curve
  (:func:`dh_private`, :func:`dh_public`; the map libsodium's
  ``crypto_sign_ed25519_{sk,pk}_to_curve25519`` computes). Every party derives every
  other's key from the roster itself, so a pair key needs neither a setup round trip
  nor a signature check, and a server cannot swap it. Signing and key agreement with one
  scalar is the XEdDSA setting (Signal); its joint security is analysed by Thormarker
  (2021), "On using the same key pair for Ed25519 and an X25519 based KEM".
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privfl.errors import PrivflError

_LABEL = b"privfl-secagg-advertise-v1"
_DERIVE_INFO = b"privfl-identity-v1|party="


class IdentityError(PrivflError, ValueError):
    """A key directory entry is not signed by the party the roster names."""


def _raw_private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def public_identity(private: bytes) -> bytes:
    """Raw 32-byte Ed25519 public key of a raw private identity key."""
    return (
        Ed25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def generate_identity() -> bytes:
    """A fresh raw Ed25519 private key from the OS CSPRNG."""
    return _raw_private(Ed25519PrivateKey.generate())


def derive_identity(secret: bytes, party: int) -> bytes:
    """Party ``party``'s identity key derived from a lab secret (simulated federations,
    where every party lives on one machine and shares that machine's secret)."""
    seed = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=_DERIVE_INFO + str(party).encode(),
    ).derive(secret)
    return seed  # any 32 bytes are a valid Ed25519 private key


def derive_roster(secret: bytes, parties: int) -> dict[int, bytes]:
    """The roster of :func:`derive_identity` keys for parties ``0 .. parties - 1``."""
    return {p: public_identity(derive_identity(secret, p)) for p in range(parties)}


def _message(session: bytes, party: int, keys: Sequence[bytes]) -> bytes:
    parts = [_LABEL, session, struct.pack(">I", party)]
    for k in keys:
        parts += [struct.pack(">I", len(k)), k]
    return b"".join(parts)


_P25519 = 2**255 - 19


def dh_private(identity_private: bytes) -> bytes:
    """The raw X25519 private key of a raw Ed25519 identity key: the same secret scalar.

    Ed25519 signs with the clamped first half of SHA-512 of the seed (RFC 8032, 5.1.5);
    X25519 clamps the 32 bytes it is given the same way (RFC 7748, 5).
    """
    if len(identity_private) != 32:
        raise IdentityError(f"an identity key has 32 bytes, got {len(identity_private)}")
    return hashlib.sha512(identity_private).digest()[:32]


@functools.lru_cache(maxsize=1 << 16)
def dh_public(identity_public: bytes) -> bytes:
    """The raw X25519 public key of a raw Ed25519 identity public key.

    The Edwards point's ``y`` maps to the Montgomery ``u = (1 + y) / (1 - y)`` mod
    ``2^255 - 19`` (RFC 7748, 4.1); the sign bit of ``x`` does not matter to X25519.
    """
    if len(identity_public) != 32:
        raise IdentityError(f"an identity public key has 32 bytes, got {len(identity_public)}")
    y = int.from_bytes(identity_public, "little") & ((1 << 255) - 1)
    if y >= _P25519 or y == 1:
        raise IdentityError("not an Ed25519 public key: y is out of range or the neutral point")
    u = (1 + y) * pow(1 - y, -1, _P25519) % _P25519
    return u.to_bytes(32, "little")


def sign_keys(private: bytes, *, session: bytes, party: int, keys: Sequence[bytes]) -> bytes:
    """Signature binding ``party``'s ephemeral ``keys`` to the key-setup ``session``."""
    key = Ed25519PrivateKey.from_private_bytes(private)
    return key.sign(_message(session, party, keys))


def verify_keys(
    roster: Mapping[int, bytes],
    signature: bytes,
    *,
    session: bytes,
    party: int,
    keys: Sequence[bytes],
) -> None:
    """Raise :class:`IdentityError` unless ``signature`` is ``party``'s over ``keys``."""
    if party not in roster:
        raise IdentityError(f"party {party} is not on my roster ({sorted(roster)})")
    try:
        Ed25519PublicKey.from_public_bytes(roster[party]).verify(
            signature, _message(session, party, keys)
        )
    except (InvalidSignature, ValueError):
        raise IdentityError(
            f"the keys the server gave for party {party} are not signed by that party's "
            "identity key: a forged or altered key directory"
        ) from None


def save_roster(path: str | Path, roster: Mapping[int, bytes]) -> None:
    """Write a roster as JSON (``{"0": "<hex public key>", ...}``)."""
    Path(path).write_text(json.dumps({str(p): k.hex() for p, k in sorted(roster.items())}))


def load_roster(path: str | Path) -> dict[int, bytes]:
    """Read a roster written by :func:`save_roster`."""
    try:
        raw = json.loads(Path(path).read_text())
        roster = {int(p): bytes.fromhex(k) for p, k in raw.items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise IdentityError(f"roster file {str(path)!r} is not readable: {exc}") from exc
    bad = [p for p, k in roster.items() if len(k) != 32]
    if bad:
        raise IdentityError(f"roster file {str(path)!r}: parties {bad} have no 32-byte key")
    return roster
