"""What a run reports: attack entries and atomic writing of results.json."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# results.json's layout (privfl/schema/results.schema.json); raised when a key changes
# meaning or goes away, not when one is added.
SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "results.schema.json"


@dataclass
class AttackReport:
    """One attack's outcome, as results.json's ``attacks`` entries record it.

    ``figures`` maps a PNG file name (written next to report.md) to a
    ``matplotlib.figure.Figure``; ``notes`` are lines printed under the attack in the
    report (e.g. expected vs measured fraction); ``arrays`` (scores, ROC points, …) are
    saved as :attr:`arrays_file` beside results.json, so curves can be redrawn.
    """

    name: str
    role: str
    target: str
    recovered: int
    total: int
    metrics: dict[str, float] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def arrays_file(self) -> str:
        """``<name>_<target>.npz`` with every character outside ``[A-Za-z0-9._-]`` as ``_``."""
        return re.sub(r"[^A-Za-z0-9._-]", "_", f"{self.name}_{self.target}") + ".npz"

    def to_json(self) -> dict[str, Any]:
        """The results.json entry; ``arrays`` stay numpy arrays until
        :func:`privfl.report.write_run` saves them and leaves the file name in their place."""
        out = {
            "name": self.name,
            "role": self.role,
            "target": self.target,
            "recovered": int(self.recovered),
            "total": int(self.total),
            "metrics": {k: _jsonable(v) for k, v in self.metrics.items()},
            "figures": sorted(self.figures),
            "notes": list(self.notes),
        }
        if self.arrays:
            out["arrays"] = {"file": self.arrays_file, **self.arrays}
        return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


_umask_lock = threading.Lock()


def umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    with _umask_lock:
        # There is no getter: set a restrictive mask for an instant and put it back.
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half.

    The file gets the permissions of any file the user creates (0666 less the umask), not
    the 0600 of the temporary file it is written as.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_private(path: Path, data: bytes | str) -> None:
    """Write a secret (a key, the lab secret) atomically, readable by the user alone (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:  # mkstemp creates the file 0600
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")
