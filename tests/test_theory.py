"""Section 4 theory simulator (Chen et al., arXiv 2511.12695): gradients, LP optimality, the two claims."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from hf_lpft.evaluation.theory import (
    TheoryConfig,
    closed_form_global,
    compare,
    find_lambda_star,
    ft_step,
    global_loss,
    gradients,
    lp_fit,
    lpft_step,
    make_instance,
    population_loss,
    sweep_lambda,
)

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
    ("seed", -3), ("overlap", 0.9), ("overlap", -0.45),
])
def test_bad_config_values_raise(field, value):
    with pytest.raises(ValueError) as err:
        TheoryConfig(**{field: value})
    assert repr(value) in str(err.value) and field in str(err.value)
