"""Surgical FT: fine-tune only chosen parts of the backbone (a block, the norms...) together with the head.

Lee et al., "Surgical Fine-Tuning Improves Adaptation to Distribution Shifts", ICLR 2023,
arXiv 2210.11466: under a shift, tuning one block of layers often beats full fine-tuning — the first
block for input-level shifts (corruptions, domains), the last block for output-level shifts. Compared in
the setting of Chen et al., "A Closer Look at Personalized Fine-Tuning in Heterogeneous Federated
Learning", arXiv 2511.12695, where each client's copy of the global model is fine-tuned post hoc.

What trains is given by ``presets`` and/or ``patterns`` (regular expressions over parameter names):

- ``first_block`` / ``last_block``: the first / last entry of the backbone's block sequence — timm
  ``blocks.<i>`` (ViT, EfficientNet...), ``stages.<i>`` (ConvNeXt...), or ``layer1..layerN`` (ResNet:
  a "block" is a stage, as in Lee et al.'s ResNet experiments);
- ``stem``: the backbone parameters before the first block (ResNet ``conv1``/``bn1``; ViT patch
  embedding, class token, position embedding) — Lee et al.'s "first layer";
- ``norms``: the affine parameters of every normalisation layer (BatchNorm, LayerNorm, GroupNorm);
- ``head``: our classifier.

The head always trains (the ``patterns`` selector of ``Phase`` adds it): a personalized model must at
least adapt its classifier, so ``presets=[head]`` alone equals linear probing with the same BatchNorm
mode. Presets depend on the architecture, so they are resolved against the model in ``prepare`` into
exact-prefix regexes; until then ``phases()`` shows them as ``preset:<name>`` placeholders, which match no
parameter name. A preset or pattern that matches no parameter of the model fails with a ConfigError
naming it, before any training: the pipeline calls ``check_model`` on a throwaway model before FedAvg.

Defaults: ``presets=[first_block]`` (the paper's shifts are input-level: corruptions and domains, the
case where Lee et al. find the first block best), BatchNorm in train mode like FT, so the two differ only
in which weights train.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from hf_lpft.config import ConfigError
from hf_lpft.strategies.base import Strategy, StrategyConfig, check_bn, register_strategy
from hf_lpft.train.phase import Phase

PRESETS = ("first_block", "last_block", "stem", "norms", "head")
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass
class SurgicalConfig(StrategyConfig):
    presets: list[str] = field(default_factory=lambda: ["first_block"],
                  metadata={"help": f"Named parts to train, any of {list(PRESETS)}; the head always trains."})
    patterns: list[str] = field(default_factory=list, metadata={"help": (
        "Extra regular expressions over parameter names (re.search), e.g. 'blocks\\.3\\.'.")})
    bn: str = field(default="train", metadata={"help": (
        "BatchNorm statistics during fine-tuning: train (updated, like FT) or frozen.")})

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [p for p in self.presets if p not in PRESETS]
        if unknown:
            raise ConfigError(f"surgical_ft.presets: unknown preset(s) {unknown!r}; choose from {list(PRESETS)}")
        if not self.presets and not self.patterns:
            raise ConfigError("surgical_ft: presets=[] and patterns=[] select nothing; name at least one part to train")
        for pattern in self.patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"surgical_ft.patterns: {pattern!r} is not a valid regular expression "
                                  f"({err})") from err
        check_bn("surgical_ft.bn", self.bn)


def backbone_blocks(backbone: nn.Module) -> list[str]:
    """Names (relative to the backbone) of its ordered block sequence: blocks.<i>, stages.<i>,
    encoder.layer.<i> (transformers: BERT, ViT...) or layer<k>."""
    for attr in ("blocks", "stages"):
        seq = getattr(backbone, attr, None)
        if isinstance(seq, (nn.Sequential, nn.ModuleList)) and len(seq):
            return [f"{attr}.{i}" for i in range(len(seq))]
    seq = getattr(getattr(backbone, "encoder", None), "layer", None)
    if isinstance(seq, nn.ModuleList) and len(seq):
        return [f"encoder.layer.{i}" for i in range(len(seq))]
    layers = sorted((n for n, _ in backbone.named_children() if re.fullmatch(r"layer\d+", n)), key=lambda n: int(n[5:]))
    return layers


def _prefix(name: str) -> str:
    return f"^{re.escape(name)}\\."


def _stem(model: nn.Module, first_block: str) -> list[str]:
    """Exact-name regexes of the backbone parameters registered before the first block."""
    stem = []
    for name, _ in model.backbone.named_parameters():
        if name.startswith(first_block + "."):
            break
        stem.append(f"^backbone\\.{re.escape(name)}$")
    return stem


def resolve_preset(model: nn.Module, preset: str) -> list[str]:
    """Regexes selecting ``preset`` in ``model`` (a SplitModel); ConfigError when the model has no such part."""
    if preset == "head":
        return [r"^head\."]
    if preset == "norms":
        return [_prefix(n) for n, m in model.named_modules() if isinstance(m, NORM_TYPES)
                and any(True for _ in m.parameters(recurse=False))]
    blocks = backbone_blocks(model.backbone)
    if not blocks:
        raise ConfigError(f"surgical_ft.presets: {preset!r} needs a block sequence (blocks.<i>, stages.<i>, "
                          f"encoder.layer.<i> or layer<k>), which the backbone {type(model.backbone).__name__} "
                          "does not have; use patterns")
    if preset == "stem":
        return _stem(model, blocks[0])
    return [_prefix(f"backbone.{blocks[0] if preset == 'first_block' else blocks[-1]}")]


def resolve_patterns(model: nn.Module, config: SurgicalConfig) -> tuple[str, ...]:
    """Presets and patterns as regexes for ``model``; each must match at least one parameter name."""
    names = [n for n, _ in model.named_parameters()]
    resolved = []
    for label, regexes in [(f"preset {p!r}", resolve_preset(model, p)) for p in config.presets] + \
                          [(f"pattern {p!r}", [p]) for p in config.patterns]:
        if not any(re.search(r, n) for r in regexes for n in names):
            raise ConfigError(f"surgical_ft: {label} matches no parameter of the model; examples of names: {names[:6]}")
        resolved += regexes
    return tuple(dict.fromkeys(resolved))


@register_strategy
class SurgicalFT(Strategy):
    """Fine-tune the parts of the model matched by presets/patterns, plus the head; everything else stays θ_G."""

    name = "surgical_ft"
    display_name = "Surgical FT"
    export_kind = "full"
    description = ("Surgical FT (Lee et al. 2023): only chosen blocks (first/last block, stem, norms, patterns) "
                   "+ head train.")
    config_cls = SurgicalConfig

    def __init__(self, config: SurgicalConfig | None = None, *, budget=None):
        super().__init__(config, budget=budget)
        self._resolved: tuple[str, ...] | None = None

    def check_model(self, model: nn.Module) -> None:
        resolve_patterns(model, self.config)

    def prepare(self, model: nn.Module) -> nn.Module:
        self._resolved = resolve_patterns(model, self.config)
        return model

    def phases(self) -> list[Phase]:
        patterns = self._resolved or tuple(f"preset:{p}" for p in self.config.presets) + tuple(self.config.patterns)
        return [Phase("surgical", "patterns", self.budget.epochs, self.budget.lr, bn=self.config.bn, patterns=patterns)]


__all__ = ["SurgicalConfig", "SurgicalFT", "backbone_blocks", "resolve_patterns"]
