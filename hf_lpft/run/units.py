"""Personalization units over processes: every (seed, strategy, client) unit trained, evaluated on every
client and exported; the k-th unit on process ``k % num_processes``, records gathered on every process."""

from __future__ import annotations

import logging
import time

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from hf_lpft._faults import fault_point
from hf_lpft.config import ExperimentConfig
from hf_lpft.data.tensors import ClientData
from hf_lpft.evaluation.clients import (
    NO_DISTORTION,
    EvalSettings,
    epoch_curve_callback,
    evaluate_on_clients,
    result_row,
)
from hf_lpft.evaluation.shared_features import SharedBackbone
from hf_lpft.federated.fedavg import my_share
from hf_lpft.federated.fedbn import client_global_model
from hf_lpft.layout import RunLayout, save_model
from hf_lpft.models.backbone import SplitModel
from hf_lpft.run.personalize import personalize, probe_all_clients
from hf_lpft.run.settings import eval_settings
from hf_lpft.run.tracking import log_unit
from hf_lpft.strategies import Strategy
from hf_lpft.train.loop import NonFiniteLossError, derive_seed
from hf_lpft.train.optim import settings_from

logger = logging.getLogger(__name__)


def failed_unit(cfg: ExperimentConfig, strategy: Strategy, clients: list[ClientData], i: int, *, seed: int,
                err: Exception, start: float) -> dict:
    """The record of a unit whose loss went non-finite (``run.on_error: skip``): NaN accuracies, the error kept."""
    if cfg.run.on_error == "raise":
        raise err
    logger.error("%s / %s / seed %d failed: %s", strategy.name, clients[i].client_id, seed, err)
    nan, sample = [float("nan")] * len(clients), sample_of(cfg, len(clients), i, seed)
    return {"row": result_row(seed, strategy.name, i, clients[i], nan, None, sample=sample) | NO_DISTORTION
            | {"error": str(err)},
            "phases": [], "curves": [], "seconds": time.perf_counter() - start}


def sample_of(cfg: ExperimentConfig, n: int, i: int, seed: int) -> list[int] | None:
    """The other clients client i's models are scored on in ``cfg``'s run (None = all: Global exact)."""
    return eval_settings(cfg.run, cfg.pft).sample(n, i, seed)


def personalize_unit(cfg: ExperimentConfig, strategy: Strategy, global_model: SplitModel, clients: list[ClientData],
                     i: int, *, seed: int, layout: RunLayout, accelerator: Accelerator, evaluation: EvalSettings,
                     reference: list | None = None, probed=None, shared: SharedBackbone | None = None) -> dict:
    """One (seed, strategy, client) unit: train, evaluate on every client, export into ``layout``; return its
    record.

    ``reference``: the start model's features on every client's test split (adds the distortion columns).
    ``probed``: this client's batched probing result (replaces the first phase); ``shared``: θ_G's test
    features for models that keep θ_G's backbone. ``stage_seconds`` splits the unit's time."""
    p, client, start = cfg.pft, clients[i], time.perf_counter()
    settings = settings_from(p)
    curves: list[dict] = []
    unit_seed = derive_seed(seed, strategy.name, client.client_id)
    sample = evaluation.sample(len(clients), i, seed)  # None: every other client (Global exact)
    try:
        # Draws from torch's global generator (e.g. LoRA's init in prepare) then depend on this unit alone, not
        # on which units ran before it in this process: resumed runs and any client order give the same result.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(unit_seed)
            model, records = personalize(strategy, global_model, client, settings=settings, accelerator=accelerator,
                                         seed=unit_seed, probed=probed,
                                         on_epoch_end=epoch_curve_callback(evaluation, clients, i, curves,
                                                                           accelerator.device, reference,
                                                                           strategy, sample))
    except NonFiniteLossError as err:
        return failed_unit(cfg, strategy, clients, i, seed=seed, err=err, start=start)
    trained = time.perf_counter()
    accs, dist = evaluate_on_clients(model, clients, i, settings=evaluation, device=accelerator.device,
                                     reference=reference, shared=shared, sample=sample)
    evaluated = time.perf_counter()
    losses = [r["epoch_loss"][-1] for r in records if r["epoch_loss"]]
    save_model(model, layout.client_dir(strategy.name, client.client_id, seed), strategy)
    row = result_row(seed, strategy.name, i, client, accs, losses[-1] if losses else None,
                     sample=sample) | dist | {"error": None}
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
                    "epoch curves need every epoch's head" if p.eval_every else "FedBN: each client has its own "
                                                                                "backbone")
        return None
    settings = settings_from(p)
    return probe_all_clients(strategy, global_model, clients, settings=settings, accelerator=accelerator,
                             seeds=[derive_seed(seed, strategy.name, c.client_id) for c in clients])


def personalize_all(cfg: ExperimentConfig, strategies: dict[str, Strategy], global_model: SplitModel,
                    clients: list[ClientData], *, seed: int, layout: RunLayout, accelerator: Accelerator,
                    evaluation: EvalSettings, client_bn: dict | None = None,
                    references: list | None = None) -> list[dict]:
    """Every strategy on every client, skipping units a previous (interrupted) run completed (``layout``'s
    checkpoints); with FedBN (``client_bn``) client i personalizes θ_G carrying its own BatchNorm tensors."""
    ckpt = layout.checkpoints
    units = [(s, i) for s in strategies for i in range(len(clients))]
    records, probed, fresh = {}, {}, set()
    shared = None if client_bn else SharedBackbone(global_model, clients, batch_size=evaluation.batch_size,
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
                                      clients, i, seed=seed, layout=layout, accelerator=accelerator,
                                      evaluation=evaluation, reference=references[i] if references else None,
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
