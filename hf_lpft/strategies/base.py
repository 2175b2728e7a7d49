"""Strategy interface and registry: a strategy declares phases and hooks, never loops.

Adding a PFT method = one file in this folder with a ``@register_strategy`` class that says its
``name``, ``display_name`` (tables and cards) and ``export_kind`` (what its export writes); registration
checks them, so no table elsewhere lists strategies.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from hf_lpft.config import ConfigError, _coerce, check_field_types
from hf_lpft.registry import Registry, check_entry_class
from hf_lpft.train.phase import BN_MODES, SOLVERS, Phase

# What ``Strategy.export`` writes: a SplitModel folder (``save_pretrained``; the Hub export keeps only the head
# when the backbone equals θ_G's) or a peft adapter folder (adapters + head, loaded onto θ_G).
EXPORT_KINDS = {"full": "a SplitModel folder (model.safetensors + config.json)",
                "adapter": "a peft adapter folder (adapter_config.json + adapter_model.safetensors)"}


@dataclass(frozen=True)
class Budget:
    """The budget every strategy shares (the paper: 15 local epochs for every method)."""

    epochs: int = 15
    lr: float = 0.01
    head_lr: float | None = None

    @property
    def probe_lr(self) -> float:
        return self.head_lr if self.head_lr is not None else self.lr


@dataclass
class StrategyConfig:
    """Options every strategy takes."""

    flood: float | None = field(default=None, metadata={"help": (
        "Loss flooding level b (Ishida et al. 2020): loss -> |loss - b| + b. None = off.")})

    def __post_init__(self) -> None:
        check_field_types(self, type(self).__name__)  # every option of every subclass: type, finite numbers
        if self.flood is not None and not self.flood >= 0:
            raise ConfigError(f"flood={self.flood!r} must be >= 0 (or None to switch flooding off)")


def check_probe_budget(strategy: str, lp_epochs: int, epochs: int) -> None:
    """Probing epochs come out of the shared budget; more than the budget fails naming the flag that fixes it.

    Chosen behaviour (no silent rescaling): the split is what the options say; a budget too small for
    it is an error that suggests ``lp_epochs`` at the default's ratio (5 of 15, a third) or a larger budget.
    """
    if lp_epochs > epochs:
        fit = min(epochs, max(1, round(epochs / 3)))
        raise ConfigError(f"{strategy}.lp_epochs={lp_epochs!r} exceeds the budget pft.epochs={epochs}; pass "
                          f"--pft.strategy_args '{{{strategy}: {{lp_epochs: {fit}}}}}' (YAML: pft.strategy_args."
                          f"{strategy}.lp_epochs: {fit}) or raise --pft.epochs to at least {lp_epochs}")


@dataclass
class ProbeConfig(StrategyConfig):
    """Options of strategies with a probing phase (LP, LP-FT): how the probe is fitted."""

    probe: str = field(default="sgd", metadata={"help": (
        "Probe solver: sgd (the run's optimizer for the probing epochs) or logreg (to convergence: L2-regularised "
        "multinomial logistic regression on frozen eval-mode features, L-BFGS, strength chosen on 20% held-out "
        "training data, warm-started from the global head; Kumar et al. 2022).")})
    probe_l2: list[float] | None = field(default=None, metadata={"help": (
        "L2 strengths the logreg probe chooses from; None = 1e-5 ... 1.")})


def check_bn(name: str, value: str) -> None:
    if value not in BN_MODES:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {list(BN_MODES)}")


def check_probe(prefix: str, probe: str, l2: list[float] | None, bn: str) -> None:
    """Options of a probing phase: its solver, the L2 grid of the converged probe, its BatchNorm mode."""
    if probe not in SOLVERS:
        raise ConfigError(f"{prefix}.probe={probe!r} is not allowed; choose one of {list(SOLVERS)}")
    if probe == "logreg" and bn == "train":
        raise ConfigError(f"{prefix}.probe='logreg' fits the head on fixed features, so the probe's BatchNorm mode "
                          f"must be frozen or reestimate, not {bn!r}")
    if l2 is not None and (not l2 or any(not (v > 0 and math.isfinite(v)) for v in l2)):
        raise ConfigError(f"{prefix}.probe_l2={l2!r} must be a non-empty list of finite L2 strengths > 0 (or unset)")


class Strategy(ABC):
    """A personalized fine-tuning method.

    Subclasses set ``name``, ``display_name``, ``description``, ``export_kind`` (one of :data:`EXPORT_KINDS`)
    and ``config_cls`` and implement :meth:`phases`.
    """

    name: ClassVar[str]
    display_name: ClassVar[str]
    description: ClassVar[str]
    export_kind: ClassVar[str]
    config_cls: ClassVar[type[StrategyConfig]] = StrategyConfig

    def __init__(self, config: StrategyConfig | None = None, *, budget: Budget | None = None):
        self.config = config if config is not None else self.config_cls()
        self.budget = budget if budget is not None else Budget()

    @property
    def ingredients(self) -> int:
        """How many independent runs of the phases to make (soups use more than one)."""
        return 1

    def prepare(self, model: nn.Module) -> nn.Module:
        """Wrap or modify the model before training (e.g. inject LoRA adapters)."""
        return model

    @abstractmethod
    def phases(self) -> list[Phase]:
        """The phases to run, in order."""

    def extra_loss(self, model: nn.Module, phase: Phase):
        """A term added to the loss (e.g. a proximal penalty), or None."""
        return None

    def grad_hook(self, model: nn.Module, phase: Phase):
        """A callable run after backward and before the step (e.g. a gradient mask), or None."""
        return None

    def check_model(self, model: nn.Module) -> None:
        """Raise ConfigError when options do not fit ``model``'s architecture (e.g. unknown module names).

        The pipeline calls this on a throwaway model before FedAvg, so such errors come before any training.
        """

    def post_step(self, model: nn.Module, phase: Phase):
        """A callable run after every optimizer step (e.g. restore masked weights), or None."""
        return None

    def frozen_entries(self, model: nn.Module, phase: Phase) -> dict[str, torch.Tensor] | None:
        """Boolean masks (by parameter name) of entries ``phase`` keeps fixed although their tensor is
        trainable (e.g. a sparse update mask), or None. Lets tests check exactly what may change."""
        return None

    def on_phase_start(self, model: nn.Module, phase: Phase, data) -> None:
        """Called before each phase (e.g. snapshot the global weights, compute a mask)."""

    def eval_view(self, model: nn.Module) -> nn.Module:
        """The model to evaluate mid-training (epoch curves); default the trained model itself."""
        return model

    def finalize(self, models: list[nn.Module]) -> nn.Module:
        """Combine the ingredient models into the personalized model (default: the only one)."""
        return models[0]

    def export(self, model: nn.Module, path) -> None:
        """Write the personalized model to the folder ``path`` (default: ``save_pretrained``: safetensors + config)."""
        model.save_pretrained(path)

    def hub_format(self) -> str:
        """What the Hub folder holds for this strategy's clients (hf_lpft.hub.export.export_client decides from
        the weights): ``peft_adapter`` for adapter exports; ``head`` (``head.safetensors`` only) when no phase
        that runs can change the backbone (only the head trains, BatchNorm frozen), as in LP; else ``full``."""
        if self.export_kind == "adapter":
            return "peft_adapter"
        running = [p for p in self.phases() if p.epochs > 0 or p.solver == "logreg"]
        frozen = all(p.trainable in ("head", "none") and p.bn == "frozen" for p in running)
        return "head" if running and frozen else "full"

    def describe(self) -> dict:
        """Config and phases, for the run record and the model card."""
        return {"name": self.name, "config": dataclasses.asdict(self.config),
                "phases": [dataclasses.asdict(p) for p in self.phases()],
                "display_name": self.display_name, "export_kind": self.export_kind}


def check_strategy_class(cls: type) -> None:
    """A registrable strategy: a Strategy subclass that sets its own ``name`` and ``display_name`` (a subclass
    must not show its parent's), a ``description`` and an ``export_kind`` from :data:`EXPORT_KINDS`."""
    check_entry_class(cls, Strategy, kind="strategy", own=("name", "display_name"))
    if not isinstance(getattr(cls, "description", None), str) or not cls.description.strip():
        raise TypeError(f"strategy class {cls.__name__} must set 'description' (a non-empty string)")
    if getattr(cls, "export_kind", None) not in EXPORT_KINDS:
        raise ValueError(f"strategy {cls.name!r}: export_kind={getattr(cls, 'export_kind', None)!r} is not allowed; "
                         f"choose one of {list(EXPORT_KINDS)}")


STRATEGIES: Registry[type[Strategy]] = Registry(
    "strategy", check=check_strategy_class,
    unknown=lambda name, names: ConfigError(f"unknown strategy {name!r}; registered strategies: {sorted(names)}"))


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: add a strategy to the registry under ``cls.name`` after :func:`check_strategy_class`
    (as peft checks the methods it registers)."""
    return STRATEGIES.register(cls)


def unregister_strategy(name: str) -> type[Strategy]:
    """Remove ``name`` from the registry (e.g. a strategy a test registered); returns its class."""
    return STRATEGIES.unregister(name)


def display_name(name: str) -> str:
    """How tables and cards show strategy ``name``: its ``display_name``, or ``name`` for one not registered
    in this process (e.g. read back from an older run folder)."""
    cls = STRATEGIES.get(name)
    return cls.display_name if cls is not None else name


def get_strategy(name: str) -> type[Strategy]:
    """The registered strategy class called ``name``."""
    return STRATEGIES.lookup(name)


def build_strategy(name: str, args: dict | None = None, *, budget: Budget | None = None,
                   check_phases: bool = True) -> Strategy:
    """Instantiate a strategy with validated options; unknown option names fail.

    ``check_phases=False`` (a strategy configured but not run now) checks names, types and ranges of the
    options only, not how they fit the budget (e.g. ``lp_epochs`` > ``pft.epochs``): that binds runs only."""
    cls = get_strategy(name)
    hints = typing.get_type_hints(cls.config_cls)
    args = dict(args or {})
    unknown = set(args) - set(hints)
    if unknown:
        raise ConfigError(f"unknown option(s) {sorted(unknown)} for strategy {name!r}; allowed: {sorted(hints)}")
    values = {k: _coerce(f"pft.strategy_args.{name}.{k}", v, hints[k]) for k, v in args.items()}
    strategy = cls(cls.config_cls(**values), budget=budget)
    if check_phases:
        strategy.phases()  # build once so bad combinations (e.g. lp_epochs > epochs) fail now
    return strategy


def fresh_copy(model: nn.Module) -> nn.Module:
    """An independent copy of the global model for one client (the global model is never touched)."""
    return copy.deepcopy(model)
