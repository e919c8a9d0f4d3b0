"""Long-term party identities: Ed25519 keys that sign each key-setup epoch's keys.

Every party holds an Ed25519 identity key and, out of band, the roster: every party's
identity public key. At key setup a party signs its fresh ephemeral keys together with
the session and its index; before it uses a key directory the server relays, it checks
every entry against the roster. A server that swaps a key (to sit in the middle of two
parties' channels) cannot sign the swap, so the party refuses the directory.
"""

from __future__ import annotations

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
