"""The deployment engine: a real flower-superlink and one SuperNode process per party."""

import datetime
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.hashes import SHA256
from flwr.app import Context, RecordDict

from privfl import run_scenario
from privfl.cli import main as cli_main
from privfl.clients.app import node_policy
from privfl.config import load_scenario
from privfl.deployment import (
    Cluster,
    DeploymentError,
    DeploymentRun,
    make_certificates,
    node_config,
    run_deployment,
    scenario_toml,
)
from privfl.runner import resolve

SMALL = ["scenario.rounds=2", "data.samples_per_party=1000"]


def _context(node_cfg):
    return Context(run_id=1, node_id=1, node_config=node_cfg, state=RecordDict(), run_config={})


def test_scenario_toml_round_trips(tmp_path):
    sc = resolve(
        "three_hospitals", ["defense.dp.mode=global", "defense.dp.epsilon=4.0", "training.lr=0.125"]
    )
    path = tmp_path / "policy.toml"
    path.write_text(scenario_toml(sc))
    assert load_scenario(path) == sc


def test_node_config_quotes_paths_and_refuses_quotes(tmp_path):
    text = node_config({"partition-id": 2, "policy": tmp_path / "p.toml"})
    assert text == f'partition-id=2 policy="{tmp_path / "p.toml"}"'
    with pytest.raises(DeploymentError, match="policy"):
        node_config({"policy": "it's"})


def test_node_reads_its_own_policy_and_data_root(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(scenario_toml(resolve("three_hospitals")))
    got = node_policy(
        _context({"partition-id": 1, "policy": str(policy), "data-root": "/srv/hospital-1"})
    )
    assert got.party == 1
    assert got.scenario.data.root == "/srv/hospital-1"
    # Without data-root the node keeps its policy's own.
    assert (
        node_policy(_context({"partition-id": 1, "policy": str(policy)})).scenario.data.root == ""
    )


def test_a_node_with_own_data_trains_on_all_of_it(tmp_path):
    import numpy as np

    from privfl.clients.app import _my_data
    from privfl.config import Scenario

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 10)):
        for kind, arr in (
            ("images-idx3", rng.integers(0, 256, (n, 28, 28))),
            ("labels-idx1", rng.integers(0, 10, n)),
        ):
            header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(
                int(d).to_bytes(4, "big") for d in arr.shape
            )
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(header + arr.astype(np.uint8).tobytes())
    sc = Scenario.from_dict(
        {
            "data": {
                "root": str(tmp_path),
                "parties": 3,
                "party_test_fraction": 0.25,
                "partition": "iid",
            }
        }
    )
    mine, classes = _my_data(sc, 2, _context({"partition-id": 2, "own-data": "true"}))
    assert (len(mine.train), len(mine.test), classes) == (30, 10, 10)
    assert sorted(mine.indices.tolist()) == list(range(40))  # every record, each once
    share, _ = _my_data(sc, 2, _context({"partition-id": 2}))
    assert len(share.train) + len(share.test) < 40  # a third of a federation


def test_certificates_chain_to_their_authority(tmp_path):
    certs = make_certificates(tmp_path)
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    leaf = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    ca.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(SHA256()))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    assert leaf.not_valid_after_utc > datetime.datetime.now(datetime.UTC)
    assert oct(certs.key.stat().st_mode & 0o777) == "0o600"


