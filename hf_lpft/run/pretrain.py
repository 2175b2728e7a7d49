"""The global model θ_G of a seed: FedAvg (builtin or Flower), a stored FedAvg result, or a given model.

The paper (arXiv 2511.12695, Sec. 3) personalizes the global model of FedAvg; every PFT strategy of a
sweep starts from the same θ_G, so runs that share what FedAvg depends on may share one FedAvg result.
With ``run.fedavg_cache`` set, the finished global model (with FedBN the clients' own BatchNorm tensors,
and the FedAvg history) is stored under ``<fedavg_cache>/<key>/``, the key being the SHA-256 of the
canonical JSON of everything FedAvg depends on (:func:`fedavg_cache_key`). A hit loads it and trains
nothing; a miss trains and stores it: written into a temporary folder inside the cache, then renamed onto
the key (``os.rename`` of a folder is atomic, and fails when another run stored the key meanwhile, whose
entry is then kept). Only the main process writes; it alone decides hit or miss and tells the others,
so every process of a run takes the same path even while another run stores the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from hf_lpft import __version__
from hf_lpft._faults import fault_point
from hf_lpft.algorithms import FLState
from hf_lpft.checkpoint import Checkpoints, RoundCheckpoint
from hf_lpft.config import ConfigError, ExperimentConfig
from hf_lpft.data.preprocess import preprocessing_for
from hf_lpft.data.tensors import ClientData, TextInputs
from hf_lpft.federated.fedavg import run_fedavg
from hf_lpft.io import write_json
from hf_lpft.layout import RunLayout, save_model
from hf_lpft.models.backbone import SplitModel, build_model
from hf_lpft.run.general_fl import algorithm_of
from hf_lpft.run.given_model import load_global_model
from hf_lpft.run.tracking import log_scalars
from hf_lpft.speed import use_memory_format
from hf_lpft.train.loop import derive_seed
from hf_lpft.train.optim import settings_from

logger = logging.getLogger(__name__)


@dataclass
class GlobalModel:
    """θ_G of one seed, its FedAvg history, FedBN client BatchNorm (or None), and where it came from."""

    model: SplitModel
    history: list[dict]
    client_bn: dict | None
    source: dict


def obtain_global_model(cfg: ExperimentConfig, clients: list[ClientData], num_classes: int, *, seed: int,
                        layout: RunLayout, accelerator: Accelerator,
                        class_names: list[str] | None = None) -> GlobalModel:
    """θ_G for ``seed``: the given ``model.global_model``, else FedAvg through ``run.fedavg_cache`` when set;
    saved (with its round checkpoint) into ``layout``. ``class_names``: the federation's (None: unnamed), saved
    with the model as ``id2label``."""
    names = {"class_names": class_names}
    if cfg.model.global_model is not None:
        given = given_global_model(cfg, num_classes, seed=seed, layout=layout, accelerator=accelerator, **names)
    elif cfg.run.fedavg_cache is not None:
        given = cached_pretrain(cfg, clients, num_classes, seed=seed, layout=layout, accelerator=accelerator, **names)
    else:
        model, history = pretrain(cfg, clients, num_classes, seed=seed, layout=layout, accelerator=accelerator, **names)
        client_bn = layout.checkpoints.load_client_bn(seed) if cfg.fedavg.bn == "local" else None
        given = GlobalModel(model, history, client_bn, {"source": "fedavg"})
    use_memory_format(given.model, cfg.run.memory_format)  # personalization trains in the same format (speed.py)
    return given


def given_global_model(cfg: ExperimentConfig, num_classes: int, *, seed: int, layout: RunLayout,
                       accelerator: Accelerator, class_names: list[str] | None = None) -> GlobalModel:
    """The given global model, also saved as the run's ``global/`` (the output folder's usual layout); it takes
    the federation's ``class_names`` when the dataset names its classes, else keeps its own."""
    if cfg.fedavg.bn == "local":
        raise ConfigError(f"model.global_model={cfg.model.global_model!r} has no per-client BatchNorm; "
                          "fedavg.bn='local' (FedBN) needs FedAvg to run: set fedavg.bn averaged")
    with torch.random.fork_rng(devices=[]):  # the head's seeded init leaves the global generator as it was
        model, info = load_global_model(cfg, num_classes, seed=seed)
    if class_names is not None:
        if list(model.id2label.values()) not in (list(class_names), [str(i) for i in range(num_classes)]):
            logger.info("model.global_model=%r names its classes %s; the federation's %s replace them",
                        cfg.model.global_model, list(model.id2label.values()), list(class_names))
        model.set_class_names(class_names)
    model = model.to(accelerator.device).eval()
    if accelerator.is_main_process:
        save_model(model, layout.global_dir(seed))
    accelerator.wait_for_everyone()
    return GlobalModel(model, [], None, info)


