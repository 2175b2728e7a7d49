"""The paper's Table 2 on our data: every PFT method, one row block per shift kind, 3 seeds.

Chen et al. (arXiv 2511.12695, Table 2) compare FT, LP, LP-FT, Proximal, Sparse, Soup and LSS FT under
input-level covariate shift (CIFAR-C, 50 clients), feature-level covariate shift (Digit5, DomainNet), concept
shift through spurious correlations (CelebA, CheXpert) and, in the appendix, label shift. Each block of
``recipes/configs/table2/blocks.yaml`` is one pipeline run over ``base.yaml`` (one PFT regime for every block);
FedAvg results are shared through ``run.fedavg_cache``. Beside the paper's columns (Local, Global, C-Std, Worst,
Average; mean (std) over seeds) the table has one the paper lacks: **Global at matched Local**, read from the
epoch curves (:func:`matched_local`), because an end-of-budget reading can credit a method with what is only
less training.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from hf_lpft.config import ExperimentConfig, parse_overrides
from hf_lpft.studies.sweep import merge_layers, run_point, sweep_config

logger = logging.getLogger(__name__)


@dataclass
class Block:
    """One row block: a shift kind, its validated config and the paper's rows it is compared with."""

    name: str
    config: ExperimentConfig
    paper: list[str] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return Path(self.config.run.output_dir)

    def seed_config(self, seed: int) -> ExperimentConfig:
        """The block run for one of its seeds alone, in ``<block>/seed_<seed>/`` (a *seed part*): a seed's
        results do not depend on the other seeds of a run, so a block too long for one session or process can
        run seed by seed and be tabulated from its parts (:func:`read_block`)."""
        if seed not in self.config.run.seeds:
            raise ValueError(f"--seeds: block {self.name!r} has seeds {list(self.config.run.seeds)}; got {seed}")
        run = dataclasses.replace(self.config.run, seeds=[seed], output_dir=str(self.folder / f"seed_{seed}"))
        return dataclasses.replace(self.config, run=run)


def load_blocks(folder: str | Path, *, output_dir: str | Path, quick: bool = False,
                overrides: list[str] | None = None) -> list[Block]:
    """Every block of ``blocks.yaml`` over ``base.yaml``, validated here (a bad block fails before any run)."""
    folder, out = Path(folder), Path(output_dir)
    base = yaml.safe_load((folder / "base.yaml").read_text()) or {}
    spec = (yaml.safe_load((folder / "blocks.yaml").read_text()) or {}).get("blocks") or {}
    if not spec:
        raise ValueError(f"{folder / 'blocks.yaml'} has no 'blocks' mapping")
    extra = merge_layers(parse_overrides(overrides or []), {"run": {"fedavg_cache": str(out / "fedavg_cache")}})
    blocks = []
    for name, value in spec.items():
        unknown = set(value or {}) - {"config", "paper"}
        if unknown:
            raise ValueError(f"block {name!r}: unknown key(s) {sorted(unknown)}; allowed: config, paper")
        cfg = sweep_config(base, value.get("config") or {}, output_dir=out / name, quick=quick, overrides=extra)
        blocks.append(Block(name, cfg, list(value.get("paper") or [])))
    return blocks


def select_blocks(blocks: list[Block], names: str | None) -> list[Block]:
    """The blocks named in the comma-separated ``names`` (all when None); an unknown name fails."""
    if not names:
        return blocks
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = [b.name for b in blocks]
    bad = [n for n in wanted if n not in known]
    if bad:
        raise ValueError(f"--blocks: unknown block(s) {bad}; blocks: {known}")
    return [b for b in blocks if b.name in wanted]


def run_blocks(blocks: list[Block], *, seeds: list[int] | None = None, accelerator=None) -> dict[str, float]:
    """Run every block (resumable: an interrupted block continues from its last finished unit); wall seconds.
    With ``seeds``, each of those seeds runs as its own seed part of the block (:meth:`Block.seed_config`)."""
    seconds = {}
    for block in blocks:
        cfgs = [block.seed_config(s) for s in seeds] if seeds else [block.config]
        start = time.perf_counter()
        for cfg in cfgs:
            logger.info("table 2 block %s -> %s", block.name, cfg.run.output_dir)
            run_point(cfg, accelerator=accelerator)
        seconds[block.name] = time.perf_counter() - start
    return seconds


@dataclass
class BlockResults:
    """What one finished block wrote: per-client results, epoch curves and the recorded wall seconds."""

    block: Block
    results: pd.DataFrame
    curves: pd.DataFrame | None
    seconds: float


