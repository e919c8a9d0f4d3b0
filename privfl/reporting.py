"""What a strategy in the server's chain can report to the run, as protocols.

The run (:mod:`privfl.server`) walks the chain of strategy wrappers and collects from
each what it reports: attack results, privacy spent, faults, side-channel records. A
strategy takes part by having the attribute or method; these protocols name them, so the
collecting code says what it asks for instead of probing with ``getattr``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from privfl.results import AttackReport


@runtime_checkable
class ReportsAttacks(Protocol):
    """An attacker (or its evaluator) that has results for results.json."""

    def attack_reports(self) -> list[AttackReport]: ...


@runtime_checkable
class ReportsPrivacySpent(Protocol):
    """A DP mechanism that accounts party-level ε per released round."""

    epsilon_history: dict[int, float]
    exhausted: bool


@runtime_checkable
class ReportsFaults(Protocol):
    """A strategy that records refusals, failed replies, exclusions and skipped rounds."""

    faults: dict[int, list[dict[str, Any]]]


@runtime_checkable
class CarriesSideChannel(Protocol):
    """A strategy that keeps the public side-channel records parties attached, per round."""

    side_channel: dict[int, dict[str, Any]]


@runtime_checkable
class Stoppable(Protocol):
    """A strategy that ends the run cleanly once ``stop_reason`` is set."""

    stop_reason: str | None


@runtime_checkable
class TakesCanaryParties(Protocol):
    """A party-level DP mechanism an auditor can hand canary parties to."""

    canary_parties: Callable[[], tuple[np.ndarray, int]] | None
