"""Local / Global / C-Std / Worst / Average, as pure functions over accuracy matrices and records.

Definitions (Chen et al., arXiv 2511.12695, see PAPER.md):
- Local: client i's model on client i's own test split.
- Global: the same model's mean accuracy over all *other* clients' test splits (own split excluded).
- C-Std: standard deviation of Local across clients (population std, ddof=0).
- Worst: the lowest Local across clients.
- Average (text): (Local + Global) / 2.  Average (table): (Local + Global + Worst) / 3.
Across seeds, tables show mean (std) with the sample std (ddof=1; 0 for one seed).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

METRIC_COLUMNS = ("local", "global", "c_std", "worst", "avg_lg", "avg_lgw", "below_global_share")
# Per-client columns of the results table that are averaged over clients when present (feature
# distortion against the global model, hf_lpft.evaluation.distortion); shown after the accuracies.
EXTRA_COLUMNS = {"distortion_local": "Δ own", "distortion_global": "Δ others"}


def local_global(acc_row: list[float] | np.ndarray, own: int) -> tuple[float, float]:
    """Local and Global accuracy of client ``own``'s model from its accuracies on every client's test split."""
    row = np.asarray(acc_row, dtype=float)
    if not 0 <= own < len(row):
        raise IndexError(f"own={own} outside the {len(row)} clients")
    others = np.delete(row, own)
    return float(row[own]), float(others.mean()) if len(others) else float("nan")


def summarize_clients(local: np.ndarray, global_: np.ndarray, reference_global: np.ndarray | None = None) -> dict:
    """Across-client metrics of one (seed, strategy).

    Args:
        local: Local accuracy per client.
        global_: Global accuracy per client.
        reference_global: The global model's Global per client; gives the share of clients whose Global
            fell below the global model's.
    """
    local, global_ = np.asarray(local, float), np.asarray(global_, float)
    out = {"local": local.mean(), "global": global_.mean(), "c_std": local.std(ddof=0), "worst": local.min()}
    out["avg_lg"] = (out["local"] + out["global"]) / 2
    out["avg_lgw"] = (out["local"] + out["global"] + out["worst"]) / 3
    out["below_global_share"] = (float(np.mean(global_ < np.asarray(reference_global, float)))
                                 if reference_global is not None else float("nan"))
    return {k: float(v) for k, v in out.items()}


def per_seed_summary(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (seed, strategy) from the per-client results table."""
    rows = []
    for (seed, strategy), group in results.groupby(["seed", "strategy"], sort=False):
        group = group.sort_values("client_index")
        ref = results[(results.seed == seed) & (results.strategy == "global_model")].sort_values("client_index")
        reference = ref.global_acc.to_numpy() if len(ref) == len(group) and strategy != "global_model" else None
        extra = {c: float(group[c].astype(float).mean()) for c in EXTRA_COLUMNS if c in group}
        rows.append({"seed": seed, "strategy": strategy,
                     **summarize_clients(group.local_acc.to_numpy(), group.global_acc.to_numpy(), reference), **extra})
    return pd.DataFrame(rows)


def summary_table(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of each metric, one row per strategy, in first-seen order."""
    per_seed = per_seed_summary(results)
    order = list(dict.fromkeys(per_seed.strategy))
    rows = []
    for strategy in order:
        group = per_seed[per_seed.strategy == strategy]
        row = {"strategy": strategy, "seeds": len(group)}
        for col in METRIC_COLUMNS + tuple(c for c in EXTRA_COLUMNS if c in per_seed):
            values = group[col].to_numpy(float)
            row[col] = float(np.mean(values))
            row[f"{col}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


DISPLAY_NAMES = {"global_model": "global-model", "ft": "FT", "lp": "LP", "lp_ft": "LP-FT",
                 "proximal_ft": "Proximal FT", "sparse_ft": "Sparse FT", "soup_ft": "Soup FT",
                 "lss_ft": "LSS FT", "lora": "LoRA", "lp_lora": "LP-LoRA", "surgical_ft": "Surgical FT",
                 "bn_adapt": "BN-adapt"}


def format_markdown(summary: pd.DataFrame) -> str:
    """The summary as a Markdown table, accuracies in %, 'mean (std)'."""
    extras = [c for c in EXTRA_COLUMNS if c in summary and summary[c].notna().any()]
    headers = ["strategy", "Local", "Global", "C-Std", "Worst", "Avg (L+G)/2", "Avg (L+G+W)/3", "Global < global model"]
    headers += [EXTRA_COLUMNS[c] for c in extras]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for _, r in summary.iterrows():
        cells = [DISPLAY_NAMES.get(r.strategy, r.strategy)] + [f"{100 * r[c]:.2f} ({100 * r[c + '_std']:.2f})" for c in METRIC_COLUMNS[:-1]]
        share = r["below_global_share"]
        cells.append("-" if np.isnan(share) else f"{100 * share:.0f}%")
        cells += [f"{r[c]:.3g} ({r[c + '_std']:.2g})" for c in extras]  # feature units, not %
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
