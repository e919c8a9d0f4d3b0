"""One-run privacy auditing: the bounds against slow references and simulations, the
canaries, the white-box DP-SGD loop with its planted faults, the party-level loop and the
black-box view."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from opacus.grad_sample import prepare_module
from scipy import special, stats
from torch import nn

from privfl import audit as A
from privfl.config import Scenario
from privfl.data import load_federation
from privfl.dp import KeyStream
from privfl.models import build_task_model

CONF = 0.95
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- slow references


def _slow_p_value(m, r, v, eps, delta):
    """Steinke et al.'s p-value from exact binomial pmfs, every sum written out."""
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(r + 1)]
    beta = sum(pmf[v:])
    alpha = 0.0
    for i in range(1, v + 1):
        alpha = max(alpha, sum(pmf[v - i : v]) / i)
    return min(1.0, beta + 2 * m * delta * alpha)


def _slow_epsilon(m, r, v, delta, conf, step):
    """Scan ε upwards on a grid; the last point before the first non-rejection."""
    eps = 0.0
    if _slow_p_value(m, r, v, 0.0, delta) > 1 - conf:
        return 0.0
    while _slow_p_value(m, r, v, eps + step, delta) <= 1 - conf:
        eps += step
    return eps


def _slow_gdp_rejects(m, k, v, mu, tau):
    """The f-DP test as the smallest distribution of W it allows: mass τ at W = v, then
    at each lower level exactly what f(1 - right mass above) demands of the wrong mass."""
    mass = [0.0] * (k + 1)
    mass[v] = tau

    def right(above):
        return sum(w * mass[w] for w in range(above, k + 1)) / m

    def wrong(above):
        return sum((k - w) * mass[w] for w in range(above, k + 1)) / m

    for i in range(v - 1, -1, -1):
        need = stats.norm.cdf(stats.norm.ppf(min(right(i + 1), 1.0)) - mu)
        short = need - wrong(i + 1)
        if short > 0:
            mass[i] = short * m / (k - i)
    return sum(mass) > 1 + 1e-12


# --------------------------------------------------------------------------- Steinke bound


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(4, 24),
    data=st.data(),
    delta=st.sampled_from([0.0, 1e-4, 1e-2]),
)
def test_epsilon_lower_bound_matches_slow_reference(m, data, delta):
    r = data.draw(st.integers(1, m))
    v = data.draw(st.integers(0, r))
    fast = A.epsilon_lower_bound(canaries=m, guesses=r, correct=v, delta=delta, confidence=CONF)
    slow = _slow_epsilon(m, r, v, delta, CONF, step=0.01)
    assert slow - 1e-6 <= fast <= slow + 0.01 + 1e-6


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(2, 3000),
    data=st.data(),
    delta=st.sampled_from([0.0, 1e-6, 1e-5]),
    conf=st.sampled_from([0.9, 0.95, 0.99]),
)
def test_epsilon_lower_bound_monotone_finite_and_zero_at_chance(m, data, delta, conf):
    assume(2 * m * delta < 1)
    r = data.draw(st.integers(1, m))
    v1 = data.draw(st.integers(0, r))
    v2 = data.draw(st.integers(v1, r))
    lo = A.epsilon_lower_bound(canaries=m, guesses=r, correct=v1, delta=delta, confidence=conf)
    hi = A.epsilon_lower_bound(canaries=m, guesses=r, correct=v2, delta=delta, confidence=conf)
    assert math.isfinite(lo) and math.isfinite(hi)
    assert 0 <= lo <= hi + 1e-6
    if v1 <= r / 2:
        assert lo == 0.0


def test_epsilon_lower_bound_values_and_inputs():
    # 100 of 100 right with δ = 0: the bound solves q^100 = 0.05, ε = logit(0.05^(1/100)).
    q = 0.05**0.01
    expect = math.log(q / (1 - q))
    got = A.epsilon_lower_bound(canaries=1000, guesses=100, correct=100, delta=0.0)
    assert got == pytest.approx(expect, abs=1e-5)
    # δ only ever weakens the bound.
    assert A.epsilon_lower_bound(canaries=1000, guesses=100, correct=100, delta=1e-5) < got
    with pytest.raises(ValueError, match="correct <= guesses"):
        A.epsilon_lower_bound(canaries=10, guesses=5, correct=6, delta=0.0)
    with pytest.raises(ValueError, match="2\\*canaries\\*delta"):
        A.epsilon_lower_bound(canaries=10_000, guesses=5, correct=5, delta=1e-4)


