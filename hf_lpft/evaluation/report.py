"""``report.md`` of a run folder: the summary table, then the paper's analyses as PNG figures.

Reads what :func:`hf_lpft.pipeline.run` wrote (``results.parquet``; ``curves.parquet`` when
``pft.eval_every > 0``; ``cross_client.parquet``, else the ``acc_by_client`` column) and writes
``report.md`` plus ``figures/*.png``; every file is written atomically. Figures (Chen et al.,
arXiv 2511.12695):

* ``distortion_vs_global.png`` -- feature distortion Δ against Global accuracy per method (Figure 3a).
* ``epoch_curves.png`` -- Local, Global (and Δ) against personalization epochs (Figure 2); epoch 0 is the
  global model. Epochs are counted across phases (LP-FT: probing epochs first) and, for soups, across
  ingredients.
* ``cross_client.png`` -- client i's model on client j's test split, one heatmap per method.

Matplotlib runs through the Agg canvas on ``Figure`` objects (no pyplot state, no display needed).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hf_lpft.evaluation.metrics import (
    drop_split_table,
    format_drop_split,
    format_markdown,
    split_exemptions,
    spread_note,
    strategy_label,
    summary_table,
)
from hf_lpft.io import atomic_path, write_text
from hf_lpft.layout import RunLayout


def _name(strategy: str) -> str:
    return strategy_label(strategy)


def cross_client_frame(results: pd.DataFrame) -> pd.DataFrame:
    """Long table of the cross-client matrix: one row per (seed, strategy, model client, data client); with a
    sampled Global (a ``global_sample`` column), only the pairs scored (own split and the sample): linear in N."""
    ids = results.drop_duplicates("client_index").set_index("client_index").client_id.to_dict()
    sampled = "global_sample" in results

    def pairs(r) -> list[tuple[int, float]]:
        accs = list(enumerate(r.acc_by_client))
        return [accs[j] for j in sorted({r.client_index, *r.global_sample})] if sampled else accs
    rows = [{"seed": r.seed, "strategy": r.strategy, "model_client": r.client_id, "model_index": r.client_index,
             "data_client": ids.get(j, str(j)), "data_index": j, "accuracy": float(a)}
            for r in results.itertuples() for j, a in pairs(r)]
    return pd.DataFrame(rows, columns=["seed", "strategy", "model_client", "model_index", "data_client",
                                       "data_index", "accuracy"])


def save_figure(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def plot_distortion_vs_global(results: pd.DataFrame, path: Path) -> bool:
    """Δ (own split, other splits) against Global accuracy: small dots per client, large per method mean."""
    ok = results[results.distortion_local.notna()] if "distortion_local" in results else results.iloc[:0]
    if ok.empty:
        return False
    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, col, label in zip(axes, ("distortion_local", "distortion_global"),
                              ("Δ on the own test split", "Δ on the other clients' test splits")):
        for k, (strategy, g) in enumerate(ok.groupby("strategy", sort=False)):
            color = f"C{k % 10}"
            ax.scatter(g[col], 100 * g.global_acc, s=14, alpha=0.35, color=color)
            ax.scatter(g[col].mean(), 100 * g.global_acc.mean(), s=110, color=color, edgecolor="k",
                       label=_name(strategy))
        ax.set(xlabel=f"feature distortion {label}", title=f"Global accuracy vs {label}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Global accuracy (%)")
    axes[1].legend(fontsize=8)
    save_figure(fig, path)
    return True


def plot_epoch_curves(curves: pd.DataFrame, results: pd.DataFrame, path: Path) -> bool:
    """Mean over clients and seeds of Local, Global (and Δ own) per epoch, one line per method."""
    if curves is None or curves.empty:
        return False
    cols = [("local_acc", "Local accuracy (%)", 100), ("global_acc", "Global accuracy (%)", 100)]
    if "distortion_local" in curves and curves.distortion_local.notna().any():
        cols.append(("distortion_local", "Δ on the own test split", 1))
    start = results[results.strategy == "global_model"]
    fig = Figure(figsize=(5 * len(cols), 4))
    axes = fig.subplots(1, len(cols))
    for k, (strategy, g) in enumerate(curves.groupby("strategy", sort=False)):
        mean = g.groupby("epoch")[[c for c, _, _ in cols]].mean()
        for ax, (col, _, scale) in zip(axes, cols):
            first = {"local_acc": start.local_acc.mean(), "global_acc": start.global_acc.mean(),
                     "distortion_local": 0.0}[col] if len(start) else np.nan
            x, y = np.r_[0, mean.index.to_numpy()], scale * np.r_[first, mean[col].to_numpy()]
            ax.plot(x, y, marker="o", ms=3, color=f"C{k % 10}", label=_name(strategy))
    for ax, (_, label, _) in zip(axes, cols):
        ax.set(xlabel="personalization epoch (0 = global model)", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(fig, path)
    return True


def cross_client_matrix(cross: pd.DataFrame, strategy: str) -> pd.DataFrame:
    """Mean over seeds of the accuracy of client i's model (rows) on client j's test split (columns), by client id."""
    names = dict(zip(cross.data_index, cross.data_client)) | dict(zip(cross.model_index, cross.model_client))
    m = cross[cross.strategy == strategy].pivot_table(index="model_index", columns="data_index", values="accuracy",
                                                     aggfunc="mean", dropna=False)
    return m.rename(index=names, columns=names).rename_axis(index="model_client", columns="data_client")


def _short(label: object, width: int = 14) -> str:
    """A tick label cut to ``width`` characters (long client ids would run into the next panel)."""
    text = str(label)
    return text if len(text) <= width else text[:width - 1] + "…"


def plot_cross_client(cross: pd.DataFrame, path: Path) -> bool:
    """One heatmap per method of accuracy (%) of client i's model (rows) on client j's test split (columns).

    Constrained layout keeps tick labels, axis labels and the shared colorbar apart; panels grow with the
    number of clients, axis labels are drawn once per row / column and cell values only up to 15 clients.
    """
    if cross.empty:
        return False
    strategies = list(dict.fromkeys(cross.strategy))
    ncols = min(3, len(strategies))
    nrows = -(-len(strategies) // ncols)
    n = max(cross.model_index.nunique(), cross.data_index.nunique())
    side = max(3.4, 0.32 * n + 2.2)
    fig = Figure(figsize=(side * ncols + 1.2, side * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for k, (ax, strategy) in enumerate(zip(axes, strategies)):
        m = cross_client_matrix(cross, strategy)
        image = ax.imshow(100 * m.to_numpy(), vmin=0, vmax=100, cmap="viridis")
        for (i, j), v in np.ndenumerate(100 * m.to_numpy()) if n <= 15 else ():
            ax.text(j, i, "-" if np.isnan(v) else f"{v:.0f}", ha="center", va="center", fontsize=7,
                    color="w" if v < 60 else "k")
        ax.set_xticks(range(m.shape[1]), [_short(c) for c in m.columns], rotation=45, ha="right",
                      rotation_mode="anchor", fontsize=7)
        ax.set_yticks(range(m.shape[0]), [_short(c) for c in m.index], fontsize=7)
        ax.set_title(_name(strategy), fontsize=9)
        if k % ncols == 0:
            ax.set_ylabel("model of client")
        if k >= len(strategies) - ncols:
            ax.set_xlabel("test split of client")
    for ax in axes[len(strategies):]:
        ax.axis("off")
    fig.colorbar(image, ax=list(axes[:len(strategies)]), shrink=0.8, label="accuracy (%)")
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return True


def epoch_table(curves: pd.DataFrame | None, results: pd.DataFrame) -> str:
    """Markdown: mean Local / Global (%) of each method at epoch 0 (global model), its first and last logged epoch."""
    if curves is None or curves.empty:
        return ""
    start = results[results.strategy == "global_model"]
    lines = ["| strategy | epoch | Local | Global |", "|---|---|---|---|"]
    if len(start):
        lines.append(f"| global model | 0 | {100 * start.local_acc.mean():.2f} | {100 * start.global_acc.mean():.2f} |")
    for strategy, g in curves.groupby("strategy", sort=False):
        mean = g.groupby("epoch")[["local_acc", "global_acc"]].mean()
        for epoch in dict.fromkeys([mean.index.min(), mean.index.max()]):
            r = mean.loc[epoch]
            lines.append(f"| {_name(strategy)} | {epoch} | {100 * r.local_acc:.2f} | {100 * r.global_acc:.2f} |")
    return "\n".join(lines)


def _read(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.is_file() else None


def drop_split_section(ok: pd.DataFrame, exempt: dict[str, str] | None = None) -> list[str]:
    """Where Global goes: the drop from the global model split into BatchNorm statistics and weights;
    ``exempt`` (:func:`hf_lpft.evaluation.metrics.split_exemptions`) names the strategies it does not apply to."""
    seeds = ok.seed.nunique()
    head = ["", f"## Where Global goes (accuracy points, {spread_note(seeds)[:-1]})", ""]
    methods = set(ok.strategy) - {"global_model", "bn_adapt"}
    if methods and methods <= set(exempt or {}):  # e.g. a backbone without BatchNorm: no method to split
        return head + ["Not split: " + "; ".join(sorted({exempt[m] for m in methods})) + "."]
    if not {"global_model", "bn_adapt"} <= set(ok.strategy):
        return head + ["Not split: the run has no bn_adapt rows (add bn_adapt to pft.strategies)."]
    table = drop_split_table(ok, exempt=exempt)
    table = table[table.strategy != "bn_adapt"]
    return head + [format_drop_split(table), "", "Global drop = Global(global model) − Global(method), per client; "
                   "of which BN statistics = the drop of BN-adapt (statistics re-estimated on the client's data, no "
                   "weight changed) on the same client; of which weights = the rest. n/a: the method never "
                   "re-estimates BatchNorm statistics, so its whole drop comes from its weights."]


def has_batchnorm(root: Path) -> bool:
    """Whether the run's saved global model holds BatchNorm statistics (``running_mean`` tensors; read from the
    safetensors header only). True when no global model is saved yet: the split is then made as usual."""
    from safetensors import safe_open

    files = sorted(Path(root, "global").rglob("model.safetensors"))
    if not files:
        return True
    with safe_open(str(files[0]), framework="pt") as f:
        return any(key.endswith("running_mean") for key in f.keys())


def _exemptions(layout: RunLayout) -> dict[str, str]:
    """Strategies the Global-drop split does not apply to, from the run record's phases (none without a record)."""
    if not layout.record.is_file():
        return {}
    record = json.loads(layout.record.read_text())
    return split_exemptions(record.get("run_info", {}).get("strategies", {}), batchnorm=has_batchnorm(layout.root))


