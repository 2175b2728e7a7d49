"""Where does LP-FT help? A regime map: LP-FT − FT over normalization x fine-tuning dose x shift.

Chen et al. (arXiv 2511.12695, Table 2) find LP-FT keeps far more Global accuracy than FT; on our digits5 it
does not in the default regime. The map runs one pipeline per cell of three axes (``recipes/configs/regime/
axes.yaml`` layered over ``base.yaml``): the normalization of the backbone (BatchNorm statistics are what FT
changes first on our data), the fine-tuning dose (optimizer, lr, and Kumar et al.'s converged probe with a
10x lower FT-stage lr, arXiv 2202.10054) and the shift (one domain a client, or Dirichlet label skew). Every
cell has the rows FT, LP, LP-FT, Proximal FT and BN-adapt. FedAvg runs once per (normalization, shift, seed)
and is reused by every dose through ``run.fedavg_cache``.
"""

from __future__ import annotations

import itertools
import logging
import time
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
    merge_layers,
    pct,
    per_seed,
    run_point,
    strategy_means,
    sweep_config,
    verdict,
)

logger = logging.getLogger(__name__)

AXES = ("norm", "shift", "dose")
ROWS = ("global_model", "ft", "lp", "lp_ft", "proximal_ft", "bn_adapt")


@dataclass
class Cell:
    """One cell of the map: its axis values, its validated config, and the dose it borrows rows from."""

    norm: str
    shift: str
    dose: str
    config: ExperimentConfig
    rows_from: str | None = None

    @property
    def name(self) -> str:
        return f"{self.norm}/{self.shift}/{self.dose}"


def load_cells(folder: str | Path, *, output_dir: str | Path, quick: bool = False,
               overrides: list[str] | None = None) -> list[Cell]:
    """Every cell of ``axes.yaml`` x ``base.yaml`` (norm, shift, dose order); a bad cell fails here, before any run."""
    folder, out = Path(folder), Path(output_dir)
    base = yaml.safe_load((folder / "base.yaml").read_text()) or {}
    axes = yaml.safe_load((folder / "axes.yaml").read_text()) or {}
    missing = [a for a in AXES if not axes.get(a)]
    if missing:
        raise ValueError(f"{folder / 'axes.yaml'} lacks the axis/axes {missing}; it needs {list(AXES)}")
    extra = merge_layers(parse_overrides(overrides or []), {"run": {"fedavg_cache": str(out / "fedavg_cache")}})
    cells = []
    for norm, shift, dose in itertools.product(*(axes[a] for a in AXES)):
        layer = dict(axes["dose"][dose] or {})
        rows_from = layer.pop("rows_from", None)
        cfg = sweep_config(base, merge_layers(axes["norm"][norm] or {}, axes["shift"][shift] or {}, layer),
                               output_dir=out / norm / shift / dose.replace("/", "_"), quick=quick, overrides=extra)
        cells.append(Cell(norm, shift, dose, cfg, rows_from))
    for cell in cells:
        check_reuse(cell, cells)
    return cells


def select_cells(cells: list[Cell], patterns: str | None) -> list[Cell]:
    """The cells whose name matches one of the comma-separated glob ``patterns`` (all when None), plus the cells
    they borrow rows from."""
    import fnmatch

    if not patterns:
        return cells
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = {c.name for c in cells if any(fnmatch.fnmatch(c.name, p) for p in pats)}
    if not chosen:
        raise ValueError(f"--cells {patterns!r} matches no cell; cells: {[c.name for c in cells]}")
    chosen |= {f"{c.norm}/{c.shift}/{c.rows_from}" for c in cells if c.name in chosen and c.rows_from}
    return [c for c in cells if c.name in chosen]


def check_reuse(cell: Cell, cells: list[Cell]) -> None:
    """A cell may borrow rows of strategies it does not run only from a cell that computes them identically."""
    if cell.rows_from is None:
        return
    from hf_lpft.run.preflight import build_strategies
    from hf_lpft.train.optim import settings_from

    source = next((c for c in cells if (c.norm, c.shift, c.dose) == (cell.norm, cell.shift, cell.rows_from)), None)
    if source is None:
        raise ValueError(f"{cell.name}: rows_from={cell.rows_from!r} is not a dose of the map")
    a, b = cell.config, source.config
    same = (a.data, a.model, a.fedavg, a.run.seeds, settings_from(a.pft), a.pft.epochs, a.pft.lr, a.pft.head_lr) == \
        (b.data, b.model, b.fedavg, b.run.seeds, settings_from(b.pft), b.pft.epochs, b.pft.lr, b.pft.head_lr)
    borrowed = [s for s in b.pft.strategies if s not in a.pft.strategies]
    mine, theirs = build_strategies(_with_strategies(a, borrowed)), build_strategies(b)
    if not same or any(mine[s].describe() != theirs[s].describe() for s in borrowed):
        raise ValueError(f"{cell.name}: rows_from={cell.rows_from!r} does not compute {borrowed} the same way "
                         "(data, model, FedAvg, seeds, optimizer, budget and strategy options must match)")


