"""Tests of privfl.data: loading (IDX, gzip, EMNIST, embedded, real MNIST) and splits."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from privfl.config import DataSection, Scenario, ScenarioError
from privfl.data import (
    EMBEDDED_SAMPLE,
    MNIST_MD5,
    DataError,
    ImageSet,
    build_embedded_sample,
    load_dataset,
    load_federation,
    partition,
)

# CI checks the repository out next to ../shared; here that is /work/shared/data.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    monkeypatch.delenv("PRIVFL_DATA", raising=False)
    monkeypatch.setenv("PRIVFL_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------- IDX writers


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """Write ``array`` (uint8) as an IDX file, optionally gzip-compressed."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def fake_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def write_mnist_like(raw: Path, *, gz: bool = False, n_train: int = 40, n_test: int = 20):
    """MNIST-named IDX files in ``raw``; returns the arrays written."""
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": fake_images(n_train, 2),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": fake_images(n_test, 3),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        write_idx(raw / name, arr, gz=gz)
    return arrays


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- ImageSet


def test_imageset_subset_and_len():
    images = torch.rand(5, 1, 28, 28)
    labels = torch.arange(5)
    s = ImageSet(images, labels)
    sub = s.subset(np.array([4, 1]))
    assert len(s) == 5 and len(sub) == 2
    assert torch.equal(sub.images, images[[4, 1]]) and sub.labels.tolist() == [4, 1]
    assert len(s.subset([])) == 0
    with pytest.raises(IndexError, match="out of range"):
        s.subset([5])
    with pytest.raises(ValueError, match="integer"):
        s.subset(np.array([0.5]))


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (torch.rand(3, 28, 28), torch.zeros(3, dtype=torch.int64), "images"),
        (torch.rand(3, 1, 28, 28).double(), torch.zeros(3, dtype=torch.int64), "images"),
        (torch.rand(3), torch.zeros(3, dtype=torch.int64), "images"),
        (torch.rand(3, 3, 0, 28), torch.zeros(3, dtype=torch.int64), "images"),
        (torch.full((3, 5), float("nan")), torch.zeros(3, dtype=torch.int64), "finite"),
        (torch.rand(3, 1, 28, 28), torch.zeros(3, dtype=torch.int32), "labels"),
        (torch.rand(3, 1, 28, 28), torch.zeros(2, dtype=torch.int64), "3 images but 2 labels"),
        (torch.rand(3, 1, 28, 28) * 2, torch.zeros(3, dtype=torch.int64), r"\[0, 1\]"),
    ],
)
def test_imageset_rejects_bad_shapes(images, labels, match):
    with pytest.raises(ValueError, match=match):
        ImageSet(images, labels)


def test_imageset_takes_colour_images_of_any_size_and_tabular_rows():
    colour = ImageSet(torch.rand(4, 3, 32, 20), torch.arange(4))
    assert colour.sample_shape == (3, 32, 20) and colour.subset([1, 2]).sample_shape == (3, 32, 20)
    # Rows are features, not pixels: any finite value.
    rows = ImageSet(torch.randn(4, 7) * 10, torch.arange(4))
    assert rows.sample_shape == (7,) and float(rows.images.min()) < 0


# --------------------------------------------------------------------------- partition


def balanced_labels(per_class: int = 100, classes: int = 10) -> np.ndarray:
    return np.repeat(np.arange(classes), per_class)


def check_disjoint_cover(parts: list[np.ndarray], n: int, *, full: bool = True) -> None:
    joined = np.concatenate(parts)
    assert joined.size == np.unique(joined).size, "parties overlap"
    assert joined.min() >= 0 and joined.max() < n
    if full:
        assert joined.size == n
    for p in parts:
        assert np.all(np.diff(p) > 0), "each party's indices are sorted"


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each party's labels and the global ones."""
    classes = labels.max() + 1
    overall = np.bincount(labels, minlength=classes) / labels.size
    tv = [
        0.5 * np.abs(np.bincount(labels[p], minlength=classes) / p.size - overall).sum()
        for p in parts
    ]
    return float(np.mean(tv))