def _digest(clients: list[ClientData]) -> list[list[str]]:
    """[client id, SHA-256 of its train and test tensors (dtype, shape, bytes)] for every client."""
    out = []
    for c in clients:
        h = hashlib.sha256()
        for t in (c.train_x, c.train_y, c.test_x, c.test_y):
            for part in ((t.input_ids, t.attention_mask) if isinstance(t, TextInputs) else (t,)):
                part = part.detach().cpu().contiguous()
                h.update(f"{part.dtype}{tuple(part.shape)}".encode())
                h.update(part.numpy())
        out.append([c.client_id, h.hexdigest()])
    return out


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fedavg_cache_key(cfg: ExperimentConfig, clients: list[ClientData], num_classes: int, *,
                     seed: int) -> tuple[str, dict]:
    """(key, payload): the SHA-256 of the canonical JSON of everything FedAvg's result depends on.

    The data enter as what FedAvg consumes: every client's id and train/test tensors, hashed. That covers
    the dataset, its size and image size, the scheme and its parameters, the partition seed, test fraction,
    shifts and tokenization, and nothing that only PFT or evaluation reads (pft.*, run.distortion, ...),
    so a manifest and the config that wrote it share a key. Then the model section (a checkpoint file by
    its content), the whole fedavg section, the run seed, the class count and the hf_lpft version.
    """
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "global_model"}
    if model["checkpoint"] is not None:
        model["checkpoint"] = {"sha256": _file_sha256(model["checkpoint"])}
    payload = {"hf_lpft": __version__, "seed": seed, "num_classes": num_classes, "clients": _digest(clients),
               "model": model, "fedavg": dataclasses.asdict(cfg.fedavg)}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest(), payload


def _main_decides(value: bool, accelerator: Accelerator) -> bool:
    """The main process's ``value`` on every process."""
    if accelerator.num_processes == 1:
        return value
    return bool(broadcast_object_list([value], from_process=0)[0])


def load_entry(entry: Path, device) -> tuple[SplitModel, list[dict], dict | None]:
    """(θ_G, history, client BatchNorm or None) of a stored FedAvg result."""
    ckpt = Checkpoints(entry)  # history and FedBN tensors in the run's checkpoint format (seed 0, no state)
    history = ckpt.load_round(0).history
    return SplitModel.from_pretrained(entry).to(device).eval(), history, ckpt.load_client_bn(0)


