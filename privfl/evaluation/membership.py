"""The membership-inference harness: trains (or is handed) the target models, rebuilds
which records are members, runs the attacks of :mod:`privfl.attacks.membership` against
the target's query interface and scores them. It holds the ground truth, so it is an
evaluator, apart from the attackers it runs: each attack sees only a
:class:`~privfl.attacks.membership.QueryAPI` and public data.

One file: training the targets, splitting members from non-members and scoring every
attack on the same split are one experiment; apart, each would need the others' state."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from privfl import progress
from privfl.architecture import build_model
from privfl.attacks.membership import (
    LabelledImages,
    LabelledTensors,
    OfflineLiRA,
    QuantileMIA,
    QueryAPI,
    hinge_score,
    loss_attack,
    train_classifier,
)
from privfl.config import Scenario, ScenarioError
from privfl.data import load_federation
from privfl.dp.sgd import train_dp_sgd
from privfl.metrics import roc
from privfl.models import build_task_model
from privfl.results import AttackReport
from privfl.seeding import derive_seed


@dataclass(frozen=True, eq=False)
class _Split:
    """Who is who in one membership experiment."""

    members: LabelledTensors  # what the target trained on
    eval_in: LabelledTensors  # members that are scored
    eval_out: LabelledTensors  # non-members that are scored (never trained on, not public)
    public: LabelledTensors  # the attacker's own non-member data
    target: str  # how the report names the target


def _cat(*sets: LabelledImages) -> LabelledTensors:
    return LabelledTensors(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]))


def _take(s: LabelledImages, idx: np.ndarray) -> LabelledTensors:
    t = torch.as_tensor(np.asarray(idx, dtype=np.int64))
    return LabelledTensors(s.images[t], s.labels[t])


def _stratified(idx: np.ndarray, labels: np.ndarray, first: int) -> np.ndarray:
    """Reorder ``idx`` so its first ``first`` records hold each label in the same share as
    the rest (up to rounding), keeping the given order within a label.

    A target trained on a random half of a small pool inherits that half's class
    histogram: a weak model (DP-SGD on 250 records) then scores over-represented classes
    higher, which separates members from non-members as a group, not record by record.
    Splitting every label in the same proportion removes that channel, so the evaluation
    measures what record-level DP bounds.
    """
    frac = first / max(1, idx.size)
    head, tail, carry = [], [], 0.0
    for c in np.unique(labels[idx]):
        of_c = idx[labels[idx] == c]
        # The rounding remainder carries over to the next label, so the head ends at
        # ``first`` records (bar float error, mended below).
        want = of_c.size * frac + carry
        n = int(np.floor(want + 1e-9))
        carry = want - n
        head.append(of_c[:n])
        tail.append(of_c[n:])
    h, t = np.concatenate(head), np.concatenate(tail)
    if h.size < first:  # float leftovers: move the last ones over
        h, t = np.concatenate([h, t[: first - h.size]]), t[first - h.size :]
    return np.concatenate([h, t])


def _split(scenario: Scenario, federation: Any, rng: np.random.Generator) -> list[_Split]:
    """One :class:`_Split` per target; all share the attacker's public data, which is
    disjoint from every target's members and scored non-members."""
    mi = scenario.attack.membership
    pool = federation.train_pool
    n_pool = int(pool.labels.shape[0])
    if mi.target == "single":
        # No federation trains here: the train pool is split into each target's members and
        # held-out non-members, the rest is public like federation.public.
        need = mi.members + mi.non_members
        if need * mi.targets > n_pool:
            raise ScenarioError(
                f"attack.membership: {mi.targets} target(s) x (members + non-members scored "
                f"= {need}) = {need * mi.targets} exceeds the train pool ({n_pool} records)"
            )
        perm = rng.permutation(n_pool)
        labels = pool.labels.numpy()
        picks = []
        for k in range(mi.targets):
            mine = _stratified(perm[k * need : (k + 1) * need], labels, mi.members)
            members = _take(pool, mine[: mi.members])
            eval_in = _take(members, rng.choice(mi.members, size=mi.eval_samples, replace=False))
            eval_out = _take(pool, mine[mi.members :])
            picks.append((members, eval_in, eval_out))
        public = _cat(federation.public, _take(pool, perm[need * mi.targets :]))
        targets = (
            ["hospital-api"]
            if mi.targets == 1
            else [f"hospital-api-{k}" for k in range(mi.targets)]
        )
    else:
        party = federation.parties[mi.target_party]
        members = LabelledTensors(party.train.images, party.train.labels)
        n_mem = int(members.labels.shape[0])
        if mi.eval_samples > n_mem:
            raise ScenarioError(
                f"attack.membership.eval_samples: {mi.eval_samples} requested but party "
                f"{mi.target_party} has {n_mem} train records"
            )
        eval_in = _take(members, rng.choice(n_mem, size=mi.eval_samples, replace=False))
        used = np.zeros(n_pool, dtype=bool)
        for p in federation.parties:
            used[np.asarray(p.indices)] = True
        unused = rng.permutation(np.flatnonzero(~used))
        # Held-out non-members: records no party holds, then the server's test split;
        # whatever is left over is the attacker's, like federation.public.
        candidates = _cat(_take(pool, unused), federation.server_test)
        n_cand = int(candidates.labels.shape[0])
        if mi.non_members > n_cand:
            raise ScenarioError(
                f"attack.membership: {mi.non_members} non-members to score requested but only "
                f"{n_cand} held-out non-members exist (unused train records + server_test)"
            )
        eval_out = _take(candidates, np.arange(mi.non_members))
        spare = _take(candidates, np.arange(mi.non_members, n_cand))
        public = _cat(federation.public, spare)
        picks = [(members, eval_in, eval_out)]
        targets = [f"global-model/party-{mi.target_party}"]
    n_pub = int(public.labels.shape[0])
    if n_pub > mi.public_samples:
        public = _take(public, np.sort(rng.choice(n_pub, size=mi.public_samples, replace=False)))
    return [_Split(m, i, o, public, t) for (m, i, o), t in zip(picks, targets, strict=True)]


