"""Tests of privfl.data's shared store: one read-only, memory-mapped pool per dataset split,
shared by every process, and parties that are views of it rather than copies."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from privfl.config import DataSection, Scenario, load_scenario
from privfl.data import (
    ImageSet,
    federation,
    imageset,
    load_dataset,
    load_federation,
    loading,
    mnist,
    store,
)
from privfl.training import round_batch_data

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("PRIVFL_DATA", raising=False)
    monkeypatch.setenv("PRIVFL_CACHE", str(tmp_path / "cache"))
    _forget()
    yield
    _forget()


def _forget() -> None:
    """Drop this process's loaded sets, as a fresh process would start."""
    for cached in (
        mnist._load_split,
        loading._load_sets,
        federation._federation,
        federation._own_data,
    ):
        cached.cache_clear()
    store._BUILDS.clear()


def _scenario(**data_section) -> Scenario:
    return Scenario.from_dict(
        {"scenario": {"seed": 5}, "data": data_section, "training": {"batch_size": 4}}
    )


def _thousand_clinics(*overrides: str) -> Scenario:
    return load_scenario(SCENARIOS / "thousand_clinics.toml", overrides)


def _pool_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / "pools").glob("*.pool"))


def _decoded(name: str = "mnist-train") -> ImageSet:
    """The split decoded straight from its files, into this process's memory."""
    spec = mnist._spec("mnist")
    source = mnist._resolve_source(DataSection())
    return mnist._decode_split(spec, source, name.endswith("train"))


# --------------------------------------------------------------------------- no copies


def test_a_thousand_parties_hold_views_not_copies():
    fed = load_federation(_thousand_clinics('data.root="embedded"'))
    assert len(fed.parties) == 1000
    pool = fed.train_pool
    pool_bytes = pool.images.numel() * pool.images.element_size()
    party_bytes = 0
    for p in fed.parties:
        for part, idx in ((p.train, p.train_indices), (p.test, p.test_indices)):
            assert part.pool is pool
            assert np.array_equal(part.rows, idx)
            assert not idx.size or np.shares_memory(part.rows, p.indices)
            party_bytes += part.labels.numel() * part.labels.element_size()
        party_bytes += p.indices.nbytes
    # 8 samples of 3,136 bytes each per party in the pool; the parties hold 8-byte numbers.
    assert party_bytes * 100 < pool_bytes
    # The pool itself is the memory-mapped cache file, not a tensor of this process's own.
    assert not pool.images.numpy().flags.writeable and not pool.images.numpy().flags.owndata
    for p in fed.parties:
        assert p.train.images.shape == (8, 1, 28, 28)
    assert sum(p.train._gathered is not None for p in fed.parties) <= imageset._KEEP_GATHERED


@pytest.mark.skipif(not (SHARED_DATA / "MNIST").is_dir(), reason="no MNIST at ../shared/data")
def test_full_mnist_thousand_clinics_views_match_copies():
    sc = _thousand_clinics(f'data.root="{SHARED_DATA}"', "data.samples_per_party=60")
    fed = load_federation(sc)
    assert len(fed.train_pool) == 60_000 and {len(p.train) for p in fed.parties} == {60}
    plain = _decoded_from(SHARED_DATA)
    assert torch.equal(fed.train_pool.images, plain.images)
    for p in (fed.parties[0], fed.parties[499], fed.parties[-1]):
        old = plain.subset(p.train_indices)
        assert torch.equal(p.train.images, old.images)
        assert torch.equal(p.train.labels, old.labels)


def _decoded_from(root: Path) -> ImageSet:
    spec = mnist._spec("mnist")
    return mnist._decode_split(spec, mnist._resolve_source(DataSection(root=str(root))), True)


# --------------------------------------------------------------------------- same bytes


def test_views_give_what_the_copies_gave():
    sc = _scenario(parties=6, partition="dirichlet", alpha=0.3, party_test_fraction=0.25)
    fed = load_federation(sc)
    plain, plain_test = _decoded("mnist-train"), _decoded("mnist-test")
    assert torch.equal(fed.train_pool.images, plain.images)
    assert torch.equal(fed.train_pool.labels, plain.labels)
    for p in fed.parties:
        for view, idx in ((p.train, p.train_indices), (p.test, p.test_indices)):
            old = plain.subset(idx)
            assert torch.equal(view.images, old.images) and torch.equal(view.labels, old.labels)
        # A subset of a view (duplicates and negative positions too) is the copy's subset.
        pick = np.array([3, 0, 3, -1, len(p.train) - 2])
        got, old = p.train.subset(pick), plain.subset(p.train_indices).subset(pick)
        assert got.pool is fed.train_pool
        assert torch.equal(got.images, old.images) and torch.equal(got.labels, old.labels)
    for half in (fed.server_test, fed.public):
        old = plain_test.subset(half.rows)
        assert torch.equal(half.images, old.images) and torch.equal(half.labels, old.labels)
    assert len(set(fed.server_test.rows) | set(fed.public.rows)) == len(plain_test)
    batch = round_batch_data(sc, 2, 1)
    assert len(batch) > 0 and torch.equal(
        batch.labels, plain.labels[batch.rows]
    )  # rows of the pool, in batch order
    assert torch.equal(batch.images, plain.images[batch.rows])