def _with_strategies(cfg: ExperimentConfig, names: list[str]) -> ExperimentConfig:
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.pft.strategies = names
    return cfg


def run_cells(cells: list[Cell], *, accelerator=None) -> tuple[pd.DataFrame, dict[str, float]]:
    """Run every cell (resumable); per-client results with the axis columns, and wall seconds per cell."""
    frames, seconds = {}, {}
    for cell in cells:
        logger.info("regime map cell %s -> %s", cell.name, cell.config.run.output_dir)
        start = time.perf_counter()
        frames[cell.dose, cell.norm, cell.shift] = run_point(cell.config, accelerator=accelerator)
        seconds[cell.name] = time.perf_counter() - start
    return _with_axes(cells, frames), seconds


def collect_cells(cells: list[Cell]) -> tuple[pd.DataFrame, dict[str, float]]:
    """The results of cells already run (each cell's ``results.parquet``) and their recorded wall seconds
    (``run_record.json`` ``timings_seconds.total``), without running anything."""
    import json

    frames, seconds, missing = {}, {}, []
    for cell in cells:
        out = Path(cell.config.run.output_dir)
        if not (out / "results.parquet").is_file():
            missing.append(cell.name)
            continue
        frames[cell.dose, cell.norm, cell.shift] = pd.read_parquet(out / "results.parquet")
        record = json.loads((out / "run_record.json").read_text())
        seconds[cell.name] = float(record["run_info"]["timings_seconds"].get("total", float("nan")))
    if missing:
        raise ValueError(f"cells not run yet (no results.parquet): {missing}; run them first")
    return _with_axes(cells, frames), seconds


def _with_axes(cells: list[Cell], frames: dict) -> pd.DataFrame:
    """Every cell's results with its axis columns; a ``rows_from`` cell gets the borrowed strategies' rows."""
    out = []
    for cell in cells:
        results = frames[cell.dose, cell.norm, cell.shift]
        if cell.rows_from is not None:
            source = frames[cell.rows_from, cell.norm, cell.shift]
            results = pd.concat([results, source[~source.strategy.isin(results.strategy)]], ignore_index=True)
        out.append(results.assign(norm=cell.norm, shift=cell.shift, dose=cell.dose, condition=cell.name))
    return pd.concat(out, ignore_index=True)


def regime_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: LP-FT − FT on Local / Global (mean, std over seeds of the per-seed client means), each
    row strategy's Local / Global, and FT's Global drop split into BatchNorm statistics and weights."""
    rows = []
    for name, group in per_seed(results).groupby("condition", sort=False):
        by = {s: g.set_index("seed") for s, g in group.groupby("strategy")}
        first = results[results.condition == name].iloc[0]
        row = {"norm": first["norm"], "shift": first["shift"], "dose": first["dose"]} | lpft_minus_ft(by) \
            | strategy_means(by, ROWS)
        row.update(_ft_drop_split(results[results.condition == name]))
        row["verdict"] = verdict(row["lpft_minus_ft_global"], row["lpft_minus_ft_global_std"], row["seeds"])
        rows.append(row)
    return pd.DataFrame(rows)


def _ft_drop_split(results: pd.DataFrame) -> dict:
    """FT's Global drop from the global model and the part BN-adapt alone explains (client means, seed mean)."""
    from hf_lpft.evaluation.metrics import global_drop_split

    ft = global_drop_split(results)
    ft = ft[ft.strategy == "ft"].groupby("seed")[["global_drop", "global_drop_bn"]].mean()
    return {"ft_global_drop": float(ft.global_drop.mean()), "ft_global_drop_bn": float(ft.global_drop_bn.mean())}