def test_epsilon_lower_bound_is_valid_for_randomized_response():
    # Randomized response at ε is exactly ε-DP per canary: the bound may exceed ε in at
    # most 5% of audits, and sits close to ε with many guesses.
    eps, m, trials = 1.0, 400, 400
    rng = np.random.default_rng(1)
    right = rng.binomial(m, special.expit(eps), size=trials)
    cache = {}
    bounds = []
    for v in right:
        if v not in cache:
            cache[v] = A.epsilon_lower_bound(canaries=m, guesses=m, correct=int(v), delta=0.0)
        bounds.append(cache[v])
    rate = np.mean(np.array(bounds) > eps)
    assert rate <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    assert np.median(bounds) > 0.6


# --------------------------------------------------------------------------- Gaussian bound


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(4, 60),
    data=st.data(),
    mu=st.floats(0.0, 6.0),
    tau=st.sampled_from([0.01, 0.05, 0.2]),
)
def test_gaussian_test_matches_slow_reference(m, data, mu, tau):
    k = data.draw(st.integers(1, m))
    v = data.draw(st.integers(0, k))
    fast = A.gaussian_tradeoff_rejected(canaries=m, guesses=k, correct=v, mu=mu, significance=tau)
    slow = _slow_gdp_rejects(m, k, v, mu, tau) if v > 0 else False
    assert fast == slow


@settings(max_examples=40, deadline=None)
@given(m=st.integers(2, 2000), data=st.data())
def test_gaussian_bound_monotone_and_zero_at_chance(m, data):
    k = data.draw(st.integers(1, m))
    v1 = data.draw(st.integers(0, k))
    v2 = data.draw(st.integers(v1, k))
    lo = A.gaussian_mu_lower_bound(canaries=m, guesses=k, correct=v1)
    hi = A.gaussian_mu_lower_bound(canaries=m, guesses=k, correct=v2)
    assert math.isfinite(lo) and 0 <= lo <= hi + 1e-6
    if v1 <= k / 2:
        assert lo == 0.0
    eps = A.gaussian_epsilon_lower_bound(canaries=m, guesses=k, correct=v2, delta=1e-5)
    assert math.isfinite(eps) and eps >= 0