KW = {"alpha": 0.5, "shards_per_party": 2, "seed": 0}


def test_iid_sizes_disjoint_cover():
    labels = balanced_labels()
    parts = partition(labels, 7, "iid", **KW)
    check_disjoint_cover(parts, labels.size)
    assert sorted(len(p) for p in parts) == [142] + [143] * 6
    assert label_skew(labels, parts) < 0.1


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(20, 400),
    classes=st.integers(1, 12),
    parties=st.integers(1, 8),
    scheme=st.sampled_from(["iid", "dirichlet", "shards"]),
    alpha=st.floats(0.01, 10.0),
    seed=st.integers(-(2**40), 2**40),
)
def test_partition_properties(n, classes, parties, scheme, alpha, seed):
    labels = np.random.default_rng(0).integers(0, classes, n)
    parts = partition(labels, parties, scheme, alpha=alpha, shards_per_party=2, seed=seed)
    assert len(parts) == parties and all(p.size > 0 for p in parts)
    check_disjoint_cover(parts, n)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partition_is_seeded(scheme):
    labels = balanced_labels()
    a = partition(labels, 5, scheme, alpha=0.3, shards_per_party=2, seed=3)
    b = partition(labels, 5, scheme, alpha=0.3, shards_per_party=2, seed=3)
    c = partition(labels, 5, scheme, alpha=0.3, shards_per_party=2, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    check_disjoint_cover(a, labels.size)


def test_dirichlet_skews_labels_and_alpha_controls_it():
    labels = balanced_labels(200)
    skewed = partition(labels, 10, "dirichlet", alpha=0.1, shards_per_party=2, seed=0)
    mild = partition(labels, 10, "dirichlet", alpha=100.0, shards_per_party=2, seed=0)
    iid = partition(labels, 10, "iid", **KW)
    check_disjoint_cover(skewed, labels.size)
    assert label_skew(labels, skewed) > 0.4
    assert label_skew(labels, mild) < 0.15
    assert label_skew(labels, iid) < 0.1


def test_dirichlet_never_leaves_a_party_tiny():
    labels = balanced_labels(50)
    for seed in range(5):
        parts = partition(labels, 25, "dirichlet", alpha=0.01, shards_per_party=2, seed=seed)
        check_disjoint_cover(parts, labels.size)
        assert min(len(p) for p in parts) >= 10


def test_shards_give_few_labels_per_party():
    labels = np.random.default_rng(0).permutation(balanced_labels())
    parts = partition(labels, 10, "shards", alpha=1.0, shards_per_party=2, seed=0)
    check_disjoint_cover(parts, labels.size)
    assert all(len(p) == 100 for p in parts)
    assert all(np.unique(labels[p]).size <= 2 for p in parts)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_samples_per_party_caps(scheme):
    labels = balanced_labels()
    parts = partition(labels, 4, scheme, samples_per_party=60, **KW)
    assert [len(p) for p in parts] == [60] * 4
    check_disjoint_cover(parts, labels.size, full=False)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_samples_per_party_too_large(scheme):
    with pytest.raises(ScenarioError, match=r"data\.samples_per_party"):
        partition(balanced_labels(), 4, scheme, samples_per_party=400, **KW)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"parties": 0}, r"data\.parties"),
        ({"parties": 1001}, r"data\.parties"),
        ({"scheme": "random"}, r"data\.partition"),
        ({"scheme": "dirichlet", "alpha": 0.0}, r"data\.alpha"),
        ({"scheme": "shards", "shards_per_party": 0}, r"data\.shards_per_party"),
        ({"scheme": "shards", "shards_per_party": 300}, r"data\.shards_per_party"),
    ],
)
def test_partition_errors(kwargs, match):
    args = {"parties": 4, "scheme": "iid", **KW, **kwargs}
    labels = balanced_labels()
    with pytest.raises(ScenarioError, match=match):
        partition(labels, args.pop("parties"), args.pop("scheme"), **args)


