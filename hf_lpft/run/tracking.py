"""The run's Accelerator and its trackers (``run.report_to``): what is logged, under ``<output_dir>/logs``."""

from __future__ import annotations

import logging
import os

import torch
from accelerate import Accelerator

from hf_lpft.config import ConfigError, ExperimentConfig
from hf_lpft.layout import RunLayout

logger = logging.getLogger(__name__)


def cpu_only_launch() -> bool:
    """Several processes (``torchrun``) on a machine without GPUs: accelerate's multi-CPU (gloo) mode needs
    ``cpu=True`` (``accelerate launch --cpu`` says so through ``ACCELERATE_USE_CPU``; plain torchrun does not)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def make_accelerator(cfg: ExperimentConfig, layout: RunLayout, accelerator: Accelerator | None) -> Accelerator:
    """The run's Accelerator; with ``run.report_to`` set, one whose tracker logs under ``layout.logs``.

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
    accelerator = Accelerator(log_with=report_to, project_dir=str(layout.logs), cpu=cpu_only_launch(),
                              **precision)
    flat = {f"{sec}.{k}": v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
            for sec, values in cfg.to_dict().items() for k, v in values.items()}
    accelerator.init_trackers(layout.root.name or "hf_lpft", config=flat)
    return accelerator


def launch_precision(cfg: ExperimentConfig) -> str:
    """The mixed precision the run's Accelerator will use: ``run.mixed_precision``, else the one ``accelerate
    launch --mixed_precision`` passes (``ACCELERATE_MIXED_PRECISION``), else no."""
    return (cfg.run.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION") or "no").lower()


def check_precision(accelerator) -> None:
    """fp16 needs a GPU: on CPU accelerate would accept it and silently train in float32. ``accelerator``: an
    Accelerator, or anything with its ``mixed_precision`` and ``device`` (preflight: before the Accelerator)."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("mixed precision fp16 needs a GPU (on CPU accelerate would silently train in float32); "
                          "use bf16 (run.mixed_precision bf16 / accelerate launch --mixed_precision bf16) or no")


def log_scalars(accelerator: Accelerator, values: dict, step: int | None = None) -> None:
    """Scalars to the trackers (numbers only; None dropped); a no-op without trackers."""
    values = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if accelerator.trackers and values:
        accelerator.log(values, step=step)


def log_unit(accelerator: Accelerator, record: dict) -> None:
    """A unit's results (``seed_<s>/<strategy>/<client>/<metric>``) and its epoch curve (step = epoch)."""
    row = record["row"]
    prefix = f"seed_{row['seed']}/{row['strategy']}/{row['client_id']}"
    keys = ("local_acc", "global_acc", "distortion_local", "distortion_global", "final_train_loss")
    log_scalars(accelerator, {f"{prefix}/{k}": row.get(k) for k in keys})
    for point in record["curves"]:
        log_scalars(accelerator, {f"{prefix}/curve/{k}": point.get(k) for k in keys[:4] + ("train_loss",)},
                    step=point["epoch"])


def finish_trackers(accelerator: Accelerator) -> None:
    """Flush and close the trackers (``end_training`` would also tear down the process group)."""
    for tracker in accelerator.trackers:
        tracker.finish()
