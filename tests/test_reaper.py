"""The run's watchdog stops what a killed run left behind, and only that."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

CHILD = """
import subprocess, sys, time
from privfl.reaper import reap_descendants
with reap_descendants():
    # A grandchild in its own session, like Ray's agents: a kill of this process
    # does not reach it.
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                         start_new_session=True)
    print(p.pid, flush=True)
    time.sleep(300)
"""


def _gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


def test_kill_9_leaves_no_process_behind() -> None:
    run = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    assert run.stdout is not None
    grandchild = int(run.stdout.readline())
    time.sleep(1.5)  # the watchdog polls every half second
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert _gone(grandchild), "the orphaned grandchild outlived the killed run"


def test_an_unrelated_process_is_not_touched() -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from privfl.reaper import terminate

        # Same PID, another creation time: a reused PID must be left alone.
        created = psutil.Process(bystander.pid).create_time()
        assert terminate({bystander.pid: created - 100.0}) == []
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