def test_partition_rejects_non_integer_labels():
    with pytest.raises(ValueError, match="labels"):
        partition(np.zeros((4, 2), dtype=int), 2, "iid", **KW)


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("layout", ["torchvision", "raw-folder", "dataset-folder"])
def test_loads_plain_idx_in_any_layout(tmp_path, layout):
    root = tmp_path / "data"
    arrays = write_mnist_like(root / "MNIST" / "raw")
    given = {
        "torchvision": root,
        "raw-folder": root / "MNIST" / "raw",
        "dataset-folder": root / "MNIST",
    }[layout]
    before = files_under(root)
    train, test, classes = load_dataset(DataSection(root=str(given)))
    assert classes == 10
    assert train.images.shape == (40, 1, 28, 28) and test.images.shape == (20, 1, 28, 28)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"]).float() / 255
    assert torch.equal(train.images[:, 0], expected)
    assert train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert files_under(root) == before
    # Decoded once per process.
    assert load_dataset(DataSection(root=str(given)))[0] is train


def test_gz_is_unpacked_into_cache_not_root(tmp_path):
    root = tmp_path / "data"
    arrays = write_mnist_like(root / "FashionMNIST" / "raw", gz=True)
    before = files_under(root)
    train, test, classes = load_dataset(DataSection(dataset="fashion-mnist", root=str(root)))
    assert classes == 10 and len(train) == 40 and len(test) == 20
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float() / 255
    assert torch.equal(test.images[:, 0], expected)
    assert files_under(root) == before
    unpacked = sorted(p.name for p in (tmp_path / "cache").rglob("*-ubyte"))
    assert unpacked == sorted(MNIST_FILES)


def test_mnist_gz_md5_mismatch_is_detected(tmp_path):
    root = tmp_path / "data"
    write_mnist_like(root / "MNIST" / "raw", gz=True)
    with pytest.raises(DataError, match=r"md5.*expected") as err:
        load_dataset(DataSection(root=str(root)))
    assert "-ubyte.gz" in str(err.value) and str(root) in str(err.value)
    # Nothing that failed its check stays in the cache.
    assert not list((tmp_path / "cache").rglob("*-ubyte"))


def write_emnist_letters(raw: Path, upright: np.ndarray, letters: np.ndarray, *, gz: bool):
    """EMNIST stores every image transposed; labels 1..26."""
    for part in ("train", "test"):
        write_idx(
            raw / f"emnist-letters-{part}-images-idx3-ubyte", upright.transpose(0, 2, 1), gz=gz
        )
        write_idx(raw / f"emnist-letters-{part}-labels-idx1-ubyte", letters, gz=gz)


@pytest.mark.parametrize("gz", [False, True])
def test_emnist_letters_upright_and_zero_based(tmp_path, gz):
    upright = fake_images(26, 5) // 4
    upright[:, 2, :] = 255  # a bar across the top: transposed it would be a left column
    upright[:, 10:20, 5] = 128
    letters = np.arange(1, 27, dtype=np.uint8)
    root = tmp_path / "data"
    write_emnist_letters(root / "EMNIST" / "raw", upright, letters, gz=gz)
    train, test, classes = load_dataset(DataSection(dataset="emnist-letters", root=str(root)))
    assert classes == 26
    assert train.labels.tolist() == list(range(26)) and test.labels.tolist() == list(range(26))
    assert torch.equal(train.images[:, 0], torch.from_numpy(upright).float() / 255)
    assert bool((train.images[:, 0, 2, :] >= 1.0 - 1e-6).all())


