"""The MNIST family (``mnist``, ``fashion-mnist``, ``emnist-<split>``) from IDX files, and
the MNIST sample shipped with privfl.

Finds the files under a root (torchvision's layout, the ``raw`` folder or its parent),
lays them out in privfl's cache where needed (``.gz`` unpacked and md5-checked, plain files
linked), checks every IDX header against its file's size, and decodes each split once into
the shared store (:func:`privfl.data.store._shared_pool`).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torchvision

from privfl.config import DataSection, ScenarioError
from privfl.data.imageset import DataError, ImageSet
from privfl.data.store import _download_root, _shared_pool, cache_dir

# privfl/_embedded/, beside this package.
EMBEDDED_SAMPLE = Path(__file__).resolve().parent.parent / "_embedded" / "mnist_sample.npz"
IMAGE_SHAPE = (1, 28, 28)

# md5 of the original MNIST files, uncompressed. No other dataset
# gets a check: we only record digests we know exactly.
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}


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
