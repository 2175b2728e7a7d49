"""Exact simulator of the two-layer linear theory of Section 4 of Chen et al. (arXiv 2511.12695).

Chen et al., "A Closer Look at Personalized Fine-Tuning in Heterogeneous Federated Learning", Section 4,
built on the LP-FT analysis of Kumar et al. (ICLR 2022, arXiv 2202.10054). Everything is a population
(infinite-data) quantity in closed form; nothing is sampled.

Model (shapes fixed here, used everywhere below)
    * input x in R^d; feature extractor B in R^{k x d}; head V in R^k; prediction f(x) = V^T B x.
    * k = m + n features: coordinates 0..m-1 are common, coordinate m+i belongs to client i.
    * ground truth of client i: y = V_i^T B* x with V_i = [V_com; lam * e_i] (e_i in R^n), one shared
      B* with orthonormal rows (B* B*^T = I_k). lam >= 0 is the heterogeneity.
    * start (the FedAvg global model): B_0 = B*, V_0 = [V_com; 0].
    * loss of client j: L_j(V, B) = 1/2 E_j[(V^T B x - V_j^T B* x)^2] = 1/2 r^T S_j r with r = B^T V - B*^T V_j
      and S_j = E_j[x x^T]. The factor 1/2 only rescales lr.
    * FT: one gradient step of size lr on (V, B) jointly on L_i.  LP-FT: V <- exact least-squares fit of
      L_i with B fixed (lp_fit), then the same step; since the model is realisable the fit is V_i, the
      gradient there is zero and the step is a no-op, so LP-FT returns (V_i, B*).
    * global loss of client i's fine-tuned model: mean of L_j over the other clients j != i; local: L_i.

Shifts (S_i = E[x x^T] of client i; e_i below is the i-th input axis of R^d)
    * "concept": S_i = I_d for every client; only the heads differ. Closed form (checked in the tests):
      LP-FT global = lam^2, FT global = lam^2 (1 + c^2) / 2 with c = lr (1 + |V_com|^2), so LP-FT <= FT
      for every lam if and only if c >= 1 (always at the default lr = 1, the step at which a head-only
      gradient step on isotropic data equals the LP fit; FT's extra move is the feature distortion).
    * "combined": x_i = e_i + eps z, z ~ N(0, I_d), so S_i = e_i e_i^T + eps^2 I_d.

Geometry of B* (our choice; the paper's B* and conditions were not available to us). Client i's
typical input e_i has the features B* e_i = [overlap * V_com / |V_com|; beta * e_i], beta =
sqrt(1 - n overlap^2): it activates the common features with signed strength overlap ("partial feature
overlap") and its own feature with strength beta. With a generic random B* instead (entries of B* e_i
~ 1/sqrt(d)), FT's step on client i's data is tiny and in our trials FT beat LP-FT at every lam.
Why lam* exists, and when (derivation in closed_form_global, checked against compare() in the tests):
FT's step on (V, B) has the bilinear term (dB)^T dV = lr^2 lam^2 (w_0^T S_i b_i) S_i b_i with
b_i = B*^T e_{m+i}, w_0 = B*^T V_0 and w_0^T S_i b_i = overlap * beta * |V_com|; it is zero under
concept shift (hence no lam-dependence there) and has the sign of overlap under combined shift.
    * overlap < 0 (client i's own concept opposes the common prediction on its data): the term damps
      FT's move as lam grows, so LP-FT / FT global loss rises with lam; LP-FT is lower for lam < lam*
      provided it is lower as lam -> 0 (needs eps large enough, e.g. eps = 0.5 at the defaults).
      The lam^4 term wins again for very large lam: FT's advantage is a window (lam*, lam**).
    * overlap >= 0: LP-FT / FT can only fall as lam grows; no threshold of the paper's kind.
Exactly (lambda_coefficients, crossings): D(lam) = FT - LP-FT global loss = lam^2 (c0 + c1 lam + c2 lam^2);
D >= 0 means LP-FT <= FT. c2 >= 0 always; c1 has the sign of overlap (0 under concept shift, and at overlap 0).
    * Theorem 4.4 (concept shift): c1 = c2 = 0 and c0 has the sign of c - 1, c = lr (1 + |V_com|^2): LP-FT <= FT
      for every lam iff c >= 1, and LP-FT > FT for every lam > 0 otherwise.
    * Theorem 4.5 (combined shift): a finite lam* exists iff c0 > 0 (LP-FT better at small lam; needs lr and eps
      large enough), c1 < 0 (overlap < 0) and c1^2 > 4 c0 c2 (fails again when lr and eps are too large);
      then LP-FT <= FT on [0, lam*] U [lam**, inf). With c0 < 0 (seed 39 at the defaults) there is no threshold.
B*'s remaining columns carry a seeded random rotation that no loss depends on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

SHIFTS = ("concept", "combined")
GLOBAL_TARGETS = ("others", "mixture")


def _require(name: str, value, ok: bool, allowed: str) -> None:
    """Raise ValueError naming the bad config value and its allowed range."""
    if not ok:
        raise ValueError(f"TheoryConfig.{name}={value!r} is invalid: allowed {allowed}")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class TheoryConfig:
    """One instance of the Section 4 model of Chen et al. (arXiv 2511.12695).

    Attributes:
        d: input dimension; needs d >= m + 2 * n_clients (room for B*'s construction).
        m: number of common features (length of V_com).
        n_clients: number of clients n (>= 2, so that a global loss exists); k = m + n features.
        lam: heterogeneity lambda >= 0 (size of each client's own head coordinate).
        eps: covariate noise scale of the combined shift (> 0); unused by the concept shift.
        lr: step size of the one FT gradient step (> 0), on the 1/2-scaled squared loss.
        shift: "concept" (E[xx^T] = I) or "combined" (x_i = e_i + eps z).
        seed: seed of V_com ~ N(0, I_m / m) and of B*'s free columns.
        overlap: signed strength with which each client's typical input activates the common features,
            |overlap| < 1 / sqrt(n_clients); see the module docstring. Unused by the concept shift.
        global_target: which losses make client i's "global" loss: "others" (mean of L_j over j != i, the
            default) or "mixture" (mean over all n clients, i's own loss included: the paper's wording of
            the global distribution as a mixture of the clients' distributions).
    """

    d: int = 16
    m: int = 3
    n_clients: int = 5
    lam: float = 1.0
    eps: float = 0.5
    lr: float = 1.0
    shift: str = "combined"
    seed: int = 0
    overlap: float = -0.2
    global_target: str = "others"

    def __post_init__(self) -> None:
        _require("m", self.m, _is_int(self.m) and self.m >= 1, "an integer >= 1")
        _require("n_clients", self.n_clients, _is_int(self.n_clients) and self.n_clients >= 2, "an integer >= 2")
        lo = self.m + 2 * self.n_clients
        _require("d", self.d, _is_int(self.d) and self.d >= lo, f"an integer >= m + 2 * n_clients = {lo}")
        _require("lam", self.lam, _is_real(self.lam) and self.lam >= 0, "a finite real >= 0")
        _require("eps", self.eps, _is_real(self.eps) and self.eps > 0, "a finite real > 0")
        _require("lr", self.lr, _is_real(self.lr) and self.lr > 0, "a finite real > 0")
        _require("shift", self.shift, self.shift in SHIFTS, f"one of {SHIFTS}")
        _require("seed", self.seed, _is_int(self.seed) and self.seed >= 0, "an integer >= 0")
        bound = 1.0 / math.sqrt(self.n_clients)
        _require("overlap", self.overlap, _is_real(self.overlap) and abs(self.overlap) < bound,
                 f"a real in the open interval (-{bound:.4g}, {bound:.4g}) = +-1/sqrt(n_clients)")
        _require("global_target", self.global_target, self.global_target in GLOBAL_TARGETS,
                 f"one of {GLOBAL_TARGETS}")


@dataclass(frozen=True)
class Instance:
    """Arrays of one model instance (float64).

    Attributes:
        B_star: (k, d) shared feature extractor with orthonormal rows.
        V_com: (m,) common head.
        heads: (n, k) true heads; row i is V_i = [V_com; lam e_i].
        sigmas: (n, d, d) second moments S_i = E[x x^T] of each client's inputs.
    """

    B_star: np.ndarray
    V_com: np.ndarray
    heads: np.ndarray
    sigmas: np.ndarray

    @property
    def n_clients(self) -> int:
        """Number of clients n."""
        return self.heads.shape[0]

    @property
    def V0(self) -> np.ndarray:
        """(k,) starting head [V_com; 0] of the global model (Chen et al., Section 4)."""
        return np.concatenate([self.V_com, np.zeros(self.n_clients)])


def _feature_extractor(cfg: TheoryConfig, v_com: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """B* (k x d), orthonormal rows, with B* e_i = [overlap V_com/|V_com|; beta e_i] for i < n.

    F = B*[:, :n] is a contraction (|F|_op^2 = n overlap^2 + beta^2 = 1), so it completes to orthonormal
    rows with G = (I_k - F F^T)^{1/2} in the next k columns, then a random rotation of columns n..d-1
    (which leaves e_0..e_{n-1} and every S_i unchanged).
    """
    n, k = cfg.n_clients, cfg.m + cfg.n_clients
    beta = math.sqrt(1.0 - n * cfg.overlap ** 2)
    F = np.zeros((k, n))
    F[: cfg.m, :] = (cfg.overlap * v_com / np.linalg.norm(v_com))[:, None]
    F[cfg.m:, :] = beta * np.eye(n)
    evals, evecs = np.linalg.eigh(np.eye(k) - F @ F.T)
    G = (evecs * np.sqrt(np.clip(evals, 0.0, None))) @ evecs.T
    rest = np.zeros((k, cfg.d - n))
    rest[:, :k] = G
    Q, _ = np.linalg.qr(rng.standard_normal((cfg.d - n, cfg.d - n)))
    return np.concatenate([F, rest @ Q], axis=1)


def make_instance(cfg: TheoryConfig) -> Instance:
    """Build B*, V_com, the heads V_i = [V_com; lam e_i] and the client second moments S_i.

    Args:
        cfg: the configuration (Chen et al., Section 4; geometry as in the module docstring).

    Returns:
        The Instance; "concept": S_i = I_d, "combined": S_i = e_i e_i^T + eps^2 I_d.
    """
    rng = np.random.default_rng(cfg.seed)
    n, d = cfg.n_clients, cfg.d
    v_com = rng.standard_normal(cfg.m) / math.sqrt(cfg.m)
    B_star = _feature_extractor(cfg, v_com, rng)
    heads = np.concatenate([np.tile(v_com, (n, 1)), cfg.lam * np.eye(n)], axis=1)
    if cfg.shift == "concept":
        sigmas = np.tile(np.eye(d), (n, 1, 1))
    else:
        sigmas = np.stack([np.outer(np.eye(d)[i], np.eye(d)[i]) + cfg.eps ** 2 * np.eye(d) for i in range(n)])
    return Instance(B_star=B_star, V_com=v_com, heads=heads, sigmas=sigmas)


def _residual(V: np.ndarray, B: np.ndarray, inst: Instance, client: int) -> np.ndarray:
    """r = B^T V - B*^T V_j (d,): the end-to-end weight error against client j's truth."""
    return B.T @ V - inst.B_star.T @ inst.heads[client]


def population_loss(V: np.ndarray, B: np.ndarray, instance: Instance, client: int) -> float:
    """Population loss L_j(V, B) = 1/2 E_j[(V^T B x - V_j^T B* x)^2] = 1/2 r^T S_j r.

    Args:
        V: (k,) head. B: (k, d) feature extractor. instance: the model. client: j, whose truth and S_j apply.

    Returns:
        The loss (Chen et al., Section 4; squared loss of Kumar et al. 2022, scaled by 1/2).
    """
    r = _residual(V, B, instance, client)
    return float(0.5 * r @ instance.sigmas[client] @ r)


def gradients(V: np.ndarray, B: np.ndarray, instance: Instance, client: int) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form gradients of population_loss: with g = S_j (B^T V - B*^T V_j),
    dL/dV = B g (k,) and dL/dB = V g^T (k, d).
    """
    g = instance.sigmas[client] @ _residual(V, B, instance, client)
    return B @ g, np.outer(V, g)


def ft_step(V: np.ndarray, B: np.ndarray, instance: Instance, client: int, lr: float):
    """FT: one joint gradient step (V, B) <- (V, B) - lr * grad L_i (Chen et al., Section 4).

    Returns:
        (V', B') after the step; the inputs are not modified.
    """
    gV, gB = gradients(V, B, instance, client)
    return V - lr * gV, B - lr * gB


def lp_fit(V: np.ndarray, B: np.ndarray, instance: Instance, client: int) -> np.ndarray:
    """LP: exact least-squares head for L_i with B fixed, the minimiser closest to V.

    Solves (B S_i B^T) delta = -dL/dV (minimum-norm delta via lstsq), which is where gradient flow on V
    from V converges; when B S_i B^T is invertible (always here) the minimiser is unique.

    Returns:
        (k,) head with dL_i/dV = 0.
    """
    S = instance.sigmas[client]
    gV, _ = gradients(V, B, instance, client)
    delta = np.linalg.lstsq(B @ S @ B.T, -gV, rcond=None)[0]
    return V + delta


def lpft_step(V: np.ndarray, B: np.ndarray, instance: Instance, client: int, lr: float):
    """LP-FT: lp_fit on client i's loss with B fixed, then the same one joint step as ft_step.

    Returns:
        (V', B') after LP then the step (Kumar et al. 2022; Chen et al., Section 4).
    """
    return ft_step(lp_fit(V, B, instance, client), B, instance, client, lr)


def _targets(n_clients: int, own_client: int, mixture: bool) -> list[int]:
    """Clients whose losses make own_client's global loss: all of them ("mixture") or all but own_client."""
    return [j for j in range(n_clients) if mixture or j != own_client]


def global_loss(V: np.ndarray, B: np.ndarray, instance: Instance, own_client: int, *,
                mixture: bool = False) -> float:
    """Mean population loss of the model over the clients j != own_client, each against its own V_j, S_j.

    With mixture=True the mean runs over all n clients, own_client included (the global distribution as
    the uniform mixture of the clients', Chen et al., Section 4).
    """
    targets = _targets(instance.n_clients, own_client, mixture)
    return float(np.mean([population_loss(V, B, instance, j) for j in targets]))


def compare(cfg: TheoryConfig) -> dict:
    """FT against LP-FT from (V_0, B*), averaged over every client as the personalising client.

    Returns:
        dict with lam, shift, ft_global, lpft_global, ft_local, lpft_local.
    """
    inst = make_instance(cfg)
    acc = {"ft_global": [], "lpft_global": [], "ft_local": [], "lpft_local": []}
    for i in range(inst.n_clients):
        for name, step in (("ft", ft_step), ("lpft", lpft_step)):
            V, B = step(inst.V0, inst.B_star, inst, i, cfg.lr)
            mixture = cfg.global_target == "mixture"
            acc[f"{name}_global"].append(global_loss(V, B, inst, i, mixture=mixture))
            acc[f"{name}_local"].append(population_loss(V, B, inst, i))
    return {"lam": float(cfg.lam), "shift": cfg.shift, **{k: float(np.mean(v)) for k, v in acc.items()}}


def closed_form_global(cfg: TheoryConfig) -> dict:
    """Global losses of FT and LP-FT derived by hand for this construction (cross-checks compare()).

    With nu = |V_com|^2, a = overlap, beta = sqrt(1 - n a^2), kappa = a sqrt(nu), eta = lr (same for all i, j):
    concept: FT = lam^2 (1 + c^2) / 2 with c = eta (1 + nu); LP-FT = lam^2.
    combined: FT's step moves w = B^T V by X = x_p P e_i + x_e e_i + x_b b_i (P = B*^T B*, b_i = B*^T e_{m+i}),
    x_p = lam eta beta, x_e = lam eta nu beta + lam^2 eta^2 kappa beta^2, x_b = eps^2 (lam eta (1 + nu)
    + lam^2 eta^2 kappa beta), whose Gram entries are |P e_i|^2 = <P e_i, e_i> = a^2 + beta^2,
    <P e_i, b_i> = <e_i, b_i> = beta; then FT = [lam^2 beta^2 (1 - eta a^2)^2 + eps^2 (lam^2 + |X|^2)] / 2
    and LP-FT = lam^2 (beta^2 + 2 eps^2) / 2. The lam^2 terms of x_e, x_b are the bilinear (dB)^T dV term.
    """
    nu = float(np.sum(make_instance(cfg).V_com ** 2))
    lam, eta, eps, a = cfg.lam, cfg.lr, cfg.eps, cfg.overlap
    if cfg.shift == "concept":
        c = eta * (1.0 + nu)
        return {"ft_global": 0.5 * lam ** 2 * (1.0 + c ** 2), "lpft_global": lam ** 2}
    beta = math.sqrt(1.0 - cfg.n_clients * a ** 2)
    kappa, phi = a * math.sqrt(nu), a ** 2 + beta ** 2
    xp = lam * eta * beta
    xe = lam * eta * nu * beta + lam ** 2 * eta ** 2 * kappa * beta ** 2
    xb = eps ** 2 * (lam * eta * (1.0 + nu) + lam ** 2 * eta ** 2 * kappa * beta)
    x2 = phi * xp ** 2 + xe ** 2 + xb ** 2 + 2 * phi * xp * xe + 2 * beta * (xp * xb + xe * xb)
    ft = 0.5 * ((lam * beta * (1.0 - eta * a ** 2)) ** 2 + eps ** 2 * (lam ** 2 + x2))
    return {"ft_global": ft, "lpft_global": 0.5 * lam ** 2 * (beta ** 2 + 2 * eps ** 2)}


def sweep_lambda(base_cfg: TheoryConfig, lams) -> list[dict]:
    """compare() at every lambda in lams, all other settings from base_cfg."""
    return [compare(replace(base_cfg, lam=float(lam))) for lam in lams]


def _ft_step_terms(inst: Instance, i: int, lr: float) -> tuple[np.ndarray, np.ndarray]:
    """(a1, a2): FT's end-to-end move is w' - w_0 = lam a1 + lam^2 a2 for client i (see lambda_coefficients)."""
    m = inst.V_com.shape[0]
    B, S = inst.B_star, inst.sigmas[i]
    sb = S @ B[m + i]
    w0 = B.T @ inst.V0
    a1 = lr * (B.T @ (B @ sb) + float(inst.V_com @ inst.V_com) * sb)
    return a1, lr ** 2 * float(w0 @ sb) * sb


def lambda_coefficients(cfg: TheoryConfig) -> dict:
    """Exact lambda-polynomials of the global losses (Chen et al., arXiv 2511.12695, Section 4, Thms 4.4-4.5).

    With b_j = B*^T e_{m+j}, P = B*^T B*, w_0 = B*^T V_0, nu = |V_com|^2: the start's residual against client
    i is -lam b_i, so FT's gradient is linear in lam and its step gives w' = B'^T V' = w_0 + lam a1 + lam^2 a2,
    a1 = lr (P + nu) S_i b_i, a2 = lr^2 (w_0^T S_i b_i) S_i b_i (a2: the bilinear (dB)^T dV term). Against
    client j, FT's residual is lam (a1 - b_j) + lam^2 a2 and LP-FT's (a no-op step after the exact fit V_i)
    lam (b_i - b_j). Hence, averaged over the (i, j) pairs of compare():
    FT global = lam^2 (f0 + f1 lam + f2 lam^2), LP-FT global = lam^2 l0 and
    D(lam) = FT - LP-FT = lam^2 (c0 + c1 lam + c2 lam^2), c0 = f0 - l0, c1 = f1, c2 = f2 >= 0 exactly.
    D > 0 means LP-FT's global loss is below FT's. B*, V_com and S_i do not depend on cfg.lam.

    Returns:
        dict with c0, c1, c2, f0, f1, f2, l0 (floats).
    """
    inst = make_instance(cfg)
    m, mixture = inst.V_com.shape[0], cfg.global_target == "mixture"
    acc = np.zeros(4)
    pairs = [(i, j) for i in range(inst.n_clients) for j in _targets(inst.n_clients, i, mixture)]
    for i, j in pairs:
        a1, a2 = _ft_step_terms(inst, i, cfg.lr)
        S, u, d = inst.sigmas[j], a1 - inst.B_star[m + j], inst.B_star[m + i] - inst.B_star[m + j]
        acc += [0.5 * u @ S @ u, u @ S @ a2, 0.5 * a2 @ S @ a2, 0.5 * d @ S @ d]
    f0, f1, f2, l0 = (float(x) for x in acc / len(pairs))
    return {"c0": f0 - l0, "c1": f1, "c2": f2, "f0": f0, "f1": f1, "f2": f2, "l0": l0}


@dataclass(frozen=True)
class Crossings:
    """Sign of D(lam) = FT - LP-FT global loss = lam^2 q(lam), q = c0 + c1 lam + c2 lam^2 (Section 4).

    Attributes:
        c0, c1, c2: coefficients of q (those within the tie tolerance set to 0).
        roots: the positive lambdas where D changes sign, ascending (at most two).
        lpft_better_near_zero: True if LP-FT < FT for all small lam > 0, False if worse, None if D = 0 always.
        lambda_star: the paper's lambda* (Thm 4.5): the first sign change, only when LP-FT is better below it;
            None ("no threshold") when LP-FT is already worse at small lam, or never worse.
        lambda_star2: lambda** > lambda*, where LP-FT becomes better again; None if it does not exist.
        lpft_le_ft: the closed intervals of lam >= 0 on which LP-FT's global loss is at most FT's.
    """

    c0: float
    c1: float
    c2: float
    roots: tuple[float, ...]
    lpft_better_near_zero: bool | None
    lambda_star: float | None
    lambda_star2: float | None
    lpft_le_ft: tuple[tuple[float, float], ...]

    def describe(self) -> str:
        """One line: whether a threshold exists, and where LP-FT <= FT as a union of closed intervals."""
        if self.lpft_better_near_zero is None:
            return "no threshold: FT and LP-FT tie for every lam"
        where = " U ".join(_interval(lo, hi) for lo, hi in self.lpft_le_ft) or "lam = 0 only"
        if self.lambda_star is None:
            why = "LP-FT is never worse" if self.lpft_better_near_zero else "LP-FT is already worse at small lam"
            return f"no threshold ({why}): LP-FT <= FT on {where}"
        star2 = "none" if self.lambda_star2 is None else f"{self.lambda_star2:.6g}"
        return f"lambda* = {self.lambda_star:.6g}, lambda** = {star2}: LP-FT <= FT on {where}"


def _interval(lo: float, hi: float) -> str:
    """'[lo, hi]' or '[lo, inf)'."""
    return f"[{lo:.6g}, inf)" if math.isinf(hi) else f"[{lo:.6g}, {hi:.6g}]"


def _positive_sign_changes(c0: float, c1: float, c2: float) -> tuple[float, ...]:
    """Positive roots of c0 + c1 x + c2 x^2 at which it changes sign (double roots excluded), ascending."""
    if c2 == 0.0:
        return (-c0 / c1,) if c1 != 0.0 and -c0 / c1 > 0 else ()
    disc = c1 * c1 - 4.0 * c2 * c0
    if disc <= 0.0:
        return ()
    q = -0.5 * (c1 + math.copysign(math.sqrt(disc), c1))  # stable: no cancellation in either root
    roots = [q / c2] + ([c0 / q] if q != 0.0 else [])
    return tuple(sorted(r for r in roots if r > 0))


def crossings(c0: float, c1: float, c2: float, *, tol: float = 0.0) -> Crossings:
    """Where LP-FT <= FT from the quadratic q of D(lam) = lam^2 q(lam) (Chen et al., Section 4, Thm 4.5).

    Args:
        c0, c1, c2: coefficients of q (lambda_coefficients). tol: |c| <= tol counts as exactly 0.

    Returns:
        Crossings. lambda* is reported only when LP-FT is better for small lam (c0 > 0, or the first non-zero
        coefficient > 0); then LP-FT <= FT on [0, lambda*] U [lambda**, inf) when both roots exist.
    """
    c0, c1, c2 = (0.0 if abs(c) <= tol else float(c) for c in (c0, c1, c2))
    roots = _positive_sign_changes(c0, c1, c2)
    first = next((c for c in (c0, c1, c2) if c != 0.0), 0.0)
    better = None if first == 0.0 else first > 0
    edges = (0.0, *roots, math.inf)
    ok = [better is None or better == (k % 2 == 0) for k in range(len(edges) - 1)]  # D's sign alternates
    intervals = tuple((edges[k], edges[k + 1]) for k in range(len(edges) - 1) if ok[k])
    star = roots[0] if better and roots else None
    star2 = roots[1] if better and len(roots) > 1 else None
    return Crossings(c0, c1, c2, roots, better, star, star2, intervals)


def lambda_thresholds(cfg: TheoryConfig, *, rtol: float = 1e-12) -> Crossings:
    """lambda* and lambda** of cfg from the exact coefficients (lam of cfg unused; Section 4, Thm 4.5).

    Args:
        cfg: the model. rtol: coefficients below rtol * max(|f0|, |f1|, |f2|, |l0|) count as 0 (exact ties,
            e.g. the concept shift at lr (1 + |V_com|^2) = 1, are otherwise decided by rounding).
    """
    co = lambda_coefficients(cfg)
    scale = max(abs(co[k]) for k in ("f0", "f1", "f2", "l0"))
    return crossings(co["c0"], co["c1"], co["c2"], tol=rtol * scale)


def _lpft_worse(cfg: TheoryConfig, lam: float, rtol: float) -> bool:
    """True when LP-FT's global loss exceeds FT's by more than rtol (relative) at this lambda."""
    r = compare(replace(cfg, lam=float(lam)))
    return r["lpft_global"] - r["ft_global"] > rtol * max(abs(r["ft_global"]), abs(r["lpft_global"]), 1e-300)


def _bisect(cfg: TheoryConfig, lo: float, hi: float, rtol: float, xtol: float) -> float:
    """Bisect [lo, hi], on which _lpft_worse differs at the ends, to a bracket narrower than xtol (1 + hi)."""
    worse_lo = _lpft_worse(cfg, lo, rtol)
    while hi - lo > xtol * (1.0 + hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _lpft_worse(cfg, mid, rtol) == worse_lo else (lo, mid)
    return 0.5 * (lo + hi)


def grid_sign_changes(base_cfg: TheoryConfig, lams, rtol: float = 1e-10, xtol: float = 1e-10) -> list[dict]:
    """Cross-check of crossings() by simulation: every sign change of LP-FT - FT on the grid, bisected.

    Runs compare() only (not lambda_coefficients), so it checks the closed form; a pair of crossings
    closer than the grid spacing is missed (Chen et al., Section 4).

    Returns:
        list of {"lam": crossing, "lpft_worse_above": bool} in ascending order.
    """
    grid = np.sort(np.asarray(lams, dtype=float))
    worse = [_lpft_worse(base_cfg, lam, rtol) for lam in grid]
    flips = [k for k in range(len(grid) - 1) if worse[k] != worse[k + 1]]
    return [{"lam": _bisect(base_cfg, float(grid[k]), float(grid[k + 1]), rtol, xtol),
             "lpft_worse_above": worse[k + 1]} for k in flips]


def find_lambda_star(base_cfg: TheoryConfig, lams, rtol: float = 1e-10, xtol: float = 1e-10):
    """Grid estimate of lambda* (Chen et al., Thm 4.5): where LP-FT turns worse than FT, from a grid.

    A cross-check of lambda_thresholds(): the first grid sign change, bisected, if LP-FT is not worse at
    the first grid point. When LP-FT is already worse there, there is no threshold of the paper's kind
    from the grid's start on, and this returns None (it does not report the first grid point).

    Args:
        base_cfg: settings other than lam. lams: grid of lambdas. rtol: relative tie tolerance.
        xtol: bisection stops when the bracket is narrower than xtol * (1 + upper end).

    Returns:
        lambda* as a float, or None.
    """
    grid = np.sort(np.asarray(lams, dtype=float))
    if _lpft_worse(base_cfg, grid[0], rtol):
        return None
    changes = grid_sign_changes(base_cfg, grid, rtol, xtol)
    return changes[0]["lam"] if changes else None
