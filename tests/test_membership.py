"""Membership inference: attacks against analytic ROCs, QMIA calibration, the query view,
and a tiny end-to-end run on synthetic images (no spine data, no DP-SGD)."""

from __future__ import annotations

import copy
import gc
import math
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from privfl.attacks import membership as M
from privfl.config import Scenario
from privfl.evaluation import membership as H
from privfl.metrics import roc
from privfl.models import build_task_model

torch.set_num_threads(1)

DELTA, TAU = 1.5, 2.0  # member shift; spread of per-record difficulty
FPRS = (0.05, 0.1, 0.2, 0.5)


def _calibrated_tpr(f):
    """Optimal per-record test: z = s - d, members N(δ, 1), non-members N(0, 1)."""
    return stats.norm.sf(stats.norm.isf(f) - DELTA)


def _global_tpr(f):
    """One global threshold on s: members N(δ, 1+τ²), non-members N(0, 1+τ²)."""
    return stats.norm.sf(stats.norm.isf(f) - DELTA / math.sqrt(1 + TAU**2))


def _synthetic(n, rng, member):
    """Records with difficulty d (the first feature); the score is N(d + δ·member, 1)."""
    d = rng.normal(0, TAU, n)
    feats = np.c_[d, rng.normal(0, 1, (n, 3))].astype(np.float32)
    return torch.from_numpy(feats), d, d + DELTA * member + rng.normal(0, 1, n)


def _check_roc(s_in, s_out, tpr_fn, auc_expected, tol=0.05):
    assert roc.auc(s_in, s_out) == pytest.approx(auc_expected, abs=0.025)
    for f in FPRS:
        assert roc.tpr_at_fpr(s_in, s_out, f).value == pytest.approx(tpr_fn(f), abs=tol)


@pytest.fixture(scope="module")
def qmia_case():
    rng = np.random.default_rng(0)
    x_pub, _, s_pub = _synthetic(4000, rng, 0)
    labels = torch.zeros(4000, dtype=torch.int64)
    q = M.QuantileMIA(1, levels=16, alpha_min=0.005, epochs=40, hidden=32, lr=3e-3, seed=1)
    return q.fit(x_pub, labels, s_pub), rng


def test_qmia_matches_calibrated_analytic_roc(qmia_case):
    q, rng = qmia_case
    n = 3000
    x_in, _, s_in = _synthetic(n, rng, 1)
    x_out, _, s_out = _synthetic(n, rng, 0)
    y = torch.zeros(n, dtype=torch.int64)
    m_in, m_out = q.membership_scores(x_in, y, s_in), q.membership_scores(x_out, y, s_out)
    _check_roc(m_in, m_out, _calibrated_tpr, stats.norm.cdf(DELTA / math.sqrt(2)))
    # Conditioning on the record beats the global threshold (the point of QMIA).
    assert roc.auc(m_in, m_out) > roc.auc(s_in, s_out) + 0.15


def test_qmia_calibrates_fpr_on_held_out_non_members(qmia_case):
    q, rng = qmia_case
    n = 4000
    x, d, s = _synthetic(n, rng, 0)
    y = torch.zeros(n, dtype=torch.int64)
    m = q.membership_scores(x, y, s)
    n_val = q._val_scores.size
    for alpha in (0.01, 0.05, 0.2):
        # The regressor's own quantile: FPR alpha on fresh non-members.
        fp = int(np.sum(m > q.threshold(alpha)))
        lo, hi = roc.clopper_pearson(fp, n, 0.99)
        assert lo <= alpha <= hi, (alpha, fp / n)
        # The operating point is the held-out split's empirical quantile; its fresh FPR
        # carries that split's sampling error (floor(alpha · n_val) allowed positives).
        assert q.operating_threshold(alpha) == roc.threshold_at_fpr(q._val_scores, alpha)
        fresh = float(np.mean(m > q.operating_threshold(alpha)))
        lo, hi = roc.clopper_pearson(math.floor(alpha * n_val), n_val, 0.99)
        assert lo <= fresh <= hi, (alpha, fresh)
    # 400 held-out public records cannot resolve FPR 0.1%: their largest score (here one
    # outlier) must not become the threshold; the regressor's own quantile is used.
    assert q._val_scores.size == 400
    outlier = copy.copy(q)
    outlier._val_scores = np.r_[q._val_scores[:-1], 50.0]
    assert outlier.operating_threshold(0.001) == q.threshold(0.001)
    # At 5% (20 allowed false positives) one outlier cannot move the quantile to itself.
    assert outlier.operating_threshold(0.05) < 5.0
    # Predicted quantiles track the true conditional ones: d + z_{1-α}.
    qs = q.predict_quantiles(x[:500], y[:500], [0.5, 0.05])
    true = d[:500, None] + stats.norm.isf([0.5, 0.05])[None, :]
    assert np.median(np.abs(qs - true)) < 0.3
    assert np.all(np.diff(q.predict_quantiles(x[:50], y[:50]), axis=1) > 0)