def format_regime_table(table: pd.DataFrame, seconds: dict[str, float] | None = None) -> str:
    """Markdown: differences in points as mean (std); accuracies in % as Local / Global."""
    heads = ["norm", "shift", "dose", "seeds", "LP-FT − FT Local", "LP-FT − FT Global", "verdict (Global)",
             *[f"{label(s)} L / G" for s in ROWS], "FT Global drop (of which BN stats)", "wall s"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for _, r in table.iterrows():
        diffs = [diff_cell(r, m) for m in ("local", "global")]
        refs = [f"{pct(r[f'{s}_local_acc'])} / {pct(r[f'{s}_global_acc'])}" for s in ROWS]
        drop = f"{pct(r.ft_global_drop)} ({pct(r.ft_global_drop_bn)})"
        cell = f"{r['norm']}/{r['shift']}/{r['dose']}"  # r.shift would be pandas' Series.shift method
        wall = f"{seconds[cell]:.0f}" if seconds and cell in seconds else "-"
        cells = [r["norm"], r["shift"], r["dose"], str(r.seeds), *diffs, r.verdict, *refs, drop, wall]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_regime_map(table: pd.DataFrame, path: str | Path) -> Path:
    """Two heatmaps (Global, Local) of LP-FT − FT: rows norm x shift, columns dose; cells 'mean ± std' (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(dict.fromkeys(zip(table["norm"], table["shift"])))
    cols = list(dict.fromkeys(table["dose"]))
    fig, axes = plt.subplots(1, 2, figsize=(4.2 + 2.6 * len(cols), 1.2 + 0.9 * len(rows)))
    for ax, metric in zip(axes, ("global", "local")):
        grid, text = np.full((len(rows), len(cols)), np.nan), {}
        for _, r in table.iterrows():
            i, j = rows.index((r["norm"], r["shift"])), cols.index(r["dose"])
            grid[i, j] = 100 * r[f"lpft_minus_ft_{metric}"]
            text[i, j] = f"{grid[i, j]:+.1f}\n± {100 * r[f'lpft_minus_ft_{metric}_std']:.1f}"
        lim = max(1.0, float(np.nanmax(np.abs(grid)))) if np.isfinite(grid).any() else 1.0
        im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        for (i, j), s in text.items():  # white on the dark ends of the colour map
            ax.text(j, i, s, ha="center", va="center", fontsize=8,
                    color="white" if abs(grid[i, j]) > 0.6 * lim else "black")
        ax.set_xticks(range(len(cols)), [c.replace("_", "\n", 2) for c in cols], fontsize=7)
        ax.set_yticks(range(len(rows)), [f"{n}\n{s}" for n, s in rows], fontsize=7)
        ax.set_title(f"LP-FT − FT, {metric.capitalize()} (points)")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(path)


def write_regime_map(out: str | Path, results: pd.DataFrame, seconds: dict[str, float]) -> tuple[pd.DataFrame, str]:
    """``regime_map.parquet`` (the table), ``regime_map.md``, ``regime_map.png`` and ``regime_results.parquet``."""
    out = Path(out)
    table = regime_table(results)
    with atomic_path(out / "regime_map.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    with atomic_path(out / "regime_results.parquet") as tmp:
        results.drop(columns=["acc_by_client"], errors="ignore").to_parquet(tmp, index=False)
    markdown = format_regime_table(table, seconds)
    write_text(out / "regime_map.md", markdown + "\n")
    plot_regime_map(table, out / "regime_map.png")
    return table, markdown


def table_from_markdown(text: str) -> pd.DataFrame:
    """The map's table back from its Markdown (:func:`format_regime_table`), for the columns the heatmap and a
    merged table need: axes, seeds, LP-FT − FT Local / Global mean and std (fractions), verdict. Lets a map that
    grows over several sessions be tabulated from the committed tables of earlier cells."""
    import re

    rows, cell = [], re.compile(r"^([+-]?\d+\.\d+) \((\d+\.\d+)\)$")
    for line in text.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if len(parts) < 7 or parts[0] in ("norm", "") or set(parts[0]) <= {"-"}:
            continue
        row = {"norm": parts[0], "shift": parts[1], "dose": parts[2], "seeds": int(parts[3]), "verdict": parts[6]}
        for metric, value in (("local", parts[4]), ("global", parts[5])):
            match = cell.match(value)
            if not match:
                raise ValueError(f"regime map row {parts[:3]}: cannot read {metric} cell {value!r}")
            row[f"lpft_minus_ft_{metric}"] = float(match.group(1)) / 100
            row[f"lpft_minus_ft_{metric}_std"] = float(match.group(2)) / 100
        rows.append(row)
    return pd.DataFrame(rows)


def merge_tables(current: pd.DataFrame, earlier: list[pd.DataFrame]) -> pd.DataFrame:
    """The cells of ``current`` plus the cells of ``earlier`` tables (e.g. :func:`table_from_markdown` of an
    earlier session's) that ``current`` lacks; a cell run now wins over an earlier reading of it."""
    key = ["norm", "shift", "dose"]
    seen = set(map(tuple, current[key].to_numpy())) if len(current) else set()
    extra = [t[[tuple(r) not in seen for r in t[key].to_numpy()]] for t in earlier]
    return pd.concat([t for t in [*extra, current] if len(t)], ignore_index=True)
