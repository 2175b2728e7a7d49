"""The strategy x backbone matrix: exactly the declared parameters change in each phase, the loss falls,
the exported model reloads and predicts identically. The backbones: timm's test ResNet (BatchNorm) and test ViT
on the toy images, and a tiny BERT (conftest) on the toy sentences."""

import copy
import dataclasses

import pytest
import torch
from conftest import BACKBONES
from peft import PeftModel
from torch.nn.modules.batchnorm import _BatchNorm

from hf_lpft.data.tensors import to_float
from hf_lpft.layout import save_model
from hf_lpft.models.backbone import SplitModel, build_model
from hf_lpft.run.personalize import personalize, run_phase
from hf_lpft.strategies import STRATEGIES, Budget, build_strategy
from hf_lpft.train.freeze import trainable_names
from hf_lpft.train.loop import OptimSettings, predict, train_phase

# Every registered strategy runs with its default options on a budget of 6 epochs.
MATRIX_BUDGET = Budget(epochs=6, lr=0.05)
TINY_BERT = "tiny_bert"  # the conftest fixtures tiny_bert (a local hf: folder) and text_clients
MATRIX_BACKBONES = [*BACKBONES, TINY_BERT]


def _clients(backbone, request):
    """The clients the backbone reads: toy sentences for the tiny BERT, toy images for timm's test models."""
    return request.getfixturevalue("text_clients" if backbone == TINY_BERT else "tiny_clients")


def _global_like(backbone, request=None):
    """A fresh model shaped like a trained global one: timm zero-inits the last BatchNorm weight of each
    residual block, which a trained model never has and which would block LoRA adapters in that branch.
    The tiny BERT is loaded from its saved (pretrained) folder."""
    if backbone == TINY_BERT:
        return build_model(request.getfixturevalue("tiny_bert"), num_classes=4, image_size=32, pretrained=True)
    model = build_model(backbone, num_classes=4, image_size=32)
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.weight is not None:
            torch.nn.init.ones_(m.weight)
    return model


def _bn_buffers(model):
    return {f"{n}.{b}": t.clone() for n, m in model.named_modules() if isinstance(m, _BatchNorm)
            for b, t in m.named_buffers() if b != "num_batches_tracked"}


