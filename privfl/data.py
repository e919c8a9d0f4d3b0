"""Datasets, the embedded MNIST sample, and seeded federated splits.

What ``data.dataset`` may name (:func:`load_dataset`):

- the MNIST family (``mnist``, ``fashion-mnist``, ``emnist-<split>``) from IDX files, below;
- ``cifar10`` / ``cifar100`` from torchvision's python-pickle layout under ``data.root``;
- ``torchvision:<Class>``, any torchvision dataset already on disk under ``data.root``;
- ``"module:loader"``, the user's own ``loader(root, seed)`` returning numpy arrays
  ``(train_x, train_y, test_x, test_y)`` or a pair of torch Datasets; what it returns is
  checked (dtype, shape, NaN, value and label range) and every error names the key.

Samples are images ``(C, H, W)`` of any size and channel count in [0, 1], or tabular rows
``(d,)``; :class:`ImageSet` holds either.

Where the MNIST family's images come from:

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

One read-only store for every process: a decoded MNIST-family or CIFAR split is written
once to privfl's cache (``pools/``, keyed by the path, size and mtime of its source files;
atomically, CRC-checked when opened, rebuilt if damaged) and memory-mapped read-only, so
the Ray actors of a simulation share its pages instead of each decoding a copy. Parties,
``server_test`` and ``public`` are views of the pools (:meth:`ImageSet.view`): indices and
labels, their images gathered only when read.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import pickle
import threading
import uuid
import warnings
import weakref
import zipfile
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import FrozenInstanceError, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torchvision

from privfl.config import DataSection, Scenario, ScenarioError
from privfl.errors import UserError
from privfl.plugins import load_object
from privfl.seeding import stream_rng

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
class _View:
    """What a view holds: the pool it reads from and its rows there."""

    pool: ImageSet
    rows: np.ndarray  # int64 positions in the pool, >= 0


class ImageSet:
    """Samples and their labels: images of any size and channel count, or tabular rows.

    Parameters
    ----------
    images : torch.Tensor
        float32, shape ``(N, *sample_shape)``: images ``(N, C, H, W)`` (MNIST: ``(N, 1, 28,
        28)``) with values in [0, 1], or tabular rows ``(N, d)`` with any finite values.
    labels : torch.Tensor
        int64, shape ``(N,)``.

    Notes
    -----
    Loaded sets are cached per process and shared: treat the tensors as read-only. A loaded
    pool is memory-mapped from privfl's cache, read-only (writes into its tensors raise), and
    its pages are shared by every process that opens it. A *view* (:meth:`view`; every
    party's ``train`` / ``test``) holds only its rows of a pool and their labels: ``images``
    gathers those rows when asked, so a view costs O(rows) memory however large the pool.
    """

    __slots__ = ("__weakref__", "_gathered", "_images", "_labels", "_store", "_view")

    _images: torch.Tensor | None
    _labels: torch.Tensor
    _view: _View | None
    _store: tuple[Path, str] | None  # (cache file, key) of a memory-mapped pool
    _gathered: torch.Tensor | None  # a view's last gathered images, see _gather

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        _check_tensors(images, labels)
        self._set(images, labels, None, None)

    def _set(
        self,
        images: torch.Tensor | None,
        labels: torch.Tensor,
        view: _View | None,
        store: tuple[Path, str] | None,
    ) -> None:
        for name, value in (
            ("_images", images),
            ("_labels", labels),
            ("_view", view),
            ("_store", store),
            ("_gathered", None),
        ):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # A mapped pool travels as its cache file and a view as its rows, never their pixels.
        if self._view is not None:
            return _make_view, (self._view.pool, self._view.rows)
        if self._store is not None:
            return _reopen_pool, self._store
        return ImageSet, (self._images, self._labels)

    def __repr__(self) -> str:
        what = f"view of {len(self)} rows" if self._view is not None else f"{len(self)} samples"
        return f"ImageSet({what}, sample_shape={self.sample_shape})"

    @property
    def images(self) -> torch.Tensor:
        """float32 ``(N, *sample_shape)``; a view's rows are gathered from its pool."""
        if self._view is None:
            assert self._images is not None
            return self._images
        return _gather(self)

    @property
    def labels(self) -> torch.Tensor:
        """int64 ``(N,)``."""
        return self._labels

    @property
    def pool(self) -> ImageSet | None:
        """The set this one is a view of (:meth:`view`), or None if it holds its own images."""
        return None if self._view is None else self._view.pool

    @property
    def rows(self) -> np.ndarray | None:
        """A view's positions in :attr:`pool` (None if it holds its own images)."""
        return None if self._view is None else self._view.rows

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample: ``(C, H, W)`` for images, ``(d,)`` for tabular rows."""
        base = self if self._view is None else self._view.pool
        assert base._images is not None
        return tuple(int(s) for s in base._images.shape[1:])

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    def view(self, indices: np.ndarray | torch.Tensor | Sequence[int]) -> ImageSet:
        """The samples at ``indices`` (integer positions, in the given order) as a view: it
        keeps the positions, not the images, and gathers them each time ``images`` is read."""
        idx = self._positions(indices, "view").numpy()
        if self._view is not None:
            return _make_view(self._view.pool, self._view.rows[idx])
        return _make_view(self, idx % len(self) if idx.size and idx.min() < 0 else idx)

    def subset(self, indices: np.ndarray | torch.Tensor | Sequence[int]) -> ImageSet:
        """The samples at ``indices`` (integer positions, in the given order): a copy, or
        for a view another view of the same pool (:meth:`view`)."""
        if self._view is not None:
            return self.view(indices)
        idx = self._positions(indices, "subset")
        return ImageSet(self.images[idx], self.labels[idx])

    def _positions(
        self, indices: np.ndarray | torch.Tensor | Sequence[int], what: str
    ) -> torch.Tensor:
        idx = torch.as_tensor(np.asarray(indices) if not torch.is_tensor(indices) else indices)
        if idx.ndim != 1 or (idx.numel() and idx.dtype not in _INDEX_DTYPES):
            raise ValueError(
                f"ImageSet.{what}: indices must be a 1-D integer array, got dtype {idx.dtype} "
                f"and shape {tuple(idx.shape)}"
            )
        idx = idx.to(torch.int64)
        n = len(self)
        if idx.numel() and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"ImageSet.{what}: indices out of range for a set of {n} images")
        return idx


_INDEX_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _check_tensors(im: Any, lb: Any) -> None:
    if not isinstance(im, torch.Tensor) or not isinstance(lb, torch.Tensor):
        raise TypeError(
            "ImageSet: images and labels must be torch tensors, got "
            f"{type(im).__name__} and {type(lb).__name__}"
        )
    if im.dtype != torch.float32 or im.ndim not in (2, 4) or 0 in im.shape[1:]:
        raise ValueError(
            f"ImageSet.images: expected float32 of shape (N, C, H, W) or (N, d), "
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
    if im.numel() and not bool(torch.isfinite(im).all()):
        raise ValueError("ImageSet.images: values must be finite (found NaN or inf)")
    if im.ndim == 4 and im.numel() and (im.min() < 0 or im.max() > 1):
        raise ValueError(
            f"ImageSet.images: values must lie in [0, 1], got "
            f"[{im.min().item():.4g}, {im.max().item():.4g}]"
        )


def _make_view(pool: ImageSet, rows: np.ndarray) -> ImageSet:
    """A view of ``rows`` (positions >= 0, already checked) of ``pool``, a non-view set."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    out = ImageSet.__new__(ImageSet)
    labels = pool.labels.index_select(0, torch.from_numpy(rows))
    out._set(None, labels, _View(pool, rows), None)
    return out


# The last few views whose rows were gathered keep them, so that reading ``images`` batch
# by batch (``view.images[i : i + b]`` in a loop) gathers once, not once per batch, while
# the memory held stays bounded however many views a process reads.
_KEEP_GATHERED = 4
_gathered: OrderedDict[int, weakref.ref[ImageSet]] = OrderedDict()
_gathered_lock = threading.Lock()


def _gather(view: ImageSet) -> torch.Tensor:
    assert view._view is not None
    with _gathered_lock:
        if view._gathered is not None:
            _gathered.move_to_end(id(view))
            return view._gathered
    pool, rows = view._view.pool, view._view.rows
    assert pool._images is not None
    images = pool._images.index_select(0, torch.from_numpy(rows))
    with _gathered_lock:
        object.__setattr__(view, "_gathered", images)
        _gathered[id(view)] = weakref.ref(view)
        _gathered.move_to_end(id(view))
        while len(_gathered) > _KEEP_GATHERED:
            old = _gathered.popitem(last=False)[1]()
            if old is not None:
                object.__setattr__(old, "_gathered", None)
    return images


class _ReadOnlyTensor(torch.Tensor):
    """A tensor over read-only shared memory (a memory-mapped pool).

    Writing into such memory would kill the process with a segmentation fault, so in-place
    operations on it (``x[i] = v``, ``x.add_(...)``, ``out=x``, ``inplace=True``) raise
    instead; every result that still aliases the memory (slices, views) stays read-only,
    and every other result is an ordinary tensor.
    """

    @classmethod
    def __torch_function__(
        cls,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            if _writes_read_only(func, args, kwargs):
                name = getattr(func, "__name__", str(func))
                raise RuntimeError(
                    f"{name}: this tensor is privfl's read-only data pool, shared by every "
                    "process; write into a copy (.clone()) instead"
                )
            spans = [_span(t) for t in _tensors((args, kwargs)) if isinstance(t, cls)]
            return _keep_read_only(func(*args, **kwargs), spans)


_INPLACE_DUNDERS = frozenset(
    ["__setitem__"]
    + [f"__i{op}__" for op in ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod")]
    + [f"__i{op}__" for op in ("pow", "lshift", "rshift", "and", "or", "xor")]
)


def _writes_read_only(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    name = getattr(func, "__name__", "")
    target = args[0] if args else None
    inplace = name in _INPLACE_DUNDERS or (
        name.endswith("_") and not name.startswith("__") and name != "requires_grad_"
    )
    if isinstance(target, _ReadOnlyTensor) and (inplace or kwargs.get("inplace") is True):
        return True
    return any(isinstance(t, _ReadOnlyTensor) for t in _tensors(kwargs.get("out")))


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, list | tuple):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _span(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _keep_read_only(out: Any, spans: list[tuple[int, int]]) -> Any:
    """``out`` with every tensor that aliases one of ``spans`` made read-only again, and
    every numpy array that does marked non-writable."""
    if isinstance(out, torch.Tensor):
        if (
            out.layout == torch.strided
            and out.device.type == "cpu"
            and out.untyped_storage().data_ptr() in {s[0] for s in spans}
        ):
            return out.as_subclass(_ReadOnlyTensor)
        return out
    if isinstance(out, np.ndarray):
        ptr = out.__array_interface__["data"][0]
        if any(lo <= ptr < hi for lo, hi in spans):
            out.flags.writeable = False
        return out
    if isinstance(out, tuple | list):
        return type(out)(_keep_read_only(o, spans) for o in out)
    return out


def _read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A read-only tensor over ``array``'s (read-only, memory-mapped) memory, no copy."""
    with warnings.catch_warnings():
        # torch warns that it cannot mark tensors read-only; _ReadOnlyTensor does.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array).as_subclass(_ReadOnlyTensor)


# --------------------------------------------------------------------------- shared pools

# A decoded split is written once to privfl's cache and memory-mapped read-only by every
# process that loads it (each Ray actor of a simulation), which then share its pages
# instead of decoding their own copy. Bump _POOL_FORMAT when decoding changes.
_POOL_FORMAT = 1
_POOL_MAGIC = b"PRIVFLPOOL\n"
_POOL_ALIGN = 4096
_BUILDS: Counter[str] = Counter()  # decodes done by this process, per pool name


def _shared_pool(name: str, files: Sequence[Path], build: Callable[[], ImageSet]) -> ImageSet:
    """``build()``'s set, decoded once for all processes: memory-mapped from a cache file
    keyed by ``name`` and the path, size and mtime of each of ``files`` (its sources).

    A missing, truncated or corrupt cache file is (re)built under a lock, written to a
    temporary file and renamed into place; where the cache cannot be written the set is
    kept in this process's memory instead.
    """
    built = None
    if not all(f.is_file() for f in files):
        built = _build(name, build)  # e.g. a download, which lays the files out
    key = _pool_key(name, files)
    path = cache_dir() / "pools" / f"{name}-{key[:24]}.pool"
    pool = _open_pool(path, key)
    if pool is not None:
        return pool
    with ExitStack() as stack:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_locked(path.parent / ".lock"))  # one for all: builds are rare
        except OSError as exc:
            return _unshared(path, exc, built if built is not None else _build(name, build))
        pool = _open_pool(path, key)  # another process may have built it meanwhile
        if pool is not None:
            return pool
        if built is None:
            built = _build(name, build)  # outside the try: a decoding error is the data's
        try:
            _write_pool(path, key, built)
        except OSError as exc:
            return _unshared(path, exc, built)
        pool = _open_pool(path, key)
    return pool if pool is not None else built


def _unshared(path: Path, exc: OSError, built: ImageSet) -> ImageSet:
    warnings.warn(
        f"privfl: cannot write the shared data cache {path} ({exc}); this process keeps "
        "its own decoded copy",
        stacklevel=3,
    )
    return built


def _build(name: str, build: Callable[[], ImageSet]) -> ImageSet:
    _BUILDS[name] += 1
    return build()


def _pool_key(name: str, files: Sequence[Path]) -> str:
    key = hashlib.sha256(f"{_POOL_FORMAT}|{name}\n".encode())
    for f in files:
        st = f.stat()
        key.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return key.hexdigest()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` between processes, so one of them decodes."""
    try:
        import fcntl
    except ImportError:  # not POSIX: racing builders each rename a complete file into place
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _write_pool(path: Path, key: str, data: ImageSet) -> None:
    """``data`` to ``path`` atomically: a header, then the images and the labels."""
    images = np.ascontiguousarray(data.images.numpy())
    labels = np.ascontiguousarray(data.labels.numpy())
    start = _POOL_ALIGN * 2  # room for the header
    labels_at = -(-(start + images.nbytes) // 64) * 64
    crc = zlib.crc32(memoryview(images).cast("B"))
    crc = zlib.crc32(bytes(labels_at - start - images.nbytes), crc)
    crc = zlib.crc32(memoryview(labels).cast("B"), crc)
    header = json.dumps(
        {
            "key": key,
            "images": [images.dtype.str, list(images.shape), start],
            "labels": [labels.dtype.str, list(labels.shape), labels_at],
            "size": labels_at + labels.nbytes,
            "crc32": crc,
        }
    ).encode()
    if len(_POOL_MAGIC) + 8 + len(header) > start:
        raise DataError(f"{path}: header too long ({len(header)} bytes)")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(_POOL_MAGIC + len(header).to_bytes(8, "little") + header)
            f.write(bytes(start - f.tell()))
            f.write(memoryview(images).cast("B"))
            f.write(bytes(labels_at - f.tell()))
            f.write(memoryview(labels).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
    finally:
        tmp.unlink(missing_ok=True)


def _open_pool(path: Path, key: str) -> ImageSet | None:
    """The pool cached at ``path``, memory-mapped read-only; None if it is missing, was
    written for another key, or is truncated or corrupt (size and CRC-32 checked)."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; the mapping outlives it
    except OSError:
        return None
    with f:
        try:
            head = f.read(len(_POOL_MAGIC) + 8)
            if len(head) != len(_POOL_MAGIC) + 8 or not head.startswith(_POOL_MAGIC):
                return None
            header = json.loads(f.read(int.from_bytes(head[-8:], "little")))
            (im_dtype, im_shape, im_at), (lb_dtype, lb_shape, lb_at) = (
                header["images"],
                header["labels"],
            )
            if header["key"] != key or os.fstat(f.fileno()).st_size != header["size"]:
                return None
            f.seek(im_at)
            crc = 0
            while chunk := f.read(1 << 24):
                crc = zlib.crc32(chunk, crc)
            if crc != header["crc32"] or not im_shape[0]:
                return None
            images = np.memmap(f, np.dtype(im_dtype), "r", im_at, tuple(im_shape))
            labels = np.memmap(f, np.dtype(lb_dtype), "r", lb_at, tuple(lb_shape))
        except (OSError, ValueError, TypeError, KeyError):
            return None
    out = ImageSet.__new__(ImageSet)
    # Checked when it was written; checking again would read every page of it.
    out._set(
        _read_only_tensor(np.asarray(images)),
        _read_only_tensor(np.asarray(labels)),
        None,
        (path, key),
    )
    return out


def _reopen_pool(path: Path, key: str) -> ImageSet:
    pool = _open_pool(path, key)
    if pool is None:
        raise DataError(f"{path}: the shared data cache is gone or corrupt; load the data again")
    return pool


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
    """One split, decoded once into the shared cache (:func:`_shared_pool`); cached per
    process on the resolved source."""
    if source.kind == "embedded":
        files = [source.path]
    else:
        files = [source.path / spec.folder / "raw" / n for n in spec.files(train)]
    name = f"{spec.name}-{'train' if train else 'test'}"
    return _shared_pool(name, files, lambda: _decode_split(spec, source, train))


def _decode_split(spec: _Spec, source: _Source, train: bool) -> ImageSet:
    """Decode one split from its files."""
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


def load_dataset(data: DataSection, seed: int = 0) -> tuple[ImageSet, ImageSet, int]:
    """Load the train and test sets named by ``data``.

    Parameters
    ----------
    data : DataSection
        ``dataset``, ``root`` and ``download`` are used; see the module docstring for how
        the root is resolved and which datasets are known.
    seed : int
        Handed to a ``module:loader`` dataset (the built-in ones do not draw anything).

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
        A corrupt or truncated file, a failed md5 check, or a loader that returned bad
        arrays; the message names the file or the key.
    ScenarioError
        An unknown dataset, or a ``module:loader`` that cannot be imported.
    """
    return _load_sets(_resolve(data), seed if _kind(data.dataset) == "loader" else 0)


def sample_shape(scenario: Scenario) -> tuple[int, ...]:
    """Shape of one sample of ``scenario``'s data, e.g. ``(1, 28, 28)`` or ``(d,)``.

    The MNIST family is known to be 1×28×28 without loading anything; other datasets are
    loaded (once per process, :func:`load_federation`).
    """
    if _kind(scenario.data.dataset) == "idx":
        return IMAGE_SHAPE
    return load_federation(scenario).train_pool.sample_shape


def _kind(dataset: str) -> Literal["idx", "cifar", "torchvision", "loader"]:
    if dataset in CIFAR_FOLDERS:
        return "cifar"
    if dataset.startswith(TORCHVISION_PREFIX):
        return "torchvision"
    if ":" in dataset:
        return "loader"
    return "idx"


def _resolve(data: DataSection) -> tuple:
    """A hashable key of what :func:`load_dataset` reads: the dataset and its resolved
    source (``PRIVFL_DATA`` may change between calls)."""
    kind = _kind(data.dataset)
    if kind == "idx":
        return (kind, _spec(data.dataset), _resolve_source(data))
    root = data.root or os.environ.get("PRIVFL_DATA", "")
    if kind == "loader":
        return (kind, data.dataset, root)  # the loader's own business, passed as given
    if not root and not data.download:
        raise DataError(
            f"data.dataset = {data.dataset!r} needs data.root (or the environment variable "
            "PRIVFL_DATA) naming the folder that holds it, or data.download = true"
        )
    path = Path(root).expanduser().resolve() if root else _download_root()
    return (kind, data.dataset, path, data.download)


@functools.lru_cache(maxsize=8)
def _load_sets(key: tuple, seed: int) -> tuple[ImageSet, ImageSet, int]:
    kind = key[0]
    if kind == "idx":
        _, spec, source = key
        return _load_split(spec, source, True), _load_split(spec, source, False), spec.num_classes
    if kind == "loader":
        return _load_user(key[1], key[2], seed)
    _, name, root, download = key
    if kind == "cifar":
        return _load_cifar(name, root, download)
    return _load_torchvision(name.removeprefix(TORCHVISION_PREFIX), root, download)


# --------------------------------------------------------------------------- CIFAR pickles

# torchvision's folder, the pickled batches of each split and the key of their labels.
CIFAR_FOLDERS = {
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "labels",
        10,
    ),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "fine_labels", 100),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts and strings only: a CIFAR batch needs no more,
    and refusing everything else keeps a crafted file from running code."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _load_cifar(name: str, root: Path, download: bool) -> tuple[ImageSet, ImageSet, int]:
    """CIFAR-10 / -100 from torchvision's python-pickle layout under ``root`` (the folder
    holding ``cifar-10-batches-py`` or that folder itself); read here rather than through
    torchvision, whose md5 check would refuse any copy but the original archive's."""
    folder, train_files, test_files, label_key, num_classes = CIFAR_FOLDERS[name]
    candidates = [root / folder, root]
    found = next((c for c in candidates if all((c / f).is_file() for f in train_files)), None)
    if found is None and download:
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            cls(str(_download_root()), download=True)
        except (OSError, RuntimeError) as exc:
            raise DataError(f"data.download: could not download {name} ({exc})") from exc
        found = _download_root() / folder
    if found is None:
        names = ", ".join((*train_files, *test_files))
        raise FileNotFoundError(
            f"data.root: no {name} files found under {str(root)!r}; looked for {{{names}}} in "
            f"{', '.join(str(c) for c in candidates)}; set data.root or PRIVFL_DATA to the "
            f"folder that holds {folder}/, or set data.download = true"
        )
    train, test = (
        _shared_pool(
            f"{name}-{part}",
            [found / f for f in files],
            functools.partial(_cifar_split, found, files, label_key, num_classes),
        )
        for part, files in (("train", train_files), ("test", test_files))
    )
    return train, test, num_classes


def _cifar_split(
    folder: Path, files: tuple[str, ...], label_key: str, num_classes: int
) -> ImageSet:
    images, labels = [], []
    for name in files:
        path = folder / name
        try:
            with open(path, "rb") as f:
                # latin1, as torchvision does: the batches were pickled by Python 2.
                raw = _ArrayUnpickler(f, encoding="latin1").load()
            batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
            x, y = np.asarray(batch["data"]), np.asarray(batch[label_key], dtype=np.int64)
        except FileNotFoundError as exc:
            raise DataError(f"{path}: missing from the CIFAR folder") from exc
        except (
            OSError,
            EOFError,
            AttributeError,
            KeyError,
            TypeError,
            ValueError,
            pickle.UnpicklingError,
        ) as exc:
            raise DataError(f"{path}: not a CIFAR batch ({type(exc).__name__}: {exc})") from exc
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            raise DataError(
                f"{path}: data must be uint8 of shape (N, 3072), got {x.dtype} {x.shape}"
            )
        if y.shape != (x.shape[0],) or (y.size and (y.min() < 0 or y.max() >= num_classes)):
            raise DataError(
                f"{path}: expected {x.shape[0]} labels in [0, {num_classes - 1}], got shape "
                f"{y.shape}" + (f" ranging over [{y.min()}, {y.max()}]" if y.size else "")
            )
        images.append(x.reshape(-1, 3, 32, 32))
        labels.append(y)
    pixels = torch.from_numpy(np.concatenate(images)).to(torch.float32).div_(255.0)
    return ImageSet(pixels, torch.from_numpy(np.concatenate(labels)))


# --------------------------------------------------------------------------- torchvision

TORCHVISION_PREFIX = "torchvision:"


def _load_torchvision(name: str, root: Path, download: bool) -> tuple[ImageSet, ImageSet, int]:
    """Any torchvision dataset class already on disk (``torchvision:<Class>``), built
    with ``train=True/False`` or ``split="train"/"test"``."""
    key = f"data.dataset = {TORCHVISION_PREFIX}{name}"
    cls = getattr(torchvision.datasets, name, None)
    if not isinstance(cls, type) or not issubclass(cls, torch.utils.data.Dataset):
        raise ScenarioError(f"{key}: torchvision.datasets has no dataset class {name!r}")
    sets = []
    for train in (True, False):
        errors = []
        for kw in ({"train": train}, {"split": "train" if train else "test"}):
            try:
                ds = cls(str(root), download=download, **kw)
                break
            except TypeError as exc:  # not this class's way of naming the split
                errors.append(str(exc))
            except (OSError, RuntimeError, ValueError) as exc:
                raise DataError(
                    f"{key}: torchvision could not read it under {root} ({exc})"
                ) from exc
        else:
            raise ScenarioError(
                f"{key}: the class takes neither train= nor split= ({'; '.join(errors)})"
            )
        sets.append(_dataset_arrays(ds, f"{key} ({'train' if train else 'test'})"))
    (train_x, train_y), (test_x, test_y) = sets
    classes = getattr(ds, "classes", None)
    num_classes = len(classes) if classes else None
    return _checked_sets(train_x, train_y, test_x, test_y, key, num_classes)


def _dataset_arrays(ds: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x float32, y)`` numpy arrays of a map-style dataset of ``(sample, label)`` pairs:
    torchvision's ``.data`` / ``.targets`` when it keeps uint8 pixels there, otherwise
    every item (PIL images and HWC arrays through ``to_tensor``)."""
    data = getattr(ds, "data", None)
    targets = getattr(ds, "targets", getattr(ds, "labels", None))
    if (
        getattr(ds, "transform", None) is None
        and data is not None
        and targets is not None
        and str(getattr(data, "dtype", "")) in ("uint8", "torch.uint8")
        and np.asarray(data).ndim in (3, 4)
    ):
        x = np.asarray(data)
        if x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)  # channels last (CIFAR) -> first
        return x.astype(np.float32) / 255.0, np.asarray(targets)
    try:
        n = len(ds)
    except TypeError as exc:
        raise DataError(f"{what}: a dataset must have a length (map-style)") from exc
    xs, ys = [], []
    for i in range(n):
        item = ds[i]
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise DataError(f"{what}: item {i} is not a (sample, label) pair")
        x, y = item
        if not isinstance(x, torch.Tensor | np.ndarray):
            x = torchvision.transforms.functional.to_tensor(x)  # PIL image -> CHW in [0, 1]
        xs.append(torch.as_tensor(x).to(torch.float32).numpy())
        ys.append(int(y))
    if not xs:
        raise DataError(f"{what}: the dataset is empty")
    if len({x.shape for x in xs}) > 1:
        raise DataError(f"{what}: samples differ in shape ({xs[0].shape} vs others)")
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


# --------------------------------------------------------------------------- your own loader


def _load_user(spec: str, root: str, seed: int) -> tuple[ImageSet, ImageSet, int]:
    """``loader(root, seed)`` of ``data.dataset = "module:loader"``, its output checked."""
    key = f"data.dataset = {spec!r}"
    loader = load_object(spec, "data.dataset")
    try:
        out = loader(root, seed)
    except UserError:
        raise
    except Exception as exc:  # the user's code: any failure is reported against the key
        raise DataError(
            f"{key}: the loader raised {type(exc).__name__}: {exc} (called with root={root!r}, "
            f"seed={seed})"
        ) from exc
    if isinstance(out, tuple | list) and len(out) == 2:
        if not all(isinstance(d, torch.utils.data.Dataset) for d in out):
            raise DataError(
                f"{key}: the loader returned 2 values that are not both torch Datasets; "
                "return (train_x, train_y, test_x, test_y) arrays or (train_set, test_set)"
            )
        (train_x, train_y), (test_x, test_y) = (
            _dataset_arrays(d, f"{key} ({w})") for d, w in zip(out, ("train", "test"), strict=True)
        )
    elif isinstance(out, tuple | list) and len(out) == 4:
        train_x, train_y, test_x, test_y = out
    else:
        what = f"{len(out)} values" if isinstance(out, tuple | list) else type(out).__name__
        raise DataError(
            f"{key}: the loader returned {what}; expected a tuple (train_x, train_y, test_x, "
            "test_y) of numpy arrays or (train_dataset, test_dataset)"
        )
    return _checked_sets(train_x, train_y, test_x, test_y, key, None)


def _checked_sets(
    train_x: Any, train_y: Any, test_x: Any, test_y: Any, key: str, num_classes: int | None
) -> tuple[ImageSet, ImageSet, int]:
    """Check what a loader or dataset gave and make ImageSets; errors name ``key``.

    ``x``: float32 ``(N, C, H, W)`` images in [0, 1] (``(N, H, W)`` gains a channel axis)
    or ``(N, d)`` rows of finite values; ``y``: integers >= 0 of shape ``(N,)``. The number
    of classes is ``num_classes`` if known, else the largest label + 1.
    """
    xs = [_as_numpy(train_x, key, "train_x"), _as_numpy(test_x, key, "test_x")]
    ys = [_as_numpy(train_y, key, "train_y"), _as_numpy(test_y, key, "test_y")]
    for x, name in zip(xs, ("train_x", "test_x"), strict=True):
        if x.dtype != np.float32:
            raise DataError(
                f"{key}: {name} must be float32, got {x.dtype} (images scaled to [0, 1], e.g. "
                "x.astype(np.float32) / 255)"
            )
        if not 2 <= x.ndim <= 4 or 0 in x.shape[1:]:
            raise DataError(
                f"{key}: {name} must have shape (N, C, H, W), (N, H, W) or (N, d), got {x.shape}"
            )
        if not np.isfinite(x).all():
            raise DataError(f"{key}: {name} holds NaN or infinite values")
    xs = [x[:, None] if x.ndim == 3 else x for x in xs]  # grayscale (N, H, W)
    if xs[0].shape[1:] != xs[1].shape[1:]:
        raise DataError(
            f"{key}: train_x samples have shape {xs[0].shape[1:]}, test_x samples "
            f"{xs[1].shape[1:]}; they must match"
        )
    for x, name in zip(xs, ("train_x", "test_x"), strict=True):
        if x.ndim == 4 and x.size and (x.min() < 0 or x.max() > 1):
            raise DataError(
                f"{key}: {name} images must lie in [0, 1], got [{x.min():.4g}, {x.max():.4g}]"
            )
    for y, x, name in zip(ys, xs, ("train_y", "test_y"), strict=True):
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{key}: {name} must hold integer class labels, got {y.dtype}")
        if y.shape != (x.shape[0],):
            raise DataError(f"{key}: {name} has shape {y.shape}, expected ({x.shape[0]},)")
        if y.size and y.min() < 0:
            raise DataError(f"{key}: {name} holds negative labels (min {y.min()}); use 0..K-1")
    if xs[0].shape[0] < 1 or xs[1].shape[0] < 2:
        raise DataError(
            f"{key}: needs at least 1 train and 2 test samples (the test set is halved into "
            f"the server's public and test data), got {xs[0].shape[0]} and {xs[1].shape[0]}"
        )
    top = int(max(y.max() for y in ys)) + 1
    if num_classes is None:
        num_classes = top
    elif top > num_classes:
        raise DataError(f"{key}: labels reach {top - 1}, the dataset has {num_classes} classes")
    train, test = (
        ImageSet(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)))
        for x, y in zip(xs, ys, strict=True)
    )
    return train, test, num_classes


def _as_numpy(value: Any, key: str, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise DataError(f"{key}: {name} must be a numpy array, got {type(value).__name__}")
    return value


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
    """Split sample indices among parties, seeded (privfl's own partitioners).

    These stay hand-written although flwr-datasets has IID, Dirichlet and shard
    partitioners (:func:`flwr_datasets_partition`, ``data.partitioner = "flwr-datasets"``):
    flwr-datasets is an optional package (with HuggingFace ``datasets`` behind it) that
    privfl does not require, its IID partitioner cuts the pool in order without shuffling,
    and every published privfl number was drawn with these splits (same seed, same bytes).

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
    rng = stream_rng(seed, "partition")
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
    return _capped(parts, samples_per_party, rng, scheme, n)


def _capped(
    parts: Sequence[np.ndarray],
    samples_per_party: int,
    rng: np.random.Generator,
    scheme: str,
    n: int,
) -> list[np.ndarray]:
    """Each part cut to ``samples_per_party`` seeded samples (0: kept whole), sorted."""
    if samples_per_party:
        short = [(i, len(p)) for i, p in enumerate(parts) if len(p) < samples_per_party]
        if short:
            i, size = short[0]
            raise ScenarioError(
                f"data.samples_per_party: {samples_per_party} requested but party {i} has only "
                f"{size} samples under the {scheme!r} partition of {n} samples among "
                f"{len(parts)} parties"
            )
        parts = [rng.choice(p, size=samples_per_party, replace=False) for p in parts]
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def flwr_datasets_partition(
    labels: np.ndarray,
    parties: int,
    scheme: Literal["iid", "dirichlet", "shards"],
    *,
    alpha: float,
    shards_per_party: int,
    seed: int,
    samples_per_party: int = 0,
) -> list[np.ndarray]:
    """:func:`partition` done by flwr-datasets' partitioners (``data.partitioner =
    "flwr-datasets"``): ``IidPartitioner`` (over a seeded shuffle of the pool),
    ``DirichletPartitioner`` and ``ShardPartitioner``, partitioning by label.

    Needs the optional package flwr-datasets (``pip install flwr-datasets``); without it
    this raises :class:`ScenarioError` naming ``data.partitioner``. Same arguments and
    return value as :func:`partition`; the splits differ from privfl's own (and
    ``ShardPartitioner`` leaves out the samples of an incomplete last shard).
    """
    try:
        # Optional dependency: imported only when a scenario asks for it.
        from datasets import Dataset
        from flwr_datasets import partitioner as fp
    except ImportError as exc:
        raise ScenarioError(
            "data.partitioner: 'flwr-datasets' needs the flwr-datasets package, which is not "
            f"installed here ({exc}); install flwr-datasets (pip install flwr-datasets) or "
            "use data.partitioner = 'privfl'"
        ) from exc
    labels = np.asarray(labels)
    n = labels.size
    if parties < 1 or n < parties:
        raise ScenarioError(f"data.parties: {parties} parties for {n} samples")
    rng = stream_rng(seed, "flwr-datasets")
    fseed = int(rng.integers(2**31))
    pool = Dataset.from_dict({"label": labels.tolist(), "index": list(range(n))})
    if scheme == "iid":
        pool = pool.shuffle(seed=fseed)
        part = fp.IidPartitioner(num_partitions=parties)
    elif scheme == "dirichlet":
        part = fp.DirichletPartitioner(
            num_partitions=parties,
            partition_by="label",
            alpha=alpha,
            min_partition_size=max(samples_per_party, min(10, n // parties)),
            seed=fseed,
        )
    elif scheme == "shards":
        part = fp.ShardPartitioner(
            num_partitions=parties,
            partition_by="label",
            num_shards_per_partition=shards_per_party,
            seed=fseed,
        )
    else:
        raise ScenarioError(
            f"data.partition: unknown scheme {scheme!r}; accepted: 'iid', 'dirichlet', 'shards'"
        )
    part.dataset = pool
    parts = [np.asarray(part.load_partition(i)["index"], dtype=np.int64) for i in range(parties)]
    return _capped(parts, samples_per_party, rng, scheme, n)


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
    then its local test samples (``train_indices`` / ``test_indices``). ``train`` and
    ``test`` are views of the pool (:meth:`ImageSet.view`) over those indices, so a party
    costs memory for its indices and labels only.
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


def own_data(scenario: Scenario) -> tuple[PartyData, int]:
    """A deployed party's own data: every training record at ``data.root`` is its own.

    A hospital whose node holds only its own records (node config ``own-data=true``) trains
    on all of them instead of on one partition of a federation; ``party_test_fraction`` of
    them (seeded by ``scenario.seed``) are kept for its local evaluation. Nothing else is
    loaded: no other party's records and no server split.

    Returns
    -------
    (PartyData, int)
        The party's data (indices into the records at ``data.root``) and the number of
        classes of the dataset.
    """
    return _own_data(scenario.data, scenario.scenario.seed, _resolve(scenario.data))


@functools.lru_cache(maxsize=2)
def _own_data(data: DataSection, seed: int, source: tuple) -> tuple[PartyData, int]:
    train, _test, num_classes = _load_sets(source, seed if source[0] == "loader" else 0)
    rng = stream_rng(seed, "own-test")
    everything = np.arange(len(train))
    return _with_local_test(train, everything, data.party_test_fraction, rng), num_classes


def _with_local_test(
    pool: ImageSet, idx: np.ndarray, fraction: float, rng: np.random.Generator
) -> PartyData:
    """A party's records ``idx`` of ``pool``, ``fraction`` of them (drawn by ``rng``) kept
    for its local test; floor keeps at least one train sample, since fraction < 1."""
    shuffled = rng.permutation(idx)
    n_test = int(np.floor(fraction * idx.size))
    tr, te = np.sort(shuffled[n_test:]), np.sort(shuffled[:n_test])
    indices = np.concatenate([tr, te])
    # Views: the party holds its positions in the pool and their labels, not the images.
    return PartyData(pool.view(indices[: tr.size]), pool.view(indices[tr.size :]), indices)


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
    return _federation(scenario.data, scenario.scenario.seed, _resolve(scenario.data))


@functools.lru_cache(maxsize=8)
def _federation(data: DataSection, seed: int, source: tuple) -> Federation:
    train, test, num_classes = _load_sets(source, seed if source[0] == "loader" else 0)
    split = partition if data.partitioner == "privfl" else flwr_datasets_partition
    parts = split(
        train.labels.numpy(),
        data.parties,
        data.partition,
        alpha=data.alpha,
        shards_per_party=data.shards_per_party,
        seed=seed,
        samples_per_party=data.samples_per_party,
    )
    rng = stream_rng(seed, "party-test")
    parties = [_with_local_test(train, idx, data.party_test_fraction, rng) for idx in parts]
    perm = stream_rng(seed, "server-split").permutation(len(test))
    half = len(test) // 2
    public_idx, server_idx = perm[:half], perm[half:]
    if data.server_test_samples:
        if data.server_test_samples > server_idx.size:
            raise ScenarioError(
                f"data.server_test_samples: {data.server_test_samples} requested but the "
                f"server's half of the {data.dataset} test set holds {server_idx.size}"
            )
        server_idx = server_idx[: data.server_test_samples]
    return Federation(
        num_classes=num_classes,
        train_pool=train,
        parties=tuple(parties),
        server_test=test.view(server_idx),
        public=test.view(public_idx),
    )
