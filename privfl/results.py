"""What a run reports: attack entries and atomic writing of results.json."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class AttackReport:
    """One attack's outcome, as results.json's ``attacks`` entries record it.

    ``figures`` maps a PNG file name (written next to report.md) to a
    ``matplotlib.figure.Figure``; ``notes`` are lines printed under the attack in the
    report (e.g. expected vs measured fraction).
    """

    name: str
    role: str
    target: str
    recovered: int
    total: int
    metrics: dict[str, float] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "target": self.target,
            "recovered": int(self.recovered),
            "total": int(self.total),
            "metrics": {k: _jsonable(v) for k, v in self.metrics.items()},
            "figures": sorted(self.figures),
            "notes": list(self.notes),
        }


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")
