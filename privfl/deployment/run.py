""":func:`run_deployment`: the run from the scenario to its results.

It checks the scenario, starts the processes under the watchdog, submits the scenario with
``flwr run`` and reads back what the ServerApp wrote (results or its error).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from privfl.config import Scenario
from privfl.deployment.errors import DeploymentError
from privfl.deployment.files import _app_pyproject
from privfl.deployment.processes import (
    CONNECTION,
    Cluster,
    DeploymentRun,
    _flower_cli,
    _flower_env,
    _start,
    _terminate_on_sigterm,
)
from privfl.reaper import reap_descendants


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
    # These load torch, which the import of privfl.deployment must not.
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
            # The public roster every party holds: masking then needs no key registration.
            f'roster-file="{root / "roster.json"}"',
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
