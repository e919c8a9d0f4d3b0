"""A scenario's data shared out: :class:`Federation` (the parties' splits with their local
test sets, the server's public and test halves), a deployed party's own data, and the
per-process caches of both."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from privfl.config import DataSection, Scenario, ScenarioError
from privfl.data.imageset import ImageSet
from privfl.data.loading import _kind, _load_sets, _resolve
from privfl.data.mnist import IMAGE_SHAPE
from privfl.data.partitions import flwr_datasets_partition, partition
from privfl.seeding import stream_rng


def sample_shape(scenario: Scenario) -> tuple[int, ...]:
    """Shape of one sample of ``scenario``'s data, e.g. ``(1, 28, 28)`` or ``(d,)``.

    The MNIST family is known to be 1×28×28 without loading anything; other datasets are
    loaded (once per process, :func:`load_federation`).
    """
    if _kind(scenario.data.dataset) == "idx":
        return IMAGE_SHAPE
    return load_federation(scenario).train_pool.sample_shape


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
