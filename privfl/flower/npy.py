"""Read a Flower ``Array`` as a NumPy view without re-parsing its header every time.

``Array.numpy()`` runs ``np.load``, which parses the ``.npy`` header with
``ast.literal_eval`` (tens of microseconds) and copies the data. A party reads the same
ten model headers every round, and a secure-aggregation round reads each model several
times, so the header is parsed once per distinct header and the data is viewed in place.
"""

from __future__ import annotations

import ast
import math
from functools import lru_cache

import numpy as np
from flwr.app import Array
from flwr.common.constant import SType

_MAGIC = b"\x93NUMPY"


@lru_cache(maxsize=4096)
def _header(raw: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    fields = ast.literal_eval(raw.decode("latin1"))
    if not isinstance(fields, dict) or set(fields) != {"descr", "fortran_order", "shape"}:
        raise ValueError(f"not a .npy header: {raw[:80]!r}")
    dtype = np.lib.format.descr_to_dtype(fields["descr"])
    if dtype.hasobject:
        raise ValueError("an Array holding Python objects is refused (it would need pickle)")
    return dtype, tuple(int(s) for s in fields["shape"]), bool(fields["fortran_order"])


def as_numpy(array: Array) -> np.ndarray:
    """The array's values as a read-only NumPy view of its bytes.

    Same values, dtype and shape as ``array.numpy()``; callers that write must copy.
    Anything that is not a plain ``.npy`` payload goes through ``array.numpy()``.
    """
    data = array.data
    if array.stype != SType.NUMPY or data[:6] != _MAGIC or data[6] not in (1, 2, 3):
        return array.numpy()
    size = 2 if data[6] == 1 else 4  # the header length's bytes, after magic and version
    hlen = int.from_bytes(data[8 : 8 + size], "little")
    begin = 8 + size
    dtype, shape, fortran = _header(bytes(data[begin : begin + hlen]))
    count = math.prod(shape)
    offset = begin + hlen
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(
            f"Array of shape {shape} and dtype {dtype} holds {len(data) - offset} data bytes"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    flat.setflags(write=False)  # a view of the Array's own bytes
    return flat.reshape(shape, order="F" if fortran else "C")
