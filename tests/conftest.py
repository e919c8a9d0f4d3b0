"""Fixtures shared by the tests that drive Flower strategies outside a running app."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture
def task_identity() -> None:
    """A run identity for Messages built outside a running app (a Grid sets it in real runs)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0


@pytest.fixture
def quiet_flower() -> Iterator[None]:
    """Flower's strategies log every round and the whole scenario at INFO: keep errors only."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)
