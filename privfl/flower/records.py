"""Model updates as Flower ArrayRecords and back."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from privfl.dp.mechanisms import unflatten


def record_with_vector(like: ArrayRecord, vec: np.ndarray) -> ArrayRecord:
    """An ArrayRecord with the keys, shapes and dtypes of ``like`` holding ``vec``."""
    arrays = unflatten(vec, like.to_numpy_ndarrays())
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(a)) for k, a in zip(like.keys(), arrays, strict=True)}
    )
