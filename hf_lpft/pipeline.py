"""federate -> pretrain (FedAvg) -> personalize (every strategy, every client) -> evaluate -> export.

Output folder (a contract): ``config.yaml``, ``run_record.json``, ``federation/manifest.json``,
``global/`` (the global model), ``clients/<strategy>/<client_id>/`` (personalized weights),
``results.parquet`` (one row per seed x strategy x client) and ``summary.md``. With several seeds,
model folders get a ``seed_<s>`` level: ``global/seed_<s>/``, ``clients/<strategy>/<client_id>/seed_<s>/``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

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
from hf_lpft.train.loop import OptimSettings, accuracy, derive_seed

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


def prepare_output_dir(cfg: ExperimentConfig) -> Path:
    out = Path(cfg.run.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run.output_dir={str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not cfg.run.overwrite:
        raise ConfigError(f"run.output_dir={str(out)!r} is not empty; pass --run.overwrite true or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
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


def pretrain(cfg: ExperimentConfig, clients: list[ClientData], num_classes: int, *, seed: int,
             accelerator: Accelerator) -> tuple[SplitModel, list[dict]]:
    """Build the model and train it with FedAvg: the global model θ_G."""
    f = cfg.fedavg
    model = build_model(cfg.model.backbone, num_classes=num_classes, image_size=cfg.data.image_size,
                        pretrained=cfg.model.pretrained, checkpoint=cfg.model.checkpoint,
                        seed=derive_seed(seed, "init") % 2**31).to(accelerator.device)
    settings = OptimSettings(f.optimizer, f.momentum, f.weight_decay, f.batch_size)
    return run_fedavg(model, clients, rounds=f.rounds, local_epochs=f.local_epochs, lr=f.lr,
                      client_fraction=f.client_fraction, settings=settings, accelerator=accelerator, seed=seed)


def personalize_all(cfg: ExperimentConfig, strategies: dict[str, Strategy], global_model: SplitModel,
                    clients: list[ClientData], *, seed: int, out: Path, accelerator: Accelerator) -> tuple[list, list]:
    """Every strategy on every client: save each personalized model, return result rows and train records."""
    p = cfg.pft
    settings = OptimSettings(p.optimizer, p.momentum, p.weight_decay, p.batch_size, cache_features=p.cache_features)
    suffix = f"seed_{seed}" if len(cfg.run.seeds) > 1 else ""
    rows, train_info = [], []
    units = [(s, i) for s in strategies for i in range(len(clients))]
    for name, i in tqdm(units, desc=f"personalize (seed {seed})", disable=not accelerator.is_main_process):
        client = clients[i]
        start = time.perf_counter()
        model, records = personalize(strategies[name], global_model, client, settings=settings,
                                     accelerator=accelerator, seed=derive_seed(seed, name, client.client_id))
        accs = cross_accuracy(model, clients, cfg=cfg, device=accelerator.device)
        losses = [r["epoch_loss"][-1] for r in records if r["epoch_loss"]]
        rows.append(result_row(seed, name, i, client, accs, losses[-1] if losses else None))
        save_model(model, out / "clients" / name / client.client_id / suffix, strategies[name])
        train_info.append({"seed": seed, "strategy": name, "client_id": client.client_id, "phases": records,
                           "seconds": time.perf_counter() - start})
    return rows, train_info


def write_results(out: Path, rows: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    results = pd.DataFrame(rows)
    with atomic_path(out / "results.parquet") as tmp:
        results.to_parquet(tmp, index=False)
    summary = summary_table(results)
    markdown = format_markdown(summary)
    write_text(out / "summary.md", markdown + "\n")
    return results, summary, markdown


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
    rows, train_info, fedavg_history = [], [], {}
    for seed in cfg.run.seeds:
        t = time.perf_counter()
        global_model, fedavg_history[seed] = pretrain(cfg, clients, fed.num_classes, seed=seed, accelerator=accelerator)
        save_model(global_model, out / "global" / (f"seed_{seed}" if len(cfg.run.seeds) > 1 else ""))
        timings[f"fedavg_seed_{seed}"] = time.perf_counter() - t
        accs = cross_accuracy(global_model, clients, cfg=cfg, device=accelerator.device)
        rows += [result_row(seed, "global_model", i, c, accs, None) for i, c in enumerate(clients)]
        t = time.perf_counter()
        new_rows, info = personalize_all(cfg, strategies, global_model, clients, seed=seed, out=out, accelerator=accelerator)
        rows, train_info = rows + new_rows, train_info + info
        timings[f"personalize_seed_{seed}"] = time.perf_counter() - t
    results, summary, markdown = write_results(out, rows)
    timings["total"] = time.perf_counter() - t0
    write_json(out / "run_record.json", {
        "run_info": {"seeds": cfg.run.seeds, "timings_seconds": timings, "manifest_sha256": fed.indices_hash(),
                     "clients": fed.client_ids, "strategies": {n: s.describe() for n, s in strategies.items()}},
        "train_info": {"fedavg_history": fedavg_history, "personalization": train_info},
        "meta_info": meta_info()})
    return RunResult(out, results, summary, markdown)
