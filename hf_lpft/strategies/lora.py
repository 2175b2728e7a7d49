"""LoRA and LP-LoRA: low-rank adapters (peft) plus our head, optionally after probing the head.

Chen et al., "A Closer Look at Personalized Fine-Tuning in Heterogeneous Federated Learning",
arXiv 2511.12695 (the appendix reports PEFT on transformers); Hu et al., "LoRA: Low-Rank Adaptation of
Large Language Models", ICLR 2022, arXiv 2106.09685; LP-LoRA applies the LP-FT recipe of Kumar et al.,
ICLR 2022, arXiv 2202.10054, with LoRA in place of full fine-tuning.

The backbone's weights never change: only the adapters and the head train, and the export is a peft
adapter folder (``adapter_config.json`` + ``adapter_model.safetensors`` holding the adapters and the
head) that loads with ``PeftModel.from_pretrained(<the global SplitModel>, folder)``. BatchNorm
statistics are frozen by default for the same reason (the folder is then the whole difference from
θ_G); with ``bn=train`` they adapt and the BatchNorm layers are exported as ``modules_to_save`` too.

Target modules, when not given: attention ``qkv`` projections if the backbone has them (timm ViTs; the
LoRA paper adapts the attention projections), else the attention query and value projections of a
transformers backbone (peft's default for its ``model_type``: ``query``/``value`` for BERT-like models and
HF ViT, as in the LoRA paper's RoBERTa experiments), else every ``Conv2d`` of the backbone (CNNs have no
attention and keep almost all their weights in convolutions; peft supports LoRA on Conv2d), else every
``Linear`` of the backbone. Defaults r=8, alpha=16 (scale alpha/r = 2), dropout 0, are common LoRA
choices; the paper states none.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hf_lpft.config import ConfigError
from hf_lpft.strategies.base import Strategy, StrategyConfig, check_bn, check_probe_budget, register_strategy
from hf_lpft.train.phase import Phase

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
# peft is imported where it is used: importing it pulls in transformers (~3 s), which listing the registered
# strategies (`hf-lpft strategies`) and reading a run's phases do not need.

logger = logging.getLogger(__name__)

HEAD = "head"  # the SplitModel attribute holding our classifier
SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)  # layer types peft's LoRA adapts


@dataclass
class LoRAStrategyConfig(StrategyConfig):
    r: int = field(default=8, metadata={"help": "LoRA rank (>= 1)."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator: updates are scaled by alpha / r."})
    dropout: float = field(default=0.0, metadata={"help": (
        "Dropout on the adapter input, in [0, 1). 0 keeps probing cacheable.")})
    target_modules: list[str] | None = field(default=None, metadata={"help": (
        "Backbone module names (or name suffixes) to adapt; None = qkv for timm ViTs, attention query/value for "
        "transformers models, Conv2d layers for CNNs.")})
    bn: str = field(default="frozen", metadata={"help": (
        "BatchNorm statistics during the LoRA phase: frozen (the backbone stays θ_G apart from the adapters) or train "
        "(BatchNorm layers are then exported too).")})

    def __post_init__(self) -> None:
        super().__post_init__()
        where = self.strategy_name()
        if self.r < 1:
            raise ConfigError(f"{where}.r={self.r!r} must be >= 1")
        if not self.alpha > 0:
            raise ConfigError(f"{where}.alpha={self.alpha!r} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout={self.dropout!r} must be in [0, 1)")
        if self.target_modules is not None and (not self.target_modules or not all(self.target_modules)):
            raise ConfigError(f"{where}.target_modules={self.target_modules!r} must be None or a list of non-empty "
                              "names")
        check_bn(f"{where}.bn", self.bn)

    def strategy_name(self) -> str:
        """For error messages: the options belong to ``lora`` or ``lp_lora``."""
        return "lora"


@dataclass
class LPLoRAStrategyConfig(LoRAStrategyConfig):
    lp_epochs: int = field(default=5, metadata={"help": (
        "Probing epochs taken from the shared budget (as lp_ft); the rest trains LoRA.")})
    lp_bn: str = field(default="frozen", metadata={"help": "BatchNorm statistics while probing: frozen or train."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lp_epochs < 0:
            raise ConfigError(f"lp_lora.lp_epochs={self.lp_epochs!r} must be >= 0")
        check_bn("lp_lora.lp_bn", self.lp_bn)

    def strategy_name(self) -> str:
        return "lp_lora"


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list entry: the module's full name equals it or ends with '.' + it."""
    return name == target or name.endswith("." + target)


# Attention query/value projections of transformers models whose model_type peft's table does not list.
QUERY_VALUE = ("query", "value", "q_proj", "v_proj", "q_lin", "v_lin")


