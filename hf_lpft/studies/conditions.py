"""When does LP-FT help? A sweep of conditions, each a full pipeline run, tabulated as LP-FT − FT.

A condition is a YAML file of config sections layered over the sweep's ``base.yaml`` (both in
``recipes/configs/conditions/``): defaults -> base -> condition -> (``quick``) -> command-line overrides,
section by section and key by key (a mapping value such as ``pft.strategy_args`` is replaced whole).
Every condition runs the same strategies, so each row of the table has the reference rows beside FT and
LP-FT: the global model, LP (head only) and BN-adapt (BatchNorm statistics only).

The table has one row per condition: LP-FT − FT on Local and on Global, the mean over seeds of the
per-seed difference of client means, with the sample std over seeds (0 for one seed); the Local / Global
of every reference strategy; and feature distortion Δ of FT and LP-FT (own / other clients' test splits)
when the results carry ``distortion_local`` / ``distortion_global`` columns. ``verdict`` says which of
LP-FT and FT kept more Global beyond one std over seeds ("within noise" otherwise; with one seed only
the sign, marked "(1 seed)").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from hf_lpft.config import ExperimentConfig, parse_overrides
from hf_lpft.io import atomic_path, write_text
from hf_lpft.studies.sweep import (
    diff_cell,
    label,
    lpft_minus_ft,
    pct,
    per_seed,
    run_point,
    strategy_means,
    sweep_config,
    verdict,
)

logger = logging.getLogger(__name__)

BASE_NAME = "base.yaml"
REFERENCES = ("global_model", "ft", "lp_ft", "lp", "bn_adapt")


@dataclass
class Condition:
    """One condition of the sweep: its config, or why it cannot run."""

    name: str
    config: ExperimentConfig | None
    skipped: str | None = None


def condition_config(base: dict, condition: dict, *, output_dir: Path, quick: bool = False,
                     overrides: dict | None = None) -> ExperimentConfig:
    """The validated config of one condition (:func:`hf_lpft.studies.sweep.sweep_config`)."""
    return sweep_config(base, condition, output_dir=output_dir, quick=quick, overrides=overrides)


def load_conditions(folder: str | Path, *, output_dir: str | Path, names: list[str] | None = None,
                    quick: bool = False, overrides: list[str] | None = None) -> list[Condition]:
    """Every ``*.yaml`` of ``folder`` but ``base.yaml`` (``baseline`` first, then by name), or ``names``.

    A condition whose config or strategy options do not validate (e.g. a backbone not supported yet,
    ``lp_epochs`` beyond ``pft.epochs``) is kept with the reason in ``skipped``, so one placeholder cannot
    stop the sweep.
    """
    from hf_lpft.run.preflight import build_strategies

    folder = Path(folder)
    base = yaml.safe_load((folder / BASE_NAME).read_text()) or {}
    paths = {p.stem: p for p in folder.glob("*.yaml") if p.name != BASE_NAME}
    unknown = sorted(set(names or []) - set(paths))
    if unknown:
        raise ValueError(f"unknown condition(s) {unknown}; available: {sorted(paths)}")
    order = names or sorted(paths, key=lambda n: (n != "baseline", n))
    extra = parse_overrides(overrides or [])
    out = []
    for name in order:
        try:
            cfg = condition_config(base, yaml.safe_load(paths[name].read_text()) or {},
                                   output_dir=Path(output_dir) / name, quick=quick, overrides=extra)
            build_strategies(cfg)
            out.append(Condition(name, cfg))
        except ValueError as err:  # ConfigError and friends
            out.append(Condition(name, None, f"config: {err}"))
    return out


def run_conditions(conditions: list[Condition], *, accelerator=None) -> pd.DataFrame:
    """Run every runnable condition through the pipeline; per-client results with a ``condition`` column.

    A condition that fails while running is logged and marked ``skipped`` (the others still run).
    """
    frames = []
    for c in conditions:
        if c.config is None:
            logger.warning("condition %s skipped: %s", c.name, c.skipped)
            continue
        logger.info("condition %s -> %s", c.name, c.config.run.output_dir)
        try:
            frames.append(run_point(c.config, accelerator=accelerator).assign(condition=c.name))
        except Exception as err:  # noqa: BLE001 - a sweep reports a failed condition and goes on
            logger.exception("condition %s failed", c.name)
            c.skipped = f"failed: {type(err).__name__}: {err}"
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def condition_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per condition (first-seen order): LP-FT − FT on Local / Global (mean, std over seeds), the
    reference strategies' Local / Global, and FT / LP-FT distortion when the results have it."""
    per = per_seed(results)
    rows = []
    for condition in dict.fromkeys(per.condition):
        group = per[per.condition == condition]
        by = {s: g.set_index("seed") for s, g in group.groupby("strategy")}
        row = {"condition": condition} | lpft_minus_ft(by) | strategy_means(by, REFERENCES) \
            | strategy_means(by, ("ft", "lp_ft"), ("distortion_local", "distortion_global"))
        row["verdict"] = verdict(row["lpft_minus_ft_global"], row["lpft_minus_ft_global_std"], row["seeds"])
        rows.append(row)
    return pd.DataFrame(rows)


