"""A watchdog that stops every process a run started, however the run ends.

Ray's head processes die with their parent, but the agents the raylet starts
(``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) are re-parented and live on after a
``kill -9`` of the run; a deployment-engine run has SuperLink and SuperNode processes
that nothing else would stop. The watchdog is a separate process in its own session: it
notes the run's descendants every half second and, once the run is gone (its pipe
closes), terminates those still alive. A process is identified by PID and creation
time, so a PID reused by an unrelated process is never touched.

Usage: ``with reap_descendants(): ...`` around the code that starts the processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import psutil

_POLL_SECONDS = 0.5
_GRACE_SECONDS = 3.0


def _descendants(parent: psutil.Process) -> dict[int, float]:
    try:
        kids = parent.children(recursive=True)
        return {p.pid: p.create_time() for p in kids if p.pid != os.getpid()}
    except psutil.Error:
        return {}


def terminate(procs: dict[int, float], grace: float = _GRACE_SECONDS) -> list[int]:
    """SIGTERM the processes still alive (same PID, same creation time), then SIGKILL."""
    alive: list[psutil.Process] = []
    for pid, created in procs.items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 1e-3:
                alive.append(p)
        except psutil.Error:
            continue
    for p in alive:
        with suppress(psutil.Error):
            p.terminate()
    _, still = psutil.wait_procs(alive, timeout=grace)
    for p in still:
        with suppress(psutil.Error):
            p.kill()
    return [p.pid for p in alive]


def watch(parent_pid: int) -> None:
    """Watchdog loop: record ``parent_pid``'s descendants until stdin closes, then stop them."""
    try:
        parent = psutil.Process(parent_pid)
    except psutil.Error:
        return
    seen: dict[int, float] = {}
    gone = threading.Event()

    def wait_eof() -> None:
        # The pipe's write end lives only in the run: EOF means it exited, by any route.
        sys.stdin.buffer.read()
        gone.set()

    threading.Thread(target=wait_eof, daemon=True).start()
    while not gone.wait(_POLL_SECONDS):
        seen.update(_descendants(parent))
    terminate(seen)


@contextmanager
def reap_descendants() -> Iterator[None]:
    """Run the body with a watchdog that stops its leftover child processes at exit.

    Also on a normal exit: whatever the body started and did not stop is terminated.
    """
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "privfl.reaper", str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the run's process group must not kill it first
        close_fds=True,
    )
    try:
        yield
    finally:
        if watchdog.stdin is not None:
            watchdog.stdin.close()
        try:
            watchdog.wait(timeout=_GRACE_SECONDS + 5)
        except subprocess.TimeoutExpired:
            watchdog.kill()


if __name__ == "__main__":
    watch(int(sys.argv[1]))
