"""Seeded splits of a train set among the parties: privfl's own partitioners
(:func:`partition`) and flwr-datasets' (:func:`flwr_datasets_partition`, optional)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from privfl.config import ScenarioError
from privfl.seeding import stream_rng


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
