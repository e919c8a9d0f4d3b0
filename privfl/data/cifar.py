"""CIFAR-10 / -100 from torchvision's python-pickle layout, read with an unpickler that
loads numpy arrays only, each split decoded once into the shared store."""

from __future__ import annotations

import functools
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torchvision

from privfl.data.imageset import DataError, ImageSet
from privfl.data.store import _download_root, _shared_pool

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