def remove_dead_temporaries(entry: Path) -> list[Path]:
    """Delete the temporary folders of ``entry``'s key that killed writers on this host left (their process
    is gone); a writer that is alive, or on another host, is left alone."""
    removed, mark = [], f".{entry.name}."
    for tmp in entry.parent.glob(f"{mark}*.tmp"):
        pid, _, rest = tmp.name[len(mark):].partition("@")
        if pid.isdigit() and rest.startswith(f"{socket.gethostname()}.") and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def store_entry(entry: Path, model: SplitModel, history: list[dict], client_bn: dict | None, payload: dict) -> bool:
    """Store a FedAvg result under ``entry`` atomically; False (theirs kept) when another run stored it first."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(entry)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.{os.getpid()}@{socket.gethostname()}.",
                                suffix=".tmp"))
    try:
        model.save_pretrained(tmp)
        Checkpoints(tmp).save_round(0, {}, history, client_bn=client_bn)
        write_json(tmp / "key.json", payload)
        fault_point("fedavg_cache_store")
        try:
            os.rename(tmp, entry)
        except OSError:  # the key exists: stored by another run or process meanwhile
            logger.info("FedAvg result %s was stored meanwhile by another run; keeping that one", entry.name)
            return False
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_pretrain(cfg: ExperimentConfig, clients: list[ClientData], num_classes: int, *, seed: int,
                    layout: RunLayout, accelerator: Accelerator, class_names: list[str] | None = None) -> GlobalModel:
    """θ_G from ``run.fedavg_cache`` when stored there, else FedAvg (resumable as usual), then stored."""
    key, payload = fedavg_cache_key(cfg, clients, num_classes, seed=seed)
    entry = Path(cfg.run.fedavg_cache) / key
    hit = _main_decides((entry / "model.safetensors").is_file(), accelerator)
    if hit:
        model, history, client_bn = load_entry(entry, accelerator.device)
        model.set_class_names(class_names)  # names are not in the key: they change no weight
        if accelerator.is_main_process:  # the usual output layout: global/ and the (FedBN) round checkpoint
            save_model(model, layout.global_dir(seed))
            layout.checkpoints.save_round(seed, model.state_dict(), history, client_bn=client_bn)
        accelerator.wait_for_everyone()
        logger.info("seed %d: FedAvg result %s loaded from %s (no FedAvg)", seed, key, cfg.run.fedavg_cache)
        return GlobalModel(model, history, client_bn, {"source": "fedavg_cache", "key": key,
                                                       "fedavg_cache": cfg.run.fedavg_cache})
    model, history = pretrain(cfg, clients, num_classes, seed=seed, layout=layout, accelerator=accelerator,
                              class_names=class_names)
    client_bn = layout.checkpoints.load_client_bn(seed) if cfg.fedavg.bn == "local" else None
    stored = store_entry(entry, model, history, client_bn, payload) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    return GlobalModel(model, history, client_bn, {"source": "fedavg", "key": key, "stored": stored,
                                                   "fedavg_cache": cfg.run.fedavg_cache})


def initial_model(cfg: ExperimentConfig, num_classes: int, *, seed: int, class_names: list[str] | None = None,
                  device=None) -> SplitModel:
    """The seeded model general FL starts from (both drivers: this pipeline and the Flower App's server),
    named ``class_names``, on ``device`` (None: where it was built) in ``run.memory_format``."""
    m = cfg.model
    model = build_model(m.backbone, num_classes=num_classes, image_size=cfg.data.image_size, pretrained=m.pretrained,
                        checkpoint=m.checkpoint, pooling=m.pooling, dropout=m.dropout,
                        seed=derive_seed(seed, "init") % 2**31, preprocessing=preprocessing_for(cfg),
                        class_names=class_names)
    if device is not None:
        model = model.to(device)
    return use_memory_format(model, cfg.run.memory_format)  # channels_last for CNNs: hf_lpft.speed


def resumed_fl_state(ckpt: Checkpoints, seed: int, saved: RoundCheckpoint | None, *,
                     stateful: bool) -> FLState | None:
    """A stateful general-FL algorithm's state (e.g. SCAFFOLD's control variates): as saved with the resumed
    round, else empty; None for a stateless algorithm."""
    if not stateful:
        return None
    return FLState(*((ckpt.load_fl_state(seed) if saved else None) or ({}, {})))


def pretrain(cfg: ExperimentConfig, clients: list[ClientData], num_classes: int, *, seed: int, layout: RunLayout,
             accelerator: Accelerator, class_names: list[str] | None = None) -> tuple[SplitModel, list[dict]]:
    """The global model θ_G (named ``class_names``): FedAvg from scratch, from a round checkpoint, or reloaded
    when complete."""
    f, ckpt = cfg.fedavg, layout.checkpoints
    done = layout.global_dir(seed)
    saved = ckpt.load_round(seed) if cfg.run.resume else None
    if saved is not None and saved.rounds == f.rounds and (done / "model.safetensors").is_file():
        return use_memory_format(SplitModel.from_pretrained(done).to(accelerator.device).eval(),
                                 cfg.run.memory_format), saved.history
    model = initial_model(cfg, num_classes, seed=seed, class_names=class_names, device=accelerator.device)
    if saved is not None:
        model.load_state_dict(saved.state)
    settings = settings_from(f)
    client_bn = ((ckpt.load_client_bn(seed) if saved else None) or {}) if f.bn == "local" else None
    algorithm = algorithm_of(cfg)  # fedavg.fl_strategy (hf_lpft.algorithms)
    fl_state = resumed_fl_state(ckpt, seed, saved, stateful=algorithm.stateful)

    def round_end(rnd: int, state: dict, hist: list) -> None:
        if accelerator.is_main_process:  # one writer when several processes run
            ckpt.save_round(seed, state, hist, client_bn=client_bn, fl_state=fl_state)
        log_scalars(accelerator, {f"seed_{seed}/fedavg/{k}": v for k, v in hist[-1].items() if k != "round"}, step=rnd)
    if f.engine == "flower":
        model, history = flower_pretrain(cfg, model, clients, seed=seed, saved=saved, accelerator=accelerator,
                                         on_round_end=round_end, fl_state=fl_state)
    else:
        model, history = run_fedavg(model, clients, rounds=f.rounds, local_epochs=f.local_epochs, lr=f.lr,
                                    client_fraction=f.client_fraction, settings=settings, accelerator=accelerator,
                                    seed=seed, eval_every=f.eval_every, start_round=saved.rounds if saved else 0,
                                    history=saved.history if saved else None, client_bn=client_bn,
                                    on_round_end=round_end, algorithm=algorithm, fl_state=fl_state)
    if accelerator.is_main_process:
        save_model(model, done)
        if f.rounds == 0:
            ckpt.save_round(seed, model.state_dict(), [], client_bn=client_bn, fl_state=fl_state)
    accelerator.wait_for_everyone()  # global/ and the FedBN checkpoint are complete before any process reads them
    return model, history


def flower_pretrain(cfg: ExperimentConfig, model: SplitModel, clients: list[ClientData], *, seed: int,
                    saved: RoundCheckpoint | None, accelerator: Accelerator, on_round_end,
                    fl_state: FLState | None = None) -> tuple[SplitModel, list[dict]]:
    """General FL on Flower's local simulation (``fedavg.engine: flower``), resumable from a round checkpoint
    (with a stateful algorithm's ``fl_state``, updated in place)."""
    if accelerator.num_processes > 1:
        raise ConfigError(f"fedavg.engine='flower' runs in one process (Flower's simulation runs the clients in "
                          f"parallel itself), not {accelerator.num_processes}; launch without accelerate/torchrun "
                          "or choose fedavg.engine builtin")
    try:
        from hf_lpft.federated.flower import run_flower_fedavg
    except ImportError as err:
        raise ConfigError(f"fedavg.engine='flower' needs Flower ({err}); pip install 'hf-lpft[flower]' or choose "
                          "fedavg.engine builtin") from err
    f = cfg.fedavg
    algorithm_of(cfg)  # a ConfigError now, not in the server
    model, history = run_flower_fedavg(model, clients, rounds=f.rounds, local_epochs=f.local_epochs, lr=f.lr,
                                       client_fraction=f.client_fraction, settings=settings_from(f), seed=seed,
                                       eval_every=f.eval_every, fl_strategy=f.fl_strategy,
                                       fl_strategy_options=f.fl_strategy_args, num_threads=cfg.run.num_threads,
                                       start_round=saved.rounds if saved else 0,
                                       history=saved.history if saved else None, on_round_end=on_round_end,
                                       fl_state=fl_state)
    return model.to(accelerator.device), history