def test_qmia_holds_out_enough_public_records_for_its_operating_point():
    # Two allowed false positives at the operating FPR, between 10% and 30% of the data.
    assert H.calibration_fraction(0.001, 8000) == pytest.approx(0.25)
    assert H.calibration_fraction(0.001, 1000) == 0.3
    assert H.calibration_fraction(0.05, 8000) == 0.1
    rng = np.random.default_rng(6)
    x, _, s = _synthetic(2000, rng, 0)
    y = torch.zeros(2000, dtype=torch.int64)
    q = M.QuantileMIA(1, levels=8, epochs=2, hidden=8, val_fraction=0.25, seed=0).fit(x, y, s)
    assert q._val_scores.size == 500
    # Resolved (500 · 1% = 5 false positives allowed): the held-out public quantile, even
    # when that is below the regressor's own threshold (which could flag nothing).
    low = copy.copy(q)
    low._val_scores = np.linspace(0.0, 1.0, 500)
    assert low.operating_threshold(0.01) == roc.threshold_at_fpr(low._val_scores, 0.01)
    assert low.operating_threshold(0.01) < q.threshold(0.01)
    with pytest.raises(ValueError, match="val_fraction"):
        M.QuantileMIA(1, val_fraction=1.0)
    with pytest.raises(ValueError, match="schedule"):
        M.QuantileMIA(1, schedule="step")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name", ["mia_small_hospitals", "mia_small_hospitals_dpsgd", "mia_federated"]
)
def test_shipped_membership_scenarios_evaluate_balanced_sets(name):
    from privfl.runner import resolve

    sc = resolve(name)
    mi = sc.attack.membership
    assert mi.eval_samples == mi.non_members
    if mi.target == "single":
        # Every member is scored, and 0.1% FPR of the pooled non-members allows at least
        # one false positive.
        assert mi.eval_samples == mi.members
        assert math.floor(0.001 * mi.non_members * mi.targets) >= 1
        # QMIA's held-out public split resolves its operating FPR.
        held_out = H.calibration_fraction(mi.operating_fpr, mi.public_samples) * mi.public_samples
        assert mi.operating_fpr * held_out >= 1
    else:
        from privfl.data import load_federation

        assert mi.eval_samples == len(load_federation(sc).parties[mi.target_party].train)


def test_qmia_gaussian_head_calibrates():
    rng = np.random.default_rng(3)
    x, _, s = _synthetic(3000, rng, 0)
    y = torch.zeros(3000, dtype=torch.int64)
    q = M.QuantileMIA(1, head="gaussian", epochs=30, hidden=32, lr=3e-3, seed=0).fit(x, y, s)
    xh, _, sh = _synthetic(4000, rng, 0)
    m = q.membership_scores(xh, torch.zeros(4000, dtype=torch.int64), sh)
    fp = int(np.sum(m > q.threshold(0.05)))
    lo, hi = roc.clopper_pearson(fp, 4000, 0.99)
    assert lo <= 0.05 <= hi


