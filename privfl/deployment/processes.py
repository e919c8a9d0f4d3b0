"""The processes of a run: start them, watch them, stop them.

The SuperLink, and per party a SuperNode and its ClientApp runner, each in its own process
group with its own log and port, in Flower's environment for the run. They are stopped by
PID and process group, and the kernel sends them SIGTERM if privfl dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privfl.config import Scenario
from privfl.deployment.certificates import make_certificates, make_node_auth_key
from privfl.deployment.errors import DeploymentError
from privfl.deployment.files import node_config, scenario_toml
from privfl.results import atomic_write_private
from privfl.secagg.identity import generate_identity, public_identity, save_roster

CONNECTION = "privfl"
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 5.0

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # How often the SuperLink's executor looks for a ServerApp to launch (Flower: 1 s).
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: its own process group, and SIGTERM when privfl dies."""
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Process:
    """One process the engine started: its role, PID and log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, chars: int = 2500) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return text[-chars:]


@dataclass
class Cluster:
    """The processes of one deployment-engine run; :meth:`stop` ends them all."""

    root: Path
    env: dict[str, str]
    processes: list[Process] = field(default_factory=list)

    def start(self, name: str, argv: list[str], *, cwd: Path | None = None) -> Process:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as fh:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=cwd or self.root,
                preexec_fn=_die_with_parent,
            )
        proc = Process(name, popen, log)
        self.processes.append(proc)
        return proc

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def check_alive(self, names: Iterable[str] | None = None) -> None:
        """Raise if one of the long-running processes has exited."""
        wanted = set(names) if names is not None else None
        for p in self.processes:
            if (wanted is None or p.name in wanted) and p.popen.poll() is not None:
                raise DeploymentError(
                    f"{p.name} (PID {p.pid}) exited with code {p.popen.returncode}:\n{p.tail()}"
                )

    def stop(self) -> None:
        """SIGTERM every process group started, newest first; SIGKILL what outlives grace."""
        live = [p for p in reversed(self.processes) if p.popen.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for p in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.processes:
            # The group too: a process's own children (Flower's executors) share it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            if p.popen.poll() is None:
                p.popen.wait()


def _wait_listening(proc: Process, port: int, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise DeploymentError(
                f"{proc.name} exited with code {proc.popen.returncode} at start:\n{proc.tail()}"
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise DeploymentError(f"{proc.name} did not listen on port {port} within {timeout:.0f} s")


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """A SIGTERM to privfl unwinds like Ctrl-C, so the processes are stopped."""
    if sys.platform == "win32" or not _main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@dataclass
class DeploymentRun:
    """What :func:`run_deployment` reports beside results.json: PIDs and phase times."""

    pids: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _flower_env(flwr_home: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    # The processes run in folders of their own: a user's `module:Class` (strategy, model,
    # dataset) is imported from privfl's working directory, as in the simulation.
    path = [os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {
        **os.environ,
        **FLOWER_ENV,
        "FLWR_HOME": str(flwr_home),
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": os.pathsep.join(path),
    }


def _flower_cli(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        raise DeploymentError(f"{name}: Flower's command is not installed next to {sys.executable}")
    return found


def _start(
    cluster: Cluster,
    scenario: Scenario,
    tls: bool,
    report: DeploymentRun,
    timings: Path | None,
) -> None:
    root = cluster.root
    flwr_home = root / "flwr-home"
    flwr_home.mkdir()
    port = free_port()
    link = f"127.0.0.1:{port}"
    certs = make_certificates(root) if tls else None
    security = (
        [
            "--ssl-certfile",
            str(certs.cert),
            "--ssl-keyfile",
            str(certs.key),
            "--ssl-ca-certfile",
            str(certs.ca),
        ]
        if certs
        else ["--insecure"]
    )
    superlink = cluster.start(
        "superlink",
        [
            _flower_cli("flower-superlink"),
            *security,
            *(["--enable-supernode-auth"] if certs else []),
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
    )
    connection = [f"[superlink]\ndefault = {json.dumps(CONNECTION)}\n", f"[superlink.{CONNECTION}]"]
    connection.append(f"address = {json.dumps(link)}")
    connection.append(
        f"root-certificates = {json.dumps(str(certs.ca))}" if certs else "insecure = true"
    )
    (flwr_home / "config.toml").write_text("\n".join(connection) + "\n")
    _wait_listening(superlink, port)

    keys = {p: generate_identity() for p in range(scenario.data.parties)}
    roster_path = root / "roster.json"
    save_roster(roster_path, {p: public_identity(k) for p, k in keys.items()})
    policy_text = scenario_toml(scenario)
    runners: list[tuple[Process, int]] = []
    for party, key in keys.items():
        folder = root / f"party-{party}"
        folder.mkdir()
        (folder / "policy.toml").write_text(policy_text)
        atomic_write_private(folder / "identity.key", key.hex().encode())
        shutil.copy(roster_path, folder / "roster.json")
        config: dict[str, Any] = {
            "partition-id": party,
            "num-partitions": scenario.data.parties,
            "policy": folder / "policy.toml",
            "identity-key": folder / "identity.key",
            "roster": folder / "roster.json",
        }
        if scenario.data.root:
            config["data-root"] = scenario.data.root
        auth: list[str] = []
        if certs:
            private, public = make_node_auth_key(folder)
            _flwr(cluster, ["supernode", "register", str(public), CONNECTION], f"register-{party}")
            auth = [
                "--root-certificates",
                str(certs.ca),
                "--auth-supernode-private-key",
                str(private),
            ]
        runtime_port = free_port()
        cluster.start(
            f"supernode-{party}",
            [
                sys.executable,
                "-m",
                "privfl.node",
                "supernode",
                *(auth or ["--insecure"]),
                "--superlink",
                link,
                "--isolation",
                "process",
                "--host",
                "127.0.0.1",
                "--port",
                str(runtime_port),
                "--node-config",
                node_config(config),
            ],
            cwd=folder,
        )
        runners.append((cluster.processes[-1], runtime_port))
    for supernode, runtime_port in runners:
        _wait_listening(supernode, runtime_port)
        party = supernode.name.removeprefix("supernode-")
        cluster.start(
            f"clientapp-{party}",
            [
                sys.executable,
                "-m",
                "privfl.node",
                "clientapp",
                "--runtime-api",
                f"127.0.0.1:{runtime_port}",
                *(["--timings", str(timings / f"clientapp-{party}.jsonl")] if timings else []),
            ],
            cwd=root / f"party-{party}",
        )
    report.pids = cluster.pids


def _flwr(cluster: Cluster, args: list[str], name: str) -> None:
    proc = cluster.start(name, [_flower_cli("flwr"), *args])
    if proc.popen.wait(timeout=START_TIMEOUT_S) != 0:
        raise DeploymentError(f"flwr {' '.join(args[:2])} failed:\n{proc.tail()}")
