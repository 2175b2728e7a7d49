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
Across seeds, tables show mean (std) with the sample std (ddof=1); one seed shows the value alone, said once.

Global estimated on a sample (``run.global_eval_clients``, issue 26): each model is scored on a seeded uniform
sample, without replacement, of K of the N-1 other clients' test splits (:func:`global_estimate`: the sample mean,
unbiased for the mean over all N-1, with its finite-population-corrected standard error). The cross-client matrix
is then only partly scored (NaN elsewhere): C-Std (matrix), Worst (matrix) and Avg (L+G+W_matrix)/3 are NaN,
not computed over the scored entries, because a minimum over a sample only bounds the matrix's minimum from
above and the scored entries over-weight the diagonal; neither estimates the full-matrix statistic.
Every column's one-line legend is :data:`COLUMN_LEGEND`, printed under every summary table.
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


def global_estimate(acc_row: list[float] | np.ndarray, sample: list[int]) -> tuple[float, float]:
    """Global estimated from a model's accuracies on ``sample``: K distinct other clients drawn uniformly without
    replacement from the N-1 others (``len(acc_row)`` = N). Returns the sample mean, unbiased for the mean over all
    N-1 others, and its standard error with the finite-population correction,
    SE = sqrt((1 - K/(N-1)) * s^2 / K), s^2 the sample variance (ddof=1) of the K accuracies (0 when K = N-1,
    NaN when K = 1: one value has no variance)."""
    row, others = np.asarray(acc_row, dtype=float), len(acc_row) - 1
    values = row[np.asarray(sample, dtype=int)]
    k = len(values)
    if not 1 <= k <= others or len(set(sample)) != k:
        raise ValueError(f"sample={list(sample)} must be 1..{others} distinct other clients")
    se = np.sqrt((1 - k / others) * values.var(ddof=1) / k) if k > 1 else np.nan
    return float(values.mean()), float(se)


def combined_se(errors: np.ndarray | list[float]) -> float:
    """Standard error of the mean of independent estimates with these standard errors: sqrt(sum SE^2) / n (the
    samples of different clients and seeds are drawn independently)."""
    errors = np.asarray(errors, dtype=float)
    return float(np.sqrt(np.sum(errors ** 2)) / len(errors)) if len(errors) else float("nan")


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
        estimate = {}
        if "global_acc_se" in group:  # a sampled Global: no full matrix to summarize (module docstring)
            matrix = None
            estimate = {"global_se": combined_se(group.global_acc_se), **sample_size(group)}
        rows.append({"seed": seed, "strategy": strategy, **summarize_clients(
            group.local_acc.to_numpy(), group.global_acc.to_numpy(), reference, matrix), **extra, **estimate})
    return pd.DataFrame(rows)


def sample_size(rows: pd.DataFrame) -> dict:
    """``global_k`` (other clients scored per model) and ``global_others`` (N-1) of rows with a sampled Global."""
    first = rows.iloc[0]
    return {"global_k": len(first.global_sample), "global_others": len(first.acc_by_client) - 1}


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
        if "global_se" in per_seed:  # the mean over seeds of independent estimates
            row |= {"global_se": combined_se(group.global_se), "global_k": int(group.global_k.iloc[0]),
                    "global_others": int(group.global_others.iloc[0])}
        rows.append(row)
    return pd.DataFrame(rows)


GLOBAL_MODEL_LABEL = "global-model"


def strategy_label(strategy: str, global_label: str = GLOBAL_MODEL_LABEL) -> str:
    """A results row's strategy as tables show it: the registered display name, ``global_label`` for the
    global model's rows (arXiv 2511.12695, Table 2 lists the methods by these names)."""
    return global_label if strategy == "global_model" else display_name(strategy)


