"""Personalizing a given global model (``hf-lpft personalize``) and reusing FedAvg results (``run.fedavg_cache``)."""

import json

import pandas as pd
import pytest
import torch

import hf_lpft.run.pretrain as pretrain
from hf_lpft.cli import main as cli_main
from hf_lpft.config import ConfigError, load_config
from hf_lpft.models.backbone import SplitModel
from hf_lpft.pipeline import run


def _cfg(tmp, name, path, cache=None, **extra):
    base = {"data": {"dataset": path, "num_classes": 4}, "fedavg": {"rounds": 2, "batch_size": 16},
            "pft": {"strategies": ["ft", "lp_ft"], "epochs": 2, "batch_size": 16,
                    "strategy_args": {"lp_ft": {"lp_epochs": 1}}},
            "run": {"output_dir": str(tmp / name), "fedavg_cache": str(cache) if cache else None}}
    for section, values in extra.items():
        base.setdefault(section, {}).update(values)
    return load_config(None, base)


def _results(out):
    return pd.read_parquet(out / "results.parquet")


def _source(out, seed=0):
    return json.loads((out / "run_record.json").read_text())["run_info"]["global_model"][str(seed)]


@pytest.fixture()
def no_fedavg(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("FedAvg ran although its result was given or stored")
    monkeypatch.setattr(pretrain, "run_fedavg", boom)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_ds_path):
    """An uncached run, and a cached run that stored its FedAvg result (same settings)."""
    tmp = tmp_path_factory.mktemp("personalize")
    plain = run(_cfg(tmp, "plain", tiny_ds_path))
    cached = run(_cfg(tmp, "cached", tiny_ds_path, cache=tmp / "cache"))
    return tmp, plain.output_dir, cached.output_dir


def test_personalize_a_runs_global_model_reproduces_its_results(runs, tiny_ds_path, no_fedavg):
    tmp, plain, _ = runs
    out = tmp / "personalized"
    code = cli_main(["personalize", "--global_model", str(plain / "global"), "--config", str(plain / "config.yaml"),
                     "--data.manifest", str(plain / "federation" / "manifest.json"), "--run.output_dir", str(out)])
    assert code == 0
    assert len(_results(plain)) == 9  # global_model, ft, lp_ft x 3 clients
    pd.testing.assert_frame_equal(_results(out), _results(plain))
    assert _source(plain) == {"source": "fedavg"}
    assert _source(out)["source"] == "given" and _source(out)["kind"] == "hf_lpft"
    assert SplitModel.from_pretrained(out / "global").state_dict().keys() == \
        SplitModel.from_pretrained(plain / "global").state_dict().keys()
    for rel in ["clients/ft/a/model.safetensors", "clients/lp_ft/c/model.safetensors", "summary.md",
                "global/config.json"]:
        assert (out / rel).is_file(), rel


def test_cached_run_equals_uncached_and_a_match_skips_fedavg(runs, tiny_ds_path, no_fedavg):
    tmp, plain, cached = runs
    stored = _source(cached)
    assert stored["source"] == "fedavg" and stored["stored"] is True
    pd.testing.assert_frame_equal(_results(cached), _results(plain))
    again = run(_cfg(tmp, "again", tiny_ds_path, cache=tmp / "cache")).output_dir  # run_fedavg would raise
    assert _source(again) == {"source": "fedavg_cache", "key": stored["key"], "fedavg_cache": str(tmp / "cache")}
    pd.testing.assert_frame_equal(_results(again), _results(plain))
    record = json.loads((again / "run_record.json").read_text())
    assert record["train_info"]["fedavg_history"]["0"] == \
        json.loads((plain / "run_record.json").read_text())["train_info"]["fedavg_history"]["0"]
    assert [p.name for p in (tmp / "cache").iterdir()] == [stored["key"]]  # one entry, no temporaries


def test_pft_and_evaluation_settings_share_the_fedavg_result(runs, tiny_ds_path, no_fedavg):
    tmp, _, cached = runs
    other = run(_cfg(tmp, "pft_only", tiny_ds_path, cache=tmp / "cache", pft={"strategies": ["lp"], "lr": 0.05},
                     run={"distortion": False, "eval_batch_size": 7})).output_dir
    assert _source(other)["source"] == "fedavg_cache" and _source(other)["key"] == _source(cached)["key"]


