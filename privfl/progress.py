"""Progress of long phases (an attack's optimiser, shadow and target training).

Library code opens a :func:`phase` and advances it; what the user sees is chosen once, by
the command line (:func:`configure`):

- ``"rich"``: a live bar per phase (nested inside the rounds' bar when one is shown);
- ``"plain"``: one line on stderr when a phase ends, for logs and pipes;
- ``"off"`` (the default of the library, so tests and notebooks stay quiet): nothing.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any, Literal

Mode = Literal["off", "plain", "rich"]

_mode: Mode = "off"


def configure(mode: Mode | Literal["auto"]) -> Mode:
    """Choose how phases are shown; ``"auto"`` is rich on a terminal, plain otherwise.

    Returns
    -------
    str
        The mode that was in force before, so a caller can restore it.
    """
    global _mode
    if mode not in ("off", "plain", "rich", "auto"):
        raise ValueError(f"progress mode: must be off, plain, rich or auto, got {mode!r}")
    before = _mode
    _mode = ("rich" if sys.stderr.isatty() else "plain") if mode == "auto" else mode
    return before


def mode() -> Mode:
    """The mode in force."""
    return _mode


class Phase:
    """A running phase: ``advance`` it by steps, or set ``completed`` outright."""

    def __init__(self, description: str, total: int | None) -> None:
        self.description = description
        self.total = total
        self.completed = 0
        self.status = ""
        self._t0 = time.perf_counter()
        self._bar: Any = None
        self._task: Any = None

    def advance(self, steps: int = 1, *, status: str | None = None) -> None:
        """``steps`` more done; ``status`` replaces the short text shown after the bar."""
        self.update(self.completed + steps, status=status)

    def update(self, completed: int, *, status: str | None = None) -> None:
        """Set the number of steps done (and the status text)."""
        self.completed = completed
        if status is not None:
            self.status = status
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, status=self.status)

    def _start(self) -> None:
        if _mode != "rich":
            return
        # Imported here: rich is only needed when a bar is drawn.
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}")]
        if self.total is not None:
            columns += [BarColumn(), MofNCompleteColumn()]
        columns += [TimeElapsedColumn(), TextColumn("{task.fields[status]}")]
        # rich >= 14 nests this bar under a live one (the rounds' bar) on the same console.
        self._bar = Progress(*columns, transient=False)
        self._task = self._bar.add_task(self.description, total=self.total, status="")
        self._bar.start()

    def _finish(self, failed: bool) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif _mode == "plain" and not failed:
            done = f" {self.completed}/{self.total}" if self.total is not None else ""
            status = f", {self.status}" if self.status else ""
            seconds = time.perf_counter() - self._t0
            print(f"privfl: {self.description}{done} ({seconds:.1f} s{status})", file=sys.stderr)


@contextlib.contextmanager
def phase(description: str, total: int | None = None) -> Iterator[Phase]:
    """A phase of ``total`` steps (None: unknown), shown as the current mode says.

    Parameters
    ----------
    description : str
        What is being done, e.g. ``"LiRA shadow models"``.
    total : int, optional
        Steps the phase will take; a bar is drawn when known, a spinner otherwise.

    Yields
    ------
    Phase
        Advance it as the work proceeds (a no-op when progress is off).
    """
    p = Phase(description, total)
    p._start()
    failed = True
    try:
        yield p
        failed = False
    finally:
        p._finish(failed)
