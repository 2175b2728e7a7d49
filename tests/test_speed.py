"""Speed choices that must not change behaviour: FedAvg evaluation every k rounds, channels_last models whose
exports are the same files and reload to the same logits, the run record naming threads and memory format."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_strategies import load_exported

from hf_lpft.config import ConfigError, load_config
from hf_lpft.federated.fedavg import run_fedavg
from hf_lpft.layout import save_model
from hf_lpft.models.backbone import SplitModel, build_model
from hf_lpft.pipeline import run
from hf_lpft.run.personalize import personalize
from hf_lpft.speed import apply_memory_format, memory_format_of, resolve_memory_format, use_memory_format
from hf_lpft.strategies import Budget, build_strategy
from hf_lpft.train.loop import OptimSettings, predict

SETTINGS = OptimSettings(batch_size=16)


def _fedavg(model, clients, accelerator, *, rounds=1, eval_every=1):
    return run_fedavg(model, clients, rounds=rounds, local_epochs=1, lr=0.05, client_fraction=1.0, settings=SETTINGS,
                      accelerator=accelerator, seed=3, eval_every=eval_every)


@pytest.mark.parametrize(("eval_every", "evaluated"), [(1, [1, 2, 3, 4, 5]), (2, [2, 4, 5]), (5, [5]), (0, [])])
def test_fedavg_evaluates_every_k_rounds_and_the_last(eval_every, evaluated, tiny_clients, accelerator):
    model = build_model("timm:test_resnet", num_classes=4, image_size=32)
    _, history = _fedavg(model, tiny_clients, accelerator, rounds=5, eval_every=eval_every)
    assert [h["round"] for h in history] == [1, 2, 3, 4, 5]
    assert [h["round"] for h in history if "global_test_acc" in h] == evaluated
    assert all(0.0 <= h["global_test_acc"] <= 1.0 for h in history if "global_test_acc" in h)


def test_eval_every_must_not_be_negative():
    with pytest.raises(ConfigError, match=r"fedavg.eval_every=-1"):
        load_config(None, {"fedavg": {"eval_every": -1}})
    with pytest.raises(ConfigError, match=r"run.memory_format='nhwc'.*channels_last"):
        load_config(None, {"run": {"memory_format": "nhwc"}})


def test_auto_memory_format_is_channels_last_for_cnns_only():
    assert resolve_memory_format(build_model("timm:test_resnet", num_classes=4, image_size=32),
                                 "auto") == "channels_last"
    assert resolve_memory_format(build_model("timm:test_vit", num_classes=4, image_size=32), "auto") == "contiguous"
    cnn = use_memory_format(build_model("timm:test_resnet", num_classes=4, image_size=32), "auto")
    assert memory_format_of(cnn) == "channels_last"
    with pytest.raises(ValueError, match="memory_format='nchw'"):
        resolve_memory_format(cnn, "nchw")


def test_channels_last_fedavg_equals_contiguous_within_float_tolerance(tiny_clients, accelerator):
    """Same round, other memory format: only the summation order differs (BatchNorm statistics included); 18 SGD
    steps at lr 0.05 grow the ~1e-7 rounding differences to ~2e-4 on weights of size ~0.4 (measured)."""
    nchw = build_model("timm:test_resnet", num_classes=4, image_size=32)
    nhwc = apply_memory_format(copy.deepcopy(nchw), "channels_last")
    _fedavg(nchw, tiny_clients, accelerator)
    _fedavg(nhwc, tiny_clients, accelerator)
    assert memory_format_of(nhwc) == "channels_last" and memory_format_of(nchw) == "contiguous"
    a, b = nchw.state_dict(), nhwc.state_dict()
    assert any("running_var" in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-3, msg=k)


@pytest.mark.parametrize("name", ["ft", "lp_ft", "lora"])  # LoRA adapts the Conv2d layers of a CNN
def test_channels_last_export_is_the_same_file_and_reloads_identically(name, tiny_clients, accelerator, tmp_path):
    client = tiny_clients[0]
    global_model = use_memory_format(build_model("timm:test_resnet", num_classes=4, image_size=32, seed=1), "auto")
    strategy = build_strategy(name, {"lp_epochs": 1} if name == "lp_ft" else None, budget=Budget(epochs=2, lr=0.01))
    model, _ = personalize(strategy, global_model, client, settings=SETTINGS, accelerator=accelerator, seed=0)
    assert memory_format_of(model) == "channels_last"
    save_model(model, tmp_path / "nhwc", strategy)
    assert memory_format_of(model) == "channels_last"  # the export leaves the training format as it was
    nchw_model = apply_memory_format(copy.deepcopy(model), "contiguous")
    save_model(nchw_model, tmp_path / "nchw", strategy)
    files = sorted(p.name for p in (tmp_path / "nhwc").glob("*.safetensors"))
    assert files and all((tmp_path / "nhwc" / f).read_bytes() == (tmp_path / "nchw" / f).read_bytes() for f in files)
    logits = predict(model, client.test_x)
    reloaded = load_exported(tmp_path / "nhwc", apply_memory_format(copy.deepcopy(global_model), "contiguous"))
    torch.testing.assert_close(predict(reloaded, client.test_x), logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(predict(apply_memory_format(reloaded, "channels_last"), client.test_x), logits)


def test_pipeline_default_records_a_fedavg_curve_threads_and_memory_format(tmp_path, tiny_ds_path):
    cfg = load_config(None, {"data": {"dataset": tiny_ds_path, "num_classes": 4},
                             "fedavg": {"rounds": 6, "batch_size": 16},
                             "pft": {"strategies": ["lp"], "epochs": 1, "batch_size": 16},
                             "run": {"output_dir": str(tmp_path / "run"), "distortion": False}})
    assert cfg.fedavg.eval_every == 5 and cfg.run.num_threads is None and cfg.run.memory_format == "auto"
    result = run(cfg)
    record = json.loads((result.output_dir / "run_record.json").read_text())
    history = record["train_info"]["fedavg_history"]["0"]
    assert [h["round"] for h in history if "global_test_acc" in h] == [5, 6]
    assert record["run_info"]["speed"] == {"torch_threads": 1, "fedavg_eval_every": 5, "memory_format": "channels_last"}
    reloaded = SplitModel.from_pretrained(result.output_dir / "global")
    assert memory_format_of(reloaded) == "contiguous" and len(reloaded.state_dict()) > 0


def test_float_inputs_converted_once_train_identically(tiny_clients, accelerator):
    """FedAvg converts uint8 train images to float once; the result equals per-batch conversion bit for bit."""
    from hf_lpft.federated.fedavg import with_float_inputs

    converted = with_float_inputs(tiny_clients)
    assert all(c.train_x.dtype == torch.float32 for c in converted)
    assert with_float_inputs(tiny_clients, limit=0) == tiny_clients  # too large: left as uint8
    a, b = (build_model("timm:test_resnet", num_classes=4, image_size=32) for _ in range(2))
    from hf_lpft.train.loop import train_phase
    from hf_lpft.train.phase import Phase

    for model, client in ((a, tiny_clients[0]), (b, converted[0])):
        train_phase(model, Phase("p", "all", 1, 0.05), client, settings=SETTINGS, accelerator=accelerator, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_evaluation_schedule_does_not_change_training(tmp_path, tiny_ds_path):
    """Evaluating every round (the old behaviour) or only at the end gives the same global model, byte for byte:
    of the speed-ups only channels_last changes numbers (the summation order)."""
    files = []
    for k in (1, 0):
        cfg = load_config(None, {"data": {"dataset": tiny_ds_path, "num_classes": 4},
                                 "fedavg": {"rounds": 3, "batch_size": 16, "eval_every": k},
                                 "pft": {"strategies": ["lp"], "epochs": 1, "batch_size": 16},
                                 "run": {"output_dir": str(tmp_path / f"k{k}"), "distortion": False}})
        files.append((run(cfg).output_dir / "global" / "model.safetensors").read_bytes())
    assert files[0] == files[1]