def test_a_view_travels_as_its_rows():
    fed = load_federation(_scenario(parties=4))
    view = fed.parties[1].train
    blob = pickle.dumps(view)
    assert len(blob) * 20 < fed.train_pool.images.numel() * 4
    back = pickle.loads(blob)
    assert torch.equal(back.images, view.images) and torch.equal(back.labels, view.labels)
    assert back.sample_shape == (1, 28, 28) and len(back) == len(view)


# --------------------------------------------------------------------------- read-only


def test_the_pool_is_read_only():
    pool = load_federation(_scenario(parties=3)).train_pool
    before = pool.images[:2].clone()
    writes = [
        lambda: pool.images.__setitem__(0, 0.5),
        lambda: pool.images[:5].mul_(2),
        lambda: pool.images[1].zero_(),
        lambda: torch.add(before, before, out=pool.images[:2]),
        lambda: torch.nn.functional.relu(pool.images, inplace=True),
        lambda: pool.labels.fill_(0),
    ]
    for write in writes:
        with pytest.raises(RuntimeError, match="read-only data pool"):
            write()
    with pytest.raises(ValueError, match="read-only"):
        pool.images.numpy()[0, 0, 0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        pool.labels[:4].numpy()[0] = 1
    assert torch.equal(pool.images[:2], before)
    # Whatever is computed from the pool is an ordinary tensor of its own.
    shifted = pool.images[:2] + 1
    shifted.add_(1)
    copy = pool.images[:2].clone()
    copy.zero_()
    gathered = pool.images[[0, 1]]
    gathered[0] = 0.0
    assert type(shifted) is type(copy) is type(gathered) is torch.Tensor
    assert torch.equal(pool.images[:2], before)


# --------------------------------------------------------------------------- across processes

_CHILD = """
import hashlib, json, sys
from privfl import data
from privfl.config import Scenario
from privfl.data import store
fed = data.load_federation(Scenario.from_dict(json.loads(sys.argv[1])))
h = hashlib.sha256()
for p in fed.parties:
    h.update(p.train.images.numpy().tobytes() + p.train.labels.numpy().tobytes())
print(json.dumps({"builds": dict(store._BUILDS), "digest": h.hexdigest()}))
"""


def test_a_second_process_maps_the_file_the_first_wrote(tmp_path):
    raw = {"scenario": {"seed": 5}, "data": {"parties": 20, "samples_per_party": 40}}
    fed = load_federation(Scenario.from_dict(raw))
    assert store._BUILDS == {"mnist-train": 1, "mnist-test": 1}
    files = _pool_files(tmp_path)
    assert len(files) == 2
    stamps = [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(raw)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    child = json.loads(out.stdout.strip().splitlines()[-1])
    assert child["builds"] == {}  # it decoded nothing: it mapped the cache file
    assert [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files] == stamps
    h = hashlib.sha256()
    for p in fed.parties:
        h.update(p.train.images.numpy().tobytes() + p.train.labels.numpy().tobytes())
    assert child["digest"] == h.hexdigest()


def test_processes_starting_together_decode_once(tmp_path):
    raw = {"scenario": {"seed": 5}, "data": {"parties": 20, "samples_per_party": 40}}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, json.dumps(raw)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    outs = [json.loads(c.communicate(timeout=300)[0].strip().splitlines()[-1]) for c in children]
    assert all(c.returncode == 0 for c in children)
    builds = Counter()
    for out in outs:
        builds.update(out["builds"])
    assert builds == {"mnist-train": 1, "mnist-test": 1}  # the lock let one of them decode
    assert len({out["digest"] for out in outs}) == 1
    assert len(_pool_files(tmp_path)) == 2 and not list(
        _pool_files(tmp_path)[0].parent.glob("*.tmp")
    )


# --------------------------------------------------------------------------- corruption


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1000])


def _flip_a_pixel(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def _bad_header(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[20:40] = b"x" * 20
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", [_truncate, _flip_a_pixel, _bad_header, Path.unlink])
def test_a_damaged_cache_file_is_detected_and_rebuilt(tmp_path, damage):
    sc = DataSection()
    first, _, _ = load_dataset(sc)
    want_images, want_labels = first.images.clone(), first.labels.clone()
    path = next(f for f in _pool_files(tmp_path) if f.name.startswith("mnist-train"))
    size, inode = path.stat().st_size, path.stat().st_ino
    del first
    damage(path)
    _forget()
    again, _, _ = load_dataset(sc)
    assert store._BUILDS["mnist-train"] == 1  # decoded again, not mapped as it was
    assert torch.equal(again.images, want_images) and torch.equal(again.labels, want_labels)
    assert path.stat().st_size == size
    assert damage is Path.unlink or path.stat().st_ino != inode  # renamed into place
    assert not list(path.parent.glob("*.tmp"))
    _forget()
    load_dataset(sc)
    assert store._BUILDS["mnist-train"] == 0  # the rebuilt file is good


def test_an_unwritable_cache_keeps_a_private_copy(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("PRIVFL_CACHE", str(blocker / "cache"))
    with pytest.warns(UserWarning, match="cannot write the shared data cache"):
        fed = load_federation(_scenario(parties=3))
    plain = _decoded("mnist-train")
    assert torch.equal(fed.train_pool.images, plain.images)
    p = fed.parties[0]
    assert torch.equal(p.train.images, plain.subset(p.train_indices).images)
