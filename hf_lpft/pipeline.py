"""federate -> pretrain (FedAvg) -> personalize (every strategy, every client) -> evaluate -> export.

Output folder (a contract): ``config.yaml``, ``run_record.json``, ``federation/manifest.json``,
``global/`` (the global model), ``clients/<strategy>/<client_id>/`` (personalized weights),
``results.parquet`` (one row per seed x strategy x client) and ``summary.md``. With several seeds,
model folders get a ``seed_<s>`` level: ``global/seed_<s>/``, ``clients/<strategy>/<client_id>/seed_<s>/``.
Analyses: ``cross_client.parquet`` (model of client i on the test split of client j), ``curves.parquet``
(Local / Global / Δ every ``pft.eval_every`` epochs), ``report.md`` with ``figures/*.png``
(hf_lpft.evaluation.report), ``logs/`` (the ``run.report_to`` tracker). Results rows carry
``distortion_local`` / ``distortion_global`` (Δ on the own / other clients' test splits) and
``cka_local`` / ``cka_global`` against the model the client started from; ``global_model`` rows hold
Δ = 0, CKA = 1 by definition, and every row holds NaN when ``run.distortion`` is off.
With ``fedavg.bn: local`` (FedBN) ``global/`` holds the averaged BatchNorm only as a fallback; each client's
own BatchNorm tensors are in ``checkpoints/seed_<s>/fedavg/client_bn.safetensors``, client i personalizes
θ_G with its own BatchNorm, and its ``global_model`` row evaluates that model on every client.

Several processes (``accelerate launch`` / ``torchrun``): FedAvg deals each round's sampled clients out to the
processes and all-reduces their sums (hf_lpft.federated.fedavg); personalization deals out the (strategy,
client) units, the k-th to process ``k % num_processes``, and gathers their records on every process. The
main process writes everything shared (the folder itself, manifest, config, round checkpoints, ``global/``,
results, run record, report); each process exports the client models of its own units and their unit
records (disjoint paths, each written atomically, so ``run.resume`` works with any number of processes).
The output folder must therefore be on a filesystem every process sees (one node, or a shared mount).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import pandas as pd
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from hf_lpft._faults import fault_point
from hf_lpft.checkpoint import Checkpoints
from hf_lpft.config import ConfigError, ExperimentConfig
from hf_lpft.data.federate import Federation, save_manifest
from hf_lpft.data.load import client_tensors, client_text_tensors
from hf_lpft.data.preprocess import preprocessing_for
from hf_lpft.data.tensors import ClientData
from hf_lpft.evaluation.distortion import distortion_by_client, extract_features, features_and_predictions
from hf_lpft.evaluation.metrics import format_markdown, global_drop_split, local_global, summary_table
from hf_lpft.evaluation.report import cross_client_frame, write_report
from hf_lpft.evaluation.shared_features import SharedBackbone
from hf_lpft.federated.fedavg import my_share
from hf_lpft.hub.push import publish_run
from hf_lpft.io import atomic_path, meta_info, write_json, write_text
from hf_lpft.models.backbone import SplitModel, build_model, load_tokenizer
from hf_lpft.run.pretrain import client_global_model, obtain_global_model
from hf_lpft.run.preflight import (build_strategies, check_backbone, check_dataset, check_output_dir,  # noqa: F401
                                   check_strategies, check_text_inputs, federation_checked, load_dataset_checked,
                                   preflight)
from hf_lpft.strategies import Strategy
from hf_lpft.speed import contiguous_weights, memory_format_of, resolve_num_threads
from hf_lpft.strategies.personalize import personalize, probe_all_clients
from hf_lpft.train.loop import NonFiniteLossError, accuracy, derive_seed
from hf_lpft.train.optim import settings_from

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    output_dir: Path
    results: pd.DataFrame
    summary: pd.DataFrame
    markdown: str


OUTPUT_NAMES = ("config.yaml", "run_record.json", "federation", "global", "clients", "checkpoints",
                "results.parquet", "curves.parquet", "summary.md", "cross_client.parquet", "report.md", "figures",
                "logs", "hub")


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete what a killed run left half-written (``atomic_path`` names: ``.<name>.<random>.tmp``)."""
    stale = sorted(p for p in out.rglob(".*.tmp") if p.is_dir() or p.is_file())
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if stale:
        logger.info("removed %d half-written file(s) of an interrupted run in %s", len(stale), out)
    return stale


