"""federate -> pretrain (FedAvg) -> personalize (every strategy, every client) -> evaluate -> export.

Output folder (a contract): ``config.yaml``, ``run_record.json``, ``federation/manifest.json``,
``global/`` (the global model), ``clients/<strategy>/<client_id>/`` (personalized weights),
``results.parquet`` (one row per seed x strategy x client) and ``summary.md``. With several seeds,
model folders get a ``seed_<s>`` level: ``global/seed_<s>/``, ``clients/<strategy>/<client_id>/seed_<s>/``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import yaml
from accelerate import Accelerator
from tqdm.auto import tqdm

from hf_lpft.checkpoint import Checkpoints
from hf_lpft.config import ConfigError, ExperimentConfig
from hf_lpft.data.federate import Federation, federate, load_manifest, num_classes_of, save_manifest
from hf_lpft.data.load import client_tensors, load_source
from hf_lpft.data.tensors import ClientData
from hf_lpft.evaluation.metrics import format_markdown, local_global, summary_table
from hf_lpft.federated.fedavg import run_fedavg
from hf_lpft.io import atomic_path, meta_info, write_json, write_text
from hf_lpft.models.backbone import SplitModel, build_model
from hf_lpft.strategies import Budget, Strategy, build_strategy
from hf_lpft.strategies.personalize import personalize
from hf_lpft.train.loop import NonFiniteLossError, OptimSettings, accuracy, derive_seed

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    output_dir: Path
    results: pd.DataFrame
    summary: pd.DataFrame
    markdown: str


def build_strategies(cfg: ExperimentConfig) -> dict[str, Strategy]:
    """Validate and build every requested strategy before any heavy work."""
    budget = Budget(epochs=cfg.pft.epochs, lr=cfg.pft.lr, head_lr=cfg.pft.head_lr)
    for name, args in cfg.pft.strategy_args.items():  # validate options even of strategies not run now
        build_strategy(name, args, budget=budget)
    return {name: build_strategy(name, cfg.pft.strategy_args.get(name), budget=budget) for name in cfg.pft.strategies}


OUTPUT_NAMES = ("config.yaml", "run_record.json", "federation", "global", "clients", "checkpoints",
                "results.parquet", "curves.parquet", "summary.md")


def _config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(saved) | set(current))
    out = []
    for k in keys:
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, f"{prefix}{k}.")
        elif a != b and f"{prefix}{k}" not in ("run.resume", "run.overwrite"):
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def prepare_output_dir(cfg: ExperimentConfig) -> Path:
    """Create the output folder; refuse a non-empty one unless resuming (same config) or overwriting."""
    out = Path(cfg.run.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run.output_dir={str(out)!r} exists and is not a folder")
    if cfg.run.resume and (out / "config.yaml").is_file():
        diff = _config_differences(yaml.safe_load((out / "config.yaml").read_text()), cfg.to_dict())
        if diff:
            raise ConfigError(f"cannot resume {str(out)!r}: the config differs from the saved one: {diff}")
    elif out.is_dir() and any(out.iterdir()):
        if not cfg.run.overwrite and not cfg.run.resume:
            raise ConfigError(f"run.output_dir={str(out)!r} is not empty; pass --run.resume true to continue "
                              "it, --run.overwrite true to start again, or choose another folder")
        for name in OUTPUT_NAMES:  # start again: remove only what a run writes
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise ConfigError(f"run.output_dir={str(out)!r} is not writable")
    return out


def build_federation(cfg: ExperimentConfig, out: Path) -> tuple[Federation, list[ClientData]]:
    """Load the source dataset, partition it (or rebuild a saved manifest), decode client tensors."""
    d = cfg.data
    ds = load_source(d.dataset, split=d.split, config_name=d.dataset_config,
                     builtin_kwargs={"n_per_domain": d.n_per_domain, "image_size": d.image_size})
    if d.label_column in ds.column_names and d.num_classes is not None:
        found = num_classes_of(ds, d.label_column)
        if found != d.num_classes:
            raise ConfigError(f"data.num_classes={d.num_classes} but column {d.label_column!r} has {found} classes")
    if d.manifest:
        fed = load_manifest(d.manifest, num_rows=len(ds))
    else:
        fed = federate(ds, scheme=d.scheme, partition_by=d.partition_by, label_column=d.label_column,
                       domain_column=d.domain_column, num_clients=d.num_clients, alpha=d.alpha,
                       min_partition_size=d.min_partition_size, test_fraction=d.test_fraction,
                       max_examples_per_client=d.max_examples_per_client, seed=d.seed)
    save_manifest(fed, out / "federation" / "manifest.json")
    clients = client_tensors(ds, fed, image_column=d.image_column, label_column=d.label_column, image_size=d.image_size)
    return fed, clients


def save_model(model: SplitModel, path: Path, strategy: Strategy | None = None) -> None:
    """Export into a temporary folder, then rename (no half-written checkpoint)."""
    with atomic_path(path, directory=True) as tmp:
        if strategy is None:
            model.save_pretrained(tmp)
        else:
            strategy.export(model, tmp)


def cross_accuracy(model, clients: list[ClientData], *, cfg: ExperimentConfig, device) -> list[float]:
    """The model's accuracy on every client's test split (row of the cross-client matrix)."""
    return [accuracy(model, c.test_x, c.test_y, batch_size=cfg.run.eval_batch_size, device=device) for c in clients]


def result_row(seed: int, strategy: str, i: int, client: ClientData, accs: list[float], final_loss: float | None) -> dict:
    local, global_ = local_global(accs, i)
    return {"seed": seed, "strategy": strategy, "client_id": client.client_id, "client_index": i,
            "n_train": client.n_train, "n_test": client.n_test, "local_acc": local, "global_acc": global_,
            "acc_by_client": accs, "final_train_loss": final_loss}


def model_dir(out: Path, cfg: ExperimentConfig, seed: int, *parts: str) -> Path:
    """``global/`` or ``clients/<strategy>/<client>/``, with a ``seed_<s>`` level when there are several seeds."""
    path = out.joinpath(*parts)
    return path / f"seed_{seed}" if len(cfg.run.seeds) > 1 else path


def pretrain(cfg: ExperimentConfig, clients: list[ClientData], num_classes: int, *, seed: int, out: Path,
             accelerator: Accelerator) -> tuple[SplitModel, list[dict]]:
    """The global model θ_G: FedAvg from scratch, from a round checkpoint, or reloaded when complete."""
    f, ckpt = cfg.fedavg, Checkpoints(out)
    done = model_dir(out, cfg, seed, "global")
    saved = ckpt.load_round(seed) if cfg.run.resume else None
    if saved is not None and len(saved[1]) == f.rounds and (done / "model.safetensors").is_file():
        return SplitModel.from_pretrained(done).to(accelerator.device).eval(), saved[1]
    model = build_model(cfg.model.backbone, num_classes=num_classes, image_size=cfg.data.image_size,
                        pretrained=cfg.model.pretrained, checkpoint=cfg.model.checkpoint,
                        seed=derive_seed(seed, "init") % 2**31).to(accelerator.device)
    if saved is not None:
        model.load_state_dict(saved[0])
    settings = OptimSettings(f.optimizer, f.momentum, f.weight_decay, f.batch_size)
    model, history = run_fedavg(model, clients, rounds=f.rounds, local_epochs=f.local_epochs, lr=f.lr,
                                client_fraction=f.client_fraction, settings=settings, accelerator=accelerator,
                                seed=seed, start_round=len(saved[1]) if saved else 0,
                                history=saved[1] if saved else None,
                                on_round_end=lambda r, state, hist: ckpt.save_round(seed, state, hist))
    save_model(model, done)
    if f.rounds == 0:
        ckpt.save_round(seed, model.state_dict(), [])
    return model, history


def epoch_curve_callback(cfg: ExperimentConfig, clients: list[ClientData], i: int, curves: list, device):
    """Record Local and Global every ``pft.eval_every`` epochs (counted across phases)."""
    if not cfg.pft.eval_every:
        return None
    counter = {"epoch": 0}

    def callback(model, phase: str, epoch: int, loss: float) -> None:
        counter["epoch"] += 1
        if counter["epoch"] % cfg.pft.eval_every == 0:
            local, global_ = local_global(cross_accuracy(model, clients, cfg=cfg, device=device), i)
            curves.append({"epoch": counter["epoch"], "phase": phase, "train_loss": loss,
                           "local_acc": local, "global_acc": global_})
    return callback


def personalize_unit(cfg: ExperimentConfig, strategy: Strategy, global_model: SplitModel, clients: list[ClientData],
                     i: int, *, seed: int, out: Path, accelerator: Accelerator) -> dict:
    """One (seed, strategy, client) unit: train, evaluate on every client, export; return its record."""
    p, client, start = cfg.pft, clients[i], time.perf_counter()
    settings = OptimSettings(p.optimizer, p.momentum, p.weight_decay, p.batch_size, cache_features=p.cache_features)
    curves: list[dict] = []
    try:
        model, records = personalize(strategy, global_model, client, settings=settings, accelerator=accelerator,
                                     seed=derive_seed(seed, strategy.name, client.client_id),
                                     on_epoch_end=epoch_curve_callback(cfg, clients, i, curves, accelerator.device))
    except NonFiniteLossError as err:
        if cfg.run.on_error == "raise":
            raise
        logger.error("%s / %s / seed %d failed: %s", strategy.name, client.client_id, seed, err)
        nan = [float("nan")] * len(clients)
        return {"row": result_row(seed, strategy.name, i, client, nan, None) | {"error": str(err)}, "phases": [],
                "curves": [], "seconds": time.perf_counter() - start}
    accs = cross_accuracy(model, clients, cfg=cfg, device=accelerator.device)
    losses = [r["epoch_loss"][-1] for r in records if r["epoch_loss"]]
    save_model(model, model_dir(out, cfg, seed, "clients", strategy.name, client.client_id), strategy)
    row = result_row(seed, strategy.name, i, client, accs, losses[-1] if losses else None) | {"error": None}
    return {"row": row, "phases": records, "curves": curves, "seconds": time.perf_counter() - start}


def personalize_all(cfg: ExperimentConfig, strategies: dict[str, Strategy], global_model: SplitModel,
                    clients: list[ClientData], *, seed: int, out: Path, accelerator: Accelerator) -> list[dict]:
    """Every strategy on every client, skipping units a previous (interrupted) run completed."""
    ckpt = Checkpoints(out)
    units = [(s, i) for s in strategies for i in range(len(clients))]
    records = []
    for name, i in tqdm(units, desc=f"personalize (seed {seed})", disable=not accelerator.is_main_process):
        cid = clients[i].client_id
        record = ckpt.load_unit(seed, name, cid) if cfg.run.resume else None
        if record is None:
            record = personalize_unit(cfg, strategies[name], global_model, clients, i, seed=seed, out=out,
                                      accelerator=accelerator)
            ckpt.save_unit(seed, name, cid, record)
        records.append(record)
    return records


def write_curves(out: Path, records: list[dict]) -> None:
    """Epoch curves (Local/Global every k epochs), when recorded, as ``curves.parquet``."""
    rows = [{k: r["row"][k] for k in ("seed", "strategy", "client_id")} | c for r in records for c in r["curves"]]
    if rows:
        with atomic_path(out / "curves.parquet") as tmp:
            pd.DataFrame(rows).to_parquet(tmp, index=False)


def write_results(out: Path, rows: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """``results.parquet`` and ``summary.md``; rows of failed clients are kept with their error."""
    results = pd.DataFrame(rows)
    with atomic_path(out / "results.parquet") as tmp:
        results.to_parquet(tmp, index=False)
    failed = results[results.error.notna()]
    summary = summary_table(results[results.error.isna()])
    markdown = format_markdown(summary)
    if len(failed):
        markdown += "\n\nFailed (excluded from the table): " + ", ".join(
            f"{r.strategy}/{r.client_id}/seed {r.seed}" for r in failed.itertuples())
    write_text(out / "summary.md", markdown + "\n")
    return results, summary, markdown


def run_seed(cfg: ExperimentConfig, strategies: dict[str, Strategy], clients: list[ClientData], num_classes: int,
             *, seed: int, out: Path, accelerator: Accelerator, timings: dict) -> tuple[list[dict], list[dict]]:
    """FedAvg then every personalization unit for one seed; returns (global-model records, unit records)."""
    t = time.perf_counter()
    global_model, history = pretrain(cfg, clients, num_classes, seed=seed, out=out, accelerator=accelerator)
    timings[f"fedavg_seed_{seed}"] = time.perf_counter() - t
    accs = cross_accuracy(global_model, clients, cfg=cfg, device=accelerator.device)
    global_rows = [{"row": result_row(seed, "global_model", i, c, accs, None) | {"error": None}, "phases": [],
                    "curves": [], "fedavg_history": history if i == 0 else None} for i, c in enumerate(clients)]
    t = time.perf_counter()
    units = personalize_all(cfg, strategies, global_model, clients, seed=seed, out=out, accelerator=accelerator)
    timings[f"personalize_seed_{seed}"] = time.perf_counter() - t
    return global_rows, units


def run(cfg: ExperimentConfig, *, accelerator: Accelerator | None = None) -> RunResult:
    """Run the whole study described by ``cfg`` and write the output folder."""
    strategies = build_strategies(cfg)  # fail on bad strategy options before any heavy work
    out = prepare_output_dir(cfg)
    accelerator = accelerator or Accelerator()
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    timings, t0 = {}, time.perf_counter()
    fed, clients = build_federation(cfg, out)
    write_text(out / "config.yaml", cfg.to_yaml())
    timings["federate"] = time.perf_counter() - t0
    records = []
    for seed in cfg.run.seeds:
        global_rows, units = run_seed(cfg, strategies, clients, fed.num_classes, seed=seed, out=out,
                                      accelerator=accelerator, timings=timings)
        records += global_rows + units
    results, summary, markdown = write_results(out, [r["row"] for r in records])
    write_curves(out, records)
    timings["total"] = time.perf_counter() - t0
    write_json(out / "run_record.json", {
        "run_info": {"seeds": cfg.run.seeds, "timings_seconds": timings, "manifest_sha256": fed.indices_hash(),
                     "clients": fed.client_ids, "resumed": cfg.run.resume,
                     "strategies": {n: s.describe() for n, s in strategies.items()}},
        "train_info": {"fedavg_history": {r["row"]["seed"]: r["fedavg_history"] for r in records if r.get("fedavg_history")},
                       "personalization": [{k: r["row"][k] for k in ("seed", "strategy", "client_id", "error")}
                                           | {"phases": r["phases"], "seconds": r.get("seconds")}
                                           for r in records if r["row"]["strategy"] != "global_model"]},
        "meta_info": meta_info()})
    return RunResult(out, results, summary, markdown)