def collect_blocks(blocks: list[Block], *, allow_missing: bool = False) -> list[BlockResults]:
    """The saved results of blocks already run; a block without ``results.parquet`` fails (or, with
    ``allow_missing``, is left out and logged)."""
    found, missing = [], []
    for block in blocks:
        read = read_block(block)
        if read is None:
            missing.append(block.name)
            continue
        found.append(read)
        whole = (block.folder / "results.parquet").is_file()  # one run over all seeds, not seed parts
        absent = [] if whole else sorted(set(block.config.run.seeds) - set(read.results.seed.unique()))
        if absent and not allow_missing:
            raise ValueError(f"block {block.name}: seed part(s) {absent} not run yet; run them with --seeds")
        if absent:
            logger.warning("table 2: block %s has results for seeds %s only (of %s)", block.name,
                           sorted(int(s) for s in read.results.seed.unique()), list(block.config.run.seeds))
    if missing and not allow_missing:
        raise ValueError(f"blocks not run yet (no results.parquet): {missing}; run them first")
    for name in missing:
        logger.warning("table 2: block %s has no results yet; left out", name)
    return found


def run_folders(block: Block) -> list[Path]:
    """The finished run folders of a block: the block's own (one run over all its seeds), else its finished
    seed parts ``seed_<s>/`` in seed order."""
    if (block.folder / "results.parquet").is_file():
        return [block.folder]
    return [block.folder / f"seed_{s}" for s in block.config.run.seeds
            if (block.folder / f"seed_{s}" / "results.parquet").is_file()]


def read_block(block: Block) -> BlockResults | None:
    """A block's saved results, from its own run or its seed parts joined (wall seconds added); None when
    nothing finished."""
    folders = run_folders(block)
    if not folders:
        return None
    results = pd.concat([pd.read_parquet(f / "results.parquet") for f in folders], ignore_index=True)
    curves = [pd.read_parquet(f / "curves.parquet") for f in folders if (f / "curves.parquet").is_file()]
    seconds = sum(float(json.loads((f / "run_record.json").read_text())["run_info"]["timings_seconds"]
                        .get("total", float("nan"))) for f in folders)
    return BlockResults(block, results, pd.concat(curves, ignore_index=True) if curves else None, seconds)


# The paper's Table 2 (arXiv 2511.12695), accuracy %: FT and LP-FT (Local, Global) and the best other method on
# Global, for the rows a block is compared with. Only these values are known here; a reader compares the ordering.
PAPER_ROWS = {
    "CIFAR10-C": {"ft": (54.50, 44.16), "lp_ft": (63.55, 55.35), "best_other": ("Proximal FT", 53.58)},
    "CIFAR100-C": {"ft": (20.05, 14.45), "lp_ft": (32.60, 25.44), "best_other": ("Sparse FT", 20.66)},
    "Digit5": {"ft": (91.17, 67.87), "lp_ft": (91.20, 82.78), "best_other": ("Proximal FT", 81.40)},
    "DomainNet": {"ft": (64.90, 42.48), "lp_ft": (68.50, 57.52), "best_other": ("Proximal FT", 56.05)},
    "CheXpert": {"ft": (76.18, 76.25), "lp_ft": (77.64, 77.54), "best_other": ("LSS FT", 77.51)},
    "CelebA": {"ft": (90.55, 73.76), "lp_ft": (93.24, 83.32), "best_other": ("Proximal FT", 81.11)},
}
# Strategies whose epoch curve is not the curve of the model they return: Soup FT's readings are its ingredients
# (each a full FT run) one after the other; the soup itself exists only at the end.
NO_MATCHED_READING = ("soup_ft",)


def client_mean_curve(curves: pd.DataFrame, results: pd.DataFrame, seed: int, strategy: str) -> pd.DataFrame:
    """Client-mean Local and Global by epoch of one (seed, strategy), epoch 0 = the global model; only epochs
    every client logged."""
    start = results[(results.seed == seed) & (results.strategy == "global_model")]
    g = curves[(curves.seed == seed) & (curves.strategy == strategy)]
    n = g.client_id.nunique()
    by = g.groupby("epoch").agg(local_acc=("local_acc", "mean"), global_acc=("global_acc", "mean"),
                                clients=("client_id", "nunique"))
    by = by[by.clients == n].drop(columns="clients")
    if len(start):
        by.loc[0] = [start.local_acc.mean(), start.global_acc.mean()]
    return by.sort_index()


