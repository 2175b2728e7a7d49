"""Probing on cached features gives the same head as probing through the frozen backbone."""


import pytest
import torch
from conftest import BACKBONES

from hf_lpft.models.backbone import build_model
from hf_lpft.train.loop import OptimSettings, cache_blocker, train_phase
from hf_lpft.train.phase import Phase


@pytest.mark.parametrize("backbone", BACKBONES)
def test_cached_probe_equals_uncached(backbone, tiny_clients, accelerator):
    phase = Phase("probe", "head", 3, 0.1, bn="frozen")
    heads, flags = [], []
    for cache in (True, False):
        model = build_model(backbone, num_classes=4, image_size=32, seed=1)
        record = train_phase(model, phase, tiny_clients[0], settings=OptimSettings(batch_size=8, cache_features=cache),
                             accelerator=accelerator, seed=5)
        heads.append({k: v.clone() for k, v in model.head.state_dict().items()})
        flags.append(record["cached_features"])
    assert flags == [True, False]
    for k in heads[0]:
        torch.testing.assert_close(heads[0][k], heads[1][k], rtol=1e-5, atol=1e-6)


def test_cache_refused_when_not_exact():
    model = build_model("timm:test_resnet", num_classes=4, image_size=32)
    assert cache_blocker(model, Phase("p", "head", 1, 0.1, bn="train")) == "BatchNorm statistics are in train mode"
    assert "all" in cache_blocker(model, Phase("p", "all", 1, 0.1, bn="frozen"))
    model.backbone.fc_dropout = torch.nn.Dropout(0.5)
    assert "fc_dropout" in cache_blocker(model, Phase("p", "head", 1, 0.1, bn="frozen"))