def attention_query_value(backbone: nn.Module) -> list[str]:
    """Query/value projections of a transformers backbone: peft's default LoRA targets for its
    ``model_type`` (BERT, RoBERTa...: ``query``, ``value``), else Linear layers named as in QUERY_VALUE."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    model_type = getattr(getattr(backbone, "config", None), "model_type", None)
    if model_type is None:
        return []
    suffixes = PEFT_DEFAULTS.get(model_type, QUERY_VALUE)
    return [n for n,
            m in backbone.named_modules() if isinstance(m, nn.Linear) and any(_matches(n, s) for s in suffixes)]


def default_targets(backbone: nn.Module) -> list[str]:
    """qkv projections (timm ViT), else attention query/value projections (transformers), else Conv2d
    layers (CNN), else Linear layers."""
    named = list(backbone.named_modules())
    qkv = [n for n, m in named if isinstance(m, nn.Linear) and n.split(".")[-1] == "qkv"]
    if qkv:
        return qkv
    query_value = attention_query_value(backbone)
    if query_value:
        return query_value
    convs = [n for n, m in named if isinstance(m, nn.Conv2d)]
    return convs or [n for n, m in named if isinstance(m, nn.Linear)]


def resolve_targets(model: nn.Module, targets: list[str] | None, *, where: str = "lora") -> list[str]:
    """Full names of the backbone modules to adapt; every requested name must match one (never the head)."""
    names = [n for n, m in model.named_modules() if n.startswith("backbone.") and isinstance(m, SUPPORTED)]
    if targets is None:
        return [f"backbone.{n}" for n in default_targets(model.backbone)]
    unknown = [t for t in targets if not any(_matches(n, t) for n in names)]
    if unknown:
        raise ConfigError(f"{where}.target_modules: {unknown!r} match no Linear/Conv/Embedding module of the backbone; "
                          f"examples of names: {names[:6]}")
    return [n for n in names if any(_matches(n, t) for t in targets)]


def warn_dead_branches(model: nn.Module) -> None:
    """Warn when BatchNorm weights are all zero (timm's zero-init-last: an untrained backbone).

    The residual branch such a layer closes outputs zero and passes no gradient; with the backbone
    frozen its weight stays zero, so adapters inside that branch can never learn.
    """
    dead = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.affine and not m.weight.any()]
    if dead:
        logger.warning("LoRA: %d BatchNorm layers have weight 0 (e.g. %s): adapters in the residual branches "
                       "they close cannot learn; LoRA expects a trained global model", len(dead), dead[0])


def lora_config(cfg: LoRAStrategyConfig, targets: list[str]) -> LoraConfig:
    """The peft config for training; the head joins ``modules_to_save`` only at the end (see finalize)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets)


@register_strategy
class LoRA(Strategy):
    """LoRA adapters on the backbone + our head, trained together for the whole budget."""

    name = "lora"
    display_name = "LoRA"
    export_kind = "adapter"  # a peft adapter folder (see export)
    description = "LoRA: low-rank adapters (peft) on the frozen backbone, trained with the head."
    config_cls = LoRAStrategyConfig

    def phases(self) -> list[Phase]:
        return [Phase("lora", "adapters_and_head", self.budget.epochs, self.budget.lr, bn=self.config.bn)]

    def check_model(self, model: nn.Module) -> None:
        resolve_targets(model, self.config.target_modules, where=self.name)

    def prepare(self, model: nn.Module) -> nn.Module:
        # The head stays a plain Linear while training (freeze.py trains it through the adapters_and_head
        # selector): a peft modules_to_save wrapper would add a frozen duplicate that the selector counts.
        targets = resolve_targets(model, self.config.target_modules, where=self.name)
        warn_dead_branches(model)
        from peft import get_peft_model

        return get_peft_model(model, lora_config(self.config, targets))

    def finalize(self, models: list[nn.Module]) -> nn.Module:
        return with_saved_modules(models[0], [HEAD] + self._trained_bn(models[0]))

    def _trained_bn(self, model: nn.Module) -> list[str]:
        """BatchNorm layers whose statistics a phase updated: they must be exported with the adapters."""
        if all(p.bn == "frozen" or p.epochs == 0 for p in self.phases()):
            return []
        split = model.get_base_model()
        return [n for n, m in split.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]

    def export(self, model: nn.Module, path) -> None:
        """The adapter folder: adapters + head (+ BatchNorm layers if their statistics trained), no backbone
        weights; it loads onto the global model with ``PeftModel.from_pretrained``. The input files
        (``preprocessor_config.json`` or a text model's tokenizer) go beside them, so the folder tokenizes alone."""
        model.save_pretrained(path)
        model.get_base_model().save_preprocessing(path)


def with_saved_modules(trained: PeftModel, modules: list[str]) -> PeftModel:
    """The same model, rebuilt so ``modules`` (the trained head, ...) are peft ``modules_to_save``.

    Only then does ``save_pretrained`` write them next to the adapters and ``from_pretrained`` restore
    them. Built with public peft calls: read the adapters, unload them (the trained head and any
    BatchNorm statistics stay in the base model), wrap again with ``modules_to_save``, load the adapters.
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    config = copy.deepcopy(trained.peft_config["default"])
    config.modules_to_save = modules
    adapters = get_peft_model_state_dict(trained)
    rebuilt = get_peft_model(trained.unload(), config)
    # The saved modules were copied with their trained values; peft's loader expects their keys all the same.
    saved = {k: v for k, v in get_peft_model_state_dict(rebuilt).items() if k not in adapters}
    result = set_peft_model_state_dict(rebuilt, {**adapters, **saved})
    if result.unexpected_keys:
        raise RuntimeError(f"adapter weights did not load back: unexpected keys {result.unexpected_keys[:5]}")
    return rebuilt


@register_strategy
class LPLoRA(LoRA):
    """LP-LoRA: probe the head on frozen features, then train LoRA adapters and the head."""

    name = "lp_lora"
    display_name = "LP-LoRA"
    description = "LP-LoRA: probe the head first (backbone frozen), then LoRA adapters + head."
    config_cls = LPLoRAStrategyConfig

    def phases(self) -> list[Phase]:
        lp = self.config.lp_epochs
        check_probe_budget("lp_lora", lp, self.budget.epochs)
        return [Phase("probe", "head", lp, self.budget.probe_lr, bn=self.config.lp_bn),
                Phase("lora", "adapters_and_head", self.budget.epochs - lp, self.budget.lr, bn=self.config.bn)]
