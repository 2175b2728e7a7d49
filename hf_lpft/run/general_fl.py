"""The general-FL algorithm of a run (``fedavg.fl_strategy`` on ``fedavg.engine``): built, checked, described."""

from __future__ import annotations

from hf_lpft.algorithms import GeneralFL, build_algorithm
from hf_lpft.config import ExperimentConfig


def algorithm_of(cfg: ExperimentConfig) -> GeneralFL:
    """``fedavg.fl_strategy`` with its validated ``fedavg.fl_strategy_args``, checked to run on ``fedavg.engine``.

    Raises:
        ConfigError: an unknown algorithm or option, a bad value, or an engine the algorithm does not run on.
    """
    f = cfg.fedavg
    return build_algorithm(f.fl_strategy, f.fl_strategy_args, engine=f.engine)


def describe_general_fl(cfg: ExperimentConfig) -> dict | None:
    """The run record's ``run_info.general_fl``: the algorithm, its options and the engine; None when the
    global model is given (no general FL runs)."""
    if cfg.model.global_model is not None:
        return None
    return algorithm_of(cfg).describe() | {"engine": cfg.fedavg.engine, "rounds": cfg.fedavg.rounds}
