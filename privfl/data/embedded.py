"""The builder of the MNIST sample shipped with privfl: a class-balanced, seeded sample of
real MNIST, written byte-for-byte reproducibly."""

from __future__ import annotations

import os
import uuid
import zipfile
from pathlib import Path

import numpy as np
import torch

from privfl.config import DataSection
from privfl.data.loading import load_dataset


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
