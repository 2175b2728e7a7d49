"""Local / Global / C-Std / Worst / Average, as pure functions over accuracy matrices and records.

Definitions (Chen et al., arXiv 2511.12695, the metrics of Table 2):
- Local: client i's model on client i's own test split.
- Global: the same model's mean accuracy over all *other* clients' test splits (own split excluded).
- C-Std (Local): standard deviation of Local across clients (population std, ddof=0).
- Worst (Local): the lowest Local across clients.
- C-Std (matrix) and Worst (matrix): the same over every entry of the cross-client accuracy matrix (client
  i's model on client j's test split, all i and j). The paper's Table 2 reports these: its Digit5 FT C-Std
  22.93 is above the largest possible std of 5 Local values averaging 91.17, so it cannot be over Local.
- Average (text): (Local + Global) / 2.  Average (table): (Local + Global + Worst) / 3, with Worst (Local)
  (``avg_lgw``) and with Worst (matrix) (``avg_lgw_matrix``, the form the paper's printed table satisfies).
Across seeds, tables show mean (std) with the sample std (ddof=1; 0 for one seed).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hf_lpft.strategies import display_name

METRIC_COLUMNS = ("local", "global", "c_std", "worst", "c_std_matrix", "worst_matrix", "avg_lg", "avg_lgw",
                  "avg_lgw_matrix", "below_global_share")
# Column headers of the printed table, in METRIC_COLUMNS order (accuracies in %, then a share).
METRIC_HEADERS = ("Local", "Global", "C-Std (Local)", "Worst (Local)", "C-Std (matrix)", "Worst (matrix)",
                  "Avg (L+G)/2", "Avg (L+G+W_local)/3", "Avg (L+G+W_matrix)/3", "Global < global model")
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


def summarize_clients(local: np.ndarray, global_: np.ndarray, reference_global: np.ndarray | None = None,
                      matrix: np.ndarray | None = None) -> dict:
    """Across-client metrics of one (seed, strategy).

    Args:
        local: Local accuracy per client.
        global_: Global accuracy per client.
        reference_global: The global model's Global per client; gives the share of clients whose Global
            fell below the global model's.
        matrix: The cross-client accuracy matrix (row i: client i's model on every client's test split);
            gives C-Std and Worst over the matrix (NaN without it).
    """
    local, global_ = np.asarray(local, float), np.asarray(global_, float)
    entries = np.asarray(matrix, float).ravel() if matrix is not None else np.array([np.nan])
    out = {"local": local.mean(), "global": global_.mean(), "c_std": local.std(ddof=0), "worst": local.min(),
           "c_std_matrix": entries.std(ddof=0), "worst_matrix": entries.min()}
    out["avg_lg"] = (out["local"] + out["global"]) / 2
    out["avg_lgw"] = (out["local"] + out["global"] + out["worst"]) / 3
    out["avg_lgw_matrix"] = (out["local"] + out["global"] + out["worst_matrix"]) / 3
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
        matrix = np.stack([np.asarray(a, float) for a in group.acc_by_client]) if "acc_by_client" in group else None
        rows.append({"seed": seed, "strategy": strategy, **summarize_clients(
            group.local_acc.to_numpy(), group.global_acc.to_numpy(), reference, matrix), **extra})
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


GLOBAL_MODEL_LABEL = "global-model"


def strategy_label(strategy: str, global_label: str = GLOBAL_MODEL_LABEL) -> str:
    """A results row's strategy as tables show it: the registered display name, ``global_label`` for the
    global model's rows (arXiv 2511.12695, Table 2 lists the methods by these names)."""
    return global_label if strategy == "global_model" else display_name(strategy)


def format_markdown(summary: pd.DataFrame) -> str:
    """The summary as a Markdown table, accuracies in %, 'mean (std)'."""
    extras = [c for c in EXTRA_COLUMNS if c in summary and summary[c].notna().any()]
    headers = ["strategy", *METRIC_HEADERS] + [EXTRA_COLUMNS[c] for c in extras]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for _, r in summary.iterrows():
        cells = [strategy_label(r.strategy)] + [f"{100 * r[c]:.2f} "
                                                f"({100 * r[c + '_std']:.2f})" for c in METRIC_COLUMNS[:-1]]
        share = r["below_global_share"]
        cells.append("-" if np.isnan(share) else f"{100 * share:.0f}%")
        cells += [f"{r[c]:.3g} ({r[c + '_std']:.2g})" for c in extras]  # feature units, not %
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def global_drop_split(results: pd.DataFrame) -> pd.DataFrame:
    """Where Global goes: per (seed, client) row, the drop from the global model's Global split into the part
    BatchNorm re-estimation alone explains and the rest (weight drift).

    ``global_drop`` = Global(global model) − Global(strategy); ``global_drop_bn`` = Global(global model) −
    Global(bn_adapt) on the same client and seed (the BN-adapt reference re-estimates the BatchNorm
    statistics on the client's data and changes no weight); ``global_drop_weights`` = ``global_drop`` −
    ``global_drop_bn`` = Global(bn_adapt) − Global(strategy). Positive = Global lost. NaN where the run has
    no ``global_model`` or ``bn_adapt`` row for that client (add ``bn_adapt`` to ``pft.strategies``).
    """
    keys = ["seed", "client_id"]
    ref = {name: results[results.strategy == name].set_index(keys).global_acc
           for name in ("global_model", "bn_adapt")}
    index = pd.MultiIndex.from_frame(results[keys])
    g0 = ref["global_model"].reindex(index).to_numpy(float)
    gb = ref["bn_adapt"].reindex(index).to_numpy(float)
    out = results.copy()
    out["global_drop"] = g0 - results.global_acc.to_numpy(float)
    out["global_drop_bn"] = g0 - gb
    out["global_drop_weights"] = gb - results.global_acc.to_numpy(float)
    return out


def drop_split_table(results: pd.DataFrame) -> pd.DataFrame:
    """Mean over clients, then mean and std over seeds, of the Global-drop split per strategy (points, not %)."""
    cols = ["global_drop", "global_drop_bn", "global_drop_weights"]
    split = results if "global_drop" in results else global_drop_split(results)
    split = split[~split.strategy.isin(["global_model"])]
    per_seed = split.groupby(["strategy", "seed"], sort=False)[cols].mean().reset_index()
    agg = per_seed.groupby("strategy", sort=False)[cols].agg(["mean", "std"])
    agg.columns = [f"{c}_{s}" for c, s in agg.columns]
    return agg.reset_index()


def format_drop_split(table: pd.DataFrame) -> str:
    """The Global-drop split as a Markdown table (accuracy points)."""
    lines = ["| strategy | Global drop | of which BN statistics | of which weights |", "|---|---|---|---|"]
    for _, r in table.iterrows():
        cells = [f"{100 * r[f'{c}_mean']:.2f} ({100 * np.nan_to_num(r[f'{c}_std']):.2f})"
                 for c in ("global_drop", "global_drop_bn", "global_drop_weights")]
        lines.append(f"| {strategy_label(r.strategy)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