def test_emnist_letters_label_zero_is_rejected(tmp_path):
    raw = tmp_path / "data" / "EMNIST" / "raw"
    write_emnist_letters(raw, fake_images(3, 0), np.array([0, 1, 2], dtype=np.uint8), gz=False)
    with pytest.raises(DataError, match="emnist-letters-train-labels-idx1-ubyte"):
        load_dataset(DataSection(dataset="emnist-letters", root=str(tmp_path / "data")))


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_file_is_named(tmp_path, gz):
    raw = tmp_path / "data" / "MNIST" / "raw"
    write_mnist_like(raw, gz=False)
    bad = raw / "t10k-images-idx3-ubyte"
    data = bad.read_bytes()[:-100]
    if gz:
        bad.unlink()
        bad = raw / "t10k-images-idx3-ubyte.gz"
        bad.write_bytes(gzip.compress(data)[:-20])  # a cut gzip stream
    else:
        bad.write_bytes(data)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte") as err:
        load_dataset(DataSection(dataset="mnist", root=str(tmp_path / "data")))
    assert "truncated" in str(err.value)
    if not gz:  # caught by the IDX header check, before torchvision reads it
        assert "header says shape (20, 28, 28)" in str(err.value)


def test_missing_files_error_lists_what_was_looked_for(tmp_path):
    root = tmp_path / "nothing-here"
    (root / "MNIST" / "raw").mkdir(parents=True)
    write_idx(root / "MNIST" / "raw" / "train-images-idx3-ubyte", fake_images(2, 0))
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(DataSection(root=str(root)))
    msg = str(err.value)
    for folder in (root / "MNIST" / "raw", root / "MNIST", root / "raw", root):
        assert f"{folder}/{{" in msg
    for name in MNIST_FILES:
        assert name in msg
    assert "missing: train-labels-idx1-ubyte, t10k-images" in msg
    assert "no such folder" in msg and ".gz" in msg and "PRIVFL_DATA" in msg


def test_privfl_data_env_is_the_default_root(tmp_path, monkeypatch):
    write_mnist_like(tmp_path / "env-data" / "MNIST" / "raw", n_train=12)
    monkeypatch.setenv("PRIVFL_DATA", str(tmp_path / "env-data"))
    train, _, _ = load_dataset(DataSection())
    assert len(train) == 12
    # An explicit root wins over the environment; "embedded" names the shipped sample.
    assert len(load_dataset(DataSection(root="embedded"))[0]) == 8000


def test_other_datasets_need_a_root():
    with pytest.raises(DataError, match=r"data\.root.*PRIVFL_DATA"):
        load_dataset(DataSection(dataset="emnist-letters"))


def test_embedded_sample_is_the_default():
    assert EMBEDDED_SAMPLE.is_file() and EMBEDDED_SAMPLE.stat().st_size < 3_000_000
    train, test, classes = load_dataset(DataSection())
    assert classes == 10
    assert train.images.shape == (8000, 1, 28, 28) and test.images.shape == (2000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [800] * 10
    assert torch.bincount(test.labels).tolist() == [200] * 10
    assert float(train.images.min()) >= 0.0 and float(train.images.max()) == 1.0
    # Real digits, not noise: about a fifth of MNIST pixels are ink.
    assert 0.1 < float((train.images > 0.5).float().mean()) < 0.3


def test_build_embedded_sample_is_reproducible(tmp_path):
    src = tmp_path / "src"
    arrays = write_mnist_like(src / "MNIST" / "raw", n_train=60, n_test=30)
    # Re-draw the labels so every class is present often enough.
    for name, n in (("train-labels-idx1-ubyte", 60), ("t10k-labels-idx1-ubyte", 30)):
        arrays[name] = np.arange(n, dtype=np.uint8) % 10
        write_idx(src / "MNIST" / "raw" / name, arrays[name])
    a = build_embedded_sample(src, tmp_path / "a.npz", n_train=20, n_test=10, seed=1)
    b = build_embedded_sample(src, tmp_path / "b.npz", n_train=20, n_test=10, seed=1)
    c = build_embedded_sample(src, tmp_path / "c.npz", n_train=20, n_test=10, seed=2)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    with np.load(a) as npz:
        idx = npz["train_source_index"]
        assert np.bincount(npz["train_labels"]).tolist() == [2] * 10
        assert np.array_equal(npz["train_images"], arrays["train-images-idx3-ubyte"][idx])
        assert npz["test_images"].shape == (10, 28, 28)


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="no ../shared/data")
def test_real_mnist(tmp_path):
    train, test, classes = load_dataset(DataSection(root=str(SHARED_DATA)))
    assert (len(train), len(test), classes) == (60000, 10000, 10)
    assert torch.bincount(train.labels).tolist()[:3] == [5923, 6742, 5958]
    unpacked = {p.name: p for p in (tmp_path / "cache").rglob("*-ubyte")}
    assert sorted(unpacked) == sorted(MNIST_MD5)
    for name, md5 in MNIST_MD5.items():
        assert hashlib.md5(unpacked[name].read_bytes()).hexdigest() == md5
    # The embedded sample is drawn from exactly these images.
    with np.load(EMBEDDED_SAMPLE) as npz:
        idx = npz["train_source_index"]
        expected = torch.from_numpy(npz["train_images"]).float() / 255
    assert torch.equal(train.images[idx, 0], expected)