def _train_model(
    scenario: Scenario, model: nn.Module, data: LabelledImages, device: torch.device, seed: int
) -> tuple[nn.Module, float | None]:
    """Train like the single target: over-fit SGD for ``attack.membership.epochs``, or
    DP-SGD under ``defense.dp.mode = "client"``. Returns the model and its epsilon."""
    mi, dp = scenario.attack.membership, scenario.defense.dp
    if dp.mode == "client":
        t = scenario.training
        res = train_dp_sgd(
            model,
            data,
            epochs=mi.epochs,
            batch_size=t.batch_size,
            lr=t.lr,
            momentum=t.momentum,
            epsilon=dp.epsilon,
            delta=dp.delta,
            clip=dp.clip,
            accountant=dp.accountant,
            seed=seed,
            device=device,
            noise_multiplier=dp.noise_multiplier,
        )
        return res.model.eval(), float(res.epsilon)
    return train_classifier(model, data, scenario, epochs=mi.epochs, seed=seed, device=device), None


def _shadow_trainer(
    scenario: Scenario, num_classes: int, device: torch.device, base_seed: int
) -> Callable[[Any], nn.Module]:
    """Shadows mimic the target's training from their own random initialisation. A
    federated target is mimicked by central training for ``rounds × local_epochs`` epochs."""
    mi = scenario.attack.membership
    epochs = scenario.scenario.rounds * scenario.training.local_epochs
    counter = iter(range(1_000_000))

    def train(data: Any) -> nn.Module:
        seed = base_seed + next(counter)
        torch.manual_seed(seed)
        model = build_task_model(
            scenario.model.name,
            num_classes,
            scenario.model.hidden,
            input_shape=tuple(data.images.shape[1:]),
        )
        if mi.target == "single":
            return _train_model(scenario, model, data, device, seed)[0]
        return train_classifier(model, data, scenario, epochs=epochs, seed=seed, device=device)

    return train


def calibration_fraction(fpr: float, public_records: int) -> float:
    """Public share held out to calibrate an operating point (QMIA's validation split,
    the public records no LiRA shadow trains on): 10%, raised (up to 30%) until it allows
    two false positives at ``fpr``, so the threshold is an empirical quantile of public
    non-members rather than a model's least reliable tail."""
    return min(0.3, max(0.1, 2.0 / (fpr * max(1, public_records))))


def _accuracy(api: QueryAPI, data: LabelledImages) -> float:
    if int(data.labels.shape[0]) == 0:
        return math.nan
    return float(np.mean(api.query(data.images).argmax(1) == data.labels.numpy()))


def _put_estimate(m: dict[str, Any], key: str, est: Any) -> None:
    """``key``, ``key_low``, ``key_high`` from an estimate with a confidence interval."""
    m.update({key: est.value, f"{key}_low": est.low, f"{key}_high": est.high})