def test_qmia_ensemble_averages_its_members() -> None:
    rng = np.random.default_rng(4)
    x, _, s = _synthetic(1500, rng, 0)
    y = torch.zeros(1500, dtype=torch.int64)
    kw = dict(levels=8, alpha_min=0.01, epochs=4, hidden=16, lr=3e-3, seed=5)
    single = M.QuantileMIA(1, **kw).fit(x, y, s)
    ens = M.QuantileMIA(1, ensemble=3, **kw).fit(x, y, s)
    xh, _, _ = _synthetic(200, rng, 0)
    yh = torch.zeros(200, dtype=torch.int64)
    with torch.no_grad():
        members = [ens._raw(net, xh, yh).double().numpy() for net in ens._nets]
    # Member 0 is the single regressor (ensemble = 1 reproduces earlier runs); the others
    # start elsewhere, and the ensemble predicts their mean.
    assert np.allclose(members[0], single._predict(xh, yh))
    assert not np.allclose(members[0], members[1])
    mean_q = np.mean(members, axis=0) * ens._scale + ens._shift
    assert np.allclose(ens.predict_quantiles(xh, yh), mean_q)
    # One held-out split for all members: the ensemble is calibrated on records none saw.
    assert ens._val_scores.size == single._val_scores.size
    with pytest.raises(ValueError, match="ensemble"):
        M.QuantileMIA(1, ensemble=0)
    with pytest.raises(ValueError, match="attack.membership.qmia_ensemble"):
        _scenario("single").replace(["attack.membership.qmia_ensemble=0"])


def _logit_case(n, rng, member, a):
    """A target whose logits are ``A x`` plus noise; members' correct logit is raised by δ
    (the memorised margin). Returns inputs, labels, observed logits and the noiseless hinge."""
    x = rng.normal(0, 1, (n, a.shape[1]))
    y = rng.integers(0, a.shape[0], n)
    clean = x @ a.T
    z = clean + rng.normal(0, 0.35, clean.shape)
    z[np.arange(n), y] += DELTA * member
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y), z, M.hinge_score(clean, y)


def test_qmia_mimic_location_reaches_the_oracle_residual() -> None:
    rng = np.random.default_rng(8)
    a = rng.normal(0, 1.5, (3, 6))
    x, y, z, _ = _logit_case(4000, rng, 0, a)
    kw = dict(levels=16, alpha_min=0.005, epochs=30, hidden=32, lr=3e-3, seed=2)
    mimic = M.QuantileMIA(3, mimics=2, **kw).fit(x, y, M.hinge_score(z, y.numpy()), logits=z)
    plain = M.QuantileMIA(3, **kw).fit(x, y, M.hinge_score(z, y.numpy()))
    n = 3000
    xi, yi, zi, ci = _logit_case(n, rng, 1, a)
    xo, yo, zo, co = _logit_case(n, rng, 0, a)
    hi, ho = M.hinge_score(zi, yi.numpy()), M.hinge_score(zo, yo.numpy())
    # The mimics' hinge locates each record's score (here: the noiseless hinge of A x).
    assert np.median(np.abs(mimic._location(xo, yo) - co)) < 0.15
    med = mimic.predict_quantiles(xo, yo, [0.5])[:, 0]
    assert np.median(np.abs(med - co)) < 0.15
    # Then the attack is as good as the oracle that knows A (score minus clean hinge), and
    # better than the regressor that must learn the hinge's max-of-others from scores.
    auc = roc.auc(mimic.membership_scores(xi, yi, hi), mimic.membership_scores(xo, yo, ho))
    assert auc == pytest.approx(roc.auc(hi - ci, ho - co), abs=0.02)
    auc_plain = roc.auc(plain.membership_scores(xi, yi, hi), plain.membership_scores(xo, yo, ho))
    assert auc > auc_plain + 0.015
    # Calibrated: the held-out public quantile holds its FPR on fresh non-members.
    fresh = float(np.mean(mimic.membership_scores(xo, yo, ho) > mimic.operating_threshold(0.05)))
    n_val = mimic._val_scores.size
    lo, hi_ = roc.clopper_pearson(math.floor(0.05 * n_val), n_val, 0.99)
    assert lo <= fresh <= hi_
    # Bad input is named.
    with pytest.raises(ValueError, match="logits"):
        M.QuantileMIA(3, mimics=1, **kw).fit(x, y, M.hinge_score(z, y.numpy()))
    with pytest.raises(ValueError, match=r"logits must be finite, shape \(4000, 3\)"):
        M.QuantileMIA(3, mimics=1, **kw).fit(x, y, M.hinge_score(z, y.numpy()), logits=z[:, :2])
    with pytest.raises(ValueError, match="mimics"):
        M.QuantileMIA(3, mimics=-1)
    with pytest.raises(ValueError, match="attack.membership.qmia_mimics"):
        _scenario("single").replace(["attack.membership.qmia_mimics=-1"])


