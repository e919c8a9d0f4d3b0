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

Rooms: :mod:`privfl.data.imageset` (:class:`ImageSet`, its views, :class:`DataError`),
:mod:`privfl.data.store` (privfl's cache folder and the shared read-only pools in it),
:mod:`privfl.data.mnist` (the MNIST family from IDX files, the embedded sample),
:mod:`privfl.data.cifar` (CIFAR pickles), :mod:`privfl.data.loaders` (``torchvision:<Class>``
and ``module:loader``), :mod:`privfl.data.loading` (:func:`load_dataset`: which reader, cached
per process), :mod:`privfl.data.partitions` (privfl's and flwr-datasets' partitioners),
:mod:`privfl.data.federation` (:class:`Federation`, :func:`load_federation`,
:func:`own_data`, :func:`sample_shape`) and :mod:`privfl.data.embedded` (the builder of the
embedded sample).
"""

from privfl.data.cifar import CIFAR_FOLDERS
from privfl.data.embedded import build_embedded_sample
from privfl.data.federation import (
    Federation,
    PartyData,
    load_federation,
    own_data,
    sample_shape,
)
from privfl.data.imageset import DataError, ImageSet
from privfl.data.loaders import TORCHVISION_PREFIX
from privfl.data.loading import load_dataset
from privfl.data.mnist import EMBEDDED_SAMPLE, IMAGE_SHAPE, MNIST_MD5
from privfl.data.partitions import flwr_datasets_partition, partition
from privfl.data.store import cache_dir

__all__ = [
    "CIFAR_FOLDERS",
    "EMBEDDED_SAMPLE",
    "IMAGE_SHAPE",
    "MNIST_MD5",
    "TORCHVISION_PREFIX",
    "DataError",
    "Federation",
    "ImageSet",
    "PartyData",
    "build_embedded_sample",
    "cache_dir",
    "flwr_datasets_partition",
    "load_dataset",
    "load_federation",
    "own_data",
    "partition",
    "sample_shape",
]
