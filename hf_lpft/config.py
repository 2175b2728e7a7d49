"""Typed, validated configuration: defaults -> YAML -> CLI overrides -> dataclasses.

Every argument group is a dataclass whose fields carry ``metadata={"help": ...}``; ``__post_init__``
rejects bad values with a message that names the value and what is allowed. Unknown keys fail.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from hf_lpft.data.schemes import QUANTITY_MODES, SCHEMES
from hf_lpft.data.shifts import (  # noqa: F401 - CORRUPTION_MODES, SEVERITIES: the vocabularies of the shifts
    CORRUPTION_MODES,
    SEVERITIES,
    SHIFTS,
    shift_problem,
)

# ConfigError and REPO_ID live below the config (layers that must not import it use them) and are re-exported here.
from hf_lpft.errors import ConfigError
from hf_lpft.spec import REPO_ID, BackboneSpec


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    _check(value in allowed, f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    _check(ok, f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


_HINTS: dict[type, dict[str, Any]] = {}


def _describe(hint: Any) -> str:
    """What a type hint allows, in words ("an integer", "a list of strings", "None or a number")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple, set):
        return f"a list of {_describe(args[0]).split(' ', 1)[-1]}s" if args else "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    if origin is typing.Literal:
        return f"one of {list(args)}"
    return {type(None): "None", bool: "true or false", int: "an integer", float: "a finite number",
            str: "a string"}.get(hint, f"a {getattr(hint, '__name__', hint)}")


