"""Soups, Local Superior Soups and LoRA: averaging maths, finalize, export/reload, option validation."""

import copy

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hf_lpft.config import ConfigError
from hf_lpft.models.backbone import SplitModel, build_model
from hf_lpft.run.personalize import run_phase
from hf_lpft.strategies import Budget, build_strategy
from hf_lpft.strategies.lss import VertexSoup, simplex_volume_sq
from hf_lpft.strategies.soup import greedy_soup
from hf_lpft.train.averaging import average_state_dicts
from hf_lpft.train.freeze import trainable_names
from hf_lpft.train.loop import OptimSettings, predict

SETTINGS = OptimSettings(batch_size=8)


def _run(strategy, model, client, accelerator):
    for k, phase in enumerate(strategy.phases()):
        run_phase(strategy, model, phase, client, settings=SETTINGS, accelerator=accelerator, seed=k)
    return model


def _logits(model, client):
    return predict(model, client.test_x)


def test_average_state_dicts_matches_a_hand_calculation():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(9)}
    out = average_state_dicts([a, b], [1, 3])
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0]))  # (1*1 + 3*3)/4, (1*2 + 3*6)/4
    assert out["n"].item() == 5 and out["n"].dtype == torch.int64  # integers: from the first state
    assert torch.equal(average_state_dicts([a, b])["w"], torch.tensor([2.0, 4.0]))
    half = {"w": torch.tensor([1.0], dtype=torch.float16)}
    assert average_state_dicts([half, half])["w"].dtype == torch.float16
    for states, weights in [([], None), ([a, b], [1]), ([a, b], [0, 0]), ([a, b], [-1, 2]), ([a, {"w": a["w"]}], None)]:
        with pytest.raises(ValueError):
            average_state_dicts(states, weights)


def test_soup_of_identical_ingredients_is_the_ingredient(tiny_clients):
    model = build_model("timm:test_resnet", num_classes=4, image_size=32)
    expected = _logits(model, tiny_clients[0])
    for greedy in (False, True):
        soup = build_strategy("soup_ft", {"greedy": greedy})
        ingredients = [copy.deepcopy(model) for _ in range(soup.ingredients)]
        soup.on_phase_start(ingredients[0], soup.phases()[0], tiny_clients[0])
        assert torch.equal(_logits(soup.finalize(ingredients), tiny_clients[0]), expected)


def test_uniform_soup_averages_different_ingredients():
    models = [nn.Linear(2, 1), nn.Linear(2, 1)]
    expected = (models[0].weight + models[1].weight).detach() / 2
    soup = build_strategy("soup_ft", {"ingredients": 2})
    assert torch.allclose(soup.finalize(models).weight, expected)


def test_greedy_soup_keeps_only_ingredients_that_do_not_hurt():
    models = []
    for value in (0.0, 1.0, 10.0):
        m = nn.Linear(1, 1, bias=False)
        nn.init.constant_(m.weight, value)
        models.append(m)
    score = lambda m: -float((m.weight.detach() - 1.0) ** 2)  # best at weight 1  # noqa: E731
    assert greedy_soup(models, score) == [1]
    assert greedy_soup([models[1], copy.deepcopy(models[1])], score) == [0, 1]  # ties are kept
    assert models[0].weight.item() == 0.0  # ingredients are left untouched


def test_simplex_volume_matches_hand_calculation():
    d2 = torch.tensor([[0.0, 4.0], [4.0, 0.0]])
    assert simplex_volume_sq(d2).item() == pytest.approx(4.0)  # two vertices: squared distance
    pts = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    d2 = torch.cdist(pts, pts) ** 2
    assert simplex_volume_sq(d2).item() == pytest.approx(36.0)  # right triangle 3-4-5: area 6


def test_lss_finalize_returns_the_vertex_average(tiny_clients, accelerator):
    lss = build_strategy("lss_ft", budget=Budget(epochs=3, lr=0.05))  # vertex 0: 1 epoch, 2 vertices: 1 each
    soup = _run(lss, lss.prepare(build_model("timm:test_resnet", num_classes=4, image_size=32)),
                tiny_clients[0], accelerator)
    assert isinstance(soup, VertexSoup) and soup.n_fixed == 2
    vertices = [[t.detach().clone() for t in v] for v in soup.vertices()]
    assert not torch.equal(vertices[1][0], vertices[2][0])  # the vertices differ
    soup_logits = _logits(soup, tiny_clients[0])  # eval forward = the simplex centre
    final = lss.finalize([soup])
    assert type(final) is SplitModel
    for i, p in enumerate(final.parameters()):
        assert torch.allclose(p, sum(v[i] for v in vertices) / 3, atol=1e-6)
    assert torch.allclose(_logits(final, tiny_clients[0]), soup_logits, atol=1e-4)