def prepare_output_dir(cfg: ExperimentConfig) -> Path:
    """Create the output folder (checked first by ``check_output_dir``); a non-empty one that is not resumed
    with the same config is overwritten: only what a run writes is removed."""
    out = check_output_dir(cfg)
    resuming = cfg.run.resume and (out / "config.yaml").is_file()
    if not resuming and out.is_dir() and any(out.iterdir()):
        check_writable(out)
        for name in OUTPUT_NAMES:  # start again: remove only what a run writes
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    check_writable(out)
    remove_stale_temporaries(out)
    return out


def check_writable(out: Path) -> None:
    """Create ``out`` and write (then delete) a probe file in it: ``os.access`` misses read-only mounts and root."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ConfigError(f"run.output_dir={str(out)!r} is not writable ({err.strerror or err}); "
                          "choose a folder you can create and write files in") from err


def client_inputs(cfg: ExperimentConfig, ds: datasets.Dataset, fed: Federation) -> list[ClientData]:
    """Every client's tensors: decoded images, or text tokenized with the backbone's tokenizer."""
    d = cfg.data
    if d.text_column:
        return client_text_tensors(ds, fed, text_column=d.text_column, label_column=d.label_column,
                                   tokenizer=load_tokenizer(cfg.model.backbone), max_length=d.max_seq_len)
    return client_tensors(ds, fed, image_column=d.image_column, label_column=d.label_column, image_size=d.image_size,
                          preprocessing=preprocessing_for(cfg))


def build_federation(cfg: ExperimentConfig, out: Path, timings: dict | None = None, *, write: bool = True,
                     federated: tuple | None = None) -> tuple[Federation, list[ClientData]]:
    """The checked federation (``federated``, from ``federation_checked``, or computed now), its manifest
    written (``write``: False on all but the main process) and every client's decoded tensors; seconds of
    each step into ``timings``: data_load, partition, decode_inputs."""
    ds, fed, stage_seconds = federated if federated is not None else federation_checked(cfg)
    t = time.perf_counter()
    if write:
        save_manifest(fed, out / "federation" / "manifest.json")
    clients = client_inputs(cfg, ds, fed)
    stage_seconds["decode_inputs"] = time.perf_counter() - t
    if timings is not None:
        timings.update(stage_seconds)
    return fed, clients


def save_model(model: SplitModel, path: Path, strategy: Strategy | None = None) -> None:
    """Export into a temporary folder, then rename (no half-written checkpoint)."""
    with atomic_path(path, directory=True) as tmp, contiguous_weights(model):  # files never depend on the format
        if strategy is None:
            model.save_pretrained(tmp)
        else:
            strategy.export(model, tmp)
        fault_point("export_model")  # test hook (hf_lpft._faults); a no-op in real runs


def cross_accuracy(model, clients: list[ClientData], *, cfg: ExperimentConfig, device,
                   shared: SharedBackbone | None = None) -> list[float]:
    """The model's accuracy on every client's test split (row of the cross-client matrix); from θ_G's
    features computed once (``shared``) when the model's backbone is θ_G's (e.g. LP)."""
    if shared is not None and (accs := shared.accuracies(model)) is not None:
        return accs
    return [accuracy(model, c.test_x, c.test_y, batch_size=cfg.run.eval_batch_size, device=device) for c in clients]


NO_DISTORTION = {"distortion_local": float("nan"), "distortion_global": float("nan"),
                 "cka_local": float("nan"), "cka_global": float("nan")}
# A global_model row compares the model a client starts from with itself: Δ = 0 and CKA = 1 by definition
# (NaN, like every row, when run.distortion is off).
SELF_DISTORTION = {"distortion_local": 0.0, "distortion_global": 0.0, "cka_local": 1.0, "cka_global": 1.0}


def evaluate_on_clients(model, clients: list[ClientData], i: int, *, cfg: ExperimentConfig, device,
                        reference: list | None = None, shared: SharedBackbone | None = None) -> tuple[list[float], dict]:
    """Accuracy on every client's test split and, given the start model's features there (``reference``),
    the distortion columns (hf_lpft.evaluation.distortion), from one forward pass per split."""
    if reference is None:
        return cross_accuracy(model, clients, cfg=cfg, device=device, shared=shared), dict(NO_DISTORTION)
    if shared is not None and (accs := shared.accuracies(model)) is not None:
        return accs, distortion_by_client(reference, reference, i)  # θ_G's backbone bit for bit: Δ = 0
    accs, feats = [], []
    for c in clients:
        f, pred = features_and_predictions(model, c.test_x, batch_size=cfg.run.eval_batch_size, device=device)
        feats.append(f)
        accs.append((pred == c.test_y).float().mean().item() if len(c.test_y) else float("nan"))
    return accs, distortion_by_client(reference, feats, i)


def reference_features(cfg: ExperimentConfig, global_model: SplitModel, clients: list[ClientData],
                       client_bn: dict | None, device) -> list[list] | None:
    """Per client i: head-input features, on every client's test split, of the model client i starts from
    (θ_G, or with FedBN θ_G with client i's BatchNorm); None when ``run.distortion`` is off."""
    if not cfg.run.distortion:
        return None

    def feats(model):
        return [extract_features(model, c.test_x, batch_size=cfg.run.eval_batch_size, device=device) for c in clients]
    if not client_bn:
        return [feats(global_model)] * len(clients)
    return [feats(client_global_model(global_model, client_bn, c.client_id)) for c in clients]


def result_row(seed: int, strategy: str, i: int, client: ClientData, accs: list[float], final_loss: float | None) -> dict:
    local, global_ = local_global(accs, i)
    return {"seed": seed, "strategy": strategy, "client_id": client.client_id, "client_index": i,
            "n_train": client.n_train, "n_test": client.n_test, "local_acc": local, "global_acc": global_,
            "acc_by_client": accs, "final_train_loss": final_loss}


def model_dir(out: Path, cfg: ExperimentConfig, seed: int, *parts: str) -> Path:
    """``global/`` or ``clients/<strategy>/<client>/``, with a ``seed_<s>`` level when there are several seeds."""
    path = out.joinpath(*parts)
    return path / f"seed_{seed}" if len(cfg.run.seeds) > 1 else path


def global_model_accuracies(cfg: ExperimentConfig, global_model: SplitModel, clients: list[ClientData],
                            client_bn: dict | None, device) -> list[list[float]]:
    """Row i: accuracies on every client's test split of the model client i personalizes from (the
    ``global_model`` rows: with FedBN, θ_G with client i's BatchNorm, also on the other clients' data)."""
    if not client_bn:
        return [cross_accuracy(global_model, clients, cfg=cfg, device=device)] * len(clients)
    return [cross_accuracy(client_global_model(global_model, client_bn, c.client_id), clients, cfg=cfg, device=device)
            for c in clients]


def batchnorm_record(cfg: ExperimentConfig, strategies: dict[str, Strategy]) -> dict:
    """The BatchNorm choices of the run, for ``run_record.json``."""
    return {"fedavg": cfg.fedavg.bn,
            "global_model_rows": ("theta_G with client i's own BatchNorm tensors, evaluated on every client"
                                  if cfg.fedavg.bn == "local" else "theta_G (BatchNorm averaged)"),
            "pft_phases": {n: {p.name: p.bn for p in s.phases()} for n, s in strategies.items()}}


def epoch_curve_callback(cfg: ExperimentConfig, clients: list[ClientData], i: int, curves: list, device,
                         reference: list | None = None, strategy: Strategy | None = None):
    """Record Local and Global (and, with ``reference``, Δ) every ``pft.eval_every`` epochs (counted across phases)."""
    counter = {"epoch": 0}

    def callback(model, phase: str, epoch: int, loss: float) -> None:
        fault_point("personalize_epoch")
        counter["epoch"] += 1
        if cfg.pft.eval_every and counter["epoch"] % cfg.pft.eval_every == 0:
            view = strategy.eval_view(model) if strategy is not None else model
            accs, dist = evaluate_on_clients(view, clients, i, cfg=cfg, device=device, reference=reference)
            local, global_ = local_global(accs, i)
            curves.append({"epoch": counter["epoch"], "phase": phase, "train_loss": loss, "local_acc": local,
                           "global_acc": global_, "distortion_local": dist["distortion_local"],
                           "distortion_global": dist["distortion_global"]})
    return callback


def personalize_unit(cfg: ExperimentConfig, strategy: Strategy, global_model: SplitModel, clients: list[ClientData],
                     i: int, *, seed: int, out: Path, accelerator: Accelerator, reference: list | None = None,
                     probed=None, shared: SharedBackbone | None = None) -> dict:
    """One (seed, strategy, client) unit: train, evaluate on every client, export; return its record.

    ``reference``: the start model's features on every client's test split (adds the distortion columns).
    ``probed``: this client's batched probing result (replaces the first phase); ``shared``: θ_G's test
    features for models that keep θ_G's backbone. ``stage_seconds`` splits the unit's time."""
    p, client, start = cfg.pft, clients[i], time.perf_counter()
    settings = settings_from(p)
    curves: list[dict] = []
    unit_seed = derive_seed(seed, strategy.name, client.client_id)
    try:
        # Draws from torch's global generator (e.g. LoRA's init in prepare) then depend on this unit alone, not
        # on which units ran before it in this process: resumed runs and any client order give the same result.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(unit_seed)
            model, records = personalize(strategy, global_model, client, settings=settings, accelerator=accelerator,
                                         seed=unit_seed, probed=probed,
                                         on_epoch_end=epoch_curve_callback(cfg, clients, i, curves,
                                                                           accelerator.device, reference,
                                                                           strategy))
    except NonFiniteLossError as err:
        if cfg.run.on_error == "raise":
            raise
        logger.error("%s / %s / seed %d failed: %s", strategy.name, client.client_id, seed, err)
        nan = [float("nan")] * len(clients)
        return {"row": result_row(seed, strategy.name, i, client, nan, None) | NO_DISTORTION | {"error": str(err)},
                "phases": [], "curves": [], "seconds": time.perf_counter() - start}
    trained = time.perf_counter()
    accs, dist = evaluate_on_clients(model, clients, i, cfg=cfg, device=accelerator.device, reference=reference,
                                     shared=shared)
    evaluated = time.perf_counter()
    losses = [r["epoch_loss"][-1] for r in records if r["epoch_loss"]]
    save_model(model, model_dir(out, cfg, seed, "clients", strategy.name, client.client_id), strategy)
    row = result_row(seed, strategy.name, i, client, accs, losses[-1] if losses else None) | dist | {"error": None}
    shared_probe = probed.record["seconds"] if probed is not None else 0.0  # its share of the batched probing
    stages = {"train": trained - start + shared_probe, "evaluate": evaluated - trained,
              "export": time.perf_counter() - evaluated}
    return {"row": row, "phases": records, "curves": curves, "seconds": sum(stages.values()), "stage_seconds": stages}


def batched_probes(cfg: ExperimentConfig, strategy: Strategy, global_model: SplitModel, clients: list[ClientData], *,
                   seed: int, accelerator: Accelerator, client_bn: dict | None) -> list | None:
    """With ``pft.batched_probe``: ``strategy``'s probing phase for all clients at once, or None (the
    loop probes each client) when batching is off or would not equal the loop."""
    p = cfg.pft
    if not p.batched_probe:
        return None
    if p.eval_every or client_bn:
        logger.info("%s: probing client by client, not batched (%s)", strategy.name,
                    "epoch curves need every epoch's head" if p.eval_every else "FedBN: each client has its own backbone")
        return None
    settings = settings_from(p)
    return probe_all_clients(strategy, global_model, clients, settings=settings, accelerator=accelerator,
                             seeds=[derive_seed(seed, strategy.name, c.client_id) for c in clients])


def personalize_all(cfg: ExperimentConfig, strategies: dict[str, Strategy], global_model: SplitModel,
                    clients: list[ClientData], *, seed: int, out: Path, accelerator: Accelerator,
                    client_bn: dict | None = None, references: list | None = None) -> list[dict]:
    """Every strategy on every client, skipping units a previous (interrupted) run completed; with FedBN
    (``client_bn``) client i personalizes θ_G carrying its own BatchNorm tensors."""
    ckpt = Checkpoints(out)
    units = [(s, i) for s in strategies for i in range(len(clients))]
    records, probed, fresh = {}, {}, set()
    shared = None if client_bn else SharedBackbone(global_model, clients, batch_size=cfg.run.eval_batch_size,
                                                   device=accelerator.device)
    mine = my_share(list(enumerate(units)), accelerator)  # several processes: unit k on process k % n
    for k, (name, i) in tqdm(mine, desc=f"personalize (seed {seed})", disable=not accelerator.is_main_process):
        cid = clients[i].client_id
        record = ckpt.load_unit(seed, name, cid) if cfg.run.resume else None
        if record is None:
            if name not in probed:
                probed[name] = batched_probes(cfg, strategies[name], global_model, clients, seed=seed,
                                              accelerator=accelerator, client_bn=client_bn)
            record = personalize_unit(cfg, strategies[name], client_global_model(global_model, client_bn, cid),
                                      clients, i, seed=seed, out=out, accelerator=accelerator,
                                      reference=references[i] if references else None,
                                      probed=probed[name][i] if probed[name] else None, shared=shared)
            fault_point("unit_exported")
            ckpt.save_unit(seed, name, cid, record)
            log_unit(accelerator, record)
            fresh.add(k)
            if i == len(clients) - 1:
                fault_point("strategy_done")
        records[k] = record
    return gather_units(records, fresh, accelerator)


def gather_units(records: dict[int, dict], fresh: set[int], accelerator: Accelerator) -> list[dict]:
    """Every process's unit records (unit index -> record), in unit order, on every process; the main
    process logs the units the others trained (trackers live on the main process)."""
    if accelerator.num_processes == 1:
        return [records[k] for k in sorted(records)]
    everything = gather_object([(k, r, k in fresh) for k, r in records.items()])
    for k, record, new in everything:
        if new and k not in records:
            log_unit(accelerator, record)
    return [record for _, record, _ in sorted(everything, key=lambda t: t[0])]


def cpu_only_launch() -> bool:
    """Several processes (``torchrun``) on a machine without GPUs: accelerate's multi-CPU (gloo) mode needs
    ``cpu=True`` (``accelerate launch --cpu`` says so through ``ACCELERATE_USE_CPU``; plain torchrun does not)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def make_accelerator(cfg: ExperimentConfig, out: Path, accelerator: Accelerator | None) -> Accelerator:
    """The run's Accelerator; with ``run.report_to`` set, one whose tracker logs under ``<output_dir>/logs``.

    A caller-supplied Accelerator is used as it is: configure its ``log_with`` yourself.
    """
    report_to = cfg.run.report_to
    if accelerator is not None:
        if report_to != "none" and not accelerator.log_with:
            logger.warning("run.report_to=%r ignored: the Accelerator passed to run() has no log_with", report_to)
        return accelerator
    precision = {"mixed_precision": cfg.run.mixed_precision} if cfg.run.mixed_precision else {}
    if report_to == "none":
        return Accelerator(cpu=cpu_only_launch(), **precision)
    from accelerate.tracking import get_available_trackers

    if report_to not in {str(t) for t in get_available_trackers()}:
        raise ConfigError(f"run.report_to={report_to!r} needs the {report_to!r} package, which is not installed; "
                          f"pip install {report_to} or choose run.report_to none")
    accelerator = Accelerator(log_with=report_to, project_dir=str(out / "logs"), cpu=cpu_only_launch(), **precision)
    flat = {f"{sec}.{k}": v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
            for sec, values in cfg.to_dict().items() for k, v in values.items()}
    accelerator.init_trackers(out.name or "hf_lpft", config=flat)
    return accelerator


def check_precision(accelerator: Accelerator) -> None:
    """fp16 needs a GPU: on CPU accelerate would accept it and silently train in float32."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("mixed precision fp16 needs a GPU (on CPU accelerate would silently train in float32); "
                          "use bf16 (run.mixed_precision bf16 / accelerate launch --mixed_precision bf16) or no")


