"""Names and record layouts shared by the secure-aggregation strategy and client mod.

Server -> party messages carry a ``"config"`` ConfigRecord with ``privfl.scenario`` and
the ``privfl.secagg.*`` keys below; party -> server replies carry only protocol
records (:data:`PAYLOAD`, :data:`VECTOR`) plus pass-through ``privfl.side.*`` records.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

SETUP = "train.privfl_secagg_setup"
RESHARE = "train.privfl_secagg_reshare"
PARTIAL_SUM = "train.privfl_secagg_sum"
UNMASK = "train.privfl_secagg_unmask"
STAGE_TYPES = (SETUP, RESHARE, PARTIAL_SUM, UNMASK)

PREFIX = "privfl.secagg."
PAYLOAD = "privfl.secagg"  # ConfigRecord: ciphertexts and public keys
VECTOR = "privfl.secagg.vec"  # ArrayRecord: the one ring vector a party sends, if any
SIDE_PREFIX = "privfl.side."
STATE = "privfl.secagg.state"  # in context.state: the party's JSON state
CACHE = "privfl.secagg.cache"  # in context.state: the encoded vector of the round
EXTRA_COORDS = 2  # weight and weight * train-loss ride at the end of the vector
RING_DTYPES = (np.dtype(np.uint32), np.dtype(np.uint64))


def pack_cts(cts: Mapping[int, bytes], key: str = "") -> dict[str, list[int] | list[bytes]]:
    """``{party: bytes}`` as two aligned ConfigRecord lists."""
    order = sorted(cts)
    return {f"{key}to": order, f"{key}cts": [cts[p] for p in order]}


def unpack_cts(rec: ConfigRecord, key: str = "") -> dict[int, bytes]:
    """Inverse of :func:`pack_cts`; raises ``ValueError`` on a malformed record."""
    to, cts = rec.get(f"{key}to", []), rec.get(f"{key}cts", [])
    if not isinstance(to, list) or not isinstance(cts, list) or len(to) != len(cts):
        raise ValueError(f"malformed ciphertext lists {key!r}")
    if len(set(to)) != len(to):
        raise ValueError(f"duplicate parties in ciphertext list {key!r}")
    return {int(p): bytes(c) for p, c in zip(to, cts, strict=True)}


def vector_record(vec: np.ndarray) -> ArrayRecord:
    """The single ring vector a party sends (``uint32`` or ``uint64`` words, kept as is)."""
    v = np.ascontiguousarray(vec)
    if v.dtype not in RING_DTYPES or v.ndim != 1:
        raise ValueError(f"a ring vector is a 1-d uint32/uint64 array, got {v.dtype} {v.shape}")
    return ArrayRecord({"v": Array(v)})


def read_vector(content: RecordDict) -> np.ndarray | None:
    """The ring vector in a payload, or None (the receiver checks its dtype against the ring)."""
    if VECTOR not in content.array_records:
        return None
    rec = content.array_records[VECTOR]
    if "v" not in rec:
        return None
    v = rec["v"].numpy()
    return v if v.dtype in RING_DTYPES and v.ndim == 1 else None


def copy_content(content: RecordDict) -> RecordDict:
    """A deep copy of a RecordDict (arrays copied; shares nothing with the original)."""
    out = RecordDict()
    for key, rec in content.items():
        if isinstance(rec, ArrayRecord):
            out[key] = ArrayRecord({k: Array(a.numpy().copy()) for k, a in rec.items()})
        elif isinstance(rec, ConfigRecord):
            out[key] = ConfigRecord(
                {k: list(v) if isinstance(v, list) else v for k, v in rec.items()}
            )
        else:
            out[key] = type(rec)(dict(rec.items()))
    return out


SHARES = "privfl.secagg.shares"  # ArrayRecord: large ciphertexts (additive shares)


def pack_shares(cts: Mapping[int, bytes]) -> ArrayRecord:
    """Large ciphertexts as uint8 arrays keyed by party (Flower serialises arrays fast)."""
    return ArrayRecord({str(p): Array(np.frombuffer(cts[p], dtype=np.uint8)) for p in sorted(cts)})


def unpack_shares(content: RecordDict) -> dict[int, bytes]:
    """Inverse of :func:`pack_shares` (empty when the record is absent)."""
    rec = content.array_records.get(SHARES)
    if rec is None:
        return {}
    return {int(p): a.numpy().tobytes() for p, a in rec.items()}
