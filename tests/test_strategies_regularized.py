"""Proximal FT, Sparse FT, Surgical FT and loss flooding: maths against hand calculations, masks,
exactly-what-trains, and option validation before any training."""

import dataclasses

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hf_lpft.config import ConfigError, load_config
from hf_lpft.models.backbone import build_model
from hf_lpft.run.personalize import run_phase
from hf_lpft.strategies import STRATEGIES, Budget, build_strategy
from hf_lpft.strategies.proximal import proximal_term
from hf_lpft.strategies.sparse import snip_mask, snip_scores
from hf_lpft.train.freeze import trainable_names
from hf_lpft.train.loop import OptimSettings, flooded

SETTINGS = OptimSettings(batch_size=8)


def _global_like(backbone):
    """Fresh model with non-zero BatchNorm weights (timm zero-inits some; a trained model has none)."""
    model = build_model(backbone, num_classes=4, image_size=32)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            nn.init.ones_(m.weight)
    return model


def _run(strategy, model, client, accelerator, settings=SETTINGS):
    for k, phase in enumerate(strategy.phases()):
        run_phase(strategy, model, phase, client, settings=settings, accelerator=accelerator, seed=k)
    return model


def _small(client, n=8):
    """The client's first ``n`` training examples as its train split (one batch an epoch: fast tests)."""
    return dataclasses.replace(client, train_x=client.train_x[:n], train_y=client.train_y[:n])


def _bits(t):
    """The raw bits of a float32 tensor: equality here is bit-identity (torch.equal treats -0.0 == 0.0)."""
    return t.detach().contiguous().view(torch.int32)


# ---------------------------------------------------------------- proximal FT

def test_proximal_term_and_gradient_match_a_hand_calculation():
    theta = {"a": torch.tensor([1.0, 2.0], requires_grad=True), "b": torch.tensor([[3.0]], requires_grad=True)}
    anchor = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([[1.0]])}
    term = proximal_term(theta, anchor, mu=0.5)
    assert term.item() == pytest.approx(0.25 * (1 + 1 + 4))  # (mu/2)·||θ − θ_G||², squared
    term.backward()
    assert torch.allclose(theta["a"].grad, torch.tensor([0.5, 0.5]))  # mu·(θ − θ_G)
    assert torch.allclose(theta["b"].grad, torch.tensor([[1.0]]))
    with pytest.raises(KeyError):
        proximal_term({"c": theta["a"]}, anchor, mu=0.5)


def test_proximal_strategy_penalises_distance_to_a_detached_snapshot():
    model = nn.Linear(2, 1)
    strategy = build_strategy("proximal_ft", {"mu": 2.0})
    phase = strategy.phases()[0]
    strategy.on_phase_start(model, phase, data=None)
    assert strategy.extra_loss(model, phase).item() == 0.0
    with torch.no_grad():
        model.weight.add_(torch.tensor([[1.0, -2.0]]))
    loss = strategy.extra_loss(model, phase)
    assert loss.item() == pytest.approx(1.0 * (1 + 4))  # the snapshot did not move with the weights
    loss.backward()
    assert torch.allclose(model.weight.grad, torch.tensor([[2.0, -4.0]]))
    assert model.bias.grad is not None and torch.equal(model.bias.grad, torch.zeros(1))
    assert build_strategy("proximal_ft", {"mu": 0.0}).extra_loss(model, phase) is None  # mu = 0 is FT


def test_proximal_keeps_the_model_closer_to_the_global_model(tiny_clients, accelerator):
    global_model = _global_like("timm:test_resnet")  # build_model is seeded: every call gives the same θ_G

    def distance(mu):
        strategy = build_strategy("proximal_ft", {"mu": mu}, budget=Budget(epochs=3, lr=0.05))
        model = _run(strategy, _global_like("timm:test_resnet"), _small(tiny_clients[0]), accelerator)
        return sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), global_model.parameters())).item()

    assert distance(5.0) < distance(0.0)


# ---------------------------------------------------------------- sparse FT

def test_snip_mask_matches_a_hand_calculation():
    scores = {"a": torch.tensor([1.0, 5.0, 3.0]), "b": torch.tensor([[4.0, 2.0]])}
    keep = snip_mask(scores, 0.4)  # N = 5, round(0.4·5) = 2 masked: keep the top 3 (5, 4, 3) over all tensors
    assert keep["a"].tolist() == [False, True, True] and keep["b"].tolist() == [[True, False]]
    keep = snip_mask(scores, 0.5, scope="per_tensor")  # a: round(1.5) = 2 masked; b: round(1.0) = 1 masked
    assert keep["a"].tolist() == [False, True, False] and keep["b"].tolist() == [[True, False]]
    assert all(k.all() for k in snip_mask(scores, 0.0).values())


