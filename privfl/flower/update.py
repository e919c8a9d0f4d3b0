"""A party's model update as it travels: Δ = local − global, its weight, its side records.

On the wire a train reply carries the party's full local weights (``"arrays"``), its
metrics (``"metrics"``: ``num-examples``, ``train-loss``) and public side records, so
that any Flower strategy can aggregate it. Everything in privfl that looks *inside* an
update — the clipping mods, the secure-aggregation encoder, the DP global update, the
curious server — reads it through this module: :func:`flat_delta` is the one place Δ
is computed, :func:`with_delta` the one place a Δ becomes weights again, and
:class:`Update` the one type a reply is read into.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from privfl.errors import PrivflError
from privfl.flower import side
from privfl.flower.npy import as_numpy

WEIGHT_KEY = "num-examples"


class UpdateError(PrivflError, ValueError):
    """A reply's weights do not match the model that was sent (keys, shapes, values)."""


def weights_of(content: RecordDict) -> tuple[str, ArrayRecord]:
    """The reply's weights: its ``"arrays"`` record, else its only ArrayRecord."""
    records = content.array_records
    if "arrays" in records:
        return "arrays", records["arrays"]
    if len(records) != 1:
        raise UpdateError(f"a train reply carries ArrayRecords {sorted(records)}; expected one")
    name = next(iter(records))
    return name, records[name]


def coordinates(arrays: ArrayRecord) -> int:
    """How many numbers ``arrays`` holds: the length of its flat Δ."""
    return sum(math.prod(a.shape) for a in arrays.values())


def flat_delta(sent: ArrayRecord, got: ArrayRecord) -> np.ndarray:
    """``got − sent`` in the key order of ``sent``, as one float64 vector.

    The subtraction is done in float64, where it is exact for float32 weights. Raises
    :class:`UpdateError` naming the first key whose name or shape does not match.
    """
    keys = list(sent.keys())
    if list(got.keys()) != keys:
        raise UpdateError(
            f"local weights have keys {list(got.keys())}, the global model has {keys}"
        )
    pairs = [(got[k], sent[k]) for k in keys]
    for k, (g, w) in zip(keys, pairs, strict=True):
        if list(g.shape) != list(w.shape):
            raise UpdateError(f"'{k}' has shape {tuple(g.shape)}, expected {tuple(w.shape)}")
    sizes = [math.prod(w.shape) for _, w in pairs]
    out = np.empty(sum(sizes))
    off = 0
    for (g, w), n in zip(pairs, sizes, strict=True):
        np.subtract(
            as_numpy(g).ravel(), as_numpy(w).ravel(), out=out[off : off + n], dtype=np.float64
        )
        off += n
    return out


def delta_arrays(sent: ArrayRecord, got: ArrayRecord) -> dict[str, np.ndarray]:
    """:func:`flat_delta` split back into float64 arrays keyed and shaped like ``sent``."""
    flat = flat_delta(sent, got)
    out, off = {}, 0
    for k, a in sent.items():
        n = math.prod(a.shape)
        out[k] = flat[off : off + n].reshape(a.shape)
        off += n
    return out


def with_delta(
    base: ArrayRecord, delta: np.ndarray, *, like: ArrayRecord | None = None
) -> ArrayRecord:
    """``base + delta`` (float64 sum) with the keys, shapes and dtypes of ``like`` (default
    ``base``): the one place an update becomes weights again."""
    like = base if like is None else like
    out, off = ArrayRecord(), 0
    for k, a in base.items():
        ref = like[k]
        n = math.prod(a.shape)
        if off + n > delta.size:
            raise UpdateError(f"update has {delta.size} entries; the model needs more at '{k}'")
        total = as_numpy(a).reshape(-1) + delta[off : off + n]  # float64
        out[k] = Array(np.ascontiguousarray(total.reshape(ref.shape).astype(as_numpy(ref).dtype)))
        off += n
    if off != delta.size:
        raise UpdateError(f"update has {delta.size} entries, the model {off}")
    return out


@dataclass
class Update:
    """A party's train reply read as an update.

    Attributes
    ----------
    delta : np.ndarray
        Δ = local − global, float64, flat in the key order of the global model.
    weight : float
        What the party's update weighs in a mean (its ``num-examples``).
    metrics : MetricRecord
        The reply's metrics, as sent.
    side : dict
        Its public side records (``privfl.side.*``), as sent.
    """

    delta: np.ndarray
    weight: float
    metrics: MetricRecord
    side: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_reply(cls, sent: ArrayRecord, content: RecordDict) -> Update:
        """Read a train reply's content against the global weights ``sent``."""
        _, got = weights_of(content)
        metrics = content.metric_records.get("metrics")
        if metrics is None:
            raise UpdateError("a train reply lacks its 'metrics' record")
        if WEIGHT_KEY not in metrics:
            raise UpdateError(f"a train reply's metrics lack '{WEIGHT_KEY}'")
        return cls(
            delta=flat_delta(sent, got),
            weight=float(metrics[WEIGHT_KEY]),
            metrics=metrics,
            side=side.records_of(content),
        )

    def write(self, sent: ArrayRecord, content: RecordDict) -> None:
        """Put this update's weights (``sent + delta``) back into a reply's content."""
        name, got = weights_of(content)
        content[name] = with_delta(sent, self.delta, like=got)