def test_gaussian_bound_is_valid_and_tighter_on_gaussian_scores():
    # Canary scores N(μ·coin, 1) make each coin exactly μ-GDP: the μ bound may exceed μ
    # in at most 5% of audits; the Gaussian analysis beats the (ε, δ) one on them.
    mu, m, k, trials = 1.0, 1000, 200, 200
    rng = np.random.default_rng(2)
    over, tighter = 0, 0
    for _ in range(trials):
        coins = rng.integers(0, 2, m).astype(bool)
        order = np.argsort(rng.normal(size=m) + mu * coins)
        right = int(coins[order[-k // 2 :]].sum() + (~coins[order[: k // 2]]).sum())
        mu_lb = A.gaussian_mu_lower_bound(canaries=m, guesses=k, correct=right)
        over += mu_lb > mu
        tighter += A.gdp_epsilon(mu_lb, 1e-5) > A.epsilon_lower_bound(
            canaries=m, guesses=k, correct=right, delta=1e-5
        )
    assert over / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    assert tighter / trials > 0.9


def test_gdp_profile():
    # δ(ε) of μ-GDP against the textbook formula, and ε(δ) as its inverse.
    for mu in (0.3, 1.0, 3.0):
        for eps in (0.0, 0.5, 2.0):
            direct = stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(
                -eps / mu - mu / 2
            )
            assert A.gdp_delta(eps, mu) == pytest.approx(direct, rel=1e-9, abs=1e-15)
        eps = A.gdp_epsilon(mu, 1e-5)
        assert A.gdp_delta(eps, mu) == pytest.approx(1e-5, rel=1e-6)
    assert A.gdp_epsilon(0.0, 1e-5) == 0.0
    assert A.gdp_epsilon(1.0, 1e-5) < A.gdp_epsilon(2.0, 1e-5)


# --------------------------------------------------------------------------- OneRunAudit


def test_coins_come_from_the_key():
    a = A.OneRunAudit(4000, key=bytes(32)).included
    assert np.array_equal(a, A.OneRunAudit(4000, key=bytes(32)).included)
    assert not np.array_equal(a, A.OneRunAudit(4000, key=b"\x01" * 32).included)
    assert 0.45 < a.mean() < 0.55
    # no key: fresh coins from the OS every time
    assert not np.array_equal(A.OneRunAudit(200).included, A.OneRunAudit(200).included)
    expect = (KeyStream(bytes(32)).uint64(4000) & np.uint64(1)).astype(bool)
    assert np.array_equal(a, expect)


def test_evaluate_guesses_the_extremes_and_shares_the_significance():
    audit = A.OneRunAudit(1000, key=bytes(32), guess_fractions=(0.1, 0.4))
    coins = audit.included
    # Perfect scores, except that the two most extreme canaries are swapped.
    scores = np.where(coins, 1.0, -1.0) + np.linspace(0, 0.5, 1000)
    top, bottom = np.argmax(scores), np.argmin(scores)
    scores[top], scores[bottom] = scores[bottom], scores[top]
    res = audit.evaluate(scores, epsilon_accounted=1.0, delta=1e-5, view="test")
    per_test = 1 - 0.05 / 2
    expect = max(
        A.epsilon_lower_bound(
            canaries=1000, guesses=k, correct=k - 2, delta=1e-5, confidence=per_test
        )
        for k in (100, 400)
    )
    assert res.epsilon_lower_bound == pytest.approx(expect)
    assert res.correct == res.guesses - 2
    assert res.violation
    assert res.epsilon_gaussian > res.epsilon_lower_bound
    assert res.included_scores.size == coins.sum()
    assert res.excluded_scores.size == (~coins).sum()
    noise = np.random.default_rng(0).normal(size=1000)
    chance = audit.evaluate(noise, epsilon_accounted=1.0, delta=1e-5, view="test")
    assert chance.epsilon_lower_bound < 0.5 and not chance.violation
    with pytest.raises(ValueError, match="1000 finite scores"):
        audit.evaluate(noise[:10], epsilon_accounted=1.0, delta=1e-5, view="test")


# --------------------------------------------------------------------------- canaries


def test_dirac_canaries():
    c = A.dirac_canaries(500, 10_000, bytes(32), clip=2.0, within=(3000, 4000))
    assert np.unique(c.coordinates).size == 500
    assert c.coordinates.min() >= 3000 and c.coordinates.max() < 4000
    g = c.gradient(np.arange(10))
    assert g.shape == (10_000,) and float(g.norm()) == pytest.approx(2.0 * math.sqrt(10))
    assert np.array_equal(c.scores(g)[:10], np.full(10, 2.0))
    assert np.all(c.scores(g)[10:] == 0)
    wide = A.dirac_canaries(50, 10**6, bytes(32))
    assert np.unique(wide.coordinates).size == 50


def test_canary_parties_are_unit_and_nearly_orthogonal():
    p = A.canary_party_directions(300, 50_000, bytes(32), clip=1.5, support=64)
    one = p.update_sum(np.array([7]))
    assert np.linalg.norm(one) == pytest.approx(1.5)
    cos = p.cosines(one)
    assert cos[7] == pytest.approx(1.0)
    assert np.max(np.abs(np.delete(cos, 7))) < 0.2
    assert p.cosines(np.zeros(50_000)).sum() == 0


def test_mislabelled_canaries():
    labels = torch.arange(10).repeat(300)
    wrong = A.mislabelled_canaries(labels, bytes(32), 10)
    assert torch.all(wrong != labels) and wrong.min() >= 0 and wrong.max() <= 9
    counts = torch.bincount((wrong - labels) % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 250
    assert torch.equal(wrong, A.mislabelled_canaries(labels, bytes(32), 10))


# --------------------------------------------------------------------------- DP-SGD


def _toy(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = torch.rand(n, 1, 28, 28, generator=g) * 0.5
    images[labels == 1, :, :14] += 0.5
    return images.clamp(0, 1), labels


def _mnist(n=64):
    train = load_federation(Scenario.from_dict({})).parties[0].train
    return train.images[:n], train.labels[:n]


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU(), nn.Linear(8, 2))


def test_canary_optimizer_releases_clipped_sum_plus_canaries_plus_keyed_noise():
    # Against a slow reference: per-sample gradients one backward at a time, clipped.
    x, y = _toy(6)
    model, clip, std = _model(), 0.3, 0.7
    params = list(model.parameters())
    dim = sum(p.numel() for p in params)
    ref = torch.zeros(dim)
    for i in range(6):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        g = torch.cat([p.grad.reshape(-1) for p in params])
        ref += g * min(1.0, clip / float(g.norm()))
    canary = torch.zeros(dim)
    canary[[5, 99]] = clip
    ref += canary + std * torch.from_numpy(KeyStream(b"\x02" * 32).normal(dim)).float()
    seen = []
    module = prepare_module(model, "hooks", batch_first=True, loss_reduction="mean")
    opt = A.CanaryDPOptimizer(
        torch.optim.SGD(params, lr=0.0),
        noise_std=std,
        max_grad_norm=clip,
        expected_batch_size=6,
        noise=KeyStream(b"\x02" * 32),
        insert=lambda: canary,
        observe=seen.append,
    )
    opt.zero_grad()
    nn.functional.cross_entropy(module(x), y).backward()
    opt.step()
    module._close()
    assert torch.allclose(seen[0], ref, atol=1e-5)


def _audit_run(seed, **kw):
    # 64 MNIST records, an MLP of 26k weights, 2000 Dirac canaries, 40 steps at q = 1/4.
    x, y = _mnist()
    torch.manual_seed(seed)
    model = build_task_model("mlp", 10, 32)
    dim = sum(p.numel() for p in model.parameters())
    key = A.subkey(seed.to_bytes(32, "big"), "test")
    audit = A.OneRunAudit(2000, key=A.subkey(key, "coins"), guess_fractions=(0.1,))
    kw.setdefault("epsilon", 3.0)
    return A.audit_dp_sgd(
        model,
        x,
        y,
        audit=audit,
        canaries=A.dirac_canaries(2000, dim, key),
        steps=40,
        sample_rate=0.25,
        clip=1.0,
        lr=0.1,
        delta=1e-5,
        key=A.subkey(key, "run"),
        **kw,
    )


def test_no_dp_run_gives_a_large_bound():
    res = _audit_run(0, epsilon=None).result
    assert res.epsilon_accounted == math.inf and not res.violation
    assert res.epsilon_lower_bound >= 4
    assert res.correct == res.guesses


@pytest.mark.parametrize(
    "fault", [{"noise_scale": 0.0}, {"noise_scale": 0.25}, {"known_noise": True}]
)
def test_planted_faults_are_flagged(fault):
    run = _audit_run(0, **fault)
    assert run.result.epsilon_accounted == pytest.approx(3.0, rel=0.01)
    assert run.result.violation


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correct_dp_sgd_is_not_flagged(seed):
    run = _audit_run(seed)
    res = run.result
    assert not res.violation
    assert res.epsilon_gaussian <= res.epsilon_accounted
    # the audit still sees the canaries: more right guesses than chance
    assert res.correct > 0.6 * res.guesses
    assert run.noise_multiplier > 1 and len(run.released_norms) == 40


# --------------------------------------------------------------------------- party level


def _party_audit(noise_scale, seed=0):
    dim, m = 5000, 1000
    key = A.subkey(seed.to_bytes(32, "big"), "party-test")
    drift = np.random.default_rng(seed).normal(size=(3, dim)) * 0.02

    def updates(rnd, current):
        return [d - 0.01 * current for d in drift]

    return A.audit_gaussian_aggregate(
        updates,
        np.zeros(dim),
        audit=A.OneRunAudit(m, key=A.subkey(key, "coins"), guess_fractions=(0.2,)),
        canaries=A.canary_party_directions(m, dim, key, support=32),
        rounds=10,
        clip=1.0,
        delta=1e-5,
        epsilon=3.0,
        noise_scale=noise_scale,
        key=A.subkey(key, "run"),
    )


def test_party_level_audit():
    ok = _party_audit(1.0)
    assert not ok.violation and ok.epsilon_gaussian <= ok.epsilon_accounted
    assert ok.epsilon_lower_bound > 0.3  # it does see the canary parties
    broken = _party_audit(0.0)
    assert broken.violation and broken.epsilon_lower_bound > 4


# --------------------------------------------------------------------------- black box


def test_mislabelled_canaries_give_a_black_box_bound_without_dp():
    x, y = _toy(200, seed=3)
    m = 100
    canary_x, canary_y = x[:m], A.mislabelled_canaries(y[:m], bytes(32), 2)
    audit = A.OneRunAudit(m, key=os.urandom(32), guess_fractions=(0.5,))
    inc = torch.from_numpy(audit.included)
    train_x = torch.cat([x[m:], canary_x[inc]])
    train_y = torch.cat([y[m:], canary_y[inc]])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(train_x), train_y).backward()
        opt.step()
    res = audit.evaluate(
        A.loss_scores(model, canary_x, canary_y),
        epsilon_accounted=math.inf,
        delta=1e-5,
        view="black-box loss",
    )
    assert res.epsilon_lower_bound > 1.5


def test_bench_help():
    from privfl.bench import audit as bench

    with pytest.raises(SystemExit) as exc:
        bench.main(["--help"])
    assert exc.value.code == 0