def _pair(a: float, b: float, fmt=pct) -> str:
    return "-" if np.isnan(a) and np.isnan(b) else f"{fmt(a)} / {fmt(b)}"


def format_condition_table(table: pd.DataFrame, skipped: dict[str, str] | None = None) -> str:
    """The table as Markdown: accuracies in % as Local / Global, differences as mean (std) in points."""
    heads = ["condition", "seeds", "LP-FT − FT Local", "LP-FT − FT Global", "verdict (Global)"] + \
        [f"{label(s)} L / G" for s in REFERENCES] + ["Δ FT own / other", "Δ LP-FT own / other"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for _, r in table.iterrows():
        diffs = [diff_cell(r, m) for m in ("local", "global")]
        refs = [_pair(r[f"{s}_local_acc"], r[f"{s}_global_acc"]) for s in REFERENCES]
        dist = [_pair(r[f"{s}_distortion_local"], r[f"{s}_distortion_global"],
                      fmt=lambda x: "-" if np.isnan(x) else f"{x:.3g}") for s in ("ft", "lp_ft")]
        lines.append("| " + " | ".join([r.condition, str(r.seeds), *diffs, r.verdict, *refs, *dist]) + " |")
    for name, reason in (skipped or {}).items():
        lines.append(f"\nSkipped: **{name}** ({reason})")
    return "\n".join(lines)


def plot_conditions(table: pd.DataFrame, path: str | Path) -> Path:
    """Bars of LP-FT − FT on Global and on Local per condition, error bars = std over seeds (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(table) + 1.5), sharey=True)
    y = np.arange(len(table))
    for ax, metric in zip(axes, ("global", "local")):
        ax.barh(y, 100 * table[f"lpft_minus_ft_{metric}"], xerr=100 * table[f"lpft_minus_ft_{metric}_std"],
                color=["tab:green" if v > 0 else "tab:red" for v in table[f"lpft_minus_ft_{metric}"]])
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(f"LP-FT − FT, {metric.capitalize()} (points)")
    axes[0].set_yticks(y, table.condition)
    axes[0].invert_yaxis()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(path)


def write_conditions(out: str | Path, results: pd.DataFrame, conditions: list[Condition]) -> tuple[pd.DataFrame, str]:
    """``conditions.parquet`` (the table), ``conditions.md`` and ``conditions.png`` in ``out``."""
    out = Path(out)
    table = condition_table(results) if len(results) else pd.DataFrame(columns=["condition"])
    with atomic_path(out / "conditions.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    markdown = format_condition_table(table, {c.name: c.skipped for c in conditions if c.skipped})
    write_text(out / "conditions.md", markdown + "\n")
    if len(table):
        plot_conditions(table, out / "conditions.png")
    return table, markdown
