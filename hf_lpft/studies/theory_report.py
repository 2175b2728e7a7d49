"""Report of the Section 4 theory simulator (Chen et al., arXiv 2511.12695): thresholds, conditions, plot.

The maths lives in hf_lpft.studies.theory; this module turns one analysed configuration per shift into
a Markdown report, a JSON record and a plot. Sign convention everywhere: D(lam) = FT - LP-FT global loss,
D >= 0 means LP-FT's global loss is at most FT's.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from hf_lpft.io import atomic_path, write_json, write_text
from hf_lpft.studies.theory import (
    Crossings,
    TheoryConfig,
    grid_sign_changes,
    lambda_coefficients,
    lambda_thresholds,
    make_instance,
    sweep_lambda,
)


def theorem_conditions(cfg: TheoryConfig) -> dict:
    """Whether this configuration meets the model's condition for the conclusion of Thm 4.4 or 4.5.

    Concept shift (Thm 4.4, "LP-FT never above FT"): holds iff c = lr (1 + |V_com|^2) >= 1, whatever lam.
    Combined shift (Thm 4.5, a finite lambda*): iff c0 > 0, c1 < 0 (overlap < 0) and c1^2 > 4 c0 c2.

    Returns:
        dict with "theorem", "holds" (bool) and the quantities the condition is made of.
    """
    if cfg.shift == "concept":
        c = cfg.lr * (1.0 + float(np.sum(make_instance(cfg).V_com ** 2)))
        return {"theorem": "4.4", "c = lr (1 + |V_com|^2)": c, "holds": c >= 1.0}
    co = lambda_coefficients(cfg)
    parts = {"c0 > 0": co["c0"] > 0, "c1 < 0 (overlap < 0)": co["c1"] < 0,
             "c1^2 > 4 c0 c2": co["c1"] ** 2 > 4.0 * co["c0"] * co["c2"]}
    return {"theorem": "4.5", **parts, "holds": all(parts.values())}


def analyse(cfg: TheoryConfig, lams) -> dict:
    """Closed-form crossings, the grid cross-check and the sweep of one configuration (Section 4).

    Returns:
        dict with cfg, crossings (Crossings), grid (grid_sign_changes), max_grid_gap (largest distance
        between a closed-form root and its grid crossing; inf if their counts differ), conditions, rows.
    """
    cross = lambda_thresholds(cfg)
    grid = grid_sign_changes(cfg, lams)
    lo, hi = float(np.min(lams)), float(np.max(lams))
    in_range = [r for r in cross.roots if lo < r < hi]
    gap = max((abs(a - g["lam"]) for a, g in zip(in_range, grid)), default=0.0)
    gap = gap if len(in_range) == len(grid) else math.inf
    return {"cfg": cfg, "crossings": cross, "grid": grid, "max_grid_gap": gap,
            "conditions": theorem_conditions(cfg), "rows": sweep_lambda(cfg, lams)}


CONDITIONS_MD = """## What the model implies (exact, one gradient step)

D(λ) = FT − LP-FT global loss = λ²(c0 + c1 λ + c2 λ²) exactly; D ≥ 0 means LP-FT ≤ FT. c2 ≥ 0 always,
and c1 has the sign of `overlap` (c1 = c2 = 0 under the concept shift and at overlap 0).

- **Theorem 4.4 (concept shift, E[xxᵀ] = I)**: D = λ²(c² − 1)/2 with c = lr·(1 + |V_com|²) (for the mixture
  global loss: λ²(c − 1)(nc + n − 2)/(2n)). "LP-FT never above FT" holds for every λ exactly when
  lr·(1 + |V_com|²) ≥ 1; otherwise LP-FT is worse for every λ > 0. No λ-threshold either way.
- **Theorem 4.5 (combined covariate shift, x_i = e_i + ε z)**: a finite λ* exists exactly when c0 > 0
  (LP-FT better at small λ: needs lr and ε large enough), c1 < 0 (overlap < 0) and c1² > 4 c0 c2 (fails
  again when lr and ε are too large). Then LP-FT ≤ FT on [0, λ*] ∪ [λ**, ∞) and FT is better only in (λ*, λ**).
  With c0 < 0, LP-FT is already worse at small λ: no threshold is reported.