# One line per column of the summary table: the only copy of the legend printed under it (console,
# summary.md, report.md, model and dataset cards all render it through format_markdown).
COLUMN_LEGEND = {
    "Local": "client i's model on client i's own test split (accuracy %), mean over clients",
    "Global": "client i's model on the *other* clients' test splits (own split excluded), mean over clients",
    "C-Std (Local)": "std of Local across clients (population std): how unevenly clients are served",
    "Worst (Local)": "the lowest Local of any client",
    "C-Std (matrix)": "std over every entry of the cross-client matrix (model i on test split j, all i, j), "
                      "as the paper's Table 2",
    "Worst (matrix)": "the lowest entry of the cross-client matrix",
    "Avg (L+G)/2": "(Local + Global) / 2",
    "Avg (L+G+W_local)/3": "(Local + Global + Worst (Local)) / 3",
    "Avg (L+G+W_matrix)/3": "(Local + Global + Worst (matrix)) / 3, the form the paper's printed table satisfies",
    "Global < global model": "share of clients whose Global fell below the FedAvg global model's Global on the "
                             "same client ('-' for the global model itself)",
    "Δ own": "feature distortion ‖f(θ_G; x) − f(θ_c; x)‖₂ at the head's input on the own test split, in "
             "feature units (global model: 0 by definition)",
    "Δ others": "the same feature distortion on the other clients' test splits",
}


def _cell(mean: float, std: float, *, scale: float, spec: str, with_std: bool, std_spec: str | None = None) -> str:
    """``mean (std)``, or the mean alone when there is no spread to show (one seed)."""
    text = f"{scale * mean:{spec}}"
    return f"{text} ({scale * std:{std_spec or spec}})" if with_std else text


def spread_note(seeds: int) -> str:
    """What the cells of a table over ``seeds`` seeds hold (said once, not in every cell)."""
    if seeds <= 1:
        return "1 seed, so each cell is one value (no std)."
    return f"mean (std) over {seeds} seeds (sample std)."


def estimate_note(k: int, others: int) -> str:
    """The sentence that says Global is an estimate (summary.md, report.md, cards), with K and N-1."""
    return (f"**Global is an estimate**: each model (and the global model) is scored on a seeded sample of {k} of "
            f"the {others} other clients' test splits (uniform, without replacement; the same {k} for every strategy "
            "of a client and seed); ± is its standard error (finite-population corrected, over clients and seeds). "
            "C-Std (matrix), Worst (matrix) and Avg (L+G+W_matrix)/3 are nan: the cross-client matrix is only "
            "partly scored (run.global_eval_clients).")


def format_legend(headers: list[str] | tuple[str, ...], *, seeds: int, estimate: tuple[int, int] | None = None) -> str:
    """The legend of a summary table with ``headers``: one line per column, from :data:`COLUMN_LEGEND`;
    ``estimate`` = (K, N-1) when Global was estimated on a sample."""
    lines = [f"Cells: {spread_note(seeds)}"] + ([estimate_note(*estimate)] if estimate else [])
    lines += [f"- **{h}**: {COLUMN_LEGEND[h]}" for h in headers if h in COLUMN_LEGEND]
    return "\n".join(lines)


def estimated(summary: pd.DataFrame) -> tuple[int, int] | None:
    """(K, N-1) when the summary's Global is an estimate on a sample of the other clients, else None (exact)."""
    if "global_se" not in summary or not len(summary) or summary["global_k"].isna().all():
        return None
    first = summary.dropna(subset=["global_k"]).iloc[0]
    return int(first.global_k), int(first.global_others)


def format_markdown(summary: pd.DataFrame, *, legend: bool = True) -> str:
    """The summary as a Markdown table, accuracies in %, 'mean (std)' over seeds (the value alone for one
    seed), followed by the legend of its columns unless ``legend=False``."""
    extras = [c for c in EXTRA_COLUMNS if c in summary and summary[c].notna().any()]
    headers = ["strategy", *METRIC_HEADERS] + [EXTRA_COLUMNS[c] for c in extras]
    seeds = int(summary["seeds"].max()) if "seeds" in summary and len(summary) else 1
    many, sampled = seeds > 1, estimated(summary)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for _, r in summary.iterrows():
        cells = [strategy_label(r.strategy)] + [_cell(r[c], r[c + "_std"], scale=100, spec=".2f", with_std=many)
                                                for c in METRIC_COLUMNS[:-1]]
        if sampled:
            cells[2] += f" ± {100 * r.global_se:.2f}"
        share = r["below_global_share"]
        cells.append("-" if np.isnan(share) else f"{100 * share:.0f}%")
        cells += [_cell(r[c], r[c + "_std"], scale=1, spec=".3g", std_spec=".2g", with_std=many)
                  for c in extras]  # feature units, not %
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    return table + "\n\n" + format_legend(headers, seeds=seeds, estimate=sampled) if legend else table