def test_cluster_stops_process_groups_and_grandchildren(tmp_path):
    cluster = Cluster(tmp_path, dict(os.environ))
    # A child that starts a grandchild of its own, as the SuperLink starts its executor.
    code = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    proc = cluster.start("parent", [sys.executable, "-c", code])
    deadline = time.monotonic() + 20
    while not (kids := psutil.Process(proc.pid).children()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kids, "the child did not start its own child"
    cluster.stop()
    assert proc.popen.poll() is not None
    assert not kids[0].is_running() or kids[0].status() == psutil.STATUS_ZOMBIE


def test_audit_scenarios_are_refused(tmp_path):
    sc = resolve("three_hospitals", ["audit.enabled=true"])
    with pytest.raises(DeploymentError, match="audit.enabled"):
        run_deployment(sc, tmp_path / "out")


def test_tls_flag_needs_the_deployment_engine(tmp_path, capsys):
    assert cli_main(["run", "three_hospitals", "--tls", "--out", str(tmp_path)]) == 2
    assert "--tls" in capsys.readouterr().err


def _gone(pids):
    """The PIDs among ``pids`` still running (zombies count as stopped)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _descendants(proc):
    try:
        kids = proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    out = {}
    for k in kids:
        try:
            out[k.pid] = " ".join(k.cmdline())
        except psutil.Error:
            continue
    return out


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["additive", "masking"])
def test_three_supernodes_with_secure_aggregation_match_the_simulation(tmp_path, protocol):
    # Masking: each SuperNode reads its identity key and the roster from its node config,
    # and its static masking key and its neighbours' from them.
    sc = resolve("three_hospitals", [*SMALL, f"defense.secure_aggregation={protocol}"])
    report = DeploymentRun()
    dep = run_deployment(sc, tmp_path / "deployed", report=report)
    # SuperLink, three SuperNodes, three ClientApp runners, flwr run: all stopped.
    assert len(report.pids) >= 8
    assert _gone(report.pids) == []
    sim = run_scenario(sc, tmp_path / "simulated", progress=False)
    assert [r["round"] for r in dep["rounds"]] == [0, 1, 2]
    assert abs(dep["final"]["accuracy"] - sim["final"]["accuracy"]) <= 0.01
    assert all(not r.get("faults") for r in dep["rounds"])
    assert (tmp_path / "deployed" / "report.md").is_file()
    assert (tmp_path / "deployed" / "rounds.csv").is_file()


@pytest.mark.slow
def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_cli_deployment_run_stops_everything_on_sigint(tmp_path):
    """A Ctrl-C during a run (over TLS, with SuperNode authentication) stops every process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out_file, err_file = (tmp_path / "stdout").open("wb"), (tmp_path / "stderr").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "privfl.cli",
            "run",
            "three_hospitals",
            "--engine",
            "deployment",
            "--tls",
            "--set",
            "scenario.rounds=50",
            "--set",
            "data.samples_per_party=500",
            "--out",
            str(tmp_path / "out"),
        ],
        env=env,
        # Files, not pipes: nobody reads them until the end, and a full pipe would block
        # the run's own writes.
        stdout=out_file,
        stderr=err_file,
        start_new_session=True,
        # A test session started in the background inherits SIGINT ignored, and so would
        # the run: give it the default a terminal's Ctrl-C meets.
        preexec_fn=_default_sigint,
    )
    me = psutil.Process(proc.pid)
    seen: set[int] = set()
    deadline = time.monotonic() + 240
    # Wait until the three ClientApp runners are up and the run's ServerApp started.
    while time.monotonic() < deadline:
        kids = _descendants(me)
        seen |= set(kids)
        runners = sum("privfl.node clientapp" in cmd for cmd in kids.values())
        if runners >= 3 and any("flwr-serverapp" in cmd for cmd in kids.values()):
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the deployment never started its runners and ServerApp")
    seen |= set(_descendants(me))
    os.kill(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        tail = (tmp_path / "stderr").read_text(errors="replace")[-3000:]
        pytest.fail(f"privfl run did not exit within 60 s of Ctrl-C; its stderr ends:\n{tail}")
    finally:
        out_file.close()
        err_file.close()
    time.sleep(1)
    assert _gone(seen) == []
    assert not (tmp_path / "out" / "results.json").exists()


def test_bench_reads_each_exchange_from_the_runners_timings(tmp_path):
    from privfl.bench.spine import exchanges

    def task(kind, rnd, start, app, pull=0.1, push=0.05):
        return json.dumps(
            {
                "type": kind,
                "round": rnd,
                "start": start,
                "end": start + pull + app + push,
                "pull": pull,
                "app": app,
                "push": push,
            }
        )

    (tmp_path / "clientapp-0.jsonl").write_text(
        "\n".join([task("train", "1", 0.0, 2.0), task("evaluate", "", 3.0, 0.2)]) + "\n"
    )
    (tmp_path / "clientapp-1.jsonl").write_text(
        "\n".join([task("train", "1", 0.5, 3.0), task("train.privfl_secagg_sum", "1", 4.0, 0.01)])
        + "\n"
    )
    got = exchanges(tmp_path)
    assert set(got[1]) == {"train", "evaluate", "secagg_sum"}
    assert got[1]["train"]["app"] == 3.0
    assert got[1]["train"]["span"] == pytest.approx(0.5 + 3.15)
    assert got[1]["evaluate"]["transfer"] == pytest.approx(0.15)