# --------------------------------------------------------------------------- federation


def scenario(seed: int = 0, **data) -> Scenario:
    return Scenario.from_dict({"scenario": {"seed": seed}, "data": data})


def image_keys(s: ImageSet) -> set[bytes]:
    return {row.numpy().tobytes() for row in s.images}


def test_federation_splits():
    fed = load_federation(scenario(parties=4, partition="dirichlet", party_test_fraction=0.2))
    assert fed.num_classes == 10 and len(fed.train_pool) == 8000
    assert len(fed.parties) == 4
    all_idx = np.concatenate([p.indices for p in fed.parties])
    assert all_idx.size == np.unique(all_idx).size == 8000
    for p in fed.parties:
        assert len(p.test) == int(0.2 * p.indices.size)
        assert len(p.train) + len(p.test) == p.indices.size
        assert np.intersect1d(p.train_indices, p.test_indices).size == 0
        assert torch.equal(p.train.images, fed.train_pool.subset(p.train_indices).images)
        assert torch.equal(p.test.labels, fed.train_pool.subset(p.test_indices).labels)
    assert len(fed.public) == len(fed.server_test) == 1000
    assert not image_keys(fed.public) & image_keys(fed.server_test)
    assert not image_keys(fed.public) & image_keys(fed.train_pool)
    assert (
        load_federation(scenario(parties=4, partition="dirichlet", party_test_fraction=0.2)) is fed
    )


def test_federation_caps_and_errors():
    fed = load_federation(scenario(parties=3, samples_per_party=500, server_test_samples=300))
    assert [p.indices.size for p in fed.parties] == [500] * 3
    assert [len(p.train) for p in fed.parties] == [450] * 3
    assert len(fed.server_test) == 300 and len(fed.public) == 1000
    with pytest.raises(ScenarioError, match=r"data\.server_test_samples"):
        load_federation(scenario(server_test_samples=1001))
    with pytest.raises(ScenarioError, match=r"data\.samples_per_party"):
        load_federation(scenario(parties=3, samples_per_party=2700, party_test_fraction=0.0))


def test_federation_same_seed_same_bytes():
    from privfl.data.federation import _federation

    a = load_federation(scenario(seed=7, parties=3, partition="shards"))
    _federation.cache_clear()
    b = load_federation(scenario(seed=7, parties=3, partition="shards"))
    c = load_federation(scenario(seed=8, parties=3, partition="shards"))
    assert a is not b
    for pa, pb, pc in zip(a.parties, b.parties, c.parties, strict=True):
        assert np.array_equal(pa.indices, pb.indices)
        assert torch.equal(pa.train.images, pb.train.images)
        assert not np.array_equal(pa.indices, pc.indices)
    assert torch.equal(a.public.images, b.public.images)
    assert torch.equal(a.server_test.labels, b.server_test.labels)
    assert not torch.equal(a.public.images, c.public.images)
