"""Names and record layouts shared by the secure-aggregation strategy and client mod.

Server -> party messages carry a ``"config"`` ConfigRecord with ``privfl.scenario`` and
the ``privfl.secagg.*`` keys below; party -> server replies carry only protocol
records (:data:`PAYLOAD`, :data:`VECTOR`) plus pass-through ``privfl.side.*`` records.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import SType

from privfl.config import SCENARIO_KEY, Scenario
from privfl.fixedpoint import FixedPointCodec
from privfl.flower.npy import as_numpy

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


def pack_cts(cts: Mapping[int, bytes], key: str = "") -> dict[str, bytes | list[bytes]]:
    """``{party: bytes}`` as two aligned ConfigRecord values (packed ids, ciphertexts)."""
    order = sorted(cts)
    return {f"{key}to": pack_ids(order), f"{key}cts": [cts[p] for p in order]}


def unpack_cts(rec: ConfigRecord, key: str = "") -> dict[int, bytes]:
    """Inverse of :func:`pack_cts`; raises ``ValueError`` on a malformed record."""
    to, cts = rec.get(f"{key}to", []), rec.get(f"{key}cts", [])
    if not isinstance(to, bytes | list) or not isinstance(cts, list):
        raise ValueError(f"malformed ciphertext lists {key!r}")
    order = ids(to)
    if len(order) != len(cts):
        raise ValueError(f"malformed ciphertext lists {key!r}")
    if len(set(order)) != len(order):
        raise ValueError(f"duplicate parties in ciphertext list {key!r}")
    return {p: bytes(c) for p, c in zip(order, cts, strict=True)}


def pack_ids(ids: list[int]) -> bytes:
    """Party indices as one ConfigRecord value (4-byte words: Flower serialises a list of
    ints element by element, a hundred times slower)."""
    return np.asarray(ids, dtype="<u4").tobytes()


def ids(value: Any) -> list[int]:
    """Party indices from :func:`pack_ids` bytes or a plain list of ints."""
    if isinstance(value, bytes):
        if len(value) % 4:
            raise ValueError(f"a packed party list has {len(value)} bytes, not a multiple of 4")
        return np.frombuffer(value, dtype="<u4").astype(int).tolist()
    return [int(p) for p in value]


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
    v = as_numpy(rec["v"])
    return v if v.dtype in RING_DTYPES and v.ndim == 1 else None


def copy_content(content: RecordDict) -> RecordDict:
    """A deep copy of a RecordDict (nothing mutable is shared with the original).

    Arrays are rebuilt around their serialised bytes: ``bytes`` are immutable, so this is
    as safe as a copy and skips a deserialise/serialise round trip per array.
    """
    out = RecordDict()
    for key, rec in content.items():
        if isinstance(rec, ArrayRecord):
            out[key] = ArrayRecord(
                {
                    k: Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=bytes(a.data))
                    for k, a in rec.items()
                }
            )
        elif isinstance(rec, ConfigRecord):
            out[key] = ConfigRecord(
                {k: list(v) if isinstance(v, list) else v for k, v in rec.items()}
            )
        else:
            out[key] = type(rec)(dict(rec.items()))
    return out


SHARES = "privfl.secagg.shares"  # ArrayRecord: large ciphertexts (additive shares)


def _npy_u8_header(n: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "|u1", "fortran_order": False, "shape": (n,)}
    )
    return buf.getvalue()


def pack_shares(cts: Mapping[int, bytes | memoryview]) -> ArrayRecord:
    """Large ciphertexts as uint8 arrays keyed by party (Flower serialises arrays fast).

    Each array's ``.npy`` bytes are built as header + ciphertext in one copy, rather
    than through ``np.save`` (two copies of megabytes per share).
    """
    return ArrayRecord(
        {
            str(p): Array(
                dtype="uint8",
                shape=(len(cts[p]),),
                stype=SType.NUMPY,
                data=_npy_u8_header(len(cts[p])) + cts[p],
            )
            for p in sorted(cts)
        }
    )


def _u8_payload(a: Array) -> memoryview:
    """The bytes of a 1-d uint8 ``.npy`` array, without copying (``np.load`` copies twice)."""
    fp = io.BytesIO(a.data)
    fmt = np.lib.format
    version = fmt.read_magic(fp)
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, _, dtype = read(fp)
    if dtype != np.uint8 or len(shape) != 1 or fp.tell() + shape[0] != len(a.data):
        raise ValueError(f"a share must be a 1-d uint8 array, got {dtype} {shape}")
    return memoryview(a.data)[fp.tell() :]


def unpack_shares(content: RecordDict) -> dict[int, memoryview]:
    """Inverse of :func:`pack_shares` (empty when the record is absent).

    Values are read-only views into the received arrays' bytes (bytes-like).
    """
    rec = content.array_records.get(SHARES)
    if rec is None:
        return {}
    return {int(p): _u8_payload(a) for p, a in rec.items()}


def _template_layout(template: ArrayRecord) -> list[tuple[str, tuple[int, ...], Any]]:
    return [(k, tuple(a.shape), a.numpy().dtype) for k, a in template.items()]


def curious_read(
    content: RecordDict, template: ArrayRecord, scenario: Scenario | FixedPointCodec
) -> dict[str, np.ndarray] | None:
    """What a curious server reads from one party's stage payload.

    Decodes the ring vector in ``content`` (masked input or partial sum) with the
    public fixed-point codec (``scenario``: the codec, or the scenario naming it) and
    reshapes it to ``template``'s arrays. Returns None when
    the payload carries no vector (only ciphertexts or keys).
    """
    vec = read_vector(content)
    if vec is None:
        return None
    layout = _template_layout(template)
    need = sum(math.prod(s) for _, s, _ in layout)
    if vec.size < need:
        return None
    codec = (
        scenario
        if isinstance(scenario, FixedPointCodec)
        else FixedPointCodec.from_section(scenario.defense.secagg)
    )
    vals = codec.decode(vec)
    out, off = {}, 0
    for k, shape, dtype in layout:
        size = math.prod(shape)
        out[k] = vals[off : off + size].reshape(shape).astype(dtype, copy=False)
        off += size
    return out


def stage_messages(
    configs: Mapping[int, ConfigRecord],
    node_of: Mapping[int, int],
    common: Scenario | Mapping[str, Any],
    server_round: int,
    msg_type: str,
    extra: Mapping[int, Mapping[str, Any]] | None = None,
) -> list[Message]:
    """One stage message per party: its config (with the ``common`` entries, or the
    scenario as privfl's parties expect it, and the round) and extras."""
    shared = {SCENARIO_KEY: common.to_json()} if isinstance(common, Scenario) else dict(common)
    msgs = []
    for party, values in configs.items():
        cfg = ConfigRecord(dict(values))
        cfg.update(shared)
        cfg["server-round"] = server_round
        content = RecordDict({"config": cfg, **(extra or {}).get(party, {})})
        msgs.append(
            Message(
                content,
                dst_node_id=node_of[party],
                message_type=msg_type,
                group_id=str(server_round),
            )
        )
    return msgs