def write_report(layout: RunLayout) -> Path:
    """Write ``report.md`` and ``figures/*.png`` for the finished run folder of ``layout`` (its run-level files
    only: ``RunLayout.without_seeds(folder)`` will do); returns the report's path."""
    out = layout.root
    results = pd.read_parquet(layout.results)
    ok = results[results.error.isna()] if "error" in results else results
    curves = _read(layout.curves)
    cross = _read(layout.cross_client)
    cross = cross if cross is not None else cross_client_frame(results)
    fig_dir = layout.figures
    seeds = ok.seed.nunique()
    parts = [f"# Run report: {out.name}", "",
             f"## Summary (accuracy %, {spread_note(seeds)[:-1]})", "", format_markdown(summary_table(ok))]
    failed = results[results.error.notna()] if "error" in results else results.iloc[:0]
    if len(failed):
        parts += ["", "Failed units (excluded): " + ", ".join(
            f"{r.strategy}/{r.client_id}/seed {r.seed}: {r.error}" for r in failed.itertuples())]
    parts += drop_split_section(ok, _exemptions(layout))
    parts += ["", "## Feature distortion vs Global accuracy (Figure 3a analogue)", ""]
    parts.append("![distortion vs Global](figures/distortion_vs_global.png)"
                 if plot_distortion_vs_global(ok, fig_dir / "distortion_vs_global.png")
                 else "Not measured (run.distortion is off).")
    parts += ["", "## Epoch curves (Figure 2 analogue)", ""]
    if plot_epoch_curves(curves, ok, fig_dir / "epoch_curves.png"):
        parts += ["![epoch curves](figures/epoch_curves.png)", "", epoch_table(curves, ok)]
    else:
        parts.append("Not recorded: set pft.eval_every > 0 to log Local and Global every k epochs.")
    parts += ["", "## Cross-client accuracy (model of client i on the test split of client j)", ""]
    parts.append("![cross-client accuracy](figures/cross_client.png)"
                 if plot_cross_client(cross, fig_dir / "cross_client.png") else "No results.")
    return write_text(layout.report, "\n".join(parts) + "\n")

