"""The converged probe: multinomial logistic regression fitted with L-BFGS equals scikit-learn's."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from hf_lpft.config import ConfigError
from hf_lpft.data.tensors import to_float
from hf_lpft.models.backbone import build_model
from hf_lpft.run.personalize import personalize
from hf_lpft.strategies import Budget, build_strategy
from hf_lpft.train.logreg import choose_l2, fit_logreg, holdout_split
from hf_lpft.train.optim import OptimSettings
from hf_lpft.train.phase import Phase

TOL = 1e-5  # on predicted probabilities; both solvers stop at gradient norms near 1e-10


def _features(n=120, d=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.5, (classes, d))
    y = rng.integers(0, classes, n)
    return torch.tensor(centres[y] + rng.normal(0, 1, (n, d))), torch.tensor(y)


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
def test_fit_equals_sklearn_logistic_regression(l2):
    x, y = _features()
    n, classes = len(y), 3
    fit = fit_logreg(x, y, l2=l2, init_weight=torch.zeros(classes, x.shape[1]), init_bias=torch.zeros(classes))
    ref = LogisticRegression(C=1.0 / (n * l2), tol=1e-12, max_iter=10_000).fit(x.numpy(), y.numpy())
    ours = torch.softmax(x @ fit.weight.T + fit.bias, -1).numpy()
    assert np.abs(ours - ref.predict_proba(x.numpy())).max() < TOL
    assert np.abs(fit.weight.numpy() - ref.coef_).max() < 1e-3  # W is identifiable under the L2 penalty


def test_warm_start_reaches_the_same_optimum():
    x, y = _features(seed=1)
    cold = fit_logreg(x, y, l2=1e-2, init_weight=torch.zeros(3, 6), init_bias=torch.zeros(3))
    warm = fit_logreg(x, y, l2=1e-2, init_weight=torch.randn(3, 6), init_bias=torch.randn(3))
    probs = [torch.softmax(x @ f.weight.T + f.bias, -1) for f in (cold, warm)]
    assert (probs[0] - probs[1]).abs().max() < TOL


def test_choose_l2_scores_every_strength_on_held_out_data():
    x, y = _features(n=100, seed=2)
    fit_idx, held = holdout_split(100, seed=3)
    assert len(held) == 20 and len(set(fit_idx.tolist()) | set(held.tolist())) == 100
    l2, scores = choose_l2(x, y, grid=(1e-4, 10.0), init_weight=torch.zeros(3, 6), init_bias=torch.zeros(3), seed=3)
    assert set(scores) == {1e-4, 10.0} and scores[l2] == max(scores.values())


def test_lp_with_logreg_probe_sets_the_head_to_the_fit(tiny_clients, accelerator):
    strategy = build_strategy("lp", {"probe": "logreg", "probe_l2": [1e-2]}, budget=Budget(epochs=3))
    model = build_model("timm:test_resnet", num_classes=4, image_size=32)
    client = tiny_clients[0]
    tuned, records = personalize(strategy, model, client, settings=OptimSettings(batch_size=8), accelerator=accelerator,
                                 seed=0)
    with torch.no_grad():
        feats = model.eval().features(to_float(client.train_x))
    assert records[0]["solver"] == "logreg" and records[0]["l2"] == 1e-2
    expected = fit_logreg(feats, client.train_y, l2=1e-2, init_weight=model.head.weight, init_bias=model.head.bias)
    assert torch.allclose(tuned.head.weight.double(), expected.weight, atol=1e-4)
    for name, p in tuned.named_parameters():  # the backbone did not move
        if not name.startswith("head"):
            assert torch.equal(p, dict(model.named_parameters())[name])


def test_logreg_probe_needs_fixed_features():
    with pytest.raises(ConfigError, match="lp_ft.probe='logreg'.*train"):
        build_strategy("lp_ft", {"probe": "logreg", "lp_bn": "train"})
    with pytest.raises(ConfigError, match="probe='newton'"):
        build_strategy("lp", {"probe": "newton"})
    with pytest.raises(ConfigError, match="probe_l2"):
        build_strategy("lp", {"probe": "logreg", "probe_l2": [-1.0]})
    with pytest.raises(ValueError, match="solver='logreg'"):
        Phase("probe", "all", 1, 0.1, bn="frozen", solver="logreg")