def matched_local(curves: pd.DataFrame | None, results: pd.DataFrame) -> pd.DataFrame:
    """Global at matched Local, per (seed, strategy): the client-mean Global at the first logged epoch where the
    client-mean Local reaches FT's final Local of that seed; when it never does, at the epoch whose Local is
    nearest (``reached`` False). Columns seed, strategy, target, epoch, local_acc, global_acc, reached."""
    cols = ["seed", "strategy", "target", "epoch", "local_acc", "global_acc", "reached"]
    if curves is None or curves.empty:
        return pd.DataFrame(columns=cols)
    ok = results[results.error.isna()] if "error" in results else results
    rows = []
    for (seed, strategy), _ in curves.groupby(["seed", "strategy"], sort=False):
        ft = ok[(ok.seed == seed) & (ok.strategy == "ft")]
        if strategy in NO_MATCHED_READING or ft.empty:
            continue
        target = float(ft.local_acc.mean())
        curve = client_mean_curve(curves, ok, seed, strategy)
        reached = curve[curve.local_acc >= target - 1e-12]
        epoch = reached.index[0] if len(reached) else (curve.local_acc - target).abs().idxmin()
        rows.append({"seed": seed, "strategy": strategy, "target": target, "epoch": int(epoch),
                     "local_acc": float(curve.loc[epoch, "local_acc"]),
                     "global_acc": float(curve.loc[epoch, "global_acc"]), "reached": bool(len(reached))})
    return pd.DataFrame(rows, columns=cols)


def global_standard_error(results: pd.DataFrame) -> dict:
    """The binomial standard error of one client's Global reading: sqrt(p (1 - p) / n), n = the test examples of
    the other clients (mean over clients), at p = 0.5 (the largest) and at the global model's mean Global."""
    first = results[(results.strategy == "global_model") & (results.seed == results.seed.min())]
    n_test = first.n_test.to_numpy(float)
    n_other = float(np.mean(n_test.sum() - n_test))
    p = float(first.global_acc.mean()) if len(first) else 0.5
    return {"n_other": n_other, "se_max": float(np.sqrt(0.25 / n_other)),
            "se_global_model": float(np.sqrt(p * (1 - p) / n_other)), "clients": int(len(first)),
            "test_per_client": float(n_test.mean())}


def block_table(found: BlockResults) -> pd.DataFrame:
    """One row per strategy of a block: the summary metrics (mean and std over seeds), Global at matched Local
    (mean, std, the epochs and how many seeds reached FT's Local) and every seed's Local / Global."""
    from hf_lpft.evaluation.metrics import summary_table

    ok = found.results[found.results.error.isna()] if "error" in found.results else found.results
    table = summary_table(ok)
    matched = matched_local(found.curves, ok)
    extra = []
    for strategy in table.strategy:
        m = matched[matched.strategy == strategy]
        runs = ok[ok.strategy == strategy].groupby("seed")[["local_acc", "global_acc"]].mean()
        extra.append({"matched_global": float(m.global_acc.mean()) if len(m) else float("nan"),
                      "matched_global_std": float(m.global_acc.std(ddof=1)) if len(m) > 1 else 0.0,
                      "matched_epochs": [int(e) for e in m.epoch], "matched_reached": int(m.reached.sum()),
                      "matched_seeds": int(len(m)),
                      "per_seed": [(int(s), float(r.local_acc), float(r.global_acc)) for s, r in runs.iterrows()]})
    return pd.concat([table.reset_index(drop=True), pd.DataFrame(extra)], axis=1).assign(block=found.block.name)


def _cell(r, col: str) -> str:
    return f"{100 * r[col]:.2f} ({100 * r[col + '_std']:.2f})"


def _matched_cell(r) -> str:
    if not r.matched_seeds:
        return "-"
    epochs = ",".join(str(e) for e in r.matched_epochs)
    note = "" if r.matched_reached == r.matched_seeds else f"; reached in {r.matched_reached}/{r.matched_seeds}"
    return f"{100 * r.matched_global:.2f} ({100 * r.matched_global_std:.2f}) @ ep {epochs}{note}"


def _distortion_cell(r) -> str:
    """Feature distortion on the client's own test split (the head's input, vs θ_G), mean (std) over seeds."""
    if "distortion_local" not in r or pd.isna(r["distortion_local"]):
        return "-"
    return f"{r['distortion_local']:.2f} ({r['distortion_local_std']:.2f})"