def _trained_resnet():
    """test_resnet with non-zero BatchNorm weights: timm zero-initialises the last BN of each residual
    branch, which would switch those branches (and the adapters in them) off under a frozen backbone."""
    model = build_model("timm:test_resnet", num_classes=4, image_size=32)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            nn.init.ones_(m.weight)
    return model


def _train_export_reload(name, global_model, client, accelerator, path, args=None):
    """Train a LoRA strategy on a copy of ``global_model``, export it, reload it onto the global model."""
    strategy = build_strategy(name, args, budget=Budget(epochs=6, lr=0.02))
    model = strategy.prepare(copy.deepcopy(global_model))
    for k, phase in enumerate(strategy.phases()):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        run_phase(strategy, model, phase, client, settings=SETTINGS, accelerator=accelerator, seed=k)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == trainable_names(model, phase)
        assert all("lora_" in n or ".head." in n for n in changed)
    final = strategy.finalize([model])
    final.eval()
    strategy.export(final, path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(global_model), path)
    assert torch.equal(_logits(reloaded, client), _logits(final, client))
    assert not torch.equal(_logits(global_model, client), _logits(final, client))
    return set(load_file(path / "adapter_model.safetensors"))


@pytest.mark.parametrize("name", ["lora", "lp_lora"])
@pytest.mark.parametrize("backbone", ["timm:test_vit", "timm:test_resnet"])
def test_lora_exports_adapters_and_head_and_reloads(name, backbone, tiny_clients, accelerator, tmp_path):
    global_model = _trained_resnet() if backbone.endswith("resnet") else build_model(backbone, num_classes=4,
                                   image_size=32)
    keys = _train_export_reload(name, global_model, tiny_clients[0], accelerator, tmp_path)
    assert keys and all("lora_" in k or k.startswith("base_model.model.head.") for k in keys), keys
    assert {"base_model.model.head.weight", "base_model.model.head.bias"} <= keys


def test_lora_with_training_batchnorm_exports_the_statistics(tiny_clients, accelerator, tmp_path):
    keys = _train_export_reload("lora", _trained_resnet(), tiny_clients[0], accelerator, tmp_path, {"bn": "train"})
    assert "base_model.model.backbone.bn1.running_mean" in keys
    assert not any(k.endswith("conv1.0.weight") for k in keys)  # backbone weights stay out


def test_lora_default_targets():
    from hf_lpft.strategies.lora import resolve_targets

    vit = build_model("timm:test_vit", num_classes=4, image_size=32)
    assert resolve_targets(vit, None) == [f"backbone.blocks.{i}.attn.qkv" for i in range(6)]
    assert resolve_targets(vit, ["qkv", "proj"])[:2] == ["backbone.patch_embed.proj", "backbone.blocks.0.attn.qkv"]
    resnet = build_model("timm:test_resnet", num_classes=4, image_size=32)
    targets = resolve_targets(resnet, None)
    assert "backbone.layer1.0.conv1" in targets and not any("head" in t for t in targets)


@pytest.mark.parametrize("name, args, bad", [
    ("lora", {"r": 0}, "r=0"),
    ("lp_lora", {"r": -2}, "r=-2"),
    ("lora", {"dropout": 1.0}, "dropout=1.0"),
    ("lp_lora", {"lp_epochs": 20}, "lp_epochs=20"),
    ("lss_ft", {"n_vertices": 1}, "n_vertices=1"),
    ("lss_ft", {"aff": -0.1}, "aff=-0.1"),
    ("lss_ft", {"div": -1e-3}, "div=-0.001"),
    ("lss_ft", {"vertex_epochs": 8}, "vertex_epochs=8"),
    ("soup_ft", {"ingredients": 0}, "ingredients=0"),
    ("soup_ft", {"holdout_fraction": 1.5}, "holdout_fraction=1.5"),
])
def test_bad_options_fail_naming_the_value(name, args, bad):
    with pytest.raises(ConfigError, match=bad):
        build_strategy(name, args, budget=Budget(epochs=15, lr=0.01))


def test_unknown_lora_target_fails_naming_it():
    strategy = build_strategy("lora", {"target_modules": ["qkv", "nonexistent_layer"]})
    with pytest.raises(ConfigError, match="nonexistent_layer"):
        strategy.prepare(build_model("timm:test_vit", num_classes=4, image_size=32))
    with pytest.raises(ConfigError, match="head"):  # the head is ours, never an adapter target
        build_strategy("lora",
                       {"target_modules": ["head"]}).prepare(build_model("timm:test_vit", num_classes=4, image_size=32))
