"""federate -> pretrain (FedAvg) -> personalize (every strategy, every client) -> evaluate -> export.

Output folder (a contract): ``config.yaml``, ``run_record.json``, ``federation/manifest.json``,
``global/`` (the global model), ``clients/<strategy>/<client_id>/`` (personalized weights),
``results.parquet`` (one row per seed x strategy x client) and ``summary.md``. With several seeds,
model folders get a ``seed_<s>`` level: ``global/seed_<s>/``, ``clients/<strategy>/<client_id>/seed_<s>/``.
Analyses: ``cross_client.parquet`` (model i on client j's test split), ``curves.parquet``, ``report.md`` +
``figures/``, ``logs/``; results rows carry Δ and CKA against the model the client started from.
With ``fedavg.bn: local`` (FedBN) ``global/`` holds the averaged BatchNorm only as a fallback; each client's
own BatchNorm tensors are in ``checkpoints/seed_<s>/fedavg/client_bn.safetensors``, client i personalizes
θ_G with its own BatchNorm, and its ``global_model`` row evaluates that model on every client.

Several processes (``accelerate launch`` / ``torchrun``): FedAvg deals each round's sampled clients out to the
processes and all-reduces their sums (hf_lpft.federated.fedavg); personalization deals out the (strategy,
client) units, the k-th to process ``k % num_processes``, and gathers their records on every process. The
main process writes everything shared (the folder itself, manifest, config, round checkpoints, ``global/``,
results, run record, report); each process exports the client models of its own units and their unit
records (disjoint paths, each written atomically, so ``run.resume`` works with any number of processes), so
the output folder must be on a filesystem every process sees.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from accelerate import Accelerator, PartialState

from hf_lpft._faults import fault_point
from hf_lpft.checkpoint import resume_summary
from hf_lpft.config import ExperimentConfig
from hf_lpft.data.federate import Federation
from hf_lpft.data.tensors import ClientData
from hf_lpft.evaluation.clients import (
    global_model_accuracies,
    reference_features,
    write_cross_client,
    write_curves,
    write_results,
)
from hf_lpft.evaluation.metrics import format_markdown, summary_table
from hf_lpft.evaluation.report import write_report
from hf_lpft.hub.push import publish_run
from hf_lpft.io import write_json, write_text
from hf_lpft.layout import RunLayout
from hf_lpft.run.federation import build_federation, federation_inputs
from hf_lpft.run.given_model import check_global_model
from hf_lpft.run.preflight import federation_checked, preflight
from hf_lpft.run.pretrain import obtain_global_model
from hf_lpft.run.records import global_model_rows, run_record, speed_info
from hf_lpft.run.settings import eval_settings, prepare_folder, run_layout
from hf_lpft.run.tracking import check_precision, cpu_only_launch, finish_trackers, make_accelerator
from hf_lpft.run.units import personalize_all
from hf_lpft.speed import memory_format_of, resolve_num_threads
from hf_lpft.strategies import Strategy

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    output_dir: Path
    results: pd.DataFrame
    summary: pd.DataFrame
    markdown: str


def run_seed(cfg: ExperimentConfig, strategies: dict[str, Strategy], clients: list[ClientData], num_classes: int,
             *, seed: int, layout: RunLayout, accelerator: Accelerator, timings: dict,
             class_names: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """FedAvg then every personalization unit for one seed (every model named ``class_names``, saved into
    ``layout``); returns (global-model records, unit records)."""
    t, evaluation = time.perf_counter(), eval_settings(cfg.run, cfg.pft)
    given = obtain_global_model(cfg, clients, num_classes, seed=seed, layout=layout, accelerator=accelerator,
                                class_names=class_names)
    global_model, history, client_bn = given.model, given.history, given.client_bn
    timings[f"fedavg_seed_{seed}"] = time.perf_counter() - t
    t = time.perf_counter()
    accs = global_model_accuracies(evaluation, global_model, clients, client_bn, accelerator.device, seed=seed)
    references = reference_features(evaluation, global_model, clients, client_bn, accelerator.device)
    timings[f"evaluate_global_model_seed_{seed}"] = time.perf_counter() - t
    global_rows = global_model_rows(seed, clients, accs, history=history, source=given.source,
                                    distortion=references is not None, memory_format=memory_format_of(global_model),
                                    evaluation=evaluation)
    t = time.perf_counter()
    units = personalize_all(cfg, strategies, global_model, clients, seed=seed, layout=layout, accelerator=accelerator,
                            evaluation=evaluation, client_bn=client_bn, references=references)
    timings[f"personalize_seed_{seed}"] = time.perf_counter() - t
    for r in units:  # per strategy and stage (units resumed from an older run may lack stage_seconds)
        for stage, sec in (r.get("stage_seconds") or {}).items():
            key = f"personalize_{r['row']['strategy']}_{stage}_seed_{seed}"
            timings[key] = timings.get(key, 0.0) + sec
    return global_rows, units


def write_outputs(cfg: ExperimentConfig, strategies: dict[str, Strategy], fed: Federation, records: list[dict], *,
                  layout: RunLayout, timings: dict, t0: float, accelerator: Accelerator) -> RunResult:
    """The main process's outputs: results, summary, curves, cross-client matrix, run record, report."""
    t = time.perf_counter()
    results, summary, markdown = write_results(layout, [r["row"] for r in records],
                                               strategies={n: s.describe() for n, s in strategies.items()})
    fault_point("export_results")
    write_curves(layout, records)
    write_cross_client(layout, results)
    timings["write_results"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    speed = {"torch_threads": torch.get_num_threads()} | speed_info(cfg, records)
    write_json(layout.record, run_record(cfg, strategies, records, timings=timings, manifest_sha256=fed.indices_hash(),
                                         client_ids=fed.client_ids, num_processes=accelerator.num_processes,
                                         federation={"scheme": fed.scheme, "params": fed.params},
                                         extras={"mixed_precision": accelerator.mixed_precision, "speed": speed}))
    write_report(layout)
    return RunResult(layout.root, results, summary, markdown)


def run(cfg: ExperimentConfig, *, accelerator: Accelerator | None = None) -> RunResult:
    """Run the whole study described by ``cfg`` and write the output folder."""
    strategies = preflight(cfg)  # every check that needs no data: nothing is written before they pass
    if accelerator is not None:
        check_precision(accelerator)  # the caller's Accelerator, before anything is written
    main = PartialState(cpu=cpu_only_launch()).is_main_process  # only the main process prepares the folder
    t0 = time.perf_counter()
    federated = federation_checked(cfg)  # dataset, labels, manifest, partition: in memory, before the folder
    check_global_model(cfg, federated[1].num_classes)  # a given model's files, kind and head, before the folder
    inputs = federation_inputs(cfg, federated)  # every image decoded: a damaged file fails before the folder
    layout = run_layout(cfg.run)
    out = prepare_folder(cfg, layout) if main else layout.root
    if main:  # first, so that an interrupted run can always be resumed from its own config.yaml
        write_text(layout.config, cfg.to_yaml())
    own_trackers = accelerator is None and cfg.run.report_to != "none"
    accelerator = make_accelerator(cfg, layout, accelerator)
    check_precision(accelerator)
    accelerator.wait_for_everyone()
    torch.set_num_threads(resolve_num_threads(cfg.run.num_threads))  # measured default: hf_lpft.speed
    timings = {}
    fed, clients = build_federation(cfg, layout, timings, write=accelerator.is_main_process, inputs=inputs)
    if cfg.run.resume and accelerator.is_main_process:  # one line: what the interrupted run left that is reused
        logger.info(resume_summary(layout, rounds=None if cfg.model.global_model else cfg.fedavg.rounds,
                                   strategies=list(strategies), client_ids=fed.client_ids))
    timings["federate"] = time.perf_counter() - t0
    records = []
    for seed in cfg.run.seeds:
        global_rows, units = run_seed(cfg, strategies, clients, fed.num_classes, seed=seed, layout=layout,
                                      accelerator=accelerator, timings=timings, class_names=fed.class_names)
        records += global_rows + units
    if not accelerator.is_main_process:  # every process holds all records; the main process writes them
        results = pd.DataFrame([r["row"] for r in records])
        summary = summary_table(results[results.error.isna()])
        accelerator.wait_for_everyone()  # return only once the outputs exist: a caller may read them next
        return RunResult(out, results, summary, format_markdown(summary))
    result = write_outputs(cfg, strategies, fed, records, layout=layout, timings=timings, t0=t0,
                           accelerator=accelerator)
    if own_trackers:
        finish_trackers(accelerator)
    publish_run(cfg.hub, out)  # <out>/hub: the Hub-ready folders, pushed when cfg.hub.push_to_hub
    accelerator.wait_for_everyone()
    return result