def _log(accelerator: Accelerator, values: dict, step: int | None = None) -> None:
    """Scalars to the trackers (numbers only; None dropped); a no-op without trackers."""
    values = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if accelerator.trackers and values:
        accelerator.log(values, step=step)


def log_unit(accelerator: Accelerator, record: dict) -> None:
    """A unit's results (``seed_<s>/<strategy>/<client>/<metric>``) and its epoch curve (step = epoch)."""
    row = record["row"]
    prefix = f"seed_{row['seed']}/{row['strategy']}/{row['client_id']}"
    keys = ("local_acc", "global_acc", "distortion_local", "distortion_global", "final_train_loss")
    _log(accelerator, {f"{prefix}/{k}": row.get(k) for k in keys})
    for point in record["curves"]:
        _log(accelerator, {f"{prefix}/curve/{k}": point.get(k) for k in keys[:4] + ("train_loss",)},
             step=point["epoch"])


def write_curves(out: Path, records: list[dict]) -> None:
    """Epoch curves (Local/Global every k epochs), when recorded, as ``curves.parquet``."""
    rows = [{k: r["row"][k] for k in ("seed", "strategy", "client_id")} | c for r in records for c in r["curves"]]
    if rows:
        with atomic_path(out / "curves.parquet") as tmp:
            pd.DataFrame(rows).to_parquet(tmp, index=False)


