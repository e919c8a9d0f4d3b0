"""Datasets of the MNIST family, the embedded MNIST sample, and seeded federated splits.

Where the images come from (:func:`load_dataset`):

1. ``data.root`` if set (``"embedded"`` selects the shipped MNIST sample);
2. else the environment variable ``PRIVFL_DATA``;
3. else, with ``data.download = true``, a download into privfl's cache;
4. else, for ``mnist`` only, the real 8,000 + 2,000 image sample shipped with privfl.

A root may be laid out as torchvision expects (``<root>/MNIST/raw/<files>``) or point at
the ``raw`` folder or its parent. IDX files may be plain or ``.gz``. Anything not already
in torchvision's layout is laid out in privfl's cache (``$PRIVFL_CACHE`` or
``~/.cache/privfl``), never next to the source: ``.gz`` files are unpacked there (MNIST
ones checked against their known md5), plain files linked. Every IDX header is checked
against its file's size, so a truncated file fails with its name.

How a dataset is shared out (:func:`load_federation`): the train set is partitioned among
the parties (:func:`partition`), each party keeps a fraction as its local test split, and
the test set is halved into the server's public data and the server's test data. Every
split is drawn from ``scenario.seed``: the same scenario gives the same bytes.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torchvision

from privfl.config import DataSection, Scenario, ScenarioError
from privfl.errors import UserError

__all__ = [
    "EMBEDDED_SAMPLE",
    "DataError",
    "Federation",
    "ImageSet",
    "PartyData",
    "build_embedded_sample",
    "cache_dir",
    "load_dataset",
    "load_federation",
    "partition",
]

EMBEDDED_SAMPLE = Path(__file__).resolve().parent / "_embedded" / "mnist_sample.npz"
IMAGE_SHAPE = (1, 28, 28)

# md5 of the original MNIST files, uncompressed. No other dataset
# gets a check: we only record digests we know exactly.
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}


class DataError(UserError, ValueError):
    """A data file is missing, corrupt or inconsistent; the message names the file."""


# --------------------------------------------------------------------------- ImageSet


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images and their labels.

    Parameters
    ----------
    images : torch.Tensor
        float32, shape ``(N, 1, 28, 28)``, values in [0, 1].
    labels : torch.Tensor
        int64, shape ``(N,)``.

    Notes
    -----
    Loaded sets are cached per process and shared: treat the tensors as read-only.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        im, lb = self.images, self.labels
        if not isinstance(im, torch.Tensor) or not isinstance(lb, torch.Tensor):
            raise TypeError(
                "ImageSet: images and labels must be torch tensors, got "
                f"{type(im).__name__} and {type(lb).__name__}"
            )
        if im.dtype != torch.float32 or im.ndim != 4 or tuple(im.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(
                f"ImageSet.images: expected float32 of shape (N, 1, 28, 28), "
                f"got {im.dtype} of shape {tuple(im.shape)}"
            )
        if lb.dtype != torch.int64 or lb.ndim != 1:
            raise ValueError(
                f"ImageSet.labels: expected int64 of shape (N,), got {lb.dtype} of shape "
                f"{tuple(lb.shape)}"
            )
        if im.shape[0] != lb.shape[0]:
            raise ValueError(
                f"ImageSet: {im.shape[0]} images but {lb.shape[0]} labels; they must match"
            )
        if im.numel() and (im.min() < 0 or im.max() > 1):
            raise ValueError(
                f"ImageSet.images: values must lie in [0, 1], got "
                f"[{im.min().item():.4g}, {im.max().item():.4g}]"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray | torch.Tensor | Sequence[int]) -> ImageSet:
        """The images at ``indices`` (integer positions, in the given order), as a copy."""
        idx = torch.as_tensor(np.asarray(indices) if not torch.is_tensor(indices) else indices)
        if idx.ndim != 1 or (idx.numel() and idx.dtype not in _INDEX_DTYPES):
            raise ValueError(
                f"ImageSet.subset: indices must be a 1-D integer array, got dtype {idx.dtype} "
                f"and shape {tuple(idx.shape)}"
            )
        idx = idx.to(torch.int64)
        n = len(self)
        if idx.numel() and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"ImageSet.subset: indices out of range for a set of {n} images")
        return ImageSet(self.images[idx], self.labels[idx])


_INDEX_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


# --------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class _Spec:
    """What torchvision calls a dataset and which files it reads."""

    name: str  # as in data.dataset
    folder: str  # torchvision's folder under the root: MNIST, FashionMNIST, EMNIST
    split: str  # EMNIST split, "" otherwise
    num_classes: int
    label_offset: int  # subtracted from the stored labels (EMNIST letters: 1..26)
    transposed: bool  # EMNIST stores images transposed

    def files(self, train: bool) -> tuple[str, str]:
        """Names of the (images, labels) IDX files of the train or test split."""
        if self.folder == "EMNIST":
            part = "train" if train else "test"
            prefix = f"emnist-{self.split}-{part}"
        else:
            prefix = "train" if train else "t10k"
        return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"

    def all_files(self) -> tuple[str, ...]:
        return self.files(True) + self.files(False)

    def md5(self, name: str) -> str | None:
        return MNIST_MD5.get(name) if self.folder == "MNIST" else None

    def torchvision_set(
        self, root: Path, train: bool, download: bool
    ) -> torchvision.datasets.MNIST:
        kw = {"root": str(root), "train": train, "download": download}
        if self.folder == "EMNIST":
            return torchvision.datasets.EMNIST(split=self.split, **kw)
        if self.folder == "FashionMNIST":
            return torchvision.datasets.FashionMNIST(**kw)
        return torchvision.datasets.MNIST(**kw)


def _spec(dataset: str) -> _Spec:
    if dataset == "mnist":
        return _Spec("mnist", "MNIST", "", 10, 0, False)
    if dataset == "fashion-mnist":
        return _Spec("fashion-mnist", "FashionMNIST", "", 10, 0, False)
    split = dataset.removeprefix("emnist-")
    classes = torchvision.datasets.EMNIST.classes_split_dict.get(split)
    if not dataset.startswith("emnist-") or classes is None:
        raise ScenarioError(
            f"data.dataset: unknown dataset {dataset!r}; accepted: mnist, fashion-mnist, "
            f"emnist-<split> with split in {', '.join(torchvision.datasets.EMNIST.splits)}"
        )
    # Letters keep an unused class 0 ("N/A") in torchvision; we shift 1..26 to 0..25.
    offset = 1 if split == "letters" else 0
    return _Spec(dataset, "EMNIST", split, len(classes) - offset, offset, True)


def cache_dir() -> Path:
    """privfl's own cache: ``$PRIVFL_CACHE`` or ``~/.cache/privfl``."""
    env = os.environ.get("PRIVFL_CACHE", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "privfl"


@dataclass(frozen=True)
class _Source:
    """A resolved data source: the embedded sample or a torchvision root."""

    kind: Literal["embedded", "torchvision"]
    path: Path  # the .npz, or the folder that holds <folder>/raw/
    download: bool = False


def _resolve_source(data: DataSection) -> _Source:
    spec = _spec(data.dataset)
    root = data.root or os.environ.get("PRIVFL_DATA", "")
    if root == "embedded" or (not root and not data.download):
        if spec.name != "mnist":
            raise DataError(
                f"data.dataset = {spec.name!r} has no embedded sample (only mnist has); set "
                "data.root or the environment variable PRIVFL_DATA to a folder holding "
                f"{spec.folder}/raw/ with {', '.join(spec.all_files())} (or their .gz), "
                "or set data.download = true"
            )
        return _Source("embedded", EMBEDDED_SAMPLE)
    if not root:
        return _Source("torchvision", _download_root(), download=True)
    path = Path(root).expanduser().resolve()
    return _Source("torchvision", _prepare_root(spec, path, data.download), data.download)


def _download_root() -> Path:
    # Downloads go to privfl's cache, never into a user's (possibly shared) root.
    path = cache_dir() / "downloads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _candidates(spec: _Spec, root: Path) -> list[Path]:
    """Folders that may hold the raw files, in the order they are tried."""
    return [root / spec.folder / "raw", root / spec.folder, root / "raw", root]


def _prepare_root(spec: _Spec, root: Path, download: bool) -> Path:
    """A torchvision root for ``spec`` found under ``root``, unpacked into the cache if needed."""
    names = spec.all_files()
    for raw in _candidates(spec, root):
        found = {n: raw / n if (raw / n).is_file() else raw / f"{n}.gz" for n in names}
        if not all(p.is_file() for p in found.values()):
            continue
        plain = all(p.name == n for n, p in found.items())
        if plain and raw.name == "raw" and raw.parent.name == spec.folder:
            for p in found.values():
                _check_idx(p)
            return raw.parent.parent
        return _unpack_to_cache(spec, found)
    if download:
        return _download_root()
    looked = "\n".join(_describe_candidate(raw, names) for raw in _candidates(spec, root))
    raise FileNotFoundError(
        f"data.root: no {spec.name} files found under {str(root)!r}; looked for\n{looked}\n"
        "(each file plain or gzip-compressed); set data.root or PRIVFL_DATA to the folder that "
        f"holds {spec.folder}/raw/, or set data.download = true"
    )


def _describe_candidate(raw: Path, names: tuple[str, ...]) -> str:
    line = f"  {raw}/{{{', '.join(names)}}}[.gz]"
    if not raw.is_dir():
        return f"{line}  (no such folder)"
    missing = [n for n in names if not (raw / n).is_file() and not (raw / f"{n}.gz").is_file()]
    return f"{line}  (missing: {', '.join(missing)})"


def _unpack_to_cache(spec: _Spec, found: dict[str, Path]) -> Path:
    """Lay the files out for torchvision in the cache: ``.gz`` unpacked, plain ones linked."""
    # Keyed by the sources' paths, sizes and mtimes so a changed source is unpacked again.
    key = hashlib.sha256()
    for name in sorted(found):
        st = found[name].stat()
        key.update(f"{found[name].resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    tv_root = cache_dir() / "raw" / f"{spec.folder}-{key.hexdigest()[:16]}"
    raw = tv_root / spec.folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, src in found.items():
        dst = raw / name
        if dst.is_file():
            continue  # written atomically, after its checks passed
        tmp = raw / f".{name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        if src.suffix != ".gz":
            _check_idx(src)
            tmp.symlink_to(src.resolve())
        else:
            tmp.write_bytes(_unpack_checked(spec, name, src))
        os.replace(tmp, dst)  # atomic: parallel parties may unpack the same file
    return tv_root


def _unpack_checked(spec: _Spec, name: str, src: Path) -> bytes:
    """The uncompressed bytes of ``src``, md5- (where known) and IDX-checked."""
    try:
        payload = gzip.decompress(src.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{src}: corrupt or truncated gzip file ({exc})") from exc
    expected = spec.md5(name)
    if expected is not None:
        got = hashlib.md5(payload).hexdigest()
        if got != expected:
            raise DataError(
                f"{src}: md5 of the uncompressed {name} is {got}, expected {expected}; "
                "the file is corrupt or not the original MNIST file"
            )
    _check_idx_bytes(src, payload[:16], len(payload))
    return payload


def _check_idx(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(16)
    _check_idx_bytes(path, head, path.stat().st_size)


def _check_idx_bytes(path: Path, head: bytes, size: int) -> None:
    """Raise :class:`DataError` unless ``head`` is an IDX uint8 header matching ``size``."""
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08 or head[3] not in (1, 3):
        raise DataError(f"{path}: not an IDX file of uint8 images or labels (bad header)")
    ndim = head[3]
    if len(head) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if size != expected:
        raise DataError(
            f"{path}: truncated or corrupt IDX file: header says shape {tuple(dims)} "
            f"({expected} bytes) but the file has {size} bytes"
        )
    if ndim == 3 and dims[1:] != [28, 28]:
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, expected 28x28")


@functools.lru_cache(maxsize=8)
def _load_split(spec: _Spec, source: _Source, train: bool) -> ImageSet:
    """Decode one split; cached per process on the resolved source."""
    if source.kind == "embedded":
        return _load_embedded(source.path, train)
    try:
        ds = spec.torchvision_set(source.path, train, source.download)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise DataError(
            f"{source.path / spec.folder / 'raw'}: torchvision could not read "
            f"{', '.join(spec.files(train))} ({exc})"
        ) from exc
    images, labels = ds.data, ds.targets.to(torch.int64) - spec.label_offset
    if spec.transposed:
        images = images.transpose(1, 2)  # EMNIST is stored column-major
    images_file, labels_file = (source.path / spec.folder / "raw" / n for n in spec.files(train))
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_file} holds {images.shape[0]} images but {labels_file} holds "
            f"{labels.shape[0]} labels"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= spec.num_classes):
        lo, hi = labels.min().item() + spec.label_offset, labels.max().item() + spec.label_offset
        raise DataError(
            f"{labels_file}: labels range over [{lo}, {hi}], expected "
            f"[{spec.label_offset}, {spec.num_classes - 1 + spec.label_offset}] for {spec.name}"
        )
    return _to_image_set(images, labels)


def _to_image_set(images: torch.Tensor, labels: torch.Tensor) -> ImageSet:
    return ImageSet(images.unsqueeze(1).to(torch.float32).div_(255.0), labels)


def _load_embedded(path: Path, train: bool) -> ImageSet:
    part = "train" if train else "test"
    try:
        with np.load(path) as npz:
            images, labels = npz[f"{part}_images"], npz[f"{part}_labels"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read the embedded MNIST sample ({exc})") from exc
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{path}: {part}_images must be uint8 (N, 28, 28), got {images.shape}")
    return _to_image_set(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))


def load_dataset(data: DataSection) -> tuple[ImageSet, ImageSet, int]:
    """Load the train and test sets named by ``data``.

    Parameters
    ----------
    data : DataSection
        ``dataset``, ``root`` and ``download`` are used; see the module docstring for how
        the root is resolved.

    Returns
    -------
    tuple[ImageSet, ImageSet, int]
        ``(train, test, num_classes)``; labels are ``0..num_classes-1`` (EMNIST letters
        shifted from 1..26) and EMNIST images are transposed to read upright like MNIST.

    Raises
    ------
    FileNotFoundError
        No files under the root; the message lists every path looked at.
    DataError
        A corrupt or truncated file, or a failed md5 check; the message names the file.
    """
    spec = _spec(data.dataset)
    source = _resolve_source(data)
    return _load_split(spec, source, True), _load_split(spec, source, False), spec.num_classes


# --------------------------------------------------------------------------- embedded sample


def build_embedded_sample(
    src_root: str | Path,
    out_path: str | Path,
    n_train: int = 8000,
    n_test: int = 2000,
    seed: int = 0,
) -> Path:
    """Write a class-balanced, seeded sample of real MNIST as a compressed ``.npz``.

    Parameters
    ----------
    src_root : str or Path
        A folder holding the MNIST IDX files (any layout :func:`load_dataset` accepts).
    out_path : str or Path
        Where to write the sample (atomically). Same inputs give the same bytes.
    n_train, n_test : int
        Images drawn from the train and test sets, spread evenly over the ten classes.
    seed : int
        Seed of the selection.

    Returns
    -------
    Path
        ``out_path``.
    """
    train, test, num_classes = load_dataset(DataSection(dataset="mnist", root=str(src_root)))
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for part, full, n in (("train", train, n_train), ("test", test, n_test)):
        idx = _balanced_sample(full.labels.numpy(), n, num_classes, rng, f"n_{part}")
        pixels = (full.images[idx, 0] * 255.0).round().to(torch.uint8).numpy()
        arrays[f"{part}_images"] = pixels
        arrays[f"{part}_labels"] = full.labels[idx].numpy().astype(np.uint8)
        arrays[f"{part}_source_index"] = idx.astype(np.int32)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex}.tmp")
    # np.savez_compressed stamps the current time into the zip; a fixed stamp keeps the
    # file byte-for-byte reproducible.
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    os.replace(tmp, out_path)
    return out_path


def _balanced_sample(
    labels: np.ndarray, n: int, num_classes: int, rng: np.random.Generator, name: str
) -> np.ndarray:
    """``n`` sorted indices, spread evenly over the classes (lower classes get the rest)."""
    out = []
    for c in range(num_classes):
        want = n // num_classes + (1 if c < n % num_classes else 0)
        pool = np.flatnonzero(labels == c)
        if want > pool.size:
            raise ValueError(f"{name}: class {c} has {pool.size} images, {want} requested")
        out.append(rng.choice(pool, size=want, replace=False))
    return np.sort(np.concatenate(out))


# --------------------------------------------------------------------------- partitioning


def partition(
    labels: np.ndarray,
    parties: int,
    scheme: Literal["iid", "dirichlet", "shards"],
    *,
    alpha: float,
    shards_per_party: int,
    seed: int,
    samples_per_party: int = 0,
) -> list[np.ndarray]:
    """Split sample indices among parties, seeded.

    Parameters
    ----------
    labels : np.ndarray
        1-D integer labels of the pool being split.
    parties : int
        Number of parties (>= 1).
    scheme : {"iid", "dirichlet", "shards"}
        ``iid``: a seeded permutation cut into equal parts. ``dirichlet``: for each class,
        the shares of the parties drawn from Dirichlet(``alpha``); redrawn (then, as a last
        resort, rebalanced from the largest party) until every party holds at least
        ``max(samples_per_party, min(10, N // parties))`` samples. ``shards``: sorted by
        label, cut into ``parties * shards_per_party`` shards, ``shards_per_party`` each.
    alpha : float
        Dirichlet concentration (> 0); smaller means more label skew.
    shards_per_party : int
        Shards each party receives under ``shards``.
    seed : int
        Seed of every random choice.
    samples_per_party : int, optional
        > 0: each party keeps a seeded random subset of exactly this many samples.

    Returns
    -------
    list[np.ndarray]
        One sorted int64 index array per party; the arrays are disjoint.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: expected a 1-D integer array, got {labels.dtype} {labels.shape}")
    if parties < 1:
        raise ScenarioError(f"data.parties: must be >= 1, got {parties}")
    if samples_per_party < 0:
        raise ScenarioError(f"data.samples_per_party: must be >= 0, got {samples_per_party}")
    n = labels.size
    if n < parties:
        raise ScenarioError(f"data.parties: {parties} parties but only {n} samples to share")
    rng = np.random.default_rng(_entropy(seed, "partition"))
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), parties)
    elif scheme == "dirichlet":
        if alpha <= 0:
            raise ScenarioError(f"data.alpha: must be > 0, got {alpha}")
        parts = _dirichlet(labels, parties, alpha, samples_per_party, rng)
    elif scheme == "shards":
        parts = _shards(labels, parties, shards_per_party, rng)
    else:
        raise ScenarioError(
            f"data.partition: unknown scheme {scheme!r}; accepted: 'iid', 'dirichlet', 'shards'"
        )
    if samples_per_party:
        short = [(i, len(p)) for i, p in enumerate(parts) if len(p) < samples_per_party]
        if short:
            i, size = short[0]
            raise ScenarioError(
                f"data.samples_per_party: {samples_per_party} requested but party {i} has only "
                f"{size} samples under the {scheme!r} partition of {n} samples among "
                f"{parties} parties"
            )
        parts = [rng.choice(p, size=samples_per_party, replace=False) for p in parts]
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _entropy(seed: int, stream: str) -> list[int]:
    """SeedSequence entropy for ``seed`` (any int) and a named stream."""
    tag = int.from_bytes(hashlib.sha256(stream.encode()).digest()[:8], "big")
    return [tag, 0 if seed >= 0 else 1, abs(seed)]


def _dirichlet(
    labels: np.ndarray, parties: int, alpha: float, samples_per_party: int, rng: np.random.Generator
) -> list[np.ndarray]:
    n = labels.size
    min_size = max(samples_per_party, min(10, n // parties))
    if min_size * parties > n:
        raise ScenarioError(
            f"data.samples_per_party: {samples_per_party} per party needs "
            f"{min_size * parties} samples, the pool has {n}"
        )
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    for _ in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(parties)]
        for idx in by_class:
            shares = rng.dirichlet(np.full(parties, alpha))
            cuts = (np.cumsum(shares)[:-1] * idx.size).astype(np.int64)
            for p, chunk in enumerate(np.split(idx, cuts)):
                parts[p].append(chunk)
        out = [np.concatenate(p) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    # Redraws keep failing (tiny alpha or many parties): top up the small parties with
    # random samples of the largest one, which keeps most of the skew.
    # min_size * parties <= n, so the largest party always has a sample to spare.
    while (need := min_size - min(len(p) for p in out)) > 0:
        small = int(np.argmin([len(p) for p in out]))
        big = int(np.argmax([len(p) for p in out]))
        take = min(need, len(out[big]) - min_size)
        moved = rng.permutation(len(out[big]))
        out[small] = np.concatenate([out[small], out[big][moved[:take]]])
        out[big] = out[big][moved[take:]]
    return out


def _shards(
    labels: np.ndarray, parties: int, shards_per_party: int, rng: np.random.Generator
) -> list[np.ndarray]:
    if shards_per_party < 1:
        raise ScenarioError(f"data.shards_per_party: must be >= 1, got {shards_per_party}")
    n_shards = parties * shards_per_party
    if n_shards > labels.size:
        raise ScenarioError(
            f"data.shards_per_party: {parties} parties x {shards_per_party} shards = {n_shards} "
            f"shards but only {labels.size} samples"
        )
    # Shuffle first so samples of one label are ordered randomly within the sort.
    perm = rng.permutation(labels.size)
    order = perm[np.argsort(labels[perm], kind="stable")]
    shards = np.array_split(order, n_shards)
    ids = rng.permutation(n_shards).reshape(parties, shards_per_party)
    return [np.concatenate([shards[s] for s in row]) for row in ids]


# --------------------------------------------------------------------------- federation


@dataclass(frozen=True, eq=False)
class PartyData:
    """One party's data.

    ``indices`` point into :attr:`Federation.train_pool`: first the party's train samples,
    then its local test samples (``train_indices`` / ``test_indices``).
    """

    train: ImageSet
    test: ImageSet
    indices: np.ndarray

    @property
    def train_indices(self) -> np.ndarray:
        """Indices into the train pool of :attr:`train` (the party's members)."""
        return self.indices[: len(self.train)]

    @property
    def test_indices(self) -> np.ndarray:
        """Indices into the train pool of :attr:`test`."""
        return self.indices[len(self.train) :]


@dataclass(frozen=True, eq=False)
class Federation:
    """A dataset shared out among the parties and the server.

    ``public`` (the server's / attacker's own data) and ``server_test`` are disjoint
    halves of the test set, so both are disjoint from every party.
    """

    num_classes: int
    train_pool: ImageSet
    parties: tuple[PartyData, ...]
    server_test: ImageSet
    public: ImageSet


def load_federation(scenario: Scenario) -> Federation:
    """The federation of ``scenario``: cached per process on its data section and seed.

    Parameters
    ----------
    scenario : Scenario
        ``scenario.data`` says what to load and how to split it; ``scenario.scenario.seed``
        seeds every split.

    Returns
    -------
    Federation
        Same scenario, same bytes.
    """
    # The resolved source is part of the key: PRIVFL_DATA may change between calls.
    return _federation(scenario.data, scenario.scenario.seed, _resolve_source(scenario.data))


@functools.lru_cache(maxsize=8)
def _federation(data: DataSection, seed: int, source: _Source) -> Federation:
    spec = _spec(data.dataset)
    train, test = _load_split(spec, source, True), _load_split(spec, source, False)
    parts = partition(
        train.labels.numpy(),
        data.parties,
        data.partition,
        alpha=data.alpha,
        shards_per_party=data.shards_per_party,
        seed=seed,
        samples_per_party=data.samples_per_party,
    )
    rng = np.random.default_rng(_entropy(seed, "party-test"))
    parties = []
    for idx in parts:
        shuffled = rng.permutation(idx)
        # floor keeps at least one train sample, since party_test_fraction < 1.
        n_test = int(np.floor(data.party_test_fraction * idx.size))
        tr, te = np.sort(shuffled[n_test:]), np.sort(shuffled[:n_test])
        parties.append(PartyData(train.subset(tr), train.subset(te), np.concatenate([tr, te])))
    perm = np.random.default_rng(_entropy(seed, "server-split")).permutation(len(test))
    half = len(test) // 2
    public_idx, server_idx = perm[:half], perm[half:]
    if data.server_test_samples:
        if data.server_test_samples > server_idx.size:
            raise ScenarioError(
                f"data.server_test_samples: {data.server_test_samples} requested but the "
                f"server's half of the {spec.name} test set holds {server_idx.size}"
            )
        server_idx = server_idx[: data.server_test_samples]
    return Federation(
        num_classes=spec.num_classes,
        train_pool=train,
        parties=tuple(parties),
        server_test=test.subset(server_idx),
        public=test.subset(public_idx),
    )
