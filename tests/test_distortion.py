"""Feature distortion Δ and linear CKA: hand calculations, invariances, and the model helpers."""

import copy

import pytest
import torch

from hf_lpft.evaluation.distortion import (
    block_distortion,
    default_blocks,
    distortion_by_client,
    extract_features,
    feature_distortion,
    features_and_predictions,
    linear_cka,
    mean_feature_distance,
)
from hf_lpft.models.backbone import SplitModel
from hf_lpft.train.loop import predict


def test_mean_feature_distance_hand_computed():
    a = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    assert mean_feature_distance(a, b) == pytest.approx((5.0 + 0.0) / 2)
    assert mean_feature_distance(a, a) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        mean_feature_distance(a, b[:, :1])


def test_linear_cka_hand_computed_and_invariances():
    # Centred X = [[-1], [1]], Y = [[-1, 0], [1, 0]]: YᵀX = [2, 0], ‖.‖² = 4; XᵀX = 2; ‖YᵀY‖_F = 2 -> CKA = 1.
    assert linear_cka(torch.tensor([[0.0], [2.0]]), torch.tensor([[0.0, 5.0], [2.0, 5.0]])) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    for n, d in [(50, 8), (6, 40)]:  # feature-space and Gram-matrix branches
        x = torch.randn(n, d, generator=g)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        assert linear_cka(x, x) == pytest.approx(1.0)
        assert linear_cka(x, 3.7 * x @ q + 2.0) == pytest.approx(1.0)  # orthogonal, isotropic scale, shift
        noisy = linear_cka(x, x + 2.0 * torch.randn(n, d, generator=g))
        assert noisy < 0.99
    # Anisotropic scaling is not an invariance of CKA.
    x = torch.randn(200, 2, generator=g)
    assert linear_cka(x, x * torch.tensor([1.0, 20.0])) < 0.99


def test_cka_gram_and_feature_forms_agree():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 20, generator=g), torch.randn(30, 25, generator=g)
    feature_form = linear_cka(x, y)  # n = 30 >= d = 25: computed in feature space
    x_wide = torch.cat([x, torch.zeros(30, 40)], dim=1)  # zero columns change nothing but force n < d (Gram form)
    assert linear_cka(x_wide, y) == pytest.approx(feature_form, rel=1e-9)


def test_distortion_by_client_splits_own_and_others():
    ref = [torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3)]
    feats = [torch.full((2, 3), v) for v in (1.0, 2.0, 4.0)]  # distances sqrt(3) * v
    out = distortion_by_client(ref, feats, own=1)
    assert out["distortion_local"] == pytest.approx(2.0 * 3 ** 0.5)
    assert out["distortion_global"] == pytest.approx((1.0 + 4.0) / 2 * 3 ** 0.5)  # own client excluded


@pytest.fixture(scope="module")
def model_and_inputs():
    torch.manual_seed(0)
    model = SplitModel("timm:test_resnet", num_classes=4, image_size=32).eval()
    x = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    return model, x


def _perturbed(model, scale: float, seed: int = 0):
    """A copy with every backbone weight moved along one fixed random direction by ``scale``."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.backbone.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def test_distortion_zero_for_identical_and_grows_with_perturbation(model_and_inputs):
    model, x = model_and_inputs
    assert feature_distortion(model, copy.deepcopy(model), x) == 0.0
    scales = [0.001, 0.01, 0.05, 0.2]
    values = [feature_distortion(model, _perturbed(model, s), x) for s in scales]
    assert all(v > 0 for v in values)
    assert values == sorted(values) and values[-1] > 10 * values[0], values
    # Changing only the head leaves the head-input features (and so Δ) untouched.
    head_only = copy.deepcopy(model)
    with torch.no_grad():
        head_only.head.weight.add_(1.0)
    assert feature_distortion(model, head_only, x) == 0.0


def test_features_and_predictions_match_forward(model_and_inputs):
    model, x = model_and_inputs
    feats, preds = features_and_predictions(model, x, batch_size=7)
    assert feats.shape == (24, model.num_features)
    assert torch.equal(preds, predict(model, x, batch_size=7).argmax(-1))
    assert torch.equal(feats, extract_features(model, x, batch_size=7))


def test_block_distortion_per_block(model_and_inputs):
    model, x = model_and_inputs
    blocks = default_blocks(model)
    assert blocks == ["backbone.act1", "backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone.layer4"]
    same = block_distortion(model, copy.deepcopy(model), x)
    assert all(v["distortion"] == 0.0 and v["cka"] == pytest.approx(1.0) for v in same.values())
    # Perturb only the last stage: the blocks before it are untouched, the last one moves.
    late = copy.deepcopy(model)
    with torch.no_grad():
        for p in late.backbone.layer4.parameters():
            p.add_(0.1)
    out = block_distortion(model, late, x)
    assert [out[b]["distortion"] for b in blocks[:-1]] == [0.0] * 4
    assert out["backbone.layer4"]["distortion"] > 0
    with pytest.raises(KeyError, match="not found"):
        block_distortion(model, late, x, blocks=["backbone.nope"])