@pytest.mark.parametrize("backbone", MATRIX_BACKBONES)
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_exactly_declared_parameters_change(name, backbone, accelerator, request):
    clients = _clients(backbone, request)
    strategy = build_strategy(name, budget=MATRIX_BUDGET)
    model = strategy.prepare(_global_like(backbone, request))
    for k, phase in enumerate(strategy.phases()):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        bn_before = _bn_buffers(model)
        record = run_phase(strategy, model, phase, clients[0], settings=OptimSettings(batch_size=8),
                           accelerator=accelerator, seed=k)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        declared = trainable_names(model, phase)
        # Entries a strategy holds fixed inside trainable tensors (sparse_ft's mask) must not move; a tensor
        # whose entries are all held fixed is not expected to change.
        frozen = strategy.frozen_entries(model, phase) or {}
        params = dict(model.named_parameters())
        assert all(torch.equal(params[n][m], before[n][m]) for n, m in frozen.items()), f"{name}: a masked entry moved"
        expected = declared - {n for n, m in frozen.items() if m.all()}
        assert changed == expected, f"{name}/{phase.name}: changed-expected={changed - expected}, expected-changed={expected - changed}"
        assert record["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if n in declared)
        bn_after = _bn_buffers(model)
        if phase.bn == "frozen":
            assert all(torch.equal(bn_before[k], bn_after[k]) for k in bn_before)
        elif bn_before:
            assert any(not torch.equal(bn_before[k], bn_after[k]) for k in bn_before)
        if phase.trainable == "head" and phase.epochs and phase.bn == "frozen":  # every matrix backbone is dropout-free
            assert record["cached_features"], f"{name}/{phase.name}: probing a frozen backbone should use cached features"


def test_lp_trains_head_only_and_ft_everything(tiny_clients):
    model = build_model("timm:test_resnet", num_classes=4, image_size=32)
    lp, ft = build_strategy("lp").phases()[0], build_strategy("ft").phases()[0]
    assert trainable_names(model, lp) == {"head.weight", "head.bias"}
    assert trainable_names(model, ft) == {n for n, _ in model.named_parameters()}


def test_lp_ft_splits_the_budget():
    phases = build_strategy("lp_ft", {"lp_epochs": 4}, budget=Budget(epochs=15, lr=0.01)).phases()
    assert [(p.name, p.trainable, p.epochs, p.bn) for p in phases] == [
        ("probe", "head", 4, "frozen"), ("finetune", "all", 11, "train")]


def _fixed_batch(client, n=16):
    """The client's first ``n`` training examples as its whole train split: every epoch sees the same batch."""
    return dataclasses.replace(client, train_x=client.train_x[:n], train_y=client.train_y[:n])


def _trains_weights(strategy) -> bool:
    return any(p.trainable != "none" and p.epochs > 0 for p in strategy.phases())


def _loss(model, data):
    return torch.nn.functional.cross_entropy(predict(model, data.train_x), data.train_y).item()


def test_loss_falls_on_a_fixed_batch_in_the_loop(tiny_clients, accelerator):
    strategy = build_strategy("ft", budget=Budget(epochs=8, lr=0.05))
    model = build_model("timm:test_resnet", num_classes=4, image_size=32)
    record = train_phase(model, strategy.phases()[0], tiny_clients[0], settings=OptimSettings(batch_size=16),
                         accelerator=accelerator, seed=0)
    assert record["epoch_loss"][-1] < record["epoch_loss"][0]


@torch.no_grad()
def _bn_fitted_to(model, data):
    """Set BatchNorm running statistics to those of ``data`` (as a trained global model's roughly fit its
    clients), so the eval-mode loss measures the weights, not stale statistics of a random init."""
    momenta = {m: m.momentum for m in model.modules() if isinstance(m, _BatchNorm)}
    if not momenta:  # no BatchNorm (test_vit, BERT): nothing to fit
        return model.eval()
    for m in momenta:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: exactly this batch's statistics
    model.train()
    model(to_float(data.train_x))
    for m, momentum in momenta.items():
        m.momentum = momentum
    return model.eval()


@pytest.mark.parametrize("backbone", MATRIX_BACKBONES)
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_loss_falls_on_a_fixed_batch(name, backbone, accelerator, request):
    """The personalized model fits a small fixed batch better than the global model it started from
    (full-batch steps at a small lr: test_vit's loss rises at lr 0.01 with momentum 0.9)."""
    data = _fixed_batch(_clients(backbone, request)[0])
    global_model = _bn_fitted_to(_global_like(backbone, request), data)
    strategy = build_strategy(name, budget=Budget(epochs=8, lr=0.003))
    if not _trains_weights(strategy):
        pytest.skip(f"{name} trains no weight (it only re-estimates statistics); it does not minimise the loss")
    model, _ = personalize(strategy, global_model, data, settings=OptimSettings(batch_size=len(data.train_y)),
                           accelerator=accelerator, seed=0)
    assert _loss(model, data) < _loss(global_model, data)


def load_exported(path, global_model):
    """Reload a personalized model as a user would: a peft adapter folder onto the global model, else a full
    ``SplitModel.from_pretrained`` folder."""
    if (path / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(copy.deepcopy(global_model), path).eval()
    return SplitModel.from_pretrained(path).eval()


@pytest.mark.parametrize("backbone", MATRIX_BACKBONES)
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_export_reloads_and_predicts_identically(name, backbone, accelerator, tmp_path, request):
    client = _fixed_batch(_clients(backbone, request)[0], n=8)  # one batch an epoch: the test is about the export
    global_model = _global_like(backbone, request)
    strategy = build_strategy(name, budget=MATRIX_BUDGET)
    model, _ = personalize(strategy, global_model, client, settings=OptimSettings(batch_size=8),
                           accelerator=accelerator, seed=0)
    save_model(model, tmp_path / "client", strategy)  # the pipeline's export (atomic folder)
    reloaded = load_exported(tmp_path / "client", global_model)
    assert torch.equal(predict(reloaded, client.test_x), predict(model, client.test_x))
    if _trains_weights(strategy) or _bn_buffers(global_model):  # else (bn_adapt on a ViT) nothing can change
        assert not torch.equal(predict(model, client.test_x), predict(global_model, client.test_x))


def test_cli_lists_every_strategy_with_description_and_defaults(capsys):
    from hf_lpft.cli import main

    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    for name, cls in STRATEGIES.items():
        line = next((ln for ln in out.splitlines() if ln.startswith(f"{name} ")), None)
        assert line is not None and cls.description in line, name
    assert "'presets': ['first_block']" in out and "'mu': 0.01" in out  # default_factory fields resolved too
    assert "MISSING" not in out


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_eval_view_is_a_split_model_for_epoch_curves(name, tiny_clients):
    """Epoch curves evaluate ``eval_view`` mid-training: it must expose features and predict like a SplitModel."""
    strategy = build_strategy(name, budget=MATRIX_BUDGET)
    model = strategy.prepare(_global_like("timm:test_resnet"))
    view = strategy.eval_view(model)
    x = to_float(tiny_clients[0].test_x[:4])
    view.eval()
    with torch.no_grad():
        assert view.features(x).shape[0] == 4
        assert view(x).shape == (4, 4)
