"""The Flower engine seen from a run: its config checked and turned into the explicit arguments of
:mod:`hf_lpft.federated.flower` (which knows no run config)."""

from __future__ import annotations

import dataclasses

from hf_lpft.algorithms import build_algorithm
from hf_lpft.config import ExperimentConfig
from hf_lpft.federated.flower import LocalTraining
from hf_lpft.train.optim import settings_from


def local_training(cfg: ExperimentConfig) -> LocalTraining:
    """A client's local FedAvg update as ``cfg.fedavg`` and ``run.num_threads`` say (the built-in engine's values)."""
    f = cfg.fedavg
    return LocalTraining(f.rounds, f.local_epochs, f.lr, settings_from(f), cfg.run.num_threads)


def check_fl_strategy(name: str, args: dict | None) -> dict:
    """Validated options of ``fedavg.fl_strategy`` on the Flower engine (coerced to the declared types).

    Raises:
        ConfigError: unknown algorithm, one that does not run on Flower, unknown or missing option (the error
            lists the allowed ones) or a bad value.
    """
    config = build_algorithm(name, args, engine="flower").config
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)

