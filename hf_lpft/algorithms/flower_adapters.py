"""Flower's own strategies as general-FL entries of the Flower engine (``fedavg.engine: flower``).

Their aggregation is Flower's (``flwr.serverapp.strategy``); sampling, node mapping, failure handling and
evaluation stay hf_lpft's (``hf_lpft.federated.flower.SeededNodes``), and clients train as in FedAvg (no
client-side term, no state). Options are the strategy class's constructor arguments, checked against its
signature when the run starts (Flower is imported only then: it is an optional extra).
"""

from __future__ import annotations

import inspect
import typing
from typing import ClassVar

from hf_lpft.algorithms.base import GeneralFL, register_algorithm
from hf_lpft.config import ConfigError, _coerce

# fedavg.fl_strategy -> the class in flwr.serverapp.strategy
FLOWER_CLASSES = {"fedadam": "FedAdam", "fedadagrad": "FedAdagrad", "fedyogi": "FedYogi", "fedavgm": "FedAvgM",
                  "fedmedian": "FedMedian", "fedtrimmedavg": "FedTrimmedAvg", "krum": "Krum", "multikrum": "MultiKrum",
                  "bulyan": "Bulyan", "qfedavg": "QFedAvg"}


# constructor arguments hf_lpft sets itself: sampling is SeededNodes', the message layout is the ClientApp's
MANAGED_ARGS = frozenset({"fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
                          "min_available_nodes", "weighted_by_key", "arrayrecord_key", "configrecord_key",
                          "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn", "train_loss_key"})


def strategy_options(class_name: str) -> dict[str, tuple[type, object]]:
    """The options of the Flower strategy class ``class_name`` a user may set: option -> (type, default)."""
    from flwr.serverapp import strategy as flwr_strategies

    cls = getattr(flwr_strategies, class_name)
    hints = typing.get_type_hints(cls.__init__)
    return {k: (hints.get(k, object), p.default) for k, p in inspect.signature(cls.__init__).parameters.items()
            if k != "self" and k not in MANAGED_ARGS and p.kind is not p.VAR_KEYWORD}


class FlowerAdapter(GeneralFL):
    """A Flower strategy class (``flower_class``) with its constructor options; the Flower engine only."""

    engines = ("flower",)
    flower_class: ClassVar[str]

    @classmethod
    def check_options(cls, args: dict) -> dict:
        """Options coerced to the types the constructor declares; unknown, missing or ill-typed ones fail."""
        options = strategy_options(cls.flower_class)
        unknown = sorted(set(args) - set(options))
        if unknown:
            raise ConfigError(f"fedavg.fl_strategy_args: unknown option(s) {unknown} for {cls.name!r}; allowed: "
                              f"{sorted(options)}")
        missing = sorted(k for k, (_, d) in options.items() if d is inspect.Parameter.empty and k not in args)
        if missing:
            raise ConfigError(f"fedavg.fl_strategy_args: {cls.name!r} needs option(s) {missing}")
        out = {}
        for k, v in args.items():
            hint = options[k][0]
            out[k] = _coerce(f"fedavg.fl_strategy_args.{k}", v, hint) if hint in (int, float, bool, str) else v
            if hint in (int, float, bool, str) and not isinstance(out[k], hint):
                raise ConfigError(f"fedavg.fl_strategy_args.{k}={v!r} must be a {hint.__name__}")
        return out

    def options(self) -> dict:
        """The given options over the constructor's scalar defaults (what the run record shows)."""
        return {k: self.config.get(k, d) for k, (_, d) in strategy_options(self.flower_class).items()
                if k in self.config or isinstance(d, (int, float, bool, str))}

    def describe(self) -> dict:
        return super().describe() | {"implementation": f"flwr.serverapp.strategy.{self.flower_class}"}

    def aggregate(self, *args, **kwargs):
        raise NotImplementedError(f"{self.name} aggregates in Flower's {self.flower_class} (fedavg.engine flower)")


for _name, _cls in FLOWER_CLASSES.items():
    register_algorithm(type(f"Flower{_cls}", (FlowerAdapter,), {
        "name": _name, "display_name": _cls, "flower_class": _cls, "__module__": __name__,
        "description": f"Flower's {_cls} (flwr.serverapp.strategy.{_cls}): Flower's aggregation, FedAvg's clients."}))