def test_lira_matches_calibrated_analytic_roc():
    rng = np.random.default_rng(4)
    n, shadows = 4000, 64
    d_in, d_out = rng.normal(0, TAU, n), rng.normal(0, TAU, n)
    s_in = d_in + DELTA + rng.normal(0, 1, n)
    s_out = d_out + rng.normal(0, 1, n)
    sh_in = d_in + rng.normal(0, 1, (shadows, n))
    sh_out = d_out + rng.normal(0, 1, (shadows, n))
    for fixed in (True, False):
        z_in = M.lira_offline_scores(s_in, sh_in, fixed_variance=fixed)
        z_out = M.lira_offline_scores(s_out, sh_out, fixed_variance=fixed)
        _check_roc(z_in, z_out, _calibrated_tpr, stats.norm.cdf(DELTA / math.sqrt(2)))
    # The operating point is a one-sided Gaussian test: FPR ≈ α.
    z_out = M.lira_offline_scores(s_out, sh_out)
    assert np.mean(z_out > M.OfflineLiRA.threshold(0.05)) == pytest.approx(0.05, abs=0.015)


def test_loss_attack_matches_global_threshold_analytic_roc():
    rng = np.random.default_rng(5)
    n = 4000
    s_in = rng.normal(0, TAU, n) + DELTA + rng.normal(0, 1, n)
    s_out = rng.normal(0, TAU, n) + rng.normal(0, 1, n)
    # Two-class logits [0, s] with label 1: -CE = -log(1 + e^-s), increasing in s.
    ones = np.ones(n, dtype=np.int64)
    l_in = M.loss_attack(np.c_[np.zeros(n), s_in], ones)
    l_out = M.loss_attack(np.c_[np.zeros(n), s_out], ones)
    auc_global = stats.norm.cdf(DELTA / math.sqrt(2 * (1 + TAU**2)))
    _check_roc(l_in, l_out, _global_tpr, auc_global)


def test_scores_match_references():
    logits = np.array([[2.0, 5.0, 1.0], [0.5, -1.0, 0.25]])
    labels = np.array([1, 2])
    np.testing.assert_allclose(M.hinge_score(logits, labels), [3.0, -0.25])
    ce = nn.functional.cross_entropy(
        torch.tensor(logits), torch.tensor(labels), reduction="none"
    ).numpy()
    np.testing.assert_allclose(M.loss_attack(logits, labels), -ce)
    with pytest.raises(ValueError, match="hinge_score"):
        M.hinge_score(logits, labels[:1])


def test_query_api_exposes_only_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.randn(5, 1, 2, 2)
    api = M.QueryAPI(model)
    before = api.query(x)
    assert isinstance(before, np.ndarray) and before.dtype == np.float64
    assert before.shape == (5, 3)
    np.testing.assert_allclose(before, model(x).detach().double().numpy(), rtol=1e-6)
    # Nothing public but the query method and a counter; no instance dict to poke at.
    assert {n for n in dir(api) if not n.startswith("_")} == {"query", "queries"}
    assert not hasattr(api, "__dict__")
    for name in M.QueryAPI.__slots__:
        value = getattr(api, name)
        assert not isinstance(value, nn.Module | torch.Tensor)
    for name in ("parameters", "state_dict", "named_parameters", "grad", "train", "model"):
        assert not hasattr(api, name)
    assert api.queries == 5
    # A snapshot: changing (or dropping) the original model changes nothing.
    with torch.no_grad():
        model[1].weight.add_(1.0)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    before[:] = 0
    np.testing.assert_allclose(api.query(x), M.QueryAPI.query(api, x))
    assert not np.allclose(api.query(x), 0)


