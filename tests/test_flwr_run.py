"""`flwr run .` — privfl as a Flower App, through Flower's own CLI and a local SuperLink."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_flwr_run_dot_runs_a_scenario(tmp_path):
    flwr = Path(sys.executable).parent / "flwr"
    if not flwr.exists() or shutil.which("flwr", path=str(flwr.parent)) is None:
        pytest.skip("flwr CLI not installed next to this Python")
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PATH": f"{flwr.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    run_config = (
        f'scenario="three_hospitals" out-dir="{out}" '
        'overrides="scenario.rounds=2;data.samples_per_party=1000"'
    )
    # flwr run may rewrite pyproject.toml (legacy federations); work on a copy.
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(ROOT / "pyproject.toml", app / "pyproject.toml")
    shutil.copy(ROOT / "README.md", app / "README.md")
    shutil.copytree(ROOT / "scenarios", app / "scenarios")
    proc = subprocess.run(
        [
            str(flwr),
            "run",
            str(app),
            "--stream",
            "--federation-config",
            "num-supernodes=3",
            "--run-config",
            run_config,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
    )
    try:
        res = json.loads((out / "results.json").read_text())
    except FileNotFoundError:
        pytest.fail(f"flwr run wrote no results:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    finally:
        # flwr run leaves a local SuperLink behind: stop it.
        subprocess.run(["pkill", "-f", f"flower-superlink.*{tmp_path}"], check=False)
        subprocess.run(["pkill", "-f", "flower-superexec"], check=False)
    assert [r["round"] for r in res["rounds"]] == [0, 1, 2]
    assert res["rounds"][1]["accuracy"] > res["rounds"][0]["accuracy"]
    assert res["config"]["data"]["samples_per_party"] == 1000