def write_results(out: Path, rows: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """``results.parquet`` and ``summary.md``; rows of failed clients are kept with their error."""
    results = global_drop_split(pd.DataFrame(rows))  # + where Global went: BN statistics vs weights
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
    given = obtain_global_model(cfg, clients, num_classes, seed=seed, out=out, accelerator=accelerator)
    global_model, history, client_bn = given.model, given.history, given.client_bn
    timings[f"fedavg_seed_{seed}"] = time.perf_counter() - t
    t = time.perf_counter()
    accs = global_model_accuracies(cfg, global_model, clients, client_bn, accelerator.device)
    references = reference_features(cfg, global_model, clients, client_bn, accelerator.device)
    timings[f"evaluate_global_model_seed_{seed}"] = time.perf_counter() - t
    self_dist = SELF_DISTORTION if references else NO_DISTORTION
    global_rows = [{"row": result_row(seed, "global_model", i, c, accs[i], None) | self_dist | {"error": None},
                    "phases": [], "curves": [], "fedavg_history": history if i == 0 else None,
                    "global_source": given.source if i == 0 else None,
                    "memory_format": memory_format_of(global_model)} for i, c in enumerate(clients)]
    t = time.perf_counter()
    units = personalize_all(cfg, strategies, global_model, clients, seed=seed, out=out, accelerator=accelerator,
                            client_bn=client_bn, references=references)
    timings[f"personalize_seed_{seed}"] = time.perf_counter() - t
    for r in units:  # per strategy and stage (units resumed from an older run may lack stage_seconds)
        for stage, sec in (r.get("stage_seconds") or {}).items():
            key = f"personalize_{r['row']['strategy']}_{stage}_seed_{seed}"
            timings[key] = timings.get(key, 0.0) + sec
    return global_rows, units


def run(cfg: ExperimentConfig, *, accelerator: Accelerator | None = None) -> RunResult:
    """Run the whole study described by ``cfg`` and write the output folder."""
    strategies = preflight(cfg)  # every check that needs no data: nothing is written before they pass
    main = PartialState(cpu=cpu_only_launch()).is_main_process  # only the main process prepares the folder
    t0 = time.perf_counter()
    federated = federation_checked(cfg)  # dataset, labels, manifest, partition: in memory, before the folder
    out = prepare_output_dir(cfg) if main else Path(cfg.run.output_dir)
    own_trackers = accelerator is None and cfg.run.report_to != "none"
    accelerator = make_accelerator(cfg, out, accelerator)
    check_precision(accelerator)
    accelerator.wait_for_everyone()
    torch.set_num_threads(resolve_num_threads(cfg.run.num_threads))  # measured default: hf_lpft.speed
    timings = {}
    fed, clients = build_federation(cfg, out, timings, write=accelerator.is_main_process, federated=federated)
    if accelerator.is_main_process:
        write_text(out / "config.yaml", cfg.to_yaml())
    timings["federate"] = time.perf_counter() - t0
    records = []
    for seed in cfg.run.seeds:
        global_rows, units = run_seed(cfg, strategies, clients, fed.num_classes, seed=seed, out=out,
                                      accelerator=accelerator, timings=timings)
        records += global_rows + units
    if not accelerator.is_main_process:  # every process holds all records; the main process writes them
        results = pd.DataFrame([r["row"] for r in records])
        summary = summary_table(results[results.error.isna()])
        return RunResult(out, results, summary, format_markdown(summary))
    t = time.perf_counter()
    results, summary, markdown = write_results(out, [r["row"] for r in records])
    fault_point("export_results")
    write_curves(out, records)
    with atomic_path(out / "cross_client.parquet") as tmp:
        cross_client_frame(results).to_parquet(tmp, index=False)
    timings["write_results"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    write_json(out / "run_record.json", {
        "run_info": {"seeds": cfg.run.seeds, "timings_seconds": timings, "manifest_sha256": fed.indices_hash(),
                     "clients": fed.client_ids, "resumed": cfg.run.resume,
                     "num_processes": accelerator.num_processes,
                     "strategies": {n: s.describe() for n, s in strategies.items()},
                     "batchnorm": batchnorm_record(cfg, strategies),
                     "global_model": {r["row"]["seed"]: r["global_source"] for r in records if r.get("global_source")},
                     "preprocessing": preprocessing_for(cfg).to_dict(),
                     "mixed_precision": accelerator.mixed_precision,

                     "speed": {"torch_threads": torch.get_num_threads(), "fedavg_eval_every": cfg.fedavg.eval_every,
                               "memory_format": next((r["memory_format"] for r in records if "memory_format" in r), None)}},
        "train_info": {"fedavg_history": {r["row"]["seed"]: r["fedavg_history"] for r in records if r.get("fedavg_history")},
                       "personalization": [{k: r["row"][k] for k in ("seed", "strategy", "client_id", "error")}
                                           | {"phases": r["phases"], "seconds": r.get("seconds"),
                                              "stage_seconds": r.get("stage_seconds")}
                                           for r in records if r["row"]["strategy"] != "global_model"]},
        "meta_info": meta_info()})
    if accelerator.is_main_process:
        write_report(out)
    if own_trackers:
        for tracker in accelerator.trackers:  # flush and close (end_training would also tear down the process group)
            tracker.finish()
    if accelerator.is_main_process:
        publish_run(cfg, out)  # <out>/hub: the Hub-ready folders, pushed when cfg.hub.push_to_hub
    return RunResult(out, results, summary, markdown)
