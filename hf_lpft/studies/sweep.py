"""The one sweep helper every study uses: layered configs, runs, and the per-seed LP-FT − FT table.

A sweep point's config is layered section by section and key by key (a mapping value such as
``pft.strategy_args`` is replaced whole): defaults -> base -> point -> (``quick``) -> command-line overrides,
with ``run.resume`` on so an interrupted sweep continues. The headline number of every study is LP-FT − FT
(arXiv 2511.12695, Table 2) on Local and on Global: the mean over seeds of the per-seed difference of client
means, with the sample std over seeds (0 for one seed).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from hf_lpft.config import ExperimentConfig, load_config
from hf_lpft.evaluation.metrics import strategy_label

logger = logging.getLogger(__name__)

GLOBAL_MODEL = "global model"  # how study tables name the global model's rows


def merge_layers(*layers: dict) -> dict:
    """Config layers merged section by section, key by key; later layers win (None layers are skipped)."""
    merged: dict[str, dict] = {}
    for layer in layers:
        for section, values in (layer or {}).items():
            merged.setdefault(section, {}).update(values or {})
    return merged


def sweep_config(base: dict, point: dict, *, output_dir: Path, quick: bool = False,
                 overrides: dict | None = None) -> ExperimentConfig:
    """The validated config of one sweep point; ``quick`` = first seed only and a third of the FedAvg rounds."""
    layers = [base, point]
    if quick:
        cfg = load_config(None, merge_layers(*layers))
        layers.append({"run": {"seeds": cfg.run.seeds[:1]}, "fedavg": {"rounds": max(1, cfg.fedavg.rounds // 3)}})
    run = {"run": {"output_dir": str(output_dir), "resume": True}}  # an interrupted sweep continues
    return load_config(None, merge_layers(*layers, overrides or {}, run))


def run_point(cfg: ExperimentConfig, *, accelerator=None) -> pd.DataFrame:
    """One sweep point through the pipeline; its per-client results."""
    from hf_lpft.pipeline import run  # the driver sits below the studies

    return run(cfg, accelerator=accelerator).results


def per_seed(results: pd.DataFrame) -> pd.DataFrame:
    """Client means per (condition, seed, strategy); rows of failed clients are left out."""
    ok = results[results["error"].isna()] if "error" in results else results
    cols = [c for c in ("local_acc", "global_acc", "distortion_local", "distortion_global") if c in ok]
    return ok.groupby(["condition", "seed", "strategy"], sort=False)[cols].mean().reset_index()


def mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and sample std (0 for one value) of the finite values; NaN, NaN when there are none."""
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def verdict(mean: float, std: float, seeds: int) -> str:
    """Which of LP-FT and FT kept more Global beyond one std over seeds (one seed: the sign only, marked)."""
    if np.isnan(mean):
        return "-"
    said = "LP-FT higher" if mean - std > 0 else "FT higher" if mean + std < 0 else "within noise"
    return said + (" (1 seed)" if seeds == 1 else "")


def lpft_minus_ft(by: dict[str, pd.DataFrame]) -> dict:
    """LP-FT − FT over the seeds both ran (``by``: strategy -> per-seed client means indexed by seed): the
    seed count, then Local and Global mean and std (:func:`verdict` reads the Global pair)."""
    paired = sorted(set(by["ft"].index) & set(by["lp_ft"].index)) if {"ft", "lp_ft"} <= set(by) else []
    row: dict = {"seeds": len(paired)}
    for metric in ("local", "global"):
        diff = (by["lp_ft"].loc[paired, f"{metric}_acc"] - by["ft"].loc[paired, f"{metric}_acc"]).to_numpy(float) \
            if paired else np.array([])
        row[f"lpft_minus_ft_{metric}"], row[f"lpft_minus_ft_{metric}_std"] = mean_std(diff)
    return row


def strategy_means(by: dict[str, pd.DataFrame], strategies, metrics=("local_acc", "global_acc")) -> dict:
    """``<strategy>_<metric>``: the mean over seeds of each strategy's client means (NaN when absent)."""
    return {f"{s}_{m}": float(by[s][m].mean()) if s in by and m in by[s] else float("nan")
            for s in strategies for m in metrics}


def label(strategy: str) -> str:
    """A strategy as study tables name it: its registered display name, "global model" for the global model."""
    return strategy_label(strategy, GLOBAL_MODEL)


def pct(x: float) -> str:
    """An accuracy fraction in percent with one decimal, ``-`` for NaN."""
    return "-" if np.isnan(x) else f"{round(100 * x, 1) + 0.0:.1f}"  # + 0.0: no "-0.0"


def diff_cell(table_row, metric: str) -> str:
    """``+d.dd (s.ss)``: LP-FT − FT on ``metric`` in points, std over seeds in brackets; ``-`` when not paired."""
    mean = table_row[f"lpft_minus_ft_{metric}"]
    return "-" if np.isnan(mean) else f"{100 * mean:+.2f} ({100 * table_row[f'lpft_minus_ft_{metric}_std']:.2f})"


def sweep_parser(doc: str, *, folder: str, folder_help: str, name: str, collect_help: str | None = None):
    """The options every sweep recipe shares: ``--folder``, ``--quick``, ``--output_dir`` (default
    ``outputs/<name>``, ``outputs/<name>_quick`` with ``--quick``), ``--log_level`` and, given its help,
    ``--collect`` (tabulate saved results, run nothing); add the recipe's own."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=folder, help=folder_help)
    parser.add_argument("--quick", action="store_true", help="1 seed and a third of the FedAvg rounds.")
    parser.add_argument("--output_dir", default=None, help=f"Default outputs/{name} (outputs/{name}_quick).")
    parser.add_argument("--log_level", default="INFO", help="Log level of hf_lpft.")
    if collect_help:
        parser.add_argument("--collect", action="store_true", help=collect_help)
    parser.set_defaults(sweep_name=name)
    return parser


def sweep_output(args) -> Path:
    """The output folder a sweep recipe's parsed ``args`` name (see :func:`sweep_parser`)."""
    return Path(args.output_dir or f"outputs/{args.sweep_name}{'_quick' if args.quick else ''}")
