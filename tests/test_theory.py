"""Section 4 theory simulator (Chen et al., arXiv 2511.12695): gradients, LP optimality, the two claims."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from hf_lpft.studies.theory import (
    TheoryConfig,
    closed_form_global,
    compare,
    crossings,
    find_lambda_star,
    ft_step,
    global_loss,
    gradients,
    grid_sign_changes,
    lambda_coefficients,
    lambda_thresholds,
    lp_fit,
    lpft_step,
    make_instance,
    population_loss,
    sweep_lambda,
)
from hf_lpft.studies.theory_report import analyse, render_report, save_report, theorem_conditions

RTOL = 1e-10


@pytest.mark.parametrize("shift", ["concept", "combined"])
def test_gradients_and_loss_match_torch_autograd(shift):
    cfg = TheoryConfig(shift=shift, lam=1.3, eps=0.6, seed=4)
    inst = make_instance(cfg)
    rng = np.random.default_rng(0)
    V = rng.standard_normal(inst.V0.shape)
    B = rng.standard_normal(inst.B_star.shape)
    for client in (0, inst.n_clients - 1):
        Vt = torch.tensor(V, requires_grad=True)
        Bt = torch.tensor(B, requires_grad=True)
        r = Bt.T @ Vt - torch.tensor(inst.B_star).T @ torch.tensor(inst.heads[client])
        loss = 0.5 * r @ torch.tensor(inst.sigmas[client]) @ r
        loss.backward()
        gV, gB = gradients(V, B, inst, client)
        assert population_loss(V, B, inst, client) == pytest.approx(loss.item(), rel=1e-12)
        np.testing.assert_allclose(gV, Vt.grad.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(gB, Bt.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_instance_structure_and_covariance_match_sampling():
    cfg = TheoryConfig(shift="combined", eps=0.4, overlap=-0.25, seed=2)
    inst = make_instance(cfg)
    n, m, k = cfg.n_clients, cfg.m, cfg.m + cfg.n_clients
    np.testing.assert_allclose(inst.B_star @ inst.B_star.T, np.eye(k), atol=1e-12)
    beta = math.sqrt(1 - n * cfg.overlap ** 2)
    feats = inst.B_star[:, :n]  # B* e_i: common part overlap * V_com/|V_com|, own feature beta
    np.testing.assert_allclose(feats[m:], beta * np.eye(n), atol=1e-12)
    np.testing.assert_allclose(feats[:m, 1], cfg.overlap * inst.V_com / np.linalg.norm(inst.V_com), atol=1e-12)
    x = np.eye(cfg.d)[1] + cfg.eps * np.random.default_rng(0).standard_normal((200_000, cfg.d))
    np.testing.assert_allclose(x.T @ x / len(x), inst.sigmas[1], atol=0.01)  # S_i = E[x x^T] of x = e_i + eps z


def test_lp_fit_is_optimal_and_lpft_step_is_then_a_no_op():
    for shift in ("concept", "combined"):
        inst = make_instance(TheoryConfig(shift=shift, lam=2.0, seed=1))
        for i in range(inst.n_clients):
            V = lp_fit(inst.V0, inst.B_star, inst, i)
            gV, gB = gradients(V, inst.B_star, inst, i)
            assert np.abs(gV).max() < 1e-10
            np.testing.assert_allclose(V, inst.heads[i], atol=1e-10)  # realisable: the fit is V_i
            V2, B2 = lpft_step(inst.V0, inst.B_star, inst, i, lr=1.0)
            np.testing.assert_allclose(V2, inst.heads[i], atol=1e-10)
            np.testing.assert_allclose(B2, inst.B_star, atol=1e-10)
    # with a non-optimal B the fit is still a stationary point of L_i in V
    inst = make_instance(TheoryConfig(shift="combined", seed=3))
    B = inst.B_star + 0.3 * np.random.default_rng(1).standard_normal(inst.B_star.shape)
    V = lp_fit(inst.V0, B, inst, 2)
    assert np.abs(gradients(V, B, inst, 2)[0]).max() < 1e-9
    assert population_loss(V, B, inst, 2) <= population_loss(V + 1e-3, B, inst, 2)


def test_concept_shift_lpft_never_above_ft_on_random_instances():
    rng = np.random.default_rng(2025)
    for t in range(20):
        m, n = int(rng.integers(1, 5)), int(rng.integers(2, 7))
        cfg = TheoryConfig(d=m + 2 * n + int(rng.integers(0, 6)), m=m, n_clients=n, shift="concept",
                           lam=float(rng.uniform(0.01, 10.0)), seed=t)
        nu = float(np.sum(make_instance(cfg).V_com ** 2))
        # the theorem's step-size condition in this model: lr (1 + |V_com|^2) >= 1 (see the sharpness test)
        cfg = replace(cfg, lr=float(rng.uniform(1.0 / (1.0 + nu), 2.0)))
        r = compare(cfg)
        assert r["lpft_global"] <= r["ft_global"] * (1 + RTOL), (cfg, r)
        cf = closed_form_global(cfg)
        assert r["ft_global"] == pytest.approx(cf["ft_global"], rel=1e-9)
        assert r["lpft_global"] == pytest.approx(cf["lpft_global"], rel=1e-9)
        assert find_lambda_star(cfg, [0.1, 1.0, 5.0]) is None


def test_concept_shift_step_size_condition_is_sharp():
    cfg = TheoryConfig(shift="concept", lam=1.5, seed=0)
    nu = float(np.sum(make_instance(cfg).V_com ** 2))
    below = compare(replace(cfg, lr=0.5 / (1.0 + nu)))  # c = 1/2: FT barely moves, LP-FT moves all the way
    assert below["ft_global"] < below["lpft_global"]
    at = compare(replace(cfg, lr=1.0 / (1.0 + nu)))  # c = 1: tie
    assert at["ft_global"] == pytest.approx(at["lpft_global"], rel=1e-10)


def test_combined_shift_threshold_lambda_star():
    cfg = TheoryConfig(shift="combined")  # defaults: overlap = -0.2, eps = 0.5, lr = 1
    small = compare(replace(cfg, lam=0.05))
    assert small["lpft_global"] <= small["ft_global"]
    lams = np.linspace(0.05, 8.0, 33)
    lam_star = find_lambda_star(cfg, lams)
    assert lam_star is not None and lams[0] < lam_star < lams[-1]
    below, above = compare(replace(cfg, lam=0.99 * lam_star)), compare(replace(cfg, lam=1.01 * lam_star))
    assert below["lpft_global"] <= below["ft_global"]
    assert above["lpft_global"] > above["ft_global"]
    rows = sweep_lambda(cfg, lams)
    for r in rows:
        cf = closed_form_global(replace(cfg, lam=r["lam"]))
        assert r["ft_global"] == pytest.approx(cf["ft_global"], rel=1e-9)
        assert (r["lpft_global"] <= r["ft_global"]) == (r["lam"] < lam_star)


@pytest.mark.parametrize("overlap", [0.0, 0.2])
def test_combined_shift_without_opposing_overlap_has_no_such_threshold(overlap):
    # the bilinear FT term has the sign of overlap, so LP-FT/FT can only fall as lam grows
    for seed, eps in ((0, 0.3), (1, 0.5), (4, 1.0)):
        rows = sweep_lambda(TheoryConfig(overlap=overlap, eps=eps, seed=seed), np.linspace(0.05, 10.0, 25))
        ratio = np.array([r["lpft_global"] / r["ft_global"] for r in rows])
        assert np.all(np.diff(ratio) <= 1e-12)


def test_global_loss_excludes_own_client():
    inst = make_instance(TheoryConfig(shift="concept", lam=1.0))
    V, B = ft_step(inst.V0, inst.B_star, inst, 0, lr=1.0)
    expected = np.mean([population_loss(V, B, inst, j) for j in range(1, inst.n_clients)])
    assert global_loss(V, B, inst, 0) == pytest.approx(expected)


@pytest.mark.parametrize("field,value", [
    ("d", 5), ("d", 16.0), ("m", 0), ("n_clients", 1), ("n_clients", True), ("lam", -0.5),
    ("lam", float("nan")), ("eps", 0.0), ("lr", -1.0), ("lr", float("inf")), ("shift", "label"),
    ("seed", -3), ("overlap", 0.9), ("overlap", -0.45), ("global_target", "all"),
])
def test_bad_config_values_raise(field, value):
    with pytest.raises(ValueError) as err:
        TheoryConfig(**{field: value})
    assert repr(value) in str(err.value) and field in str(err.value)


def _random_cfg(rng, t, **fixed) -> TheoryConfig:
    """A random instance of the model (both shifts, both global targets) for property tests."""
    m, n = int(rng.integers(1, 5)), int(rng.integers(2, 7))
    cfg = dict(d=m + 2 * n + int(rng.integers(0, 6)), m=m, n_clients=n, seed=t,
               shift=str(rng.choice(["concept", "combined"])), global_target=str(rng.choice(["others", "mixture"])),
               lr=float(rng.uniform(0.05, 3.0)), eps=float(rng.uniform(0.05, 2.0)),
               overlap=float(rng.uniform(-0.99, 0.99)) / math.sqrt(n))
    return TheoryConfig(**{**cfg, **fixed})


def test_global_loss_is_exactly_the_lambda_quartic_of_lambda_coefficients():
    rng = np.random.default_rng(7)
    for t in range(30):
        cfg = _random_cfg(rng, t)
        co = lambda_coefficients(cfg)
        lams = rng.uniform(0.01, 30.0, 3)
        for lam in lams:  # coefficients do not depend on cfg.lam; the simulation does the steps for real
            r = compare(replace(cfg, lam=float(lam)))
            assert r["ft_global"] == pytest.approx(lam ** 2 * (co["f0"] + co["f1"] * lam + co["f2"] * lam ** 2),
                                                   rel=1e-9), cfg
            assert r["lpft_global"] == pytest.approx(lam ** 2 * co["l0"], rel=1e-9), cfg
        assert co["c2"] >= 0.0
        if cfg.shift == "concept":  # Theorem 4.4 in closed form: no lambda-dependence of the ratio
            c, n = cfg.lr * (1 + float(np.sum(make_instance(cfg).V_com ** 2))), cfg.n_clients
            c0 = (c * c - 1) / 2 if cfg.global_target == "others" else (c - 1) * (n * c + n - 2) / (2 * n)
            assert co["c0"] == pytest.approx(c0, rel=1e-9, abs=1e-12) and abs(co["c1"]) + co["c2"] < 1e-12
        else:  # c1 has the sign of overlap
            assert np.sign(co["c1"]) == np.sign(cfg.overlap)


def test_lambda_coefficients_agree_with_a_polynomial_fit_and_the_hand_derivation():
    cfg = TheoryConfig()  # combined shift, defaults
    lams = np.array([0.5, 1.0, 2.0, 3.5, 5.0, 8.0, 13.0])
    d = [compare(replace(cfg, lam=float(lam))) for lam in lams]
    fit = np.polyfit(lams, [(r["ft_global"] - r["lpft_global"]) / lam ** 2 for r, lam in zip(d, lams)], 4)
    co = lambda_coefficients(cfg)
    np.testing.assert_allclose(fit[:2], 0.0, atol=1e-12)  # no lam^5, lam^6 terms in D
    np.testing.assert_allclose(fit[2:], [co["c2"], co["c1"], co["c0"]], rtol=1e-8)
    for lam in lams:  # the scalar derivation of closed_form_global gives the same polynomial
        hand = closed_form_global(replace(cfg, lam=float(lam)))
        assert hand["ft_global"] - hand["lpft_global"] == pytest.approx(
            lam ** 2 * (co["c0"] + co["c1"] * lam + co["c2"] * lam ** 2), rel=1e-9)


def test_crossings_by_hand():
    two = crossings(2.0, -3.0, 1.0)  # q = (x - 1)(x - 2): LP-FT better, worse on (1, 2), better again
    assert (two.lambda_star, two.lambda_star2, two.lpft_better_near_zero) == (1.0, 2.0, True)
    assert two.lpft_le_ft == ((0.0, 1.0), (2.0, math.inf))
    assert "[0, 1] U [2, inf)" in two.describe()
    late = crossings(-2.0, 1.0, 0.0)  # worse until 2, then better: no threshold of the paper's kind
    assert late.lambda_star is None and late.roots == (2.0,) and late.lpft_le_ft == ((2.0, math.inf),)
    assert "no threshold" in late.describe()
    once = crossings(2.0, -1.0, 0.0)  # linear: better until 2, worse beyond
    assert once.lambda_star == 2.0 and once.lambda_star2 is None and once.lpft_le_ft == ((0.0, 2.0),)
    never = crossings(1.0, -1.0, 1.0)  # no real root: better for every lam
    assert never.lambda_star is None and never.lpft_le_ft == ((0.0, math.inf),)
    assert crossings(1.0, -2.0, 1.0).roots == ()  # double root at 1: touches, no sign change
    tie = crossings(1e-17, 0.0, 0.0, tol=1e-12)
    assert tie.lpft_better_near_zero is None and tie.lambda_star is None
    edge = crossings(0.0, -1.0, 1.0)  # D = lam^3 (lam - 1): worse near 0, better from 1
    assert edge.lpft_better_near_zero is False and edge.lambda_star is None and edge.roots == (1.0,)


@pytest.mark.parametrize("cfg", [TheoryConfig(), TheoryConfig(global_target="mixture"),
                                 TheoryConfig(seed=3, eps=0.8, lr=0.7, overlap=-0.3)])
def test_closed_form_roots_equal_the_dense_grid_sign_changes(cfg):
    cross = lambda_thresholds(cfg)
    assert cross.lambda_star is not None and cross.lambda_star2 is not None
    hi = 1.5 * cross.lambda_star2
    grid = grid_sign_changes(cfg, np.linspace(0.01, hi, 600))  # simulation only, bisected to 1e-10
    assert [g["lpft_worse_above"] for g in grid] == [True, False]
    np.testing.assert_allclose([g["lam"] for g in grid], cross.roots, atol=1e-6, rtol=0)
    for root, worse_above in zip(cross.roots, (True, False)):  # a 1e-7 grid across each root flips once
        local = [compare(replace(cfg, lam=float(x))) for x in root + np.linspace(-1e-6, 1e-6, 21)]
        worse = np.array([r["lpft_global"] > r["ft_global"] for r in local])
        assert np.count_nonzero(np.diff(worse)) == 1 and worse[-1] == worse_above and worse[0] != worse_above
    assert find_lambda_star(cfg, np.linspace(0.01, hi, 600)) == pytest.approx(cross.lambda_star, abs=1e-6)


def test_seed_39_at_the_defaults_reports_no_threshold():
    cfg = TheoryConfig(seed=39)  # LP-FT is worse than FT for every lam < 52.5
    cross = lambda_thresholds(cfg)
    assert cross.c0 < 0 and cross.lpft_better_near_zero is False
    assert cross.lambda_star is None and cross.lambda_star2 is None
    assert cross.roots == pytest.approx((52.5439,), abs=1e-3) and cross.lpft_le_ft[0][1] == math.inf
    assert "no threshold" in cross.describe()
    for grid in (np.linspace(0.05, 40, 160), np.linspace(0.05, 80, 321)):
        assert find_lambda_star(cfg, grid) is None
    small = compare(replace(cfg, lam=0.05))
    assert small["lpft_global"] > small["ft_global"]
    late = grid_sign_changes(cfg, np.linspace(0.05, 80, 321))  # the one crossing: LP-FT better from 52.5 on
    assert len(late) == 1 and not late[0]["lpft_worse_above"]
    assert late[0]["lam"] == pytest.approx(cross.roots[0], abs=1e-6)
    assert not theorem_conditions(cfg)["holds"]


def test_theorem_4_4_condition_predicts_the_sign_on_200_random_instances():
    rng = np.random.default_rng(44)
    counts = {True: 0, False: 0}
    for t in range(200):
        cfg = _random_cfg(rng, t, shift="concept", lr=float(rng.uniform(0.01, 1.0)),
                          lam=float(rng.uniform(0.01, 10.0)))
        c = cfg.lr * (1.0 + float(np.sum(make_instance(cfg).V_com ** 2)))
        predicted = c >= 1.0  # lr (1 + |V_com|^2) >= 1  <=>  LP-FT <= FT, whatever lam
        r = compare(cfg)
        assert (r["lpft_global"] <= r["ft_global"]) == predicted, (cfg, c, r)
        cross = lambda_thresholds(cfg)
        assert cross.lambda_star is None and cross.lpft_better_near_zero == predicted
        assert theorem_conditions(cfg)["holds"] == predicted
        counts[predicted] += 1
    assert min(counts.values()) >= 40, counts  # both sides of the condition were exercised


def test_theorem_4_5_finite_lambda_star_exactly_under_its_conditions():
    rng = np.random.default_rng(45)
    for t in range(100):
        cfg = _random_cfg(rng, t, shift="combined", lr=float(rng.uniform(0.05, 6.0)))
        cross, cond = lambda_thresholds(cfg), theorem_conditions(cfg)
        assert (cross.lambda_star is not None) == cond["holds"], cfg
        if cfg.overlap >= 0:
            assert cross.lambda_star is None
        if cross.lambda_star is not None:  # LP-FT <= FT on [0, lam*] U [lam**, inf), worse in between
            for lam, worse in ((0.5 * cross.lambda_star, False), (math.sqrt(cross.lambda_star * cross.lambda_star2),
                                                                  True), (2.0 * cross.lambda_star2, False)):
                r = compare(replace(cfg, lam=lam))
                assert (r["lpft_global"] > r["ft_global"]) == worse, (cfg, lam)
    base = TheoryConfig()  # overlap -0.2, eps 0.5, lr 1: a threshold; too small or too large lr, eps: none
    assert lambda_thresholds(base).lambda_star is not None
    assert lambda_thresholds(replace(base, lr=0.1)).c0 < 0
    assert lambda_thresholds(replace(base, eps=0.1)).c0 < 0
    large = lambda_thresholds(replace(base, lr=5.0, eps=1.0))
    assert large.c0 > 0 and large.lambda_star is None and large.lpft_le_ft == ((0.0, math.inf),)


def test_mixture_global_loss_includes_the_own_client():
    inst = make_instance(TheoryConfig(lam=2.0))
    V, B = ft_step(inst.V0, inst.B_star, inst, 1, lr=1.0)
    expected = np.mean([population_loss(V, B, inst, j) for j in range(inst.n_clients)])
    assert global_loss(V, B, inst, 1, mixture=True) == pytest.approx(expected)
    others, mix = compare(TheoryConfig(lam=2.0)), compare(TheoryConfig(lam=2.0, global_target="mixture"))
    n = inst.n_clients
    assert mix["ft_global"] == pytest.approx(((n - 1) * others["ft_global"] + others["ft_local"]) / n)


def test_report_states_the_crossings_and_conditions(tmp_path):
    lams = np.linspace(0.05, 40.0, 41)
    results = {"concept": analyse(TheoryConfig(shift="concept", lr=0.3), lams),
               "combined": analyse(TheoryConfig(), lams)}
    assert results["combined"]["max_grid_gap"] < 1e-6
    text = render_report(results)
    assert results["combined"]["crossings"].describe() in text and "[0, 1.42347] U [29.0079, inf)" in text
    assert "Theorem 4.4's conclusion in this model: does not hold" in text
    paths = save_report(results, tmp_path)
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    saved = json.loads((tmp_path / "theory_sweep.json").read_text())
    assert saved["combined"]["crossings"]["lambda_star"] == results["combined"]["crossings"].lambda_star
    assert saved["combined"]["crossings"]["lpft_le_ft"][-1][1] is None  # [lambda**, inf)