def test_snip_scores_are_abs_gradient_times_weight_and_leave_the_model_alone():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    stats = model[1].running_mean.clone()
    scores = snip_scores(model, x, y, batch_size=4)  # three batches: the gradient is of the mean over all 10
    assert model[0].weight.grad is None and torch.equal(model[1].running_mean, stats)
    model.eval()
    nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(scores[name], (p.grad * p).abs(), atol=1e-6), name


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_sparse_ft_mask_has_the_configured_sparsity_and_masked_weights_stay_bit_identical(scope, tiny_clients,
                                                                                          accelerator):
    strategy = build_strategy("sparse_ft", {"sparsity": 0.7, "scope": scope}, budget=Budget(epochs=2, lr=0.05))
    model = _global_like("timm:test_resnet")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Weight decay and momentum move weights whose gradient is zero: the post-step restore must undo that.
    settings = OptimSettings(batch_size=8, weight_decay=0.1, momentum=0.9)
    _run(strategy, model, _small(tiny_clients[0], 16), accelerator, settings)
    masked = strategy.frozen_entries(model, strategy.phases()[0])
    n_total = sum(m.numel() for m in masked.values())
    n_masked = sum(int(m.sum()) for m in masked.values())
    if scope == "global":
        assert n_masked == round(0.7 * n_total)
    else:
        assert all(int(m.sum()) == round(0.7 * m.numel()) for m in masked.values())
    params = dict(model.named_parameters())
    for name, m in masked.items():
        assert torch.equal(_bits(params[name])[m], _bits(before[name])[m]), name
    moved = sum(int((params[n] != before[n])[~m].sum()) for n, m in masked.items())
    assert moved > 0.5 * (n_total - n_masked)  # the unmasked entries did train


def test_sparse_ft_without_the_restore_would_let_weight_decay_move_masked_weights(tiny_clients, accelerator):
    """The bit-identity test above can fail: without the post-step hook, weight decay moves masked weights."""
    strategy = build_strategy("sparse_ft", {"sparsity": 0.7}, budget=Budget(epochs=1, lr=0.05))
    strategy.post_step = lambda model, phase: None
    model = _global_like("timm:test_resnet")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _run(strategy, model, _small(tiny_clients[0]), accelerator, OptimSettings(batch_size=8, weight_decay=0.1))
    masked = strategy.frozen_entries(model, strategy.phases()[0])
    params = dict(model.named_parameters())
    assert any(not torch.equal(params[n][m], before[n][m]) for n, m in masked.items())


# ---------------------------------------------------------------- surgical FT

def _names(model, prefixes):
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


@pytest.mark.parametrize("backbone, presets, expected", [
    ("timm:test_resnet", ["first_block"], ("backbone.layer1.",)),
    ("timm:test_resnet", ["last_block"], ("backbone.layer4.",)),
    ("timm:test_resnet", ["stem"], ("backbone.conv1.", "backbone.bn1.")),
    ("timm:test_vit", ["first_block"], ("backbone.blocks.0.",)),
    ("timm:test_vit", ["last_block", "head"], ("backbone.blocks.5.",)),
    ("timm:test_vit", ["stem"], ("backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.")),
])
def test_surgical_presets_select_the_named_parts_plus_the_head(backbone, presets, expected):
    model = build_model(backbone, num_classes=4, image_size=32)
    strategy = build_strategy("surgical_ft", {"presets": presets})
    model = strategy.prepare(model)
    assert trainable_names(model, strategy.phases()[0]) == _names(model, expected + ("head.",))


def test_surgical_norms_preset_selects_every_normalisation_layer():
    model = build_model("timm:test_vit", num_classes=4, image_size=32)
    strategy = build_strategy("surgical_ft", {"presets": ["norms"]})
    names = trainable_names(strategy.prepare(model), strategy.phases()[0])
    norms = {n for n, _ in model.named_parameters() if ".norm" in n}
    assert names == norms | {"head.weight", "head.bias"} and len(norms) == 2 * 13


@pytest.mark.parametrize("backbone, args, expected", [
    ("timm:test_resnet", {"presets": ["last_block"]}, ("backbone.layer4.", "head.")),
    ("timm:test_vit", {"presets": [], "patterns": [r"blocks\.2\.mlp"]}, ("backbone.blocks.2.mlp.", "head.")),
])
def test_surgical_trains_exactly_the_matched_parameters(backbone, args, expected, tiny_clients, accelerator):
    strategy = build_strategy("surgical_ft", args, budget=Budget(epochs=2, lr=0.05))
    model = strategy.prepare(_global_like(backbone))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _run(strategy, model, _small(tiny_clients[0]), accelerator)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == _names(model, expected)


def test_surgical_pattern_or_preset_matching_nothing_fails_naming_it():
    vit = build_model("timm:test_vit", num_classes=4, image_size=32)
    with pytest.raises(ConfigError, match="no_such_layer"):
        build_strategy("surgical_ft", {"patterns": ["no_such_layer"]}).prepare(vit)
    with pytest.raises(ConfigError, match="'norms'"):  # a model without normalisation layers
        build_strategy("surgical_ft", {"presets": ["norms"]}).check_model(_LinearSplit())
    with pytest.raises(ConfigError, match="'last_block' needs a block sequence"):
        build_strategy("surgical_ft", {"presets": ["last_block"]}).check_model(_LinearSplit())


