"""Flower's deployment engine on this machine: ``privfl run SCENARIO --engine deployment``.

:func:`run_deployment` starts a ``flower-superlink`` and, for every party, a SuperNode
(``python -m privfl.node supernode``, Flower's ``flower-supernode`` with a short idle
poll) and the process that runs its ClientApp (``python -m privfl.node clientapp``), all
as separate processes on 127.0.0.1 with ports chosen at run time. It submits the
scenario with ``flwr run`` and waits for the ServerApp to write results.json into the
output folder, exactly as the simulation engine does. Every process it started is
stopped by its PID and process group when the run ends, fails or is interrupted; a
watchdog (:mod:`privfl.reaper`) and a parent-death signal cover a ``kill -9`` of privfl.

Each SuperNode gets its own ``--node-config``: its ``partition-id``, its ``policy`` (its
own copy of the scenario, written to its own folder), ``data-root`` and an
``identity-key`` of its own with the federation's ``roster`` (generated here, as
``privfl keys`` would). The parties never read their defenses or data from the server.
``tls=True`` serves the SuperLink over TLS with a certificate authority made here with
``cryptography``, and the SuperLink admits only the SuperNodes whose public keys were
registered (SuperNode authentication).

Flower's state (``FLWR_HOME``) lives in a private temporary folder; telemetry, update
checks and runtime dependency installation are off.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import ipaddress
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import http_grid

from privfl.config import Scenario, scenario_from_json
from privfl.errors import UserError
from privfl.node import shorten_object_retries
from privfl.reaper import reap_descendants
from privfl.results import atomic_write_private
from privfl.secagg.identity import generate_identity, public_identity, save_roster
from privfl.strategies.wrapper import GridProxy

CONNECTION = "privfl"
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 5.0
# The ServerApp's wait between asking the SuperLink for replies: a tenth of the time
# spent so far, within these bounds (Flower's HTTP grid waits a fixed 3 s).
_POLL_MIN_S = 0.005
_POLL_MAX_S = 0.2

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # How often the SuperLink's executor looks for a ServerApp to launch (Flower: 1 s).
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}


class DeploymentError(UserError):
    """The deployment engine could not run the scenario (a process failed or timed out)."""


# --------------------------------------------------------------------------- ServerApp


class PollingGrid(GridProxy):
    """The SuperLink's grid with a short, growing wait between polls for replies."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``, then pull replies until all arrived or ``timeout`` passed."""
        pending = set(self.grid.push_messages(messages))
        start = time.monotonic()
        replies: list[Message] = []
        while pending:
            got = list(self.grid.pull_messages(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            spent = time.monotonic() - start
            if not pending or (timeout is not None and spent >= timeout):
                break
            time.sleep(min(max(0.1 * spent, _POLL_MIN_S), _POLL_MAX_S))
        return replies


server_app = ServerApp()


@server_app.main()
def _serve(grid: Grid, context: Context) -> None:
    # Imported in the ServerApp's process only: privfl.server loads torch.
    from privfl.server import run_federation

    shorten_object_retries(http_grid)
    cfg = context.run_config
    error_file = Path(str(cfg["error-file"]))
    try:
        scenario = scenario_from_json(Path(str(cfg["scenario-file"])).read_text())
        run_federation(PollingGrid(grid), scenario, Path(str(cfg["out-dir"])), progress=False)
    except BaseException as exc:
        # The engine reads this back: the ServerApp's process is not privfl's own.
        error_file.write_text(
            json.dumps(
                {
                    "type": type(exc).__name__,
                    "user_error": isinstance(exc, UserError),
                    "message": str(exc),
                    "traceback": traceback.format_exc(),
                }
            )
        )
        raise


# --------------------------------------------------------------------------- files


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def scenario_toml(scenario: Scenario) -> str:
    """The validated scenario as a TOML file a party can hold as its policy."""
    lines: list[str] = []

    def table(name: str, body: Mapping[str, Any]) -> None:
        lines.append(f"[{name}]")
        subs = []
        for key, value in body.items():
            if isinstance(value, Mapping):
                subs.append((f"{name}.{key}", value))
            elif value is not None:  # None is every such key's default
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
        for sub_name, sub in subs:
            table(sub_name, sub)

    for section, body in scenario.to_dict().items():
        table(section, body)
    return "\n".join(lines)


def _app_pyproject() -> str:
    return "\n".join(
        [
            "[build-system]",
            'requires = ["setuptools>=70"]',
            'build-backend = "setuptools.build_meta"',
            "",
            "[project]",
            'name = "privfl-deployment"',
            'version = "1.0.0"',
            'description = "privfl scenario on the deployment engine"',
            'license = "Apache-2.0"',
            "dependencies = []",
            "",
            "[tool.flwr.app]",
            'publisher = "privfl"',
            'fab-include = ["README.md"]',
            "",
            "[tool.flwr.app.components]",
            'serverapp = "privfl.deployment:server_app"',
            'clientapp = "privfl.app:client_app"',
            "",
            "[tool.flwr.app.config]",
            'scenario-file = ""',
            'out-dir = ""',
            'error-file = ""',
            "",
        ]
    )


@dataclass
class Certificates:
    """A certificate authority and the SuperLink's certificate for 127.0.0.1."""

    ca: Path
    cert: Path
    key: Path


def make_certificates(folder: Path) -> Certificates:
    """A fresh CA and a SuperLink certificate for ``127.0.0.1`` and ``localhost``."""
    now = datetime.datetime.now(datetime.UTC)
    life = datetime.timedelta(days=1)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("privfl local CA"))
        .issuer_name(name("privfl local CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + life)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + life)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    out = Certificates(
        ca=folder / "ca.pem", cert=folder / "superlink.pem", key=folder / "superlink.key"
    )
    out.ca.write_bytes(ca.public_bytes(pem))
    out.cert.write_bytes(cert.public_bytes(pem))
    atomic_write_private(
        out.key,
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    return out


def make_node_auth_key(folder: Path) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair (EC P-384, OpenSSH format): (private, public)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / "node-auth.key", folder / "node-auth.pub"
    atomic_write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return private, public


def node_config(values: Mapping[str, Any]) -> str:
    """A ``--node-config`` string: ``key="value"`` pairs separated by spaces."""
    parts = []
    for key, value in values.items():
        text = str(value)
        if any(q in text for q in "\"'"):
            raise DeploymentError(f"node config {key}: quotes are not allowed in {text!r}")
        parts.append(f"{key}={value}" if isinstance(value, int) else f'{key}="{text}"')
    return " ".join(parts)


# --------------------------------------------------------------------------- processes


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


# --------------------------------------------------------------------------- the run


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


def run_deployment(
    scenario: Scenario,
    out: Path,
    *,
    tls: bool = False,
    verbose: bool = False,
    report: DeploymentRun | None = None,
    timings: Path | None = None,
) -> dict[str, Any]:
    """Run ``scenario`` on a local SuperLink and one SuperNode per party; return results.

    Parameters
    ----------
    scenario
        The validated scenario; every party is handed its own copy as its policy file.
    out
        The output folder (results.json, report.md, ...), as with the simulation engine.
    tls
        Serve the SuperLink over TLS (a CA made for this run) and admit only registered
        SuperNodes; otherwise the processes talk in the clear over loopback.
    verbose
        Echo every process's log to stderr when the run ends.
    report
        Filled with the PIDs started and the seconds spent starting, running, stopping.
    timings
        A folder where each party's ClientApp runner appends one JSON line per message
        (``clientapp-<party>.jsonl``: message type, seconds pulling, running, pushing).
    """
    if scenario.audit.enabled:
        raise DeploymentError(
            "audit.enabled: the privacy audit hands its canary records to simulated parties "
            "only; run this scenario with --engine simulation"
        )
    # Imported here, as by the runner: `privfl --help` must not load torch.
    from privfl.data import load_federation
    from privfl.server import run_federation
    from privfl.training import resolve_device

    # Fail on missing data or devices here, before any process starts.
    resolve_device(scenario.scenario.device)
    load_federation(scenario)
    report = report if report is not None else DeploymentRun()
    out = Path(out).expanduser().resolve()
    if scenario.data.root:
        # Every process runs in a folder of its own: a relative root means privfl's.
        root_abs = str(Path(scenario.data.root).expanduser().resolve())
        scenario = scenario.replace([f"data.root={json.dumps(root_abs)}"])
    if (
        scenario.attack.kind == "membership-inference"
        and scenario.attack.membership.target == "single"
    ):
        # The hospital-API target is one model trained in-house: no federation to deploy.
        return run_federation(None, scenario, out, progress=False)
    root = Path(tempfile.mkdtemp(prefix="privfl-deployment-"))
    cluster = Cluster(root, _flower_env(root / "flwr-home"))
    t0 = time.perf_counter()
    try:
        with reap_descendants(), _terminate_on_sigterm():
            try:
                _start(cluster, scenario, tls, report, timings)
                report.seconds["start"] = time.perf_counter() - t0
                t1 = time.perf_counter()
                _submit(cluster, scenario, out)
                report.seconds["run"] = time.perf_counter() - t1
            finally:
                report.pids = cluster.pids
                t2 = time.perf_counter()
                cluster.stop()
                report.seconds["stop"] = time.perf_counter() - t2
                if verbose:
                    for p in cluster.processes:
                        print(f"--- {p.name} (PID {p.pid})\n{p.tail(20000)}", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return json.loads((out / "results.json").read_text())


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


def _submit(cluster: Cluster, scenario: Scenario, out: Path) -> None:
    """``flwr run`` the scenario and wait until its ServerApp has finished."""
    root = cluster.root
    app = root / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(_app_pyproject())
    (app / "README.md").write_text("A privfl scenario on Flower's deployment engine.\n")
    lab = root / "lab"
    lab.mkdir()
    (lab / "scenario.json").write_text(scenario.to_json())
    error_file = lab / "server-error.json"
    run_config = " ".join(
        [
            f'scenario-file="{lab / "scenario.json"}"',
            f'out-dir="{out}"',
            f'error-file="{error_file}"',
        ]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    before = results.stat().st_mtime_ns if results.exists() else None
    run = cluster.start(
        "flwr-run",
        [_flower_cli("flwr"), "run", str(app), CONNECTION, "--stream", "--run-config", run_config],
    )
    long_running = [p.name for p in cluster.processes if p.name != "flwr-run"]
    long_running = [n for n in long_running if not n.startswith("register-")]
    while run.popen.poll() is None:
        cluster.check_alive(long_running)
        if error_file.exists():
            break
        time.sleep(0.2)
    if error_file.exists():
        err = json.loads(error_file.read_text())
        message = f"the ServerApp failed: {err['type']}: {err['message']}"
        if err["user_error"]:
            raise DeploymentError(message)
        raise RuntimeError(f"{message}\n{err['traceback']}")
    after = results.stat().st_mtime_ns if results.exists() else None
    if after is None or after == before:
        raise DeploymentError(
            f"flwr run ended (code {run.popen.returncode}) without results in {out}:\n"
            f"{run.tail()}\n--- superlink\n{cluster.processes[0].tail()}"
        )
