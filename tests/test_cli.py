"""The command line: every user error is one line naming what to fix, exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from privfl import __version__
from privfl.cli import main

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
FILES += ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _corrupt_root(tmp_path):
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FILES:
        (raw / name).write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 12)  # header of 0 images
    # A truncated image file: its header promises 10 images.
    (raw / FILES[0]).write_bytes(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") + bytes(8))
    return raw.parent.parent


def _bad_run(tmp_path):
    run = tmp_path / "badrun"
    run.mkdir()
    (run / "results.json").write_text("{truncated")
    return run


# (argv, what the message must name); each is a mistake a user can make.
CASES = {
    "unknown scenario": (["run", "no_such_scenario"], "no_such_scenario"),
    "unknown key": (["run", "three_hospitals", "--set", "training.nosuch=1"], "training.nosuch"),
    "bad value": (["run", "three_hospitals", "--set", "data.parties=0"], "data.parties"),
    "NaN": (["run", "three_hospitals", "--set", "training.lr=nan"], "training.lr"),
    "inf": (
        ["run", "three_hospitals", "--set", "defense.secagg.clip_range=inf"],
        "defense.secagg.clip_range",
    ),
    "bad override": (["run", "three_hospitals", "--set", "rounds"], "section.key=value"),
    "missing data folder": (
        ["run", "three_hospitals", "--set", "data.root=/nonexistent/privfl-data"],
        "data.root",
    ),
    "fashion-mnist without data": (
        ["run", "three_hospitals", "--set", "data.dataset=fashion-mnist"],
        "data.dataset",
    ),
    "corrupt IDX file": (["run", "three_hospitals", "--set", "data.root={root}"], FILES[0]),
    "missing run folder": (["report", "{tmp}/nowhere"], "nowhere/results.json"),
    "corrupt results.json": (["report", "{badrun}"], "badrun/results.json"),
    "bad grid": (
        ["sweep", "three_hospitals", "--grid", "defense.dp", "--out", "{tmp}/s"],
        "--grid",
    ),
    "bad grid value": (
        ["sweep", "three_hospitals", "--grid", "training.lr=0.1,fast", "--out", "{tmp}/s"],
        "training.lr",
    ),
}
if not torch.cuda.is_available():
    CASES["CUDA without a GPU"] = (
        ["run", "three_hospitals", "--set", "scenario.device=cuda"],
        "scenario.device",
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_errors_are_one_line_without_traceback(case, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PRIVFL_DATA", raising=False)
    argv, named = CASES[case]
    fill = {"tmp": tmp_path, "root": "", "badrun": ""}
    if "{root}" in " ".join(argv):
        fill["root"] = _corrupt_root(tmp_path)
    if "{badrun}" in " ".join(argv):
        fill["badrun"] = _bad_run(tmp_path)
    argv = [a.format(**fill) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("privfl: error: ")
    assert named in err
    assert "Traceback" not in err


def test_verbose_shows_the_traceback(capsys):
    assert main(["-v", "run", "three_hospitals", "--set", "training.lr=nan"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "privfl: error: training.lr" in err


def test_the_installed_command_exits_2_and_prints_no_traceback():
    cmd = [sys.executable, "-m", "privfl.cli", "run", "three_hospitals", "--set", "data.parties=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "data.parties" in proc.stderr and "Traceback" not in proc.stderr
    version = subprocess.run(
        [sys.executable, "-m", "privfl.cli", "--version"], capture_output=True, text=True
    )
    assert version.returncode == 0 and version.stdout.strip() == f"privfl {__version__}"


def test_a_bug_still_shows_its_traceback(monkeypatch):
    # Only user errors are shortened: anything else is a bug and must keep its traceback.
    import privfl.cli as cli

    def broken(args):
        raise KeyError("internal")

    monkeypatch.setattr(cli, "_cmd_scenarios", broken)
    with pytest.raises(KeyError):
        main(["scenarios"])