def test_offline_lira_trains_shadows_on_public_subsets_only():
    seen = []

    def train_fn(data):
        seen.append(data.images.clone())
        torch.manual_seed(len(seen))
        return nn.Sequential(nn.Flatten(), nn.Linear(4, 2))

    public = SimpleNamespace(images=torch.randn(20, 1, 2, 2), labels=torch.randint(0, 2, (20,)))
    lira = M.OfflineLiRA(train_fn, shadow_models=3, seed=0).fit(public, 8)
    assert len(seen) == 3
    flat = public.images.flatten(1)
    for imgs in seen:
        assert imgs.shape[0] == 8
        # Every shadow record is a public record.
        assert all(torch.any(torch.all(flat == r, dim=1)) for r in imgs.flatten(1))
    x = torch.randn(6, 1, 2, 2)
    y = torch.randint(0, 2, (6,))
    assert lira.shadow_scores(x, y).shape == (3, 6)
    with pytest.raises(ValueError, match="shadow_models"):
        M.OfflineLiRA(train_fn, shadow_models=1)
    # The fixed deviation is set once at fit: a record's statistic does not depend on
    # which other records are scored with it (members and non-members are scored apart).
    assert lira.sigma is not None and lira.sigma > 0
    t = np.random.default_rng(0).normal(size=6)
    np.testing.assert_allclose(
        lira.membership_scores(x[:2], y[:2], t[:2]), lira.membership_scores(x, y, t)[:2]
    )


def test_offline_lira_fixed_sigma_pools_out_scores_only() -> None:
    rng = np.random.default_rng(2)
    n, shadows = 30, 4
    out_scores = rng.normal(0, 2.0, (shadows, n))

    class Fixed(M.OfflineLiRA):
        def shadow_scores(self, images, labels):
            # A shadow's score of a record it trained on is wildly off; it must not count.
            return np.where(self.in_mask, 1e3, out_scores)

    lira = Fixed(lambda data: nn.Identity(), shadow_models=shadows, seed=3)
    # Recompute the subsets fit() will draw, to know the IN entries.
    draw = np.random.default_rng(3)
    lira.in_mask = np.zeros((shadows, n), dtype=bool)
    for i in range(shadows):
        lira.in_mask[i, draw.choice(n, size=10, replace=False)] = True
    public = SimpleNamespace(
        images=torch.zeros(n, 1, 2, 2), labels=torch.zeros(n, dtype=torch.int64)
    )
    lira.fit(public, 10)
    k = (~lira.in_mask).sum(0)
    var = [np.var(out_scores[~lira.in_mask[:, j], j], ddof=1) for j in range(n) if k[j] >= 2]
    assert lira.sigma == pytest.approx(np.sqrt(np.mean(var)))


# --------------------------------------------------------------------------- end to end


def _images(n, rng, templates):
    y = rng.integers(0, templates.shape[0], n)
    x = np.clip(templates[y] + rng.normal(0, 0.35, (n, 1, 28, 28)), 0, 1).astype(np.float32)
    return SimpleNamespace(images=torch.from_numpy(x), labels=torch.from_numpy(y.astype(np.int64)))


def _federation(rng):
    templates = rng.uniform(0, 1, (4, 1, 28, 28))
    pool = _images(600, rng, templates)
    parties = []
    for i in range(2):
        idx = np.arange(i * 60, (i + 1) * 60)
        train = SimpleNamespace(images=pool.images[idx], labels=pool.labels[idx])
        parties.append(SimpleNamespace(train=train, indices=idx))
    return SimpleNamespace(
        num_classes=4,
        train_pool=pool,
        parties=tuple(parties),
        public=_images(300, rng, templates),
        server_test=_images(100, rng, templates),
    )


def _scenario(target):
    return Scenario.from_dict(
        {
            "scenario": {"seed": 3, "rounds": 2},
            "data": {"parties": 2},
            "model": {"name": "mlp", "hidden": 32},
            "training": {"batch_size": 16, "lr": 0.1, "local_epochs": 2},
            "attack": {
                "kind": "membership-inference",
                "membership": {
                    "target": target,
                    "members": 60,
                    "eval_samples": 50,
                    "epochs": 25,
                    "public_samples": 400,
                    "shadow_models": 2,
                    "quantile_levels": 8,
                    "qmia_epochs": 5,
                },
            },
        }
    )


REQUIRED = {"attack", "auc", "tpr_at_0.1pct_fpr", "tpr_at_1pct_fpr", "precision"}