@pytest.mark.parametrize("change", [
    {"fedavg": {"lr": 0.02}}, {"fedavg": {"rounds": 1}}, {"model": {"backbone": "timm:test_vit"}},
    {"data": {"seed": 1}}, {"run": {"seeds": [1]}}, {"data": {"scheme": "iid", "num_clients": 3}},
])
def test_fedavg_result_not_reused_when_a_setting_differs(runs, tiny_ds_path, monkeypatch, change):
    tmp, _, cached = runs
    calls = []
    real = pretrain.run_fedavg
    monkeypatch.setattr(pretrain, "run_fedavg", lambda *a, **k: calls.append(1) or real(*a, **k))
    name = "miss_" + "_".join(f"{s}.{k}" for s, v in change.items() for k in v)
    extra = {s: dict(v) for s, v in change.items()}
    extra.setdefault("pft", {}).update(strategies=["lp"])
    seed = (change.get("run") or {}).get("seeds", [0])[0]
    out = run(_cfg(tmp / "misses", name, tiny_ds_path, cache=tmp / "cache", **extra)).output_dir
    assert calls == [1]
    source = _source(out, seed)
    assert source["source"] == "fedavg" and source["key"] != _source(cached)["key"] and source["stored"] is True


def test_store_keeps_the_first_entry_when_two_runs_store_one_key(tmp_path):
    model = SplitModel("timm:test_resnet", num_classes=4)
    entry = tmp_path / "cache" / "k"
    assert pretrain.store_entry(entry, model, [{"round": 1}], None, {"who": "first"}) is True
    other = SplitModel("timm:test_resnet", num_classes=4)
    assert pretrain.store_entry(entry, other, [{"round": 9}], None, {"who": "second"}) is False
    loaded, history, client_bn = pretrain.load_entry(entry, "cpu")
    assert history == [{"round": 1}] and client_bn is None
    assert json.loads((entry / "key.json").read_text()) == {"who": "first"}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert [p.name for p in entry.parent.iterdir()] == ["k"]


@pytest.mark.parametrize("classes", [4, 7])
def test_plain_timm_folder_personalizes(tmp_path, tiny_ds_path, no_fedavg, classes):
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(3)
    source = timm.create_model("test_resnet", num_classes=classes).eval()
    save_for_hf(source, str(tmp_path / "timm_model"), safe_serialization=True)
    code = cli_main(["personalize", "--global_model", str(tmp_path / "timm_model"), "--data.dataset", tiny_ds_path,
                     "--data.num_classes", "4", "--pft.strategies", "ft,lp_ft", "--pft.epochs", "2",
                     "--pft.strategy_args", "{lp_ft: {lp_epochs: 1}}", "--run.output_dir", str(tmp_path / "out")])
    assert code == 0
    out = tmp_path / "out"
    assert sorted(_results(out).strategy.unique()) == ["ft", "global_model", "lp_ft"]
    info = _source(out)
    assert info["kind"] == "timm"
    ours = SplitModel.from_pretrained(out / "global").eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.features(x), source.forward_head(source.forward_features(x), pre_logits=True))
        if classes == 4:  # the classifier fits the federation: kept, so the model computes what it computed
            assert info["head"] == "the timm checkpoint's classifier"
            assert torch.allclose(ours(x), source(x))
        else:
            assert info["head"].startswith("new (nn.Linear default init, torch seed")


def test_nonexistent_global_model_fails_naming_it(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(ConfigError, match="model.global_model=.*no_such_model"):
        load_config(None, {"model": {"global_model": missing}})
    assert cli_main(["personalize", "--global_model", missing]) == 2


def test_wrong_class_count_fails_naming_the_model(tmp_path, tiny_ds_path, no_fedavg):
    SplitModel("timm:test_resnet", num_classes=3).save_pretrained(tmp_path / "three")
    cfg = _cfg(tmp_path, "out", tiny_ds_path, model={"global_model": str(tmp_path / "three")})
    with pytest.raises(ConfigError, match=r"model.global_model=.*three.* 3 classes but the federation has 4"):
        run(cfg)


def test_timm_checkpoint_file_and_transformers_folder_load_as_global_models(tmp_path):
    import timm
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModel

    from hf_lpft.run.given_model import load_global_model

    source = timm.create_model("test_resnet", num_classes=4).eval()
    save_file(source.state_dict(), str(tmp_path / "weights.safetensors"))
    cfg = load_config(None, {"model": {"global_model": str(tmp_path / "weights.safetensors")}})
    model, info = load_global_model(cfg, 4, seed=0)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert info["kind"] == "timm_checkpoint" and torch.allclose(model.eval()(x), source(x))
    cfg = load_config(None, {"model": {"global_model": str(tmp_path / "weights.safetensors"), "backbone": "hf:x"}})
    with pytest.raises(ConfigError, match="needs model.backbone timm:<architecture>"):
        load_global_model(cfg, 4, seed=0)

    vit = AutoModel.from_config(AutoConfig.for_model("vit", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=64, patch_size=8, image_size=32)).eval()
    vit.save_pretrained(tmp_path / "vit")
    cfg = load_config(None, {"model": {"global_model": str(tmp_path / "vit"), "backbone": f"hf:{tmp_path / 'vit'}"}})
    model, info = load_global_model(cfg, 4, seed=0)
    with torch.no_grad():
        assert torch.allclose(model.eval().features(x), vit(pixel_values=x).last_hidden_state[:, 0], atol=1e-6)
    assert info["kind"] == "transformers" and info["head"].startswith("new (nn.Linear default init")