def _evaluate(
    name: str,
    scores_in: np.ndarray,
    scores_out: np.ndarray,
    flag_in: np.ndarray,
    flag_out: np.ndarray,
    *,
    seed: int,
) -> dict[str, Any]:
    """ROC metrics of the statistics and the operating point given by the flags (each
    target's own calibrated threshold, so pooled targets keep their own operating points)."""
    m: dict[str, Any] = {"attack": name}
    _put_estimate(m, "auc", roc.auc_ci(scores_in, scores_out, seed=seed))
    for key, f in (("tpr_at_0.1pct_fpr", 0.001), ("tpr_at_1pct_fpr", 0.01)):
        _put_estimate(m, key, roc.tpr_at_fpr(scores_in, scores_out, f))
    f_in, f_out = flag_in.astype(np.float64), flag_out.astype(np.float64)
    tp = int(flag_in.sum())
    p = roc.precision_at(f_in, f_out, 0.5)
    _put_estimate(m, "precision", p)
    _put_estimate(m, "precision_balanced", roc.balanced_precision_at(f_in, f_out, 0.5))
    _put_estimate(m, "operating_observed_fpr", roc.fpr_at(f_out, 0.5))
    m.update(
        operating_tpr=tp / scores_in.size,
        flagged=p.trials,
        true_positives=tp,
    )
    return m


