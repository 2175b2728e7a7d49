"""SplitModel: a backbone that yields features plus our own ``nn.Linear`` head.

The split follows timm's contract: features = ``forward_head(forward_features(x), pre_logits=True)``,
which for a model built with ``num_classes=0`` is simply ``backbone(x)``. The head input is the
"penultimate layer" at which the paper measures feature distortion.
"""

from __future__ import annotations

import logging

import timm
import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

logger = logging.getLogger(__name__)

BACKBONE_PREFIXES = ("timm",)


def _create_timm(name: str, *, image_size: int, pretrained: bool = False, checkpoint: str | None = None) -> nn.Module:
    """Build a timm model without classifier; ViT-like models get ``img_size`` so small inputs work."""
    if name not in timm.list_models() and not pretrained:
        raise ValueError(f"backbone 'timm:{name}' is not a timm model name; see timm.list_models()")
    extra = {}
    if checkpoint is not None:
        # A local file stands in for the Hub download; timm loads and adapts it (e.g. pos-embed resize).
        extra["pretrained_cfg_overlay"] = {"file": str(checkpoint)}
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, img_size=image_size, **extra)
    except TypeError:  # CNNs take no img_size: they are size-agnostic
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **extra)


class SplitModel(nn.Module, PyTorchModelHubMixin, library_name="hf_lpft", tags=["federated-learning", "lp-ft"]):
    """Backbone + linear head, savable with ``save_pretrained`` and loadable with ``from_pretrained``.

    Args:
        backbone: ``"timm:<name>"``.
        num_classes: Output classes of the head.
        image_size: Input resolution (needed by ViT-like backbones).
    """

    def __init__(self, backbone: str = "timm:test_resnet", num_classes: int = 10, image_size: int = 32):
        super().__init__()
        prefix, _, name = backbone.partition(":")
        if prefix not in BACKBONE_PREFIXES or not name:
            raise ValueError(f"backbone={backbone!r} must look like 'timm:<model name>'")
        self.backbone_spec = backbone
        self.backbone = _create_timm(name, image_size=image_size)
        self.head = nn.Linear(self.backbone.num_features, num_classes)

    @property
    def num_features(self) -> int:
        return self.head.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Head input (pre-logits) features."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(backbone: str, *, num_classes: int, image_size: int, pretrained: bool = False,
                checkpoint: str | None = None, seed: int = 0) -> SplitModel:
    """Create a SplitModel with deterministic initialisation, optionally with pretrained backbone weights."""
    torch.manual_seed(seed)
    model = SplitModel(backbone, num_classes=num_classes, image_size=image_size)
    if pretrained or checkpoint is not None:
        name = backbone.partition(":")[2]
        source = _create_timm(name, image_size=image_size, pretrained=True, checkpoint=checkpoint)
        model.backbone.load_state_dict(source.state_dict())
        logger.info("loaded pretrained backbone weights for %s", backbone)
    return model
