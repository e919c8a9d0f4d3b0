"""The evaluator of a curious server's gradient inversion.

Not the attacker: :class:`InversionEvaluator` holds the run's scenario, rebuilds the batch
the target party trained on in the attacked round (:func:`privfl.training.round_batch_data`)
and scores the reconstruction against it. The attacker
(``privfl.strategies.curious_server.CuriousServer``) works from the traffic it recorded
and its :class:`~privfl.attacks.gradient_inversion.AttackerKnowledge` only.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from privfl.attacks.gradient_inversion import AttackerKnowledge, Reconstruction
from privfl.config import Scenario
from privfl.results import AttackReport
from privfl.training import round_batch_data


class InversionEvaluator:
    """Scores a reconstruction of ``attack.gradient_inversion.target_party``'s batch in
    round ``attack.gradient_inversion.round``.

    Parameters
    ----------
    scenario : Scenario
        The run's scenario (data, training, ``attack.gradient_inversion``).
    """

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario

    def truth(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The distinct samples (images, labels) the target trained on in the round."""
        s = self.scenario.attack.gradient_inversion
        data = round_batch_data(self.scenario, s.target_party, s.round)
        flat = torch.cat([data.images.flatten(1), data.labels[:, None].float()], 1)
        _, first = np.unique(flat.numpy(), axis=0, return_index=True)
        idx = torch.as_tensor(np.sort(first))
        return data.images[idx], data.labels[idx]

    def score(self, reconstruction: Reconstruction, knowledge: AttackerKnowledge) -> AttackReport:
        """The attack's :class:`AttackReport`: ``reconstruction`` matched against
        :meth:`truth`, with what the attacker was assumed to know (``knowledge``)."""
        # matplotlib, scipy and torchmetrics: kept off the import of the strategies
        from privfl.metrics import evaluate_reconstruction, image_grid_figure

        s = self.scenario.attack.gradient_inversion
        target = f"party {s.target_party}, round {s.round}"
        t0 = time.perf_counter()
        truth, truth_labels = self.truth()
        rec = reconstruction
        ev = evaluate_reconstruction(rec.images, rec.labels, truth, truth_labels, s.recovered_psnr)
        fig = image_grid_figure(
            truth,
            rec.images,
            perm=ev["perm"],
            psnr_per_image=ev["psnr_per_image"],
            truth_labels=truth_labels.tolist(),
            recon_labels=rec.labels.tolist(),
            title=f"{s.method}: party {s.target_party}, round {s.round}",
        )
        kn = knowledge
        secure = self.scenario.defense.secure_aggregation
        if s.method == "inverting-gradients":
            budget = (
                f"best of {s.restarts} start(s) after {s.trial_iterations or s.iterations} "
                f"Adam steps each, run to {s.iterations}"
            )
        elif s.method == "feature-span":
            budget = (
                f"local steps peeled off the first dense layer's update; each feature "
                f"inverted from {s.restarts} public start(s), {s.iterations} Adam steps"
            )
        else:
            budget = f"best of {s.restarts} start(s), run to {s.iterations} L-BFGS iterations"
        notes = [
            f"method {s.method}, {budget}; "
            f"attacker knows batch size {kn.batch_size}, {kn.local_steps} local step(s) "
            f"at lr {kn.lr}, labels {'known' if kn.labels_known else 'recovered'}",
            f"recovered = PSNR >= {s.recovered_psnr} dB after optimal matching; "
            f"evaluation took {time.perf_counter() - t0:.1f} s",
        ]
        if secure != "none":
            notes.append(
                f"inverted the server's real view under secure aggregation "
                f"({secure}): the decoded stage payload (masked input or partial sum of "
                f"shares), not the party's update"
            )
        if kn.local_steps > 1:
            # feature-span reads the steps as taken, whatever multi_step says
            model = "peeled one by one" if s.method == "feature-span" else f"as '{s.multi_step}'"
            notes.append(f"{kn.local_steps} local steps modelled {model}")
        if kn.momentum or kn.weight_decay:
            notes.append(
                f"the party's SGD momentum {kn.momentum} and weight decay {kn.weight_decay} "
                "are modelled"
            )
        if self.scenario.training.optimizer != "sgd":
            notes.append(
                f"the parties train with {self.scenario.training.optimizer}: the attack "
                "models their update as SGD steps, so expect less"
            )
        return AttackReport(
            name="gradient-inversion",
            role="curious-server",
            target=target,
            recovered=ev["recovered"],
            total=ev["total"],
            metrics={
                "psnr_mean": ev["psnr_mean"],
                "psnr_max": ev["psnr_max"],
                "ssim_mean": ev["ssim_mean"],
                "label_accuracy": ev["label_accuracy"],
                "seconds": rec.seconds,
                "objective": rec.objective,
            },
            figures={"gradient_inversion.png": fig},
            notes=notes,
        )