def split_exemptions(descriptions: dict[str, dict], *, batchnorm: bool = True) -> dict[str, str]:
    """Strategies the BatchNorm / weights split of the Global drop does not apply to, with the reason.

    ``descriptions``: ``Strategy.describe()`` per strategy (the run record's ``run_info.strategies``). The split
    charges every method with BN-adapt's drop from re-estimating BatchNorm statistics; a strategy whose phases
    all keep BatchNorm frozen (``Phase.bn == "frozen"``, e.g. LP) never re-estimates them, so its whole drop is
    its weights' and the split would mislead. ``batchnorm=False`` (the backbone has no BatchNorm layer): no
    strategy has statistics to re-estimate, so the split applies to none.
    """
    if not batchnorm:
        return {name: "the backbone has no BatchNorm layer, so there are no statistics to re-estimate"
                for name in descriptions}
    out = {}
    for name, desc in descriptions.items():
        phases = desc.get("phases") or []
        if phases and all(p.get("bn") == "frozen" for p in phases):
            out[name] = "BatchNorm statistics stay frozen in every phase, so no part of its drop is BN-adapt's"
    return out


def global_drop_split(results: pd.DataFrame, *, exempt: dict[str, str] | None = None) -> pd.DataFrame:
    """Where Global goes: per (seed, client) row, the drop from the global model's Global split into the part
    BatchNorm re-estimation alone explains and the rest (weight drift).

    ``global_drop`` = Global(global model) − Global(strategy); ``global_drop_bn`` = Global(global model) −
    Global(bn_adapt) on the same client and seed (the BN-adapt reference re-estimates the BatchNorm
    statistics on the client's data and changes no weight); ``global_drop_weights`` = ``global_drop`` −
    ``global_drop_bn`` = Global(bn_adapt) − Global(strategy). Positive = Global lost. NaN where the run has
    no ``global_model`` or ``bn_adapt`` row for that client (add ``bn_adapt`` to ``pft.strategies``), and in
    the two split columns for the strategies of ``exempt`` (:func:`split_exemptions`; ``global_drop`` stays).
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
    skip = results.strategy.isin(list(exempt or {})).to_numpy()
    out.loc[skip, ["global_drop_bn", "global_drop_weights"]] = np.nan
    return out


def drop_split_table(results: pd.DataFrame, *, exempt: dict[str, str] | None = None) -> pd.DataFrame:
    """Mean over clients, then mean and std over seeds, of the Global-drop split per strategy (points, not %);
    ``reason`` says why a strategy of ``exempt`` is not split (empty where it is)."""
    cols = ["global_drop", "global_drop_bn", "global_drop_weights"]
    split = global_drop_split(results, exempt=exempt)
    split = split[~split.strategy.isin(["global_model"])]
    per_seed = split.groupby(["strategy", "seed"], sort=False)[cols].mean().reset_index()
    agg = per_seed.groupby("strategy", sort=False)[cols].agg(["mean", "std"])
    agg.columns = [f"{c}_{s}" for c, s in agg.columns]
    agg["seeds"] = per_seed.groupby("strategy", sort=False).seed.nunique()
    agg["reason"] = [(exempt or {}).get(s, "") for s in agg.index]
    return agg.reset_index()


def format_drop_split(table: pd.DataFrame) -> str:
    """The Global-drop split as a Markdown table (accuracy points); n/a with the reason where it does not apply."""
    lines = ["| strategy | Global drop | of which BN statistics | of which weights |", "|---|---|---|---|"]
    for _, r in table.iterrows():
        many = r.get("seeds", 2) > 1
        cells = [_cell(r[f"{c}_mean"], np.nan_to_num(r[f"{c}_std"]), scale=100, spec=".2f", with_std=many)
                 for c in ("global_drop", "global_drop_bn", "global_drop_weights")]
        if r.get("reason"):
            cells[1:] = [f"n/a: {r.reason}", "n/a"]
        lines.append(f"| {strategy_label(r.strategy)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