def _typed(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against ``hint`` (ints widened to float, tuples to lists); ConfigError naming it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _typed(name, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{name}={value!r} must be {_describe(hint)}")
    if origin in (list, tuple, set):
        _check(isinstance(value, (list, tuple)), f"{name}={value!r} must be {_describe(hint)}")
        try:
            return [_typed(name, v, args[0]) for v in value] if args else list(value)
        except ConfigError:
            raise ConfigError(f"{name}={value!r} must be {_describe(hint)}") from None
    if origin is dict or hint is dict:
        _check(isinstance(value, dict), f"{name}={value!r} must be a mapping")
        return {k: _typed(f"{name}[{k!r}]", v, args[1]) for k, v in value.items()} if len(args) == 2 else value
    if origin is typing.Literal:
        _check(value in args, f"{name}={value!r} is not allowed; choose one of {list(args)}")
        return value
    if hint is bool:
        _check(isinstance(value, bool), f"{name}={value!r} must be true or false")
    elif hint is int:
        _check(isinstance(value, numbers.Integral) and not isinstance(value, bool),
               f"{name}={value!r} must be an integer")
        return int(value)
    elif hint is float:
        _check(isinstance(value, numbers.Real) and not isinstance(value, bool), f"{name}={value!r} must be a number")
        _check(math.isfinite(value), f"{name}={value!r} must be a finite number (inf and nan are not allowed)")
        return float(value)
    elif isinstance(hint, type) and hint is not typing.Any:
        _check(isinstance(value, hint), f"{name}={value!r} must be {_describe(hint)}")
    return value


def check_field_types(obj: Any, section: str) -> None:
    """Check (and normalise: int -> float, tuple -> list) every field of the dataclass ``obj`` against its
    type hint; called first in each section's ``__post_init__``, so every field, also one added later,
    is checked when the dataclass is built from Python as well as from YAML/CLI.

    Raises:
        ConfigError: naming ``<section>.<field>``, the value and the type allowed.
    """
    cls = type(obj)
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        checked = _typed(f"{section}.{f.name}", value, _HINTS[cls][f.name])
        if checked is not value:
            object.__setattr__(obj, f.name, checked)


# Why a federation needs two clients (DataConfig, hf_lpft.run.preflight.check_clients).
ONE_CLIENT = ("a federation needs at least 2 clients: PFT's Global accuracy is measured on the other clients' "
              "test splits")


@dataclass
class DataConfig:
    """Which dataset to federate and how."""

    dataset: str = field(default="digits5", metadata={"help": (
        "Embedded dataset name (digits5), a Hub dataset id, or a local path saved with save_to_disk.")})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    split: str = field(default="train", metadata={"help": "Split of the source dataset to federate."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    text_column: str | None = field(default=None, metadata={"help": (
        "Column holding the text of a text dataset (e.g. text for topics); set, it replaces image_column: examples "
        "are tokenized with the backbone's tokenizer (needs an hf: backbone).")})
    max_seq_len: int = field(default=128, metadata={"help": (
        "Text: tokens kept per example (truncation); each batch is padded to its longest example.")})
    label_column: str = field(default="label", metadata={"help": (
        "Column holding the class labels (ClassLabel or int).")})
    domain_column: str = field(default="domain", metadata={"help": (
        "Column naming the domain of each example (natural scheme).")})
    scheme: str = field(default="natural", metadata={"help": (
        "Partition scheme (flwr-datasets partitioners): iid, dirichlet (label skew, alpha), pathological "
        "(classes_per_client classes a client), natural (one client per value of partition_by), quantity (size skew, "
        "quantity_mode), natural+dirichlet (clients_per_domain clients a domain with Dirichlet label skew inside "
        "each).")})
    partition_by: str | None = field(default=None, metadata={"help": (
        "Column to partition by, or joint columns as a+b; default domain_column for natural and natural+dirichlet, "
        "label_column for dirichlet and pathological.")})
    num_clients: int = field(default=5, metadata={"help": (
        "Number of clients (iid, dirichlet, pathological, quantity); natural uses the number of distinct values.")})
    alpha: float = field(default=0.5, metadata={"help": "Dirichlet concentration; smaller = more label skew."})
    min_partition_size: int = field(default=10, metadata={"help": (
        "Dirichlet and quantity: resample (at most 10 times) until every client has at least this many examples.")})
    classes_per_client: int = field(default=2, metadata={"help": "Pathological scheme: classes a client."})
    quantity_mode: str = field(default="dirichlet", metadata={"help": (
        "Quantity scheme: client sizes from dirichlet(alpha), linear, square or exponential in the client index.")})
    clients_per_domain: int = field(default=2, metadata={"help": "natural+dirichlet: clients a domain."})
    corruption: str = field(default="none", metadata={"help": (
        "Input-level covariate shift: none, or per_client (client i gets the i-th (corruption, severity) pair of "
        "hf_lpft.data.shifts.corruption_schedule, CIFAR-10-C families).")})
    corruption_families: list[str] | None = field(default=None, metadata={"help": (
        "Corruption families to cycle over; None = all 15 CIFAR-10-C families.")})
    corruption_severities: list[int] | None = field(default=None, metadata={"help": (
        "Severities (1-5) to rotate over; None = 1..5.")})
    label_permutation: int = field(default=0, metadata={"help": (
        "Concept shift: permute this many classes on each client with a seeded per-client cycle (0 = off).")})
    shifts: list[str] = field(default_factory=list, metadata={"help": (
        "More per-client shifts to switch on, by name: shifts registered with hf_lpft.data.shifts.register_shift "
        "(corruption and label_permutation are switched on by their own keys above).")})
    shift_args: dict[str, dict] = field(default_factory=dict, metadata={"help": (
        "Options of the shifts named in data.shifts, e.g. {my_shift: {strength: 0.5}}; unknown options fail.")})
    test_fraction: float = field(default=0.25, metadata={"help": (
        "Share of each client's data held out as its test split (stratified by label).")})
    max_examples_per_client: int | None = field(default=None, metadata={"help": (
        "Cap each client's examples (before the train/test split); None = no cap.")})
    image_size: int = field(default=32, metadata={"help": "Images are resized to image_size x image_size RGB."})
    n_per_domain: int = field(default=800, metadata={"help": (
        "Embedded datasets (digits5, digits-c, colored-digits): examples per domain (one domain = one client under "
        "the natural scheme).")})
    num_classes: int | None = field(default=None, metadata={"help": (
        "Expected number of classes; checked against the dataset when set.")})
    seed: int = field(default=0, metadata={"help": (
        "Partition seed: which examples each client gets and its train/test split; the same for every run.seeds "
        "entry. Not the training seed (run.seeds). No short form: a bare --seed is refused as ambiguous.")})
    manifest: str | None = field(default=None, metadata={"help": (
        "Path of a saved federation manifest to rebuild exactly the same partition.")})
    data_dir: str | None = field(default=None, metadata={"help": (
        "Your own data: the folder datasets.load_dataset reads, e.g. with dataset imagefolder "
        "(<data_dir>/<domain>/<class>/<image>).")})
    data_files: list[str] | None = field(default=None, metadata={"help": (
        "Your own data: files (or globs) for dataset csv, json or parquet, passed to datasets.load_dataset as "
        "data_files.")})
    domain_level: int | None = field(default=None, metadata={"help": (
        "Your own images: fill domain_column with the name of this folder level below data_dir (0 = the first level, "
        "e.g. <data_dir>/<domain>/<class>/<image>).")})

    def __post_init__(self) -> None:
        check_field_types(self, "data")
        _check_choice("data.scheme", self.scheme, tuple(SCHEMES))  # the registry: hf_lpft.data.schemes
        _check_data_keys(f"data.scheme={self.scheme!r}", "scheme", SCHEMES[self.scheme].options)
        _check(self.classes_per_client >= 1, f"data.classes_per_client={self.classes_per_client!r} must be >= 1")
        _check_choice("data.quantity_mode", self.quantity_mode, QUANTITY_MODES)
        _check(self.clients_per_domain >= 1, f"data.clients_per_domain={self.clients_per_domain!r} must be >= 1")
        for name, shift in SHIFTS.items():  # the registry: hf_lpft.data.shifts
            _check_data_keys(f"shift {name!r}", "shift", shift.options)
        problem = shift_problem(vars(self), prefix="data.")
        _check(not problem, problem)
        _check(self.num_clients >= 2, f"data.num_clients={self.num_clients!r} must be >= 2 ({ONE_CLIENT})")
        _check_positive("data.alpha", self.alpha)
        _check(self.min_partition_size >= 0, f"data.min_partition_size={self.min_partition_size!r} must be >= 0")
        _check(0.0 < self.test_fraction < 1.0, f"data.test_fraction={self.test_fraction!r} must be in (0, 1)")
        _check(self.image_size >= 8, f"data.image_size={self.image_size!r} must be >= 8")
        _check(self.n_per_domain >= 1, f"data.n_per_domain={self.n_per_domain!r} must be >= 1")
        _check(self.max_seq_len >= 2,
               f"data.max_seq_len={self.max_seq_len!r} must be >= 2 (room for the special tokens)")
        if self.max_examples_per_client is not None:
            _check(self.max_examples_per_client >= 2,
                   f"data.max_examples_per_client={self.max_examples_per_client!r} must be >= 2")
        if self.num_classes is not None:
            _check(self.num_classes >= 2, f"data.num_classes={self.num_classes!r} must be >= 2")
        if self.manifest is not None:
            _check(Path(self.manifest).is_file(), f"data.manifest={self.manifest!r} is not a file; give the path of "
                   "a federation/manifest.json written by an earlier run, or leave it unset")
        _check(0 <= self.seed < 2**31, f"data.seed={self.seed!r} must be in [0, 2**31)")
        if self.data_dir is not None:
            _check(Path(self.data_dir).is_dir(), f"data.data_dir={self.data_dir!r} is not a folder")
        _check(self.data_files is None or len(self.data_files) > 0,
               "data.data_files is empty; name at least one file or leave it unset")
        if self.domain_level is not None:
            _check(self.domain_level >= 0,
                   f"data.domain_level={self.domain_level!r} must be >= 0 (0 = the first folder level)")
            _check(self.data_dir is not None,
                   f"data.domain_level={self.domain_level!r} counts folders below data.data_dir; set data.data_dir")


_DATA_KEYS = frozenset(f.name for f in dataclasses.fields(DataConfig))


def _check_data_keys(who: str, kind: str, options: tuple[str, ...]) -> None:
    """A registered scheme's or shift's declared options are data.* keys (a typo fails at config time)."""
    unknown = [o for o in options if o not in _DATA_KEYS]
    _check(not unknown, f"{who} declares option(s) {unknown} that are not data.* keys; a {kind} reads keys of "
           f"{sorted(_DATA_KEYS)}")


POOLINGS = ("mean", "cls")  # = hf_lpft.models.backbone.POOLINGS (below config; tests/test_config.py guards it)


@dataclass
class ModelConfig:
    """The backbone and its head."""

    backbone: str = field(default="timm:test_resnet", metadata={"help": (
        "timm:<name> (any timm model; tiny test models included), hf:<model id, local folder or installed alias such "
        "as all-MiniLM-L6-v2> (transformers AutoModel), or hf-config:<vit-tiny, vit-test or a config.json path> "
        "(architecture only, random weights).")})
    pretrained: bool = field(default=False, metadata={"help": (
        "Load pretrained backbone weights (timm: the Hub or a local checkpoint; hf: the model id / folder).")})
    checkpoint: str | None = field(default=None, metadata={"help": (
        "Local backbone weights file (safetensors or a timm checkpoint) for pretrained=True offline.")})
    pooling: str = field(default="mean", metadata={"help": (
        "Text backbones (hf:): features are the mean of the last hidden states over the attention mask (mean) or the "
        "first token (cls). Vision backbones use their standard pooled output.")})
    dropout: float | None = field(default=None, metadata={"help": (
        "Transformers backbones: replace the hidden/attention dropout probability (0 makes probing cacheable); None "
        "keeps the model's.")})
    global_model: str | None = field(default=None, metadata={"help": (
        "Personalize this global model instead of training one with FedAvg (hf-lpft personalize): a folder or Hub "
        "model id holding an hf_lpft global model (a run's global/), a timm model (save_for_hf / push_to_hub folder) "
        "or a transformers model, or a timm checkpoint file (with model.backbone timm:<architecture>). fedavg "
        "settings are then unused; plain timm/transformers models get a new head unless the timm classifier already "
        "has the federation's class count.")})

    def __post_init__(self) -> None:
        check_field_types(self, "model")
        _check(BackboneSpec.is_spec(self.backbone),
               f"model.backbone={self.backbone!r} must look like 'timm:<model name>', 'hf:<model id or path>' "
               "or 'hf-config:<preset or config path>'")
        _check_choice("model.pooling", self.pooling, POOLINGS)
        if self.checkpoint is not None:
            _check(self.spec.is_timm, f"model.checkpoint={self.checkpoint!r} is for timm backbones; for "
                   f"{self.backbone!r} point hf: at a local folder instead")
            _check(Path(self.checkpoint).is_file(), f"model.checkpoint={self.checkpoint!r} is not a file")
        _check(not (self.pretrained and self.spec.kind == "hf-config"), f"model.pretrained=true but "
               f"{self.backbone!r} has no weights (hf-config: builds an architecture only); use hf:<model id or path>")
        if self.dropout is not None:
            _check(not self.spec.is_timm,
                   f"model.dropout={self.dropout!r} applies to hf: backbones only, not {self.backbone!r}")
            _check(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout!r} must be in [0, 1)")
        if self.global_model is not None:
            _check(Path(self.global_model).exists() or bool(REPO_ID.match(self.global_model)),
                   f"model.global_model={self.global_model!r} is neither an existing folder or file nor a Hub repo id "
                   "('namespace/name'); give a run's global/ folder, a timm or transformers model folder, a timm "
                   "checkpoint file, or a Hub model id")

    @property
    def spec(self) -> BackboneSpec:
        """``backbone`` parsed (validated in ``__post_init__``): what the layers below take."""
        return BackboneSpec.parse(self.backbone)


OPTIMIZERS = ("sgd", "adam", "adamw")  # = hf_lpft.train.optim (config stays free of torch imports; tests guard it)
SCHEDULES = ("constant", "cosine")
REPORT_TO = ("none", "tensorboard", "trackio", "wandb")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
FEDAVG_BN_MODES = ("averaged", "local")
FEDAVG_ENGINES = ("builtin", "flower")  # = hf_lpft.algorithms.ENGINES (guarded by tests/test_config.py)
@dataclass
class FedAvgConfig:
    """General federated learning (FedAvg) that produces the global model."""

    rounds: int = field(default=30, metadata={"help": "Communication rounds."})
    local_epochs: int = field(default=1, metadata={"help": "Local epochs per client per round."})
    client_fraction: float = field(default=1.0, metadata={"help": "Share of clients sampled each round."})
    optimizer: str = field(default="sgd", metadata={"help": (
        "sgd, adam or adamw (local optimizer, re-created for every client every round: no state carries over).")})
    lr: float = field(default=0.05, metadata={"help": "Local learning rate."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay."})
    batch_size: int = field(default=64, metadata={"help": "Local batch size."})
    bn: str = field(default="averaged", metadata={"help": (
        "BatchNorm layers in FedAvg: averaged (plain FedAvg: weights and running statistics averaged like every other "
        "float tensor) or local (FedBN, Li et al. 2021: every BatchNorm tensor - affine weight/bias and running "
        "statistics - stays with its client across rounds; client i personalizes and is evaluated as the global model "
        "with its own BatchNorm).")})

    schedule: str = field(default="constant", metadata={"help": (
        "Local lr over the rounds: constant, or cosine (round r uses lr x 0.5 (1 + cos(pi r / rounds))).")})
    engine: str = field(default="builtin", metadata={"help": (
        "Who runs FedAvg: builtin (hf_lpft's loop; clients sharded over accelerate/torchrun processes) or flower (a "
        "Flower ServerApp/ClientApp in Flower's local simulation; pip install 'hf-lpft[flower]'; one process; the "
        "same global model as builtin).")})
    fl_strategy: str = field(default="fedavg", metadata={"help": (
        "General-FL algorithm (registry: hf_lpft/algorithms/): fedavg, fedprox, scaffold on either engine; "
        "Flower's fedadam, fedadagrad, fedyogi, fedavgm, fedmedian, fedtrimmedavg, krum, multikrum, bulyan, qfedavg "
        "on fedavg.engine flower (clients sampled as fedavg.client_fraction says).")})
    fl_strategy_args: dict[str, Any] = field(default_factory=dict, metadata={"help": (
        "Options of the algorithm, e.g. {proximal_mu: 0.1} for fedprox, {server_lr: 1.0, weighting: uniform} for "
        "scaffold, {eta: 0.01, tau: 0.001} for fedadam (a Flower strategy's are checked against its constructor).")})
    eval_every: int = field(default=5, metadata={"help": (
        "Evaluate the global model on every client's test split after every k-th round and after the last one (the "
        "FedAvg curve in the run record); 0 = never during FedAvg (the pipeline still evaluates the final global "
        "model).")})

    def __post_init__(self) -> None:
        check_field_types(self, "fedavg")
        _check(self.rounds >= 0, f"fedavg.rounds={self.rounds!r} must be >= 0")
        _check_choice("fedavg.bn", self.bn, FEDAVG_BN_MODES)
        _check_choice("fedavg.engine", self.engine, FEDAVG_ENGINES)
        _check(not (self.engine == "flower" and self.bn == "local"), "fedavg.engine='flower' averages every "
               "tensor; fedavg.bn='local' (FedBN) needs fedavg.engine='builtin'")
        _check(self.local_epochs >= 1, f"fedavg.local_epochs={self.local_epochs!r} must be >= 1")
        _check(0.0 < self.client_fraction <= 1.0, f"fedavg.client_fraction={self.client_fraction!r} must be in (0, 1]")
        _check_choice("fedavg.optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("fedavg.schedule", self.schedule, SCHEDULES)
        _check_positive("fedavg.lr", self.lr)
        _check(0.0 <= self.momentum < 1.0, f"fedavg.momentum={self.momentum!r} must be in [0, 1)")
        _check_positive("fedavg.weight_decay", self.weight_decay, allow_zero=True)
        _check(self.batch_size >= 1, f"fedavg.batch_size={self.batch_size!r} must be >= 1")
        # the name, the engine and the options are checked against the registry in preflight (hf_lpft.run.general_fl)
        _check(isinstance(self.fl_strategy_args, dict), f"fedavg.fl_strategy_args={self.fl_strategy_args!r} must be "
               "a mapping of options")
        _check(self.eval_every >= 0,
               f"fedavg.eval_every={self.eval_every!r} must be >= 0 (0 = no evaluation during FedAvg)")


@dataclass
class PFTConfig:
    """Post-hoc personalized fine-tuning: the strategies and their shared budget."""

    strategies: list[str] = field(default_factory=lambda: ["ft", "lp", "lp_ft"], metadata={"help": (
        "Strategies to run (see `hf-lpft strategies`).")})
    epochs: int = field(default=15, metadata={"help": (
        "Local epochs of personalization (the paper: 15 for every method).")})
    optimizer: str = field(default="sgd", metadata={"help": (
        "sgd, adam or adamw; a new optimizer for every client and every phase (no state carries over between "
        "stages).")})
    lr: float = field(default=0.01, metadata={"help": "Learning rate of the fine-tuning phases."})
    head_lr: float | None = field(default=None, metadata={"help": "Learning rate of probing phases; default = lr."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay."})
    batch_size: int = field(default=64, metadata={"help": "Batch size."})
    eval_every: int = field(default=0, metadata={"help": (
        "Evaluate Local and Global every k personalization epochs (epoch curves); 0 = off.")})
    cache_features: bool = field(default=True, metadata={"help": (
        "Probe on cached backbone features when that is exact (head-only phase, BatchNorm frozen, no dropout).")})
    batched_probe: bool = field(default=False, metadata={"help": (
        "Train the probing heads of all clients together as one batched tensor operation (equal to client-by-client "
        "probing within float tolerance; SGD, cached features, no eval_every curves); falls back, logged, when not "
        "equal.")})
    schedule: str = field(default="constant", metadata={"help": (
        "Learning rate within each phase: constant, or cosine (annealed to 0 over the phase's steps).")})
    strategy_args: dict[str, dict] = field(default_factory=dict, metadata={"help": (
        "Per-strategy options, e.g. {lp_ft: {lp_epochs: 5}}; options of strategies not run are still validated "
        "(names, values), but only strategies that run are held to the budget (e.g. lp_epochs <= pft.epochs).")})

    def __post_init__(self) -> None:
        check_field_types(self, "pft")
        _check(len(self.strategies) > 0, "pft.strategies is empty; name at least one strategy")
        _check(len(set(self.strategies)) == len(self.strategies), f"pft.strategies={self.strategies!r} has duplicates")
        _check(self.epochs >= 1, f"pft.epochs={self.epochs!r} must be >= 1")
        _check_choice("pft.optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("pft.schedule", self.schedule, SCHEDULES)
        _check_positive("pft.lr", self.lr)
        if self.head_lr is not None:
            _check_positive("pft.head_lr", self.head_lr)
        _check(0.0 <= self.momentum < 1.0, f"pft.momentum={self.momentum!r} must be in [0, 1)")
        _check_positive("pft.weight_decay", self.weight_decay, allow_zero=True)
        _check(self.batch_size >= 1, f"pft.batch_size={self.batch_size!r} must be >= 1")
        _check(self.eval_every >= 0, f"pft.eval_every={self.eval_every!r} must be >= 0")
        bad = [k for k, v in self.strategy_args.items() if not isinstance(v, dict)]
        _check(not bad, f"pft.strategy_args[{bad[0]!r}] must be a mapping of options" if bad else "")


# run.global_eval_clients' default (null, also what a run folder written before the option means): Global exact up
# to this many + 1 clients, estimated on a sample of this many other clients above (issue 26; measured by
# benchmarks/bench_global_estimate.py, table in benchmarks/README.md).
GLOBAL_EVAL_CLIENTS = 49


@dataclass
class RunConfig:
    """Where outputs go and which seeds run."""

    output_dir: str = field(default="outputs/run", metadata={"help": "Output folder (one per run)."})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": (
        "Training seeds: the whole pipeline (FedAvg + PFT: initialisation, client sampling, batch order) runs once "
        "per seed, on the one partition of data.seed.")})
    overwrite: bool = field(default=False, metadata={"help": (
        "Allow writing into a non-empty output_dir (starts from scratch).")})
    resume: bool = field(default=False, metadata={"help": (
        "Continue an interrupted run in output_dir from its last complete unit (same config required); takes "
        "precedence over overwrite.")})
    on_error: str = field(default="continue", metadata={"help": (
        "A client whose loss becomes NaN/inf: continue (record the error, go on) or raise.")})
    eval_batch_size: int = field(default=256, metadata={"help": "Batch size of evaluation."})
    num_threads: int | None = field(default=None, metadata={"help": (
        "torch CPU threads; None = 1, measured fastest on a shared 2-core CPU (hf_lpft.speed, benchmarks/README.md).")})
    distortion: bool = field(default=True, metadata={"help": (
        "Measure feature distortion (Δ, linear CKA) of every personalized model against the global model at the "
        "head's input, on its own and the other clients' test splits.")})
    global_eval_clients: int | None = field(default=None, metadata={"help": (
        "Global (and the cross-client matrix) for many clients: each model is scored on its own test split and at "
        "most this many (K) other clients' test splits. With N clients and K >= N-1: every other client (exact, "
        f"as always). With K < N-1: a seeded sample of K of the N-1 others (from run seed and client index, the same "
        "for every strategy and the global model's row), so evaluation is linear in N: Global is then an unbiased "
        "estimate with its standard error (results column global_acc_se), stated in the summary, cards and run "
        f"record, and the matrix metrics are NaN. Default null: K = {GLOBAL_EVAL_CLIENTS}, so exact up to "
        f"{GLOBAL_EVAL_CLIENTS + 1} clients (measured: benchmarks/bench_global_estimate.py); 0 = every other client "
        "(exact) at any N; else K >= 2 (a standard error needs two values). The Flower App is always exact: a "
        "sample is refused with it.")})
    report_to: str = field(default="none", metadata={"help": (
        "Experiment tracker for progress scalars, through accelerate: none, tensorboard, trackio or wandb (the "
        "tracker's package must be installed).")})
    fedavg_cache: str | None = field(default=None, metadata={"help": (
        "Folder of finished FedAvg results shared between runs: a run whose client data, model section, fedavg "
        "section, seed and hf_lpft version match a stored result loads it instead of training (key = sha256 of those "
        "settings); a miss trains and stores it. None = off.")})
    mixed_precision: str | None = field(default=None, metadata={"help": (
        "accelerate mixed precision: no, bf16 (CPU and GPU) or fp16 (GPU only; gradient scaling); None = accelerate's "
        "own setting (accelerate launch --mixed_precision, ACCELERATE_MIXED_PRECISION), default no.")})
    memory_format: str = field(default="auto", metadata={"help": (
        "Memory format of the model's 4-d tensors while training: auto (channels_last for convolutional networks, "
        "measured ~1.3x faster on CPU; contiguous otherwise), channels_last or contiguous. Saved weights are "
        "contiguous either way.")})

    def __post_init__(self) -> None:
        check_field_types(self, "run")
        _check(len(self.seeds) > 0, "run.seeds is empty")
        _check(all(isinstance(s, int) and s >= 0 for s in self.seeds),
               f"run.seeds={self.seeds!r} must be non-negative integers")
        _check(len(set(self.seeds)) == len(self.seeds), f"run.seeds={self.seeds!r} has duplicates")
        _check_choice("run.on_error", self.on_error, ("continue", "raise"))
        _check(self.eval_batch_size >= 1, f"run.eval_batch_size={self.eval_batch_size!r} must be >= 1")
        if self.num_threads is not None:
            _check(self.num_threads >= 1, f"run.num_threads={self.num_threads!r} must be >= 1")
        _check(self.global_eval_clients in (None, 0) or self.global_eval_clients >= 2,
               f"run.global_eval_clients={self.global_eval_clients!r} must be an integer >= 2 (other clients scored "
               f"per model; a standard error needs two), 0 (every other client: exact) or null (the default, "
               f"{GLOBAL_EVAL_CLIENTS})")
        _check_choice("run.report_to", self.report_to, REPORT_TO)
        if self.fedavg_cache is not None:
            _check(not Path(self.fedavg_cache).exists() or Path(self.fedavg_cache).is_dir(),
                   f"run.fedavg_cache={self.fedavg_cache!r} exists and is not a folder; give a folder (created if "
                   "missing)")
        if self.mixed_precision is not None:
            _check_choice("run.mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        _check_choice("run.memory_format", self.memory_format, MEMORY_FORMATS)


@dataclass
class HubConfig:
    """Publishing to the Hugging Face Hub (endpoint from HF_ENDPOINT; token from HF_TOKEN or the login cache)."""

    push_to_hub: bool = field(default=False, metadata={"help": (
        "Publish the run at the end: the model repo (global model, personalized clients, cards) in one commit and the "
        "results dataset. Without it the same Hub-ready folder is written to <output_dir>/hub.")})
    hub_repo_id: str | None = field(default=None, metadata={"help": (
        "Model repo 'namespace/name' (created if missing); required with push_to_hub.")})
    hub_private: bool = field(default=False, metadata={"help": "Create the repos private."})
    hub_results_repo_id: str | None = field(default=None, metadata={"help": (
        "Results dataset repo; default '<hub_repo_id>-results'.")})
    hub_experiment: str | None = field(default=None, metadata={"help": (
        "Dataset config name of this run's results; default the output folder's name.")})
    hub_license: str = field(default="apache-2.0", metadata={"help": (
        "License in the model cards' metadata (a Hub license id such as apache-2.0, mit, cc-by-4.0, other); mind the "
        "licenses of your data and of a pretrained backbone.")})

    def __post_init__(self) -> None:
        check_field_types(self, "hub")
        _check(not self.push_to_hub or self.hub_repo_id is not None, "hub.push_to_hub=true needs hub.hub_repo_id "
               "(e.g. --hub_repo_id me/my-study)")
        for name in ("hub_repo_id", "hub_results_repo_id"):
            value = getattr(self, name)
            _check(value is None or bool(REPO_ID.match(value)), f"hub.{name}={value!r} must look like 'namespace/name' "
                   "(letters, digits, '_', '.', '-')")
        _check(bool(re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", self.hub_license)), f"hub.hub_license={self.hub_license!r} "
               "must be a Hub license id in lower case, e.g. apache-2.0, mit, cc-by-4.0 or other")


SECTIONS: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "fedavg": FedAvgConfig, "pft": PFTConfig, "run": RunConfig,
    "hub": HubConfig,
}


@dataclass
class ExperimentConfig:
    """The whole experiment: one field per argument group."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    fedavg: FedAvgConfig = field(default_factory=FedAvgConfig)
    pft: PFTConfig = field(default_factory=PFTConfig)
    run: RunConfig = field(default_factory=RunConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or fail naming the value."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(name, value, args[0])
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        _check(isinstance(value, (list, tuple)), f"{name}={value!r} must be a list")
        (inner,) = typing.get_args(hint)
        return [_coerce(name, v, inner) for v in value]
    if origin is dict or hint is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        _check(isinstance(value, dict), f"{name}={value!r} must be a mapping")
        return dict(value)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        _check(isinstance(value, bool), f"{name}={value!r} must be true or false")
        return value
    if hint in (int, float):
        if isinstance(value, str):
            text, value = value, yaml.safe_load(value)
            if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string; Python's float does not
                try:
                    value = float(text.strip())
                except ValueError:
                    pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(ok and (hint is float or float(value).is_integer()),
               f"{name}={value!r} must be {'an integer' if hint is int else 'a number'}")
        return hint(value)
    if hint is str:
        _check(isinstance(value, (str, int, float)), f"{name}={value!r} must be a string")
        return str(value)
    return value


def _build_section(section: str, values: dict) -> Any:
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    unknown = set(values) - set(hints)
    _check(not unknown, f"unknown key(s) {sorted(unknown)} in section {section!r}; allowed: {sorted(hints)}")
    kwargs = {k: _coerce(f"{section}.{k}", v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


# Bare ``--key`` forms refused although the name is unique, because they read as another option: ``--seed``
# looks like the training seed but would set data.seed, the partition (``--run.seeds 0 --seed 1`` silently
# trained another partition). Key -> what to write instead.
NO_SHORT_FORM = {"seed": "--data.seed (the partition: which examples each client gets) or --run.seeds (the training "
                         "seeds, e.g. --run.seeds 0,1,2)"}


def _field_index() -> dict[str, list[str]]:
    index: dict[str, list[str]] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            index.setdefault(f.name, []).append(section)
    return index


def _is_flag(key: str, index: dict[str, list[str]]) -> bool:
    """Whether ``--key`` names exactly one boolean field (which may then be given without a value)."""
    section, _, name = key.rpartition(".")
    sections = [section] if section else index.get(name, [])
    return (len(sections) == 1 and sections[0] in SECTIONS
            and typing.get_type_hints(SECTIONS[sections[0]]).get(name) is bool)


def parse_overrides(args: list[str]) -> dict[str, dict]:
    """Turn ``["--fedavg.rounds", "10", "--lr=0.1"]`` into ``{"fedavg": {"rounds": "10"}, ...}``.

    A bare key (``--rounds``) is accepted when exactly one section has it and it is not in
    :data:`NO_SHORT_FORM`; otherwise the error lists the qualified names to use instead.
    """
    out: dict[str, dict] = {}
    index = _field_index()
    i = 0
    while i < len(args):
        arg = args[i]
        _check(arg.startswith("--"), f"unexpected argument {arg!r}; overrides look like --section.key value")
        key, _, value = arg[2:].partition("=")
        if not _ and (i + 1 == len(args) or args[i + 1].startswith("--")) and _is_flag(key, index):
            value = "true"  # a bare boolean flag, e.g. --push_to_hub
        elif not _:
            _check(i + 1 < len(args) and not args[i + 1].startswith("--"), f"override {arg!r} has no value; "
                   "write --section.key value or --section.key=value")
            value, i = args[i + 1], i + 1
        i += 1
        section, _, name = key.rpartition(".")
        if not section:
            _check(name not in NO_SHORT_FORM, f"option {arg!r} is ambiguous; use {NO_SHORT_FORM.get(name)}")
            sections = index.get(name, [])
            _check(len(sections) == 1, f"unknown option {arg!r}" if not sections else
                   f"option {arg!r} is ambiguous; use one of {[f'--{s}.{name}' for s in sections]}")
            section = sections[0]
        _check(section in SECTIONS, f"unknown section {section!r} in {arg!r}; allowed: {list(SECTIONS)}")
        out.setdefault(section, {})[name] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None,
                *, defaults: dict | None = None) -> ExperimentConfig:
    """Resolve a configuration: ``defaults`` -> YAML file -> overrides, then validate.

    Args:
        path: YAML file with top-level sections data/model/fedavg/pft/run (all optional).
        overrides: CLI-style list (``["--fedavg.rounds", "5"]``) or a nested dict.
        defaults: nested dict applied before the YAML (used by recipes for their own defaults).

    Raises:
        ConfigError: on unknown sections or keys and on any invalid value, naming it.
    """
    merged: dict[str, dict] = {}
    layers = [defaults or {}]
    if path is not None:
        layers.append(read_config_file(path))
    if overrides:
        layers.append(parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    for layer in layers:
        for section, values in layer.items():
            _check(section in SECTIONS, f"unknown section {section!r}; allowed: {list(SECTIONS)}")
            _check(isinstance(values, dict), f"section {section!r} must be a mapping, got {values!r}")
            merged.setdefault(section, {}).update(values)
    cfg = ExperimentConfig(**{s: _build_section(s, merged.get(s, {})) for s in SECTIONS})
    given = {s: frozenset(k for layer in layers[1:] for k in layer.get(s, {})) for s in SECTIONS}
    object.__setattr__(cfg, "_given", given)  # not a field: never saved, compared on resume or pushed
    return cfg


def given_keys(cfg: ExperimentConfig, section: str) -> set[str]:
    """The keys of ``section`` the user set explicitly.

    The fields whose value differs from the field's default; for a config from :func:`load_config`, only
    those present in the YAML file or the overrides (a recipe's ``defaults`` do not count), so that a run's
    saved ``config.yaml``, which lists every key, can be passed back as ``--config``.
    """
    recorded = getattr(cfg, "_given", None)
    obj = getattr(cfg, section)
    out = set()
    for f in dataclasses.fields(obj):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if getattr(obj, f.name) != default:
            out.add(f.name)
    # A run's own config.yaml lists every key; a value equal to its default changes nothing, so only values
    # that differ from the default count as given (and, from load_config, only keys the user wrote).
    return out if recorded is None else out & set(recorded.get(section, ()))


def read_config_file(path: str | Path) -> dict:
    """The sections of a YAML config file; ConfigError naming the file and what is wrong with it."""
    p = Path(path)
    _check(p.exists(), f"config file {str(p)!r} does not exist")
    _check(p.is_file(), f"config file {str(p)!r} is not a file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                          f"{err.start}); save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"config file {str(p)!r} cannot be read ({err.strerror or err})") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {problem}{where}") from None
    loaded = {} if loaded is None else loaded
    _check(isinstance(loaded, dict), f"config file {str(p)!r} must hold a mapping of sections "
           f"{list(SECTIONS)}, not a {type(loaded).__name__}")
    return loaded


def _type_name(hint: Any) -> str:
    """A type hint as it reads in ``--help``: ``int``, ``str|None``, ``list[int]``, ``dict[str,Any]``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return "|".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{','.join(_type_name(a) for a in args)}]"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def cli_value(value: Any) -> str:
    """A config value written as it is given on the command line (lists comma-separated, None as none)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(cli_value(v) for v in value) if value else "[]"
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()
    return str(value)


def field_default(f: dataclasses.Field) -> Any:
    """The default value of a config dataclass field (``default_factory`` called)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def add_config_help(parser: Any, defaults: dict | None = None) -> None:
    """Add every field of every section (:data:`SECTIONS`) to ``parser`` (an ``argparse.ArgumentParser``)
    as an argument group per section, for its ``--help`` only: ``--section.key`` (and ``--key`` where the
    name is unique), the type, the default (``defaults`` - a recipe's nested dict - first) and the field's
    ``metadata["help"]``. Generated from the dataclasses, so a new field shows up without being listed.
    Parsing stays :func:`parse_overrides`' (the parser must not parse with these arguments).
    """
    index = _field_index()
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None
        group = parser.add_argument_group(f"{section} options", doc)
        for f in dataclasses.fields(cls):
            default = (defaults or {}).get(section, {}).get(f.name, field_default(f))
            short = len(index[f.name]) == 1 and f.name not in NO_SHORT_FORM
            names = [f"--{section}.{f.name}"] + ([f"--{f.name}"] if short else [])
            text = f"{f.metadata.get('help', '')} (default: {cli_value(default)})".strip()
            group.add_argument(*names, dest=f"{section}.{f.name}", metavar=_type_name(hints[f.name]),
                               help=text.replace("%", "%%"))
