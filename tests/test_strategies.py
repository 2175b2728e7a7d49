"""The strategy x backbone matrix: exactly the declared parameters change in each phase."""

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from hf_lpft.models.backbone import build_model
from hf_lpft.strategies import STRATEGIES, Budget, build_strategy
from hf_lpft.strategies.personalize import run_phase
from hf_lpft.train.freeze import trainable_names
from hf_lpft.train.loop import OptimSettings, train_phase

from conftest import BACKBONES

# Every registered strategy runs with its default options on a budget of 6 epochs.
MATRIX_BUDGET = Budget(epochs=6, lr=0.05)


def _global_like(backbone):
    """A fresh model shaped like a trained global one: timm zero-inits the last BatchNorm weight of each
    residual block, which a trained model never has and which would block LoRA adapters in that branch."""
    model = build_model(backbone, num_classes=4, image_size=32)
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.weight is not None:
            torch.nn.init.ones_(m.weight)
    return model


def _bn_buffers(model):
    return {f"{n}.{b}": t.clone() for n, m in model.named_modules() if isinstance(m, _BatchNorm)
            for b, t in m.named_buffers() if b != "num_batches_tracked"}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_exactly_declared_parameters_change(name, backbone, tiny_clients, accelerator):
    strategy = build_strategy(name, budget=MATRIX_BUDGET)
    model = strategy.prepare(_global_like(backbone))
    for k, phase in enumerate(strategy.phases()):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        bn_before = _bn_buffers(model)
        record = run_phase(strategy, model, phase, tiny_clients[0], settings=OptimSettings(batch_size=8),
                           accelerator=accelerator, seed=k)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        declared = trainable_names(model, phase)
        assert changed == declared, f"{name}/{phase.name}: changed-declared={changed - declared}, declared-changed={declared - changed}"
        assert record["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if n in declared)
        bn_after = _bn_buffers(model)
        if phase.bn == "frozen":
            assert all(torch.equal(bn_before[k], bn_after[k]) for k in bn_before)
        elif bn_before:
            assert any(not torch.equal(bn_before[k], bn_after[k]) for k in bn_before)


def test_lp_trains_head_only_and_ft_everything(tiny_clients):
    model = build_model("timm:test_resnet", num_classes=4, image_size=32)
    lp, ft = build_strategy("lp").phases()[0], build_strategy("ft").phases()[0]
    assert trainable_names(model, lp) == {"head.weight", "head.bias"}
    assert trainable_names(model, ft) == {n for n, _ in model.named_parameters()}


def test_lp_ft_splits_the_budget():
    phases = build_strategy("lp_ft", {"lp_epochs": 4}, budget=Budget(epochs=15, lr=0.01)).phases()
    assert [(p.name, p.trainable, p.epochs, p.bn) for p in phases] == [
        ("probe", "head", 4, "frozen"), ("finetune", "all", 11, "train")]


def test_loss_falls_on_a_fixed_batch(tiny_clients, accelerator):
    strategy = build_strategy("ft", budget=Budget(epochs=8, lr=0.05))
    model = build_model("timm:test_resnet", num_classes=4, image_size=32)
    record = train_phase(model, strategy.phases()[0], tiny_clients[0], settings=OptimSettings(batch_size=16),
                         accelerator=accelerator, seed=0)
    assert record["epoch_loss"][-1] < record["epoch_loss"][0]