"""


def _table(rows: list[dict], every: int) -> list[str]:
    """Markdown table of a sub-sampled sweep."""
    out = ["| λ | FT global | LP-FT global | FT local | LP-FT local | LP-FT ≤ FT |",
           "|---|---|---|---|---|---|"]
    for r in rows[::every]:
        out.append(f"| {r['lam']:.3f} | {r['ft_global']:.5g} | {r['lpft_global']:.5g} | {r['ft_local']:.4g} "
                   f"| {r['lpft_local']:.4g} | {r['lpft_global'] <= r['ft_global']} |")
    return out


def _section(result: dict) -> list[str]:
    """Markdown of one analysed configuration."""
    cfg, cross, rows = result["cfg"], result["crossings"], result["rows"]
    cond = result["conditions"]
    grid = ", ".join(f"{g['lam']:.9g} ({'worse' if g['lpft_worse_above'] else 'better'} above)"
                     for g in result["grid"]) or "none"
    facts = ", ".join(f"{k} = {v:.6g}" if isinstance(v, float) else f"{k}: {v}" for k, v in cond.items()
                      if k not in ("theorem", "holds"))
    return [f"## {cfg.shift} shift", "", f"`{cfg}`", "",
            f"c0 = {cross.c0:.6g}, c1 = {cross.c1:.6g}, c2 = {cross.c2:.6g}", "",
            f"**Result: {cross.describe()}**", "",
            f"Theorem {cond['theorem']}'s conclusion in this model: "
            f"{'holds' if cond['holds'] else 'does not hold'} ({facts}).", "",
            f"Grid cross-check (simulation on {len(rows)} λ in [{rows[0]['lam']:.3g}, {rows[-1]['lam']:.3g}], "
            f"sign changes bisected): {grid}; largest gap to the closed form: {result['max_grid_gap']:.2e}.", "",
            *_table(rows, max(1, len(rows) // 20)), ""]


def render_report(results: dict[str, dict]) -> str:
    """Markdown report of analyse() results per shift, then the conditions (Chen et al., Section 4)."""
    head = ["# Two-layer linear model of Section 4 (arXiv 2511.12695): FT against LP-FT", "",
            "Global loss of client i's fine-tuned model: mean loss over the other clients ('others') or over all",
            "clients ('mixture'); averaged over every client i. λ* and λ** are the positive roots of",
            "c0 + c1 λ + c2 λ²; the grid sweep is only a cross-check.", ""]
    body = [line for result in results.values() for line in _section(result)]
    return "\n".join(head + body + [CONDITIONS_MD])


def _json_crossings(cross: Crossings) -> dict:
    """Crossings as JSON-safe dict (an open end is written as null)."""
    d = asdict(cross)
    d["lpft_le_ft"] = [[lo, None if math.isinf(hi) else hi] for lo, hi in cross.lpft_le_ft]
    d["describe"] = cross.describe()
    return d


def save_report(results: dict[str, dict], output_dir) -> list[Path]:
    """Write theory_report.md, theory_sweep.json and theory_sweep.png into output_dir (atomically)."""
    out = Path(output_dir)
    payload = {s: {"config": asdict(r["cfg"]), "crossings": _json_crossings(r["crossings"]),
                   "grid_sign_changes": r["grid"], "conditions": r["conditions"], "rows": r["rows"]}
               for s, r in results.items()}
    paths = [write_text(out / "theory_report.md", render_report(results)),
             write_json(out / "theory_sweep.json", payload)]
    plot_sweep(results, out / "theory_sweep.png")
    return paths + [out / "theory_sweep.png"]


def plot_sweep(results: dict[str, dict], path) -> None:
    """Global loss of FT and LP-FT and their ratio against lambda, one column per shift, lambda*/** marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(5.5 * len(results), 7), squeeze=False, sharex="col")
    for c, (shift, res) in enumerate(results.items()):
        lam = np.array([r["lam"] for r in res["rows"]])
        ft, lpft = (np.array([r[k] for r in res["rows"]]) for k in ("ft_global", "lpft_global"))
        top, bottom = axes[0, c], axes[1, c]
        top.plot(lam, ft, label="FT")
        top.plot(lam, lpft, "--", label="LP-FT")
        cross = res["crossings"]
        stars = (("\\lambda^*", cross.lambda_star), ("\\lambda^{**}", cross.lambda_star2))
        marks = [(name, x) for name, x in stars if x is not None and lam.min() <= x <= lam.max()]
        none = "no threshold" if cross.lambda_star is None else "$\\lambda^*$ outside the range"
        note = ", ".join(f"${n}$ = {x:.3g}" for n, x in marks) or none
        top.set(yscale="log", ylabel="global loss", title=f"{shift} shift ({note})")
        bottom.plot(lam, lpft / np.maximum(ft, 1e-300), color="k")
        bottom.axhline(1.0, color="grey", lw=0.8)
        bottom.set(xlabel="heterogeneity $\\lambda$", ylabel="LP-FT / FT global loss")
        for ax in (top, bottom):
            for name, x in marks:
                ax.axvline(x, color="r", lw=1, ls="-" if name == "\\lambda^*" else ":", label=f"${name}$")
        top.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
