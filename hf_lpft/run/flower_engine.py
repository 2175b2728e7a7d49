"""The Flower engine seen from a run: its config checked and turned into the explicit arguments of
:mod:`hf_lpft.federated.flower` (which knows no run config), and described for the run record."""

from __future__ import annotations

import inspect

from hf_lpft.config import ConfigError, ExperimentConfig, _coerce
from hf_lpft.federated.flower import FLOWER_STRATEGIES, LocalTraining, strategy_options
from hf_lpft.train.optim import settings_from


def local_training(cfg: ExperimentConfig) -> LocalTraining:
    """A client's local FedAvg update as ``cfg.fedavg`` and ``run.num_threads`` say (the built-in engine's values)."""
    f = cfg.fedavg
    return LocalTraining(f.rounds, f.local_epochs, f.lr, settings_from(f), cfg.run.num_threads)


def check_fl_strategy(name: str, args: dict | None) -> dict:
    """Validated options of ``fedavg.fl_strategy`` (coerced to the declared types).

    Raises:
        ConfigError: unknown strategy, unknown or missing option (the error lists the allowed ones) or a bad value.
    """
    if name not in FLOWER_STRATEGIES:
        raise ConfigError(f"fedavg.fl_strategy={name!r} is not allowed; choose one of {list(FLOWER_STRATEGIES)}")
    options, args = strategy_options(name), dict(args or {})
    unknown = sorted(set(args) - set(options))
    if unknown:
        raise ConfigError(f"fedavg.fl_strategy_args: unknown option(s) {unknown} for {name!r}; allowed: "
                          f"{sorted(options) or 'none (fedavg is configured by fedavg.*)'}")
    missing = sorted(k for k, (_, default) in options.items() if default is inspect.Parameter.empty and k not in args)
    if missing:
        raise ConfigError(f"fedavg.fl_strategy_args: {name!r} needs option(s) {missing}")
    out = {}
    for k, v in args.items():
        hint = options[k][0]
        out[k] = _coerce(f"fedavg.fl_strategy_args.{k}", v, hint) if hint in (int, float, bool, str) else v
        if hint in (int, float, bool, str) and not isinstance(out[k], hint):
            raise ConfigError(f"fedavg.fl_strategy_args.{k}={v!r} must be a {hint.__name__}")
    return out




def describe_fl_strategy(cfg: ExperimentConfig) -> dict:
    """The general-FL method of a run, for the run record and the cards."""
    f = cfg.fedavg
    options = check_fl_strategy(f.fl_strategy, f.fl_strategy_args)
    source = "hf_lpft FedAvg (float64 example-weighted, equal to the built-in engine)" if f.fl_strategy == "fedavg" \
        else f"flwr.serverapp.strategy.{FLOWER_STRATEGIES[f.fl_strategy]}"
    return {"name": f.fl_strategy, "implementation": source,
            "options": {k: (d if k not in options else options[k]) for k, (_, d) in
                        strategy_options(f.fl_strategy).items() if isinstance(d, (int, float, bool, str))}}