def run_membership(
    scenario: Scenario,
    *,
    target_model: nn.Module | None = None,
    federation: Any = None,
    device: torch.device | str = "cpu",
) -> list[AttackReport]:
    """Run the scenario's membership-inference attacks; one report per attack.

    Parameters
    ----------
    scenario : Scenario
        ``attack.membership`` says which attacks, which target and how many records.
    target_model : nn.Module, optional
        ``target = "federated"``: the global model after the Flower run (required).
        ``target = "single"``: must be None; the target is trained here on ``members``
        records of the train pool (DP-SGD when ``defense.dp.mode = "client"``).
    federation : Federation, optional
        Defaults to ``privfl.data.load_federation(scenario)``.
    device : torch.device or str

    Returns
    -------
    list[AttackReport]
        ``name = "membership-inference"``, ``role = "query-only"``, ``target`` =
        ``"<hospital-api | hospital-api-xK | global-model/party-i>/<attack>"``;
        ``recovered`` = members flagged at the attack's operating point (FPR
        ``operating_fpr`` as calibrated by the attacker on public data), ``total`` =
        members scored. With ``attack.membership.targets = K > 1`` (single targets) K
        independent hospitals are attacked, each with its own QMIA regressor and
        thresholds (LiRA's shadows are shared: they never see a target) and the records
        of all K are pooled into one ROC, as in the LiRA paper's many-target evaluation.
        The first report carries the combined log-log ROC figure.
    """
    mi = scenario.attack.membership
    device = torch.device(device)
    if federation is None:
        federation = load_federation(scenario)
    if mi.target == "federated" and target_model is None:
        raise ValueError(
            "attack.membership.target = 'federated' needs the global model (target_model)"
        )
    if mi.target == "single" and target_model is not None:
        raise ValueError(
            "attack.membership.target = 'single' trains its own target; pass no target_model"
        )
    given_model = target_model

    seed = scenario.scenario.seed
    rng = np.random.default_rng(derive_seed(seed, "membership-split"))
    splits = _split(scenario, federation, rng)
    public = splits[0].public
    num_classes = int(federation.num_classes)
    y_pub = public.labels.numpy()
    n_pub = int(y_pub.size)

    def mimic_factory() -> nn.Module:
        # Like LiRA's shadows, QMIA's mimics know the target's architecture, not its weights.
        return build_task_model(
            scenario.model.name,
            num_classes,
            scenario.model.hidden,
            input_shape=tuple(public.images.shape[1:]),
        )

    lira: OfflineLiRA | None = None
    lira_notes: list[str] = []
    cal = torch.zeros(0, dtype=torch.int64)
    cal_shadow = np.zeros((0, 0))
    if "lira" in mi.attacks:
        # Shadows depend only on the public data and the training recipe, so one set
        # serves every target. Public records held out from every shadow calibrate the
        # operating point (calibration_fraction); the shadows sample the rest.
        n_trained = int(splits[0].members.labels.shape[0])
        if mi.target == "federated":
            n_trained = sum(int(p.train.labels.shape[0]) for p in federation.parties)
        n_cal = int(n_pub * calibration_fraction(mi.operating_fpr, n_pub))
        gen = torch.Generator().manual_seed(derive_seed(seed, "lira-calibration"))
        perm = torch.randperm(n_pub, generator=gen)
        cal, pool = perm[:n_cal], perm[n_cal:]
        shadow_pool = LabelledTensors(public.images[pool], public.labels[pool])
        subset = max(1, min(n_trained, int(pool.numel()) // 2))
        lira = OfflineLiRA(
            _shadow_trainer(scenario, num_classes, device, derive_seed(seed, "lira-shadows")),
            shadow_models=mi.shadow_models,
            fixed_variance=mi.fixed_variance,
            seed=derive_seed(seed, "lira"),
            device=device,
        ).fit(shadow_pool, subset)
        # The same for every target: only the target's own scores of these records differ.
        cal_shadow = lira.shadow_scores(public.images[cal], public.labels[cal])
        var = (
            f"fixed variance (σ = {lira.sigma:.3g}, pooled OUT scores of the shadows' public "
            f"records)"
            if lira.sigma is not None
            else "per-record variance"
        )
        lira_notes = [
            f"offline, {mi.shadow_models} shadows on {subset} public records, {var}; "
            f"operating point calibrated on {n_cal} public records no shadow "
            f"trained on"
        ]

    # Per attack: pooled statistics of members and non-members, and whether the attack
    # flagged each record at its own target's operating point.
    pooled: dict[str, dict[str, list[np.ndarray]]] = {
        a: {"in": [], "out": [], "flag_in": [], "flag_out": []} for a in mi.attacks
    }
    notes_of: dict[str, list[str]] = {"lira": lira_notes}
    train_acc, test_acc, epsilons = [], [], []
    for k, split in enumerate(splits):
        target_model = given_model
        if target_model is None:
            # Target 0 uses the single target's seed tag: K = 1 is the single-target attack.
            tag = "mia-target" if k == 0 else f"mia-target-{k}"
            with progress.phase(f"membership: target model {k + 1}/{len(splits)}"):
                target_model, eps = _train_model(
                    scenario,
                    build_model(scenario, num_classes),
                    split.members,
                    device,
                    derive_seed(seed, tag),
                )
            if eps is not None:
                epsilons.append(eps)
        api = QueryAPI(target_model, device)
        del target_model  # from here on the attacker only queries
        train_acc.append(_accuracy(api, split.members))
        test_acc.append(_accuracy(api, split.eval_out))

        y_in, y_out = split.eval_in.labels.numpy(), split.eval_out.labels.numpy()
        logits_in = api.query(split.eval_in.images)
        logits_out = api.query(split.eval_out.images)
        logits_pub = api.query(public.images)
        h_in, h_out, h_pub = (
            hinge_score(z, y)
            for z, y in ((logits_in, y_in), (logits_out, y_out), (logits_pub, y_pub))
        )
        for name in mi.attacks:
            if name == "qmia":
                qmia = QuantileMIA(
                    num_classes,
                    levels=mi.quantile_levels,
                    head=mi.qmia_head,
                    epochs=mi.qmia_epochs,
                    ensemble=mi.qmia_ensemble,
                    mimics=mi.qmia_mimics,
                    mimic_factory=mimic_factory,
                    val_fraction=calibration_fraction(mi.operating_fpr, n_pub),
                    seed=derive_seed(seed, "qmia") if k == 0 else derive_seed(seed, "qmia", k),
                    device=device,
                ).fit(public.images, public.labels, h_pub, logits=logits_pub)
                s_in = qmia.membership_scores(split.eval_in.images, split.eval_in.labels, h_in)
                s_out = qmia.membership_scores(split.eval_out.images, split.eval_out.labels, h_out)
                thr = qmia.operating_threshold(mi.operating_fpr)
                n_val = 0 if qmia._val_scores is None else qmia._val_scores.size
                per = " per target" if len(splits) > 1 else ""
                ens = f", mean of {mi.qmia_ensemble} regressors" if mi.qmia_ensemble > 1 else ""
                loc = (
                    f"; location: mean hinge of {mi.qmia_mimics} mimic(s) of the target's "
                    f"architecture distilled from its public logits"
                    if mi.qmia_mimics
                    else ""
                )
                notes_of[name] = [
                    f"hinge score; {mi.qmia_head} head, {mi.quantile_levels} levels{ens}{loc}; "
                    f"operating point calibrated on {n_val} held-out public records{per}"
                ]
            elif name == "loss":
                thr = roc.threshold_at_fpr(loss_attack(logits_pub, y_pub), mi.operating_fpr)
                s_in, s_out = loss_attack(logits_in, y_in), loss_attack(logits_out, y_out)
                notes_of[name] = ["negated cross-entropy; threshold = public non-members' quantile"]
            else:
                assert lira is not None
                s_in = lira.membership_scores(split.eval_in.images, split.eval_in.labels, h_in)
                s_out = lira.membership_scores(split.eval_out.images, split.eval_out.labels, h_out)
                thr = lira.operating_threshold(
                    public.images[cal],
                    public.labels[cal],
                    h_pub[cal.numpy()],
                    mi.operating_fpr,
                    shadow_scores=cal_shadow,
                )
            # Each statistic is kept as its distance past this target's own calibrated
            # threshold: one target's ROC is unchanged by the shift, and pooled targets
            # are ranked on a common scale anchored at the operating point instead of a
            # scale that drifts from one regressor (or one target's scores) to the next.
            got = pooled[name]
            got["in"].append(s_in - thr)
            got["out"].append(s_out - thr)
            got["flag_in"].append(s_in > thr)
            got["flag_out"].append(s_out > thr)

    common: dict[str, Any] = {
        "targets": len(splits),
        "members_scored": int(sum(s.eval_in.labels.shape[0] for s in splits)),
        "non_members_scored": int(sum(s.eval_out.labels.shape[0] for s in splits)),
        "public_records": n_pub,
        "operating_fpr": mi.operating_fpr,
        "target_train_accuracy": float(np.mean(train_acc)),
        "target_test_accuracy": float(np.mean(test_acc)),
    }
    if epsilons:
        common["epsilon"] = float(max(epsilons))
    target_name = splits[0].target if len(splits) == 1 else f"hospital-api-x{len(splits)}"
    results: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]] = []
    for name in mi.attacks:
        got = pooled[name]
        notes = list(notes_of[name])
        if len(splits) > 1:
            notes.append(
                f"{len(splits)} independent targets, each trained on its own "
                f"{mi.members} records; statistics and operating-point flags pooled"
            )
        results.append(
            (
                name,
                np.concatenate(got["in"]),
                np.concatenate(got["out"]),
                np.concatenate(got["flag_in"]),
                np.concatenate(got["flag_out"]),
                notes,
            )
        )

    reports = []
    curves = {}
    for name, s_in, s_out, f_in, f_out, notes in results:
        metrics = _evaluate(
            name, s_in, s_out, f_in, f_out, seed=derive_seed(seed, "auc-boot", name)
        )
        metrics.update(common)
        curve = roc.roc_curve(s_in, s_out)
        curves[f"{name} (AUC {metrics['auc']:.3f})"] = curve
        notes = [
            *notes,
            f"AUC {metrics['auc']:.3f} [{metrics['auc_low']:.3f}, {metrics['auc_high']:.3f}]; "
            f"TPR@0.1%FPR {metrics['tpr_at_0.1pct_fpr']:.3f}; "
            f"TPR@1%FPR {metrics['tpr_at_1pct_fpr']:.3f}",
            f"operating point (aimed FPR {mi.operating_fpr:g}): observed FPR "
            f"{metrics['operating_observed_fpr']:.4f}, {metrics['true_positives']} of "
            f"{metrics['flagged']} flagged are members: precision {metrics['precision']:.3f} "
            f"[{metrics['precision_low']:.3f}, {metrics['precision_high']:.3f}] at "
            f"{s_in.size} members : {s_out.size} non-members, "
            f"{metrics['precision_balanced']:.3f} "
            f"[{metrics['precision_balanced_low']:.3f}, "
            f"{metrics['precision_balanced_high']:.3f}] at 1 : 1",
        ]
        reports.append(
            AttackReport(
                name="membership-inference",
                role="query-only",
                target=f"{target_name}/{name}",
                recovered=metrics["true_positives"],
                total=int(s_in.size),
                metrics=metrics,
                notes=notes,
                # Saved beside results.json, so ROC curves can be redrawn and pooled.
                arrays={
                    "scores_in": s_in,
                    "scores_out": s_out,
                    "flagged_in": f_in,
                    "flagged_out": f_out,
                    "roc_fpr": curve.fpr,
                    "roc_tpr": curve.tpr,
                    "roc_thresholds": curve.thresholds,
                },
            )
        )
    if reports:
        fig = roc.roc_figure(curves, title=f"Membership inference: {target_name}")
        reports[0].figures[f"membership_roc_{target_name.replace('/', '_')}.png"] = fig
    return reports
