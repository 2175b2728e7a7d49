"""General-FL algorithms and their registry: server aggregation, an optional client-side term, optional state.

The paper personalizes the global model of a general-FL method (arXiv 2511.12695, Sec. 3: post-hoc PFT is
plug-and-play after any of them). An algorithm (``fedavg.fl_strategy``) is one file in this folder with a
``@register_algorithm`` class, as PFT strategies are (``hf_lpft.strategies``). Both engines drive the same
class (``fedavg.engine: builtin`` in ``hf_lpft.federated.fedavg``, ``flower`` in ``hf_lpft.federated.flower``):

* client side, in every sampled client's local training: :meth:`GeneralFL.local_objective` (a term added to
  the loss, e.g. FedProx's proximal term or SCAFFOLD's control-variate correction), then
  :meth:`GeneralFL.client_result` (what the client sends besides its weights, and its new own state);
* server side: the clients' weights averaged with :meth:`GeneralFL.client_weight` (float64 sums in client
  order), their uploads summed, then :meth:`GeneralFL.aggregate` (the new global weights and server state).

State (:class:`FLState`): the server's own tensors and each client's, kept by the engine and saved with the
round checkpoint, so a run resumes mid-way. A client's state travels with its TRAIN message (Flower): the
nodes stay stateless (a SuperNode runs each message in a fresh process), and for SCAFFOLD the server learns
nothing new by holding c_i, which is the sum of the Δc_i the client sent it.

Uploads are summed (not gathered) so the built-in engine keeps memory flat and all-reduces them across
processes; an aggregation that needs every client's update (Krum, medians) is one of Flower's strategies,
registered as adapters for the Flower engine (``flower_adapters``).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from hf_lpft.config import ConfigError, _coerce, check_field_types
from hf_lpft.registry import Registry, check_entry_class
from hf_lpft.train.averaging import finish

ENGINES = ("builtin", "flower")
LossHook = Callable[[nn.Module], torch.Tensor | None]


@dataclass
class AlgorithmConfig:
    """Options every algorithm takes (none yet); subclasses add typed, validated fields."""

    def __post_init__(self) -> None:
        check_field_types(self, "fedavg.fl_strategy_args")  # every option of every subclass: type, finite


@dataclass
class FLState:
    """What persists across rounds: the server's tensors and each client's (by client id), both empty at start."""

    server: dict[str, torch.Tensor] = field(default_factory=dict)
    clients: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


@dataclass
class WeightedSums:
    """The clients' weights as float64 sums with their total weight (``hf_lpft.train.averaging``)."""

    sums: dict
    total: float

    def mean(self, like: dict) -> dict:
        """The weighted average, cast to the dtypes of ``like`` (FedAvg's aggregate, bit for bit)."""
        return finish(self.sums, self.total, like)

    def mean64(self) -> dict:
        """The weighted average of the float tensors in float64 (other tensors as summed: the first client's)."""
        return {k: v / self.total if v.is_floating_point() else v for k, v in self.sums.items()}