HEADERS = ["method", "Local", "Global", "C-Std (matrix)", "Worst (matrix)", "Avg (L+G+W_matrix)/3", "Avg (L+G)/2",
           "C-Std (Local)", "Worst (Local)", "Global at matched Local", "Δ own", "every seed: Local / Global"]


def format_block(table: pd.DataFrame, found: BlockResults) -> str:
    """A block as Markdown: its setup line, standard error, the table and the paper's matching rows."""
    from hf_lpft.studies.sweep import label

    se = global_standard_error(found.results)
    seeds = sorted(found.results.seed.unique())
    planned = list(found.block.config.run.seeds)
    partial = f" (**{len(seeds)} of the {len(planned)} planned: {', '.join(map(str, planned))}**)" \
        if set(planned) - set(seeds) else ""
    lines = [f"### {found.block.name}", "",
             f"{se['clients']} clients, {se['test_per_client']:.0f} test examples a client (mean); seeds "
             f"{', '.join(map(str, seeds))}{partial}; wall {found.seconds / 60:.1f} min (recorded). One client's "
             f"Global is read on {se['n_other']:.0f} test examples: standard error {100 * se['se_max']:.2f} points at "
             f"p = 0.5 ({100 * se['se_global_model']:.2f} at the global model's Global), so 2 SE = "
             f"{200 * se['se_max']:.2f} points.", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for _, r in table.iterrows():
        runs = "; ".join(f"s{s}: {100 * lo:.1f} / {100 * g:.1f}" for s, lo, g in r.per_seed)
        cells = [label(r.strategy), *(_cell(r, c) for c in ("local", "global", "c_std_matrix", "worst_matrix",
                                                             "avg_lgw_matrix", "avg_lg", "c_std", "worst")),
                 _matched_cell(r), _distortion_cell(r), runs]
        lines.append("| " + " | ".join(cells) + " |")
    for row in found.block.paper:
        p = PAPER_ROWS[row]
        lines.append(f"| *paper, {row}* | *FT {p['ft'][0]:.2f} / {p['ft'][1]:.2f}; LP-FT {p['lp_ft'][0]:.2f} / "
                     f"{p['lp_ft'][1]:.2f} (Local / Global); best other on Global: {p['best_other'][0]} "
                     f"{p['best_other'][1]:.2f}* |" + " |" * (len(HEADERS) - 2))
    return "\n".join(lines + spurious_lines(found.results))


def lpft_vs_ft(found: BlockResults) -> str:
    """LP-FT − FT in points, mean (std over seeds) of the per-seed difference of client means: Local, Global
    and Global at matched Local."""
    from hf_lpft.studies.sweep import diff_cell, lpft_minus_ft, mean_std

    ok = found.results.assign(condition=found.block.name)
    ok = ok[ok.error.isna()] if "error" in ok else ok
    means = ok.groupby(["seed", "strategy"])[["local_acc", "global_acc"]].mean().reset_index()
    by = {s: g.set_index("seed") for s, g in means.groupby("strategy")}
    row = lpft_minus_ft(by)
    if not row["seeds"]:
        return "LP-FT − FT: not both run."
    matched = matched_local(found.curves, ok).set_index(["strategy", "seed"]).global_acc
    paired = [s for s in sorted(by["ft"].index) if ("ft", s) in matched and ("lp_ft", s) in matched]
    diff = np.array([matched["lp_ft", s] - matched["ft", s] for s in paired], float)
    m, sd = mean_std(diff)
    at = "-" if np.isnan(m) else f"{100 * m:+.2f} ({100 * sd:.2f})"
    seeds = f"{row['seeds']} seed{'s' if row['seeds'] != 1 else ''}"
    return (f"LP-FT − FT ({seeds}, points, mean (std)): Local {diff_cell(row, 'local')}, "
            f"Global {diff_cell(row, 'global')}, Global at matched Local {at}.")


def plot_block(table: pd.DataFrame, found: BlockResults, path: str | Path) -> Path:
    """Bars of Local, Global and Global at matched Local per method (mean over seeds, std as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hf_lpft.io import atomic_path
    from hf_lpft.studies.sweep import label

    x = np.arange(len(table))
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(table), 3.6))
    for k, (col, name) in enumerate((("local", "Local"), ("global", "Global"),
                                     ("matched_global", "Global at matched Local"))):
        ax.bar(x + (k - 1) * 0.27, 100 * table[col], 0.27, yerr=100 * table[col + "_std"], label=name, capsize=2)
    ax.set_xticks(x, [label(s) for s in table.strategy], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Table 2 on our data: {found.block.name} (mean ± std over seeds)", fontsize=9)
    ax.set_ylim(0, 112)  # room above the bars for the legend
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def write_table2(out: str | Path, found: list[BlockResults]) -> str:
    """``table2.md`` (every block), ``table2.parquet`` (one row per block x method) and one PNG per block."""
    from hf_lpft.io import atomic_path, write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts, tables = [], []
    for f in found:
        table = block_table(f)
        tables.append(table)
        plot_block(table, f, out / f"table2_{f.block.name}.png")
        parts += [format_block(table, f), "", lpft_vs_ft(f), "", f"![{f.block.name}](table2_{f.block.name}.png)", ""]
    if tables:
        frame = pd.concat(tables, ignore_index=True)
        for col in ("matched_epochs", "per_seed"):  # lists of tuples: stored as JSON text
            frame[col] = frame[col].map(json.dumps)
        with atomic_path(out / "table2.parquet") as tmp:
            frame.to_parquet(tmp, index=False)
    markdown = "\n".join(parts) if parts else "No block has results yet."
    write_text(out / "table2.md", markdown + "\n")
    return markdown


def side_of(client_id: str) -> str | None:
    """``aligned`` or ``reversed`` for a spurious-digits client id (``<k>_<side>_p<agreement>``), else None."""
    parts = str(client_id).split("_")
    return parts[1] if len(parts) == 3 and parts[1] in ("aligned", "reversed") else None


def aligned_vs_reversed(results: pd.DataFrame, strategy: str = "global_model") -> pd.DataFrame:
    """Accuracy of ``strategy`` on the aligned and on the reversed clients of a spurious-digits federation, per
    seed: the mean over those clients of the model's accuracy on their test splits (for the global model,
    Local = its accuracy on the client's own split). Columns seed, aligned, reversed."""
    rows = results[results.strategy == strategy].assign(side=lambda d: d.client_id.map(side_of))
    rows = rows[rows.side.notna()]
    if rows.empty:
        return pd.DataFrame(columns=["seed", "aligned", "reversed"])
    return rows.pivot_table(index="seed", columns="side", values="local_acc", aggfunc="mean").reset_index()


def spurious_lines(results: pd.DataFrame) -> list[str]:
    """For a spurious-digits block: the global model's accuracy on the aligned vs the reversed clients (mean
    (std) over seeds and every seed), the calibration the benchmark is read with; nothing for other data."""
    from hf_lpft.studies.sweep import mean_std

    table = aligned_vs_reversed(results)
    if table.empty or not {"aligned", "reversed"} <= set(table.columns):
        return []
    cells = []
    for side in ("aligned", "reversed"):
        m, sd = mean_std(table[side].to_numpy(float))
        runs = ", ".join(f"{100 * v:.1f}" for v in table[side])
        cells.append(f"{side} clients {100 * m:.2f} ({100 * sd:.2f}) [{runs}]")
    return ["", "Global model's accuracy (%) on its clients' test splits, mean (std) over seeds [every seed]: "
            + "; ".join(cells) + "."]


PUBLISHED = ("results.parquet", "curves.parquet", "config.yaml", "run_record.json")


def publish_blocks(found: list[BlockResults], dest: str | Path) -> Path:
    """Copy each finished block's small files (:data:`PUBLISHED`; of the run record its ``run_info`` and
    ``meta_info``) into ``dest/<block>/`` (a seed part's into ``dest/<block>/seed_<s>/``): a folder that
    ``--collect --output_dir dest`` tabulates, e.g. committed so that a study spread over several sessions keeps
    its finished blocks and seed parts (the run folders themselves, with models, stay out of git)."""
    import shutil

    from hf_lpft.io import atomic_path

    dest = Path(dest)
    for f in found:
        if f.block.folder.resolve() == (dest / f.block.name).resolve():
            continue  # already there
        for source in run_folders(f.block):
            target = dest / f.block.name / source.relative_to(f.block.folder)
            target.mkdir(parents=True, exist_ok=True)
            for name in PUBLISHED:
                if (source / name).is_file():
                    with atomic_path(target / name) as tmp:
                        if name == "run_record.json":  # run_info and meta_info; train_info's per-phase losses
                            record = json.loads((source / name).read_text())  # stay behind (MBs at 50 clients)
                            Path(tmp).write_text(json.dumps({k: record[k] for k in ("run_info", "meta_info")
                                                             if k in record}, indent=2))
                        else:
                            shutil.copyfile(source / name, tmp)
    return dest
