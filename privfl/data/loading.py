"""Which reader ``data.dataset`` names (:func:`load_dataset`), and the per-process cache of
what was loaded, keyed by the dataset and its resolved source."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

from privfl.config import DataSection
from privfl.data.cifar import CIFAR_FOLDERS, _load_cifar
from privfl.data.imageset import DataError, ImageSet
from privfl.data.loaders import TORCHVISION_PREFIX, _load_torchvision, _load_user
from privfl.data.mnist import _load_split, _resolve_source, _spec
from privfl.data.store import _download_root


def load_dataset(data: DataSection, seed: int = 0) -> tuple[ImageSet, ImageSet, int]:
    """Load the train and test sets named by ``data``.

    Parameters
    ----------
    data : DataSection
        ``dataset``, ``root`` and ``download`` are used; see :mod:`privfl.data` for how the
        root is resolved and which datasets are known.
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
