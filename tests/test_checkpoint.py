import pytest
import torch
from conftest import BACKBONES

from hf_lpft.models.backbone import SplitModel, build_model


@pytest.mark.parametrize("backbone", BACKBONES)
def test_reloaded_checkpoint_gives_identical_logits(backbone, tmp_path):
    model = build_model(backbone, num_classes=4, image_size=32, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the init: the saved weights must be what is loaded
    model.eval()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    loaded = SplitModel.from_pretrained(tmp_path / "m")
    loaded.eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.backbone_spec == backbone


def test_features_are_head_input():
    model = build_model("timm:test_resnet", num_classes=4, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.features(x)
        assert feats.shape == (2, model.num_features)
        assert torch.allclose(model.head(feats), model(x))


def test_unknown_backbone_fails_clearly():
    with pytest.raises(ValueError, match="not_a_model"):
        SplitModel("timm:not_a_model")
    with pytest.raises(ValueError, match="resnet18"):
        SplitModel("resnet18")
