"""Check the layering contracts of pyproject.toml on the checkout.

``lint-imports`` reads packages from disk, and in the checkout ``strategies/``,
``clients/`` and ``attacks/`` are not inside ``privfl/`` as they are once installed. This
copies the sources into the installed layout in a temporary folder and runs the contracts
there (``.ci/run`` runs them on the built wheel instead).

    python scripts/lint_imports.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAPPED = ("strategies", "clients", "attacks")


def main() -> int:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    with tempfile.TemporaryDirectory(prefix="privfl-lint-") as tmp:
        shutil.copytree(ROOT / "privfl", Path(tmp) / "privfl", ignore=ignore)
        for folder in MAPPED:
            shutil.copytree(ROOT / folder, Path(tmp) / "privfl" / folder, ignore=ignore)
        env = {**os.environ, "PYTHONPATH": tmp}
        lint = Path(sys.executable).with_name("lint-imports")
        cmd = [str(lint), "--config", str(ROOT / "pyproject.toml")]
        return subprocess.call(cmd, cwd=tmp, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
