"""The container every data module hands out: :class:`ImageSet` (samples and their labels)
and its views over a pool, plus :class:`DataError`, the error of a bad data file.

A view (:meth:`ImageSet.view`) holds a pool and its rows there; the images of the last few
views read are kept (:func:`_gather`) so that reading a view batch by batch gathers once.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import FrozenInstanceError, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privfl.errors import UserError


class DataError(UserError, ValueError):
    """A data file is missing, corrupt or inconsistent; the message names the file."""


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
            # privfl.data.store builds ImageSets, so it imports this module: a real cycle.
            from privfl.data.store import _reopen_pool

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