def test_end_to_end_single_target_on_synthetic_images():
    fed = _federation(np.random.default_rng(0))
    sc = _scenario("single")
    reports = H.run_membership(sc, federation=fed)
    again = H.run_membership(sc, federation=fed)
    assert [r.metrics["attack"] for r in reports] == ["qmia", "loss", "lira"]
    for r, r2 in zip(reports, again, strict=True):
        assert (r.name, r.role) == ("membership-inference", "query-only")
        assert r.target == f"hospital-api/{r.metrics['attack']}"
        assert set(r.metrics) >= REQUIRED
        assert r.total == 50 and 0 <= r.recovered <= 50
        assert r.metrics["auc_low"] <= r.metrics["auc"] <= r.metrics["auc_high"]
        assert r.metrics == r2.metrics  # same seed, same numbers
        assert r.to_json()["metrics"]["target_train_accuracy"] == 1.0
    # An over-fit target on noisy images leaks: the LOSS attack sees it.
    assert reports[1].metrics["auc"] > 0.6
    assert len(reports[0].figures) == 1
    with pytest.raises(ValueError, match="single"):
        H.run_membership(sc, federation=fed, target_model=nn.Linear(1, 1))


def test_end_to_end_qmia_with_mimics(monkeypatch) -> None:
    fed = _federation(np.random.default_rng(0))
    sc = _scenario("single").replace(
        ["attack.membership.attacks=['qmia']", "attack.membership.qmia_mimics=2"]
    )
    built = []
    fit = M.QuantileMIA.fit

    def spy(self, inputs, labels, scores, logits=None):
        built.append((self.mimic_factory(), logits))
        return fit(self, inputs, labels, scores, logits)

    monkeypatch.setattr(M.QuantileMIA, "fit", spy)
    (rep,) = H.run_membership(sc, federation=fed)
    (plain,) = H.run_membership(sc.replace(["attack.membership.qmia_mimics=0"]), federation=fed)
    # The mimics have the target's architecture and learn from its logits on public data.
    mimic, logits = built[0]
    target = build_task_model(sc.model.name, fed.num_classes, sc.model.hidden)
    assert [p.shape for p in mimic.parameters()] == [p.shape for p in target.parameters()]
    assert logits.shape == (sc.attack.membership.public_samples, fed.num_classes)
    assert "mean hinge of 2 mimic(s)" in rep.notes[0]
    assert rep.metrics["auc"] != plain.metrics["auc"]
    (again,) = H.run_membership(sc, federation=fed)
    assert again.metrics == rep.metrics  # same seed, same numbers


def test_pooled_targets_are_independent_hospitals_scored_together():
    fed = _federation(np.random.default_rng(2))
    sc = _scenario("single").replace(
        ["attack.membership.targets=3", "attack.membership.attacks=['loss', 'qmia']"]
    )
    reports = H.run_membership(sc, federation=fed)
    for r in reports:
        m = r.metrics
        assert r.target == f"hospital-api-x3/{m['attack']}"
        assert (r.total, m["members_scored"], m["non_members_scored"]) == (150, 150, 150)
        assert m["targets"] == 3
        # Flags come from each target's own threshold; the counts still add up.
        assert m["true_positives"] == r.recovered <= m["flagged"]
        assert m["operating_tpr"] == pytest.approx(r.recovered / 150)
        assert m["target_train_accuracy"] == 1.0  # mean over the three targets
    with pytest.raises(ValueError, match="exceeds the train pool"):
        H.run_membership(sc.replace(["attack.membership.targets=6"]), federation=fed)


def test_members_and_non_members_share_each_label_equally() -> None:
    from privfl.evaluation.membership import _stratified

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 3000)
    for n, first in ((500, 250), (501, 250), (37, 20), (10, 1)):
        idx = rng.permutation(3000)[:n]
        out = _stratified(idx, labels, first)
        assert sorted(out.tolist()) == sorted(idx.tolist())
        head = np.bincount(labels[out[:first]], minlength=10)
        tail = np.bincount(labels[out[first:]], minlength=10)
        assert head.sum() == first
        # Every label split in the head's share, up to one record of rounding.
        assert np.all(np.abs(head - (head + tail) * first / n) < 1.0 + 1e-9)


def test_pooled_targets_are_validated() -> None:
    with pytest.raises(ValueError, match="targets"):
        _scenario("single").replace(["attack.membership.targets=0"])
    with pytest.raises(ValueError, match="attack.membership.targets"):
        _scenario("federated").replace(["attack.membership.targets=2"])