class _LinearSplit(nn.Module):
    """A SplitModel-shaped model without normalisation layers or a block sequence."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(2, 3))
        self.head = nn.Linear(3, 2)


# ---------------------------------------------------------------- loss flooding

def test_flooding_is_abs_loss_minus_level_plus_level():
    loss = torch.tensor([0.3, 0.8], requires_grad=True)
    out = flooded(loss, 0.5)
    assert torch.allclose(out, torch.tensor([0.7, 0.8]))  # |0.3 − 0.5| + 0.5, |0.8 − 0.5| + 0.5
    out.sum().backward()
    assert loss.grad.tolist() == [-1.0, 1.0]  # gradient ascent below the flood level
    assert flooded(loss, None) is loss


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_applies_its_flood_level_in_the_loop(name, tiny_clients, accelerator, monkeypatch):
    import hf_lpft.train.loop as loop

    strategy = build_strategy(name, {"flood": 0.25}, budget=Budget(epochs=6, lr=0.01))  # 6: lp_ft's 5 + 1
    if all(p.trainable == "none" for p in strategy.phases()):
        pytest.skip(f"{name} computes no loss")
    seen = []
    monkeypatch.setattr(loop, "flooded", lambda loss, flood: seen.append(flood) or flooded(loss, flood))
    model = strategy.prepare(_global_like("timm:test_vit"))
    _run(strategy, model, _small(tiny_clients[0]), accelerator)
    assert seen and set(seen) == {0.25}


def test_flooding_above_the_loss_reverses_the_update(tiny_clients, accelerator):
    """With b above the loss, one plain SGD step moves the weights by exactly minus the unflooded step."""
    settings = OptimSettings(batch_size=1000, momentum=0.0)  # one batch = one step per epoch
    steps = []
    for flood in (None, 1e3):
        model = _global_like("timm:test_vit")
        start = [p.detach().clone() for p in model.parameters()]
        strategy = build_strategy("ft", {"flood": flood}, budget=Budget(epochs=1, lr=0.01))
        _run(strategy, model, _small(tiny_clients[0]), accelerator, settings)
        steps.append([p.detach() - s for p, s in zip(model.parameters(), start)])
    assert any(s.abs().sum() > 0 for s in steps[0])
    assert all(torch.allclose(a, -b, atol=1e-7) for a, b in zip(*steps))


# ---------------------------------------------------------------- bad options fail before training

@pytest.mark.parametrize("name, args, bad", [
    ("proximal_ft", {"mu": -0.1}, "mu=-0.1"),
    ("proximal_ft", {"mu": float("nan")}, "mu=nan"),
    ("sparse_ft", {"sparsity": -0.1}, "sparsity=-0.1"),
    ("sparse_ft", {"sparsity": 1.0}, "sparsity=1.0"),
    ("sparse_ft", {"sparsity": 1.5}, "sparsity=1.5"),
    ("sparse_ft", {"scope": "layer"}, "scope='layer'"),
    ("sparse_ft", {"snip_examples": 0}, "snip_examples=0"),
    ("lora", {"r": 0}, "r=0"),
    ("lp_lora", {"r": -1}, "r=-1"),
    ("surgical_ft", {"presets": ["middle_block"]}, "middle_block"),
    ("surgical_ft", {"presets": [], "patterns": []}, "select nothing"),
    ("surgical_ft", {"patterns": ["blocks[0"]}, r"blocks\[0"),
])
def test_bad_options_fail_naming_the_value(name, args, bad):
    with pytest.raises(ConfigError, match=bad):
        build_strategy(name, args, budget=Budget(epochs=15, lr=0.01))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_negative_flood_fails_for_every_strategy(name):
    with pytest.raises(ConfigError, match=r"flood=-0\.5"):
        build_strategy(name, {"flood": -0.5})


@pytest.mark.parametrize("name, args, bad", [
    ("lora", {"target_modules": ["qkv", "no_such_module"]}, "no_such_module"),
    ("surgical_ft", {"patterns": ["no_such_param"]}, "no_such_param"),
])
def test_architecture_dependent_options_fail_before_fedavg(name, args, bad, tiny_ds_path, tmp_path, monkeypatch):
    import hf_lpft.pipeline as pipeline
    import hf_lpft.run.pretrain as pretrain

    def no_training(*a, **k):
        raise AssertionError("training started before the options were checked")

    monkeypatch.setattr(pretrain, "run_fedavg", no_training)
    cfg = load_config(None, {"data": {"dataset": tiny_ds_path, "num_classes": 4},
                             "model": {"backbone": "timm:test_vit"},
                             "pft": {"strategies": [name], "strategy_args": {name: args}},
                             "run": {"output_dir": str(tmp_path / "out")}})
    with pytest.raises(ConfigError, match=bad):
        pipeline.run(cfg)
    assert not (tmp_path / "out").exists()