class GeneralFL:
    """A general-FL algorithm; the defaults are FedAvg's (McMahan et al. 2017).

    Subclasses set ``name``, ``display_name``, ``description`` and ``config_cls`` (typed options), and may
    restrict ``engines``.
    """

    name: ClassVar[str]
    display_name: ClassVar[str]
    description: ClassVar[str]
    engines: ClassVar[tuple[str, ...]] = ENGINES
    config_cls: ClassVar[type[AlgorithmConfig]] = AlgorithmConfig
    stateful: ClassVar[bool] = False  # keeps server or client state across rounds (saved with checkpoints)

    def __init__(self, config: AlgorithmConfig | None = None):
        self.config = config if config is not None else self.config_cls()

    @classmethod
    def check_options(cls, args: dict) -> AlgorithmConfig:
        """``fedavg.fl_strategy_args`` as the typed, validated ``config_cls``; unknown names fail, listing the
        allowed ones."""
        hints = typing.get_type_hints(cls.config_cls)
        allowed = sorted(f.name for f in dataclasses.fields(cls.config_cls))
        unknown = sorted(set(args) - set(allowed))
        if unknown:
            raise ConfigError(f"fedavg.fl_strategy_args: unknown option(s) {unknown} for {cls.name!r}; allowed: "
                              f"{allowed or f'none ({cls.name} is configured by fedavg.*)'}")
        return cls.config_cls(**{k: _coerce(f"fedavg.fl_strategy_args.{k}", v, hints[k]) for k, v in args.items()})

    # -- client side ---------------------------------------------------------------------------------------
    def local_objective(self, model: nn.Module, *, server_state: dict, client_state: dict) -> LossHook | None:
        """A term added to the local loss, built once before local training (``model`` holds the start weights)."""
        return None

    def client_result(self, *, start: dict, trained: dict, server_state: dict, client_state: dict, steps: int,
                      lr: float) -> tuple[dict, dict | None]:
        """(upload, new client state) after local training in ``steps`` optimizer steps of learning rate ``lr``:
        ``start`` holds the model's parameters (by name) before it, ``trained`` the state dict after it. Uploads
        are summed over the round's clients (keys and shapes as :meth:`upload_template`); None = keep no state."""
        return {}, None

    def upload_template(self, model: nn.Module) -> dict:
        """Zeros shaped like one client's upload (a process that trained no client adds them in an all-reduce)."""
        return {}

    # -- server side ---------------------------------------------------------------------------------------
    def client_weight(self, n_train: int) -> float:
        """A client's weight in the average of the weights: its train examples (FedAvg)."""
        return float(n_train)

    def aggregate(self, global_state: dict, weights: WeightedSums, uploads: dict, server_state: dict, *,
                  n_sampled: int, n_clients: int) -> tuple[dict, dict]:
        """(new global state, new server state) from the round's weighted sums and summed uploads."""
        return weights.mean(global_state), server_state

    # -- description ---------------------------------------------------------------------------------------
    def options(self) -> dict:
        return dataclasses.asdict(self.config)

    def describe(self) -> dict:
        """The algorithm as the run record (``run_info.general_fl``) and the cards show it."""
        return {"name": self.name, "display_name": self.display_name, "description": self.description,
                "implementation": f"{type(self).__module__}.{type(self).__qualname__}",
                "engines": list(self.engines), "options": self.options()}

    def to_message(self) -> str:
        """Name and options as one JSON string (a Flower TRAIN message's ``fl-algorithm`` config value)."""
        return json.dumps({"name": self.name, "options": self.options()}, sort_keys=True)


def from_message(text: str) -> GeneralFL:
    """The algorithm a TRAIN message names (:meth:`GeneralFL.to_message`)."""
    spec = json.loads(text)
    return build_algorithm(spec["name"], spec["options"])


def check_algorithm_class(cls: type) -> None:
    """A registrable algorithm: a GeneralFL subclass that names and describes itself, on known engines."""
    check_entry_class(cls, GeneralFL, kind="algorithm", own=("name", "display_name", "description"))
    if not cls.engines or set(cls.engines) - set(ENGINES):
        raise ValueError(f"algorithm {cls.name!r}: engines={cls.engines!r} must be a non-empty subset of {ENGINES}")


ALGORITHMS: Registry[type[GeneralFL]] = Registry(
    "general-FL algorithm", check=check_algorithm_class,
    unknown=lambda name, names: ConfigError(f"fedavg.fl_strategy={name!r} is not allowed; choose one of "
                                            f"{sorted(names)}"))


def register_algorithm(cls: type[GeneralFL]) -> type[GeneralFL]:
    """Class decorator: add a general-FL algorithm to the registry under ``cls.name``."""
    return ALGORITHMS.register(cls)


def unregister_algorithm(name: str) -> type[GeneralFL]:
    """Remove ``name`` from the registry (e.g. an algorithm a test registered); returns its class."""
    return ALGORITHMS.unregister(name)


def get_algorithm(name: str) -> type[GeneralFL]:
    return ALGORITHMS.lookup(name)


def build_algorithm(name: str, args: dict | None = None, *, engine: str | None = None) -> GeneralFL:
    """The algorithm ``name`` with validated options (``fedavg.fl_strategy_args``), checked to run on ``engine``.

    Raises:
        ConfigError: an unknown algorithm, engine or option, or a bad value; one line naming what is allowed.
    """
    cls = get_algorithm(name)
    if engine is not None and engine not in cls.engines:
        raise ConfigError(f"fedavg.fl_strategy={name!r} runs on fedavg.engine {' or '.join(map(repr, cls.engines))}"
                          f", not {engine!r}; it needs fedavg.engine='{cls.engines[0]}'")
    return cls(cls.check_options(dict(args or {})))


def local_steps(n_train: int, batch_size: int, local_epochs: int) -> int:
    """Optimizer steps of one client's local training (``train_phase``: no batch dropped)."""
    return local_epochs * -(-n_train // batch_size)