def test_end_to_end_federated_target_uses_party_records():
    fed = _federation(np.random.default_rng(1))
    sc = _scenario("federated").replace(["attack.membership.attacks=['loss']"])
    with pytest.raises(ValueError, match="global model"):
        H.run_membership(sc, federation=fed)
    from privfl.models import build_task_model

    torch.manual_seed(0)
    model = build_task_model("mlp", 4, 32)
    both = SimpleNamespace(
        images=torch.cat([p.train.images for p in fed.parties]),
        labels=torch.cat([p.train.labels for p in fed.parties]),
    )
    M.train_classifier(model, both, sc, epochs=25, seed=0)
    (report,) = H.run_membership(sc, target_model=model, federation=fed)
    assert report.target == "global-model/party-0/loss"
    assert report.total == 50
    assert report.metrics["non_members_scored"] == 50
    # More non-members than members: every one scored, the 1:1 precision reported.
    wide = sc.replace(["attack.membership.eval_non_members=150"])
    (report,) = H.run_membership(wide, target_model=model, federation=fed)
    assert (report.total, report.metrics["non_members_scored"]) == (50, 150)
    m = report.metrics
    assert m["precision_balanced"] == pytest.approx(
        m["operating_tpr"] / (m["operating_tpr"] + m["operating_observed_fpr"])
    )
    with pytest.raises(ValueError, match="non-members"):
        H.run_membership(
            sc.replace(["attack.membership.eval_non_members=900"]),
            target_model=model,
            federation=fed,
        )
    assert report.metrics["auc"] > 0.6


def test_loss_statistic_keeps_confident_records_apart() -> None:
    from privfl.attacks.membership import loss_attack

    logits = np.array([[40.0, 0.0, 0.0], [45.0, 0.0, 0.0], [2.0, 1.0, 0.5], [0.0, 3.0, 0.0]])
    labels = np.array([0, 0, 0, 0])
    stat = loss_attack(logits, labels)
    # Naive z_y - logsumexp(z) rounds both confident rows to exactly 0.
    assert stat[0] < stat[1] < 0.0
    ref = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(stat[2:], ref[[2, 3], 0], rtol=1e-12)
    np.testing.assert_allclose(stat[0], -2 * np.exp(-40.0), rtol=1e-9)


def test_lira_operating_point_is_calibrated_on_held_out_public_records() -> None:
    from privfl.attacks.membership import OfflineLiRA

    lira = OfflineLiRA(lambda data: None, shadow_models=2)
    rng = np.random.default_rng(0)
    # Heavy-tailed statistics: the Gaussian z for 1% would flag far more than 1%.
    cal = rng.standard_t(2, size=4000)
    fresh = rng.standard_t(2, size=20000)
    lira.membership_scores = lambda images, labels, target: np.asarray(target)  # type: ignore[method-assign]
    thr = lira.operating_threshold(None, None, cal, 0.01)
    assert thr > lira.threshold(0.01)
    observed = float(np.mean(fresh >= thr))
    assert 0.006 < observed < 0.016
    assert float(np.mean(fresh >= lira.threshold(0.01))) > 0.03
    # Too few records to resolve the FPR: the Gaussian threshold.
    assert lira.operating_threshold(None, None, cal[:50], 0.01) == lira.threshold(0.01)


def test_bench_summarises_attacks_over_seeds() -> None:
    from privfl.bench.membership import _seed_list, seed_summary

    def row(seed, attack, auc, tpr):
        return {
            "scenario": "mia_small_hospitals",
            "seed": seed,
            "attack": attack,
            "auc": auc,
            "tpr_at_0.1pct_fpr": tpr,
            "tpr_at_1pct_fpr": 2 * tpr,
            "precision": 0.9,
        }

    rows = [
        row(0, "qmia", 0.66, 0.013),
        row(0, "lira", 0.65, 0.024),
        row(1, "qmia", 0.68, 0.025),
        row(1, "lira", 0.66, 0.020),
    ]
    lines = seed_summary(rows)
    assert (
        "mia_small_hospitals qmia  over 2 seeds: AUC 0.670 ± 0.010, TPR@0.1% 0.019 ± 0.006"
        in lines[0]
    )
    assert lines[-1].startswith(
        "mia_small_hospitals QMIA's TPR@0.1% >= LiRA's on 1/2 seeds (seeds 1)"
    )
    assert _seed_list("0, 1,4") == [0, 1, 4]
    with pytest.raises(Exception, match="comma-separated integers"):
        _seed_list("0,x")
