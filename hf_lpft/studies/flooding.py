"""Loss-flooding ablation (Figure 3b of Chen et al., arXiv 2511.12695): Global accuracy at equal local loss.

Flooding (Ishida et al. 2020) trains on |loss - b| + b: gradient ascent once the training loss falls below
the flood level b, so the final local loss is held near b. One full run per level (FedAvg is repeated:
same seed, same global model), flooding the chosen strategies through ``pft.strategy_args.<s>.flood``.
Writes ``<output_dir>/flood_<b>/`` (ordinary run folders) and ``flooding.md`` / ``.csv`` / ``.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from hf_lpft.config import ExperimentConfig, load_config
from hf_lpft.evaluation.metrics import strategy_label
from hf_lpft.evaluation.report import save_figure
from hf_lpft.io import atomic_path, write_text
from hf_lpft.studies.sweep import run_point


def flooded_config(base: ExperimentConfig, flood: float, strategies: list[str]) -> ExperimentConfig:
    """``base`` with only ``strategies`` run, each flooded at ``flood``, into ``<output_dir>/flood_<b>``."""
    d = base.to_dict()
    d["pft"]["strategies"] = strategies
    for s in strategies:
        d["pft"]["strategy_args"].setdefault(s, {})["flood"] = flood
    d["run"]["output_dir"] = str(Path(base.run.output_dir) / f"flood_{flood:g}")
    return load_config(None, d)


def flooding_configs(base: ExperimentConfig, floods: list[float], strategies: list[str]) -> dict[float,
                     ExperimentConfig]:
    """One checked config per flood level: every level's options (flood >= 0, strategy names) fail here,
    before any training."""
    from hf_lpft.run.preflight import build_strategies

    cfgs = {b: flooded_config(base, b, strategies) for b in floods}
    for cfg in cfgs.values():
        build_strategies(cfg)
    return cfgs


def run_flooding(cfgs: dict[float, ExperimentConfig], *, accelerator=None) -> dict[float, pd.DataFrame]:
    """Every flood level's run; its per-client results by level."""
    return {b: run_point(cfg, accelerator=accelerator) for b, cfg in cfgs.items()}


def write_flooding(out: str | Path, results: dict[float, pd.DataFrame]) -> tuple[pd.DataFrame, str]:
    """``flooding.md``, ``flooding.csv`` and ``flooding.png`` in ``out``; returns the table and its Markdown."""
    out = Path(out)
    table = flooding_table(results)
    markdown = flooding_markdown(table)
    write_text(out / "flooding.md", "# Loss flooding: Global accuracy vs final local training loss\n\n"
               + markdown + "\n\n![flooding](flooding.png)\n")
    with atomic_path(out / "flooding.csv") as tmp:
        table.to_csv(tmp, index=False)
    plot_flooding(table, out / "flooding.png")
    return table, markdown


def flooding_table(results_by_flood: dict[float, pd.DataFrame]) -> pd.DataFrame:
    """Loss-flooding ablation (Figure 3b): per (strategy, flood level), mean over clients and seeds of the
    final local training loss (plain cross-entropy of the last epoch), Local, Global and Δ own."""
    rows = []
    for flood, results in results_by_flood.items():
        ok = results[(results.strategy != "global_model") & results.error.isna()]
        for strategy, g in ok.groupby("strategy", sort=False):
            rows.append({"strategy": strategy, "flood": flood, "final_train_loss": g.final_train_loss.mean(),
                         "local_acc": g.local_acc.mean(), "global_acc": g.global_acc.mean(),
                         "distortion_local": g.distortion_local.mean() if "distortion_local" in g else np.nan})
    return pd.DataFrame(rows).sort_values(["strategy", "flood"], kind="stable", ignore_index=True)


def flooding_markdown(table: pd.DataFrame) -> str:
    """The ablation table in Markdown (accuracies in %)."""
    lines = ["| strategy | flood | final train loss | Local | Global | Δ own |", "|---|---|---|---|---|---|"]
    lines += [f"| {strategy_label(r.strategy)} | {r.flood:g} | {r.final_train_loss:.3f} | {100 * r.local_acc:.2f} | "
              f"{100 * r.global_acc:.2f} | {r.distortion_local:.3g} |" for r in table.itertuples()]
    return "\n".join(lines)


def plot_flooding(table: pd.DataFrame, path: Path) -> None:
    """Global accuracy against final local training loss, one line per strategy, points labelled by flood."""
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for k, (strategy, g) in enumerate(table.groupby("strategy", sort=False)):
        ax.plot(g.final_train_loss, 100 * g.global_acc, marker="o", color=f"C{k % 10}", label=strategy_label(strategy))
        for r in g.itertuples():
            ax.annotate(f"b={r.flood:g}", (r.final_train_loss, 100 * r.global_acc), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    ax.set(xlabel="final local training loss", ylabel="Global accuracy (%)", title="Loss flooding")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
