"""Optimizers as a recorded choice: fresh state per client and per stage, the FT-stage lr, schedules."""

import math

import pytest
import torch

import hf_lpft.train.loop as loop
from hf_lpft.config import OPTIMIZERS as CONFIG_OPTIMIZERS
from hf_lpft.config import SCHEDULES as CONFIG_SCHEDULES
from hf_lpft.config import ConfigError, FedAvgConfig, PFTConfig
from hf_lpft.models.backbone import build_model
from hf_lpft.run.personalize import personalize
from hf_lpft.strategies import Budget, build_strategy
from hf_lpft.train.optim import (
    OPTIMIZERS,
    SCHEDULES,
    OptimSettings,
    cosine_factor,
    make_optimizer,
    round_lr,
    settings_from,
)


@pytest.fixture()
def spy_optimizers(monkeypatch):
    """Every optimizer the loop makes, with the lr it was made with and whether its state was empty."""
    made = []

    def spy(params, lr, settings):
        opt = make_optimizer(params, lr, settings)
        made.append({"optimizer": opt, "lr": lr, "empty_state": len(opt.state) == 0, "kind": type(opt).__name__})
        return opt
    monkeypatch.setattr(loop, "make_optimizer", spy)
    return made


def test_config_and_train_agree_on_the_choices():
    assert CONFIG_OPTIMIZERS == OPTIMIZERS and CONFIG_SCHEDULES == SCHEDULES


def test_settings_from_a_config_section():
    s = settings_from(PFTConfig(optimizer="adam", weight_decay=0.01, batch_size=16, schedule="cosine",
                                cache_features=False))
    assert s == OptimSettings("adam", 0.9, 0.01, 16, cache_features=False, schedule="cosine")
    assert settings_from(FedAvgConfig(optimizer="adamw")).optimizer == "adamw"


@pytest.mark.parametrize("bad", [{"optimizer": "rmsprop"}, {"schedule": "linear"}])
def test_bad_optimizer_or_schedule_fails_clearly(bad):
    with pytest.raises(ConfigError, match=repr(next(iter(bad.values())))):
        PFTConfig(**bad)
    with pytest.raises(ValueError, match=repr(next(iter(bad.values())))):
        OptimSettings(**bad)


def test_adam_state_is_fresh_per_client_and_per_stage(spy_optimizers, tiny_clients, accelerator):
    strategy = build_strategy("lp_ft", {"lp_epochs": 1}, budget=Budget(epochs=3, lr=1e-3))
    model = build_model("timm:test_resnet", num_classes=4, image_size=32)
    settings = OptimSettings("adam", batch_size=8, cache_features=False)
    for client in tiny_clients[:2]:
        personalize(strategy, model, client, settings=settings, accelerator=accelerator, seed=1)
    assert [m["kind"] for m in spy_optimizers] == ["Adam"] * 4  # 2 clients x (probe, finetune)
    assert all(m["empty_state"] for m in spy_optimizers)
    assert len({id(m["optimizer"]) for m in spy_optimizers}) == 4
    # Behaviour: client 1 personalized after client 0 equals client 1 personalized alone.
    alone, _ = personalize(strategy, model, tiny_clients[1], settings=settings, accelerator=accelerator, seed=1)
    after, _ = personalize(strategy, model, tiny_clients[1], settings=settings, accelerator=accelerator, seed=1)
    for a, b in zip(alone.state_dict().values(), after.state_dict().values()):
        assert torch.equal(a, b)


def test_ft_stage_lr_reaches_the_optimizer(spy_optimizers, tiny_clients, accelerator):
    strategy = build_strategy("lp_ft", {"lp_epochs": 1, "ft_lr_factor": 0.1}, budget=Budget(epochs=2, lr=0.05,
                                                                                             head_lr=0.02))
    model = build_model("timm:test_resnet", num_classes=4, image_size=32)
    personalize(strategy, model, tiny_clients[0], settings=OptimSettings(batch_size=8, cache_features=False),
                accelerator=accelerator, seed=0)
    assert [m["lr"] for m in spy_optimizers] == [0.02, pytest.approx(0.005)]
    assert spy_optimizers[1]["optimizer"].param_groups[0]["lr"] == pytest.approx(0.005)


@pytest.mark.parametrize("factor", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_ft_lr_factor_fails(factor):
    with pytest.raises(ConfigError, match="ft_lr_factor"):
        build_strategy("lp_ft", {"ft_lr_factor": factor})


def test_cosine_schedule_anneals_over_the_phase(spy_optimizers, tiny_clients, accelerator):
    strategy = build_strategy("ft", budget=Budget(epochs=2, lr=0.1))
    model = build_model("timm:test_resnet", num_classes=4, image_size=32)
    client = tiny_clients[0]
    personalize(strategy, model, client, settings=OptimSettings(batch_size=8, schedule="cosine"),
                accelerator=accelerator, seed=0)
    steps = 2 * math.ceil(client.n_train / 8)
    opt = spy_optimizers[0]["optimizer"]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * cosine_factor(steps, steps))  # 0 after the last step
    assert opt.param_groups[0]["initial_lr"] == 0.1


def test_cosine_and_round_lr_hand_values():
    assert cosine_factor(0, 10) == 1.0 and cosine_factor(5, 10) == pytest.approx(0.5)
    assert cosine_factor(10, 10) == pytest.approx(0.0)
    cos = OptimSettings(schedule="cosine")
    assert [round_lr(0.1, cos, rnd=r, rounds=4) for r in range(4)] == pytest.approx(
        [0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2, 0.05, 0.1 * (1 + math.cos(3 * math.pi / 4)) / 2])
    assert round_lr(0.1, OptimSettings(), rnd=3, rounds=4) == 0.1


def test_fedavg_cosine_anneals_over_rounds_not_within(spy_optimizers, tiny_clients, accelerator):
    from hf_lpft.federated.fedavg import run_fedavg

    model = build_model("timm:test_resnet", num_classes=4, image_size=32)
    settings = OptimSettings("adam", batch_size=8, schedule="cosine")
    run_fedavg(model, tiny_clients[:1], rounds=2, local_epochs=1, lr=0.01, client_fraction=1.0, settings=settings,
               accelerator=accelerator, seed=0, eval_every=0)
    assert [m["lr"] for m in spy_optimizers] == pytest.approx([0.01, 0.005])
    assert all(m["empty_state"] and m["kind"] == "Adam" for m in spy_optimizers)
    assert all("initial_lr" not in m["optimizer"].param_groups[0] for m in spy_optimizers)  # no per-step schedule
