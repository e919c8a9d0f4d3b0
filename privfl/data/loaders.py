"""Datasets read through other code: any torchvision dataset class on disk
(``torchvision:<Class>``) and the user's own ``module:loader``; what they give is checked
(dtype, shape, NaN, value and label range) and every error names ``data.dataset``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

from privfl.config import ScenarioError
from privfl.data.imageset import DataError, ImageSet
from privfl.errors import UserError
from privfl.plugins import load_object

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
