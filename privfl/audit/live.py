"""The auditor of a live federated run: hands out canaries, watches releases, bounds ε."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from privfl.audit.canaries import (
    CanaryParties,
    DiracCanaries,
    canary_party_directions,
    dirac_canaries,
    loss_scores,
    mislabelled_canaries,
)
from privfl.audit.game import AuditResult, OneRunAudit
from privfl.audit.keys import subkey
from privfl.dp import KeyStream


class CanaryInserter:
    """One party's included canary records: each joins a local step with probability q.

    Handed to the party locally by the auditor's harness (they are records of its data);
    ``__call__(rate)`` returns the summed clipped gradient of the canaries that join this
    step, or None.
    """

    def __init__(self, canaries: DiracCanaries, indices: np.ndarray, key: bytes) -> None:
        self.canaries = canaries
        self.indices = np.asarray(indices, dtype=np.int64)
        self._coins = KeyStream(key)

    def __call__(self, rate: float) -> torch.Tensor | None:
        if self.indices.size == 0:
            return None
        chosen = self.indices[self._coins.uniform(self.indices.size) < rate]
        return self.canaries.gradient(chosen) if chosen.size else None


class RunAuditor:
    """The auditor of one federated run (a lab instrument, apart from parties and server).

    It holds the secret coins; hands each party its canary records (Dirac gradient
    canaries, record-level DP-SGD or no DP) or adds the included canary parties to the
    server's DP-FedAvg sum (party-level DP); observes every global model the server
    releases (the aggregate of each round: the white-box view of a server under secure
    aggregation); and bounds ε at the end.

    Parameters
    ----------
    mode : {"none", "client", "global", "distributed"}
        The run's ``defense.dp.mode``: canary records for the first two, canary parties
        (added to the released sum, as a party's update would be) for the party-level ones.
    canaries : int
    param_names : sequence of str
        The model's parameter names, in ``model.parameters()`` order (the flat order of
        the canaries' coordinates).
    sizes : sequence of int
        Their sizes.
    clip : float
        The clip norm (per-sample under DP-SGD, per-party under DP-FedAvg; 1 without DP).
    parties : int
        Parties of the federation (canary record j belongs to party j mod parties).
    view : {"aggregate", "party-update", "final-model"}
        What the auditor is handed (see ``audit.view``).
    target_party : int
        The party whose update the ``party-update`` view sees (it holds every canary).
    records, num_classes
        Public records (images, labels) the ``final-model`` view mislabels as canaries.
    """

    def __init__(
        self,
        *,
        mode: str,
        canaries: int,
        param_names: Sequence[str],
        sizes: Sequence[int],
        clip: float,
        parties: int,
        confidence: float = 0.95,
        guess_fraction: float = 0.05,
        key: bytes | None = None,
        view: str = "aggregate",
        target_party: int = 0,
        records: tuple[torch.Tensor, torch.Tensor] | None = None,
        num_classes: int = 10,
    ) -> None:
        if mode not in ("none", "client", "global", "distributed"):
            raise ValueError(
                f"RunAuditor: mode must be none, client, global or distributed, got {mode!r}"
            )
        if view not in ("aggregate", "party-update", "final-model"):
            raise ValueError(
                f"RunAuditor: view must be aggregate, party-update or final-model, got {view!r}"
            )
        if view == "final-model" and (records is None or len(records[1]) < canaries):
            have = 0 if records is None else len(records[1])
            raise ValueError(
                f"audit.canaries: the final-model view needs {canaries} canary records, "
                f"the public data holds {have}"
            )
        self.mode = mode
        self.view = view
        self.target_party = target_party
        self.key = key if key is not None else os.urandom(32)
        self.audit = OneRunAudit(
            canaries, key=subkey(self.key, "coins"), guess_fractions=(guess_fraction,)
        )
        self.names = list(param_names)
        self.sizes = [int(s) for s in sizes]
        self.dim = sum(self.sizes)
        self.parties = parties
        self.confidence = confidence
        if mode in ("global", "distributed"):
            self.canary_parties: CanaryParties | None = canary_party_directions(
                canaries, self.dim, subkey(self.key, "parties"), clip=clip
            )
            self.records: DiracCanaries | None = None
        else:
            self.records = dirac_canaries(
                canaries, self.dim, subkey(self.key, "records"), clip=clip
            )
            self.canary_parties = None
        self.scores = np.zeros(canaries)
        self.rounds = 0
        self._previous: np.ndarray | None = None
        # Black box: mislabelled public records, in the parties' data when included.
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        if view == "final-model":
            assert records is not None
            images, labels = records[0][:canaries], records[1][:canaries]
            self.inputs = (
                images,
                mislabelled_canaries(labels, subkey(self.key, "labels"), num_classes),
            )

    # ------------------------------------------------------------------ handed out
    def _owned(self, party: int) -> np.ndarray:
        if self.view == "party-update":
            return np.full(self.audit.canaries, party == self.target_party)
        return np.arange(self.audit.canaries) % self.parties == party

    def party_records(self, party: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The mislabelled canary records (included ones) party ``party`` trains on, or
        None (black-box view only)."""
        if self.inputs is None:
            return None
        chosen = torch.from_numpy(np.flatnonzero(self._owned(party) & self.audit.included))
        return self.inputs[0][chosen], self.inputs[1][chosen]

    def party_inserter(self, party: int, server_round: int) -> CanaryInserter | None:
        """The canary records party ``party`` holds (included ones only) for one round, or
        None; their step coins are fresh each round (keyed by party and round)."""
        if self.records is None or self.view == "final-model":
            return None
        own = self._owned(party)
        chosen = np.flatnonzero(own & self.audit.included)
        key = subkey(self.key, f"party-{party}-round-{server_round}")
        return CanaryInserter(self.records, chosen, key)

    def canary_party_sum(self) -> tuple[np.ndarray, int] | None:
        """The included canary parties' summed updates and their count (DP-FedAvg)."""
        if self.canary_parties is None:
            return None
        chosen = np.flatnonzero(self.audit.included)
        return self.canary_parties.update_sum(chosen), int(chosen.size)

    # ------------------------------------------------------------------ the view
    def flatten(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """The parameters of a global model as one vector, in the canaries' order."""
        return np.concatenate(
            [np.asarray(arrays[n], dtype=np.float64).reshape(-1) for n in self.names]
        )

    def observe_party(self, sent: Mapping[str, np.ndarray], reply: np.ndarray) -> None:
        """Party-update view: score the canaries on what the server received from the
        target party (``reply``: its weights, flat, or whatever it could decode of a masked
        payload) against the model it was sent."""
        assert self.records is not None
        step = np.asarray(reply, dtype=np.float64)[: self.dim] - self.flatten(sent)
        self.scores += self.records.scores(-step)
        self.rounds += 1

    def observe_final(self, model: nn.Module) -> None:
        """Black-box view: score the mislabelled canaries by the released model's loss."""
        assert self.inputs is not None
        self.scores = loss_scores(model.cpu(), *self.inputs)
        self.rounds = 1

    def observe(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Score the canaries on the step from the previous global model to this one."""
        if self.view != "aggregate":
            return
        flat = self.flatten(arrays)
        if self._previous is not None:
            step = flat - self._previous
            if self.records is not None:
                # Descent moves a parameter against an included canary's gradient.
                self.scores += self.records.scores(-step)
            else:
                assert self.canary_parties is not None
                self.scores += self.canary_parties.cosines(step)
            self.rounds += 1
        self._previous = flat

    def result(self, *, epsilon_accounted: float, delta: float) -> AuditResult:
        """Guess and bound ε from the scores gathered so far."""
        if self.view == "final-model":
            view = "black-box: the released model's loss on mislabelled canary records"
        elif self.view == "party-update":
            view = (
                f"what the server received from party {self.target_party}, Dirac canary "
                "records in its training"
            )
        elif self.records is not None:
            view = (
                "white-box: every round's aggregate, Dirac canary records in the parties' training"
            )
        else:
            view = "white-box: every round's aggregate, canary parties in the sum"
        return self.audit.evaluate(
            self.scores,
            epsilon_accounted=epsilon_accounted,
            delta=delta,
            view=view,
            confidence=self.confidence,
        )
