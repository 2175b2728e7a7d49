"""Probing all clients' heads at once equals probing each client with THE loop (within float tolerance)."""

import copy

import pytest
import torch

from hf_lpft.data.tensors import ClientData
from hf_lpft.models.backbone import build_model
from hf_lpft.run.personalize import batched_probe_blocker, personalize, probe_all_clients
from hf_lpft.strategies import build_strategy
from hf_lpft.strategies.base import Budget
from hf_lpft.train.batched_probe import probe_clients, train_heads
from hf_lpft.train.loop import NonFiniteLossError, OptimSettings, train_phase
from hf_lpft.train.phase import Phase


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread (restored after): on a shared 2-core machine two OpenMP threads can be several
    times slower than one, and these tests check values, not speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def uneven(clients):
    """Clients of different sizes, so their epochs have different numbers of batches."""
    c0, c1, c2 = clients
    return [c0, ClientData("short", c1.train_x[:5], c1.train_y[:5], c1.test_x, c1.test_y), c2]


@pytest.mark.parametrize("settings", [OptimSettings(batch_size=4), OptimSettings(batch_size=6, weight_decay=0.01),
                                      OptimSettings(batch_size=64, momentum=0.0)])
def test_batched_heads_equal_loop(settings, tiny_clients, accelerator):
    clients = uneven(tiny_clients)
    base = build_model("timm:test_resnet", num_classes=4, image_size=32, seed=3)
    phase = Phase("probe", "head", 3, 0.2, bn="frozen")
    seeds = [11, 12, 13]
    results = probe_clients(copy.deepcopy(base), phase, clients, settings=settings, seeds=seeds, flood=0.05)
    for client, seed, result in zip(clients, seeds, results):
        model = copy.deepcopy(base)
        record = train_phase(model, phase, client, settings=settings, accelerator=accelerator, seed=seed, flood=0.05)
        assert record["cached_features"] and result.record["batched_probe"]
        torch.testing.assert_close(result.head_state["weight"], model.head.weight.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(result.head_state["bias"], model.head.bias.detach(), rtol=1e-4, atol=1e-5)
        assert result.record["epoch_loss"] == pytest.approx(record["epoch_loss"], rel=1e-5)
    assert not torch.equal(results[0].head_state["weight"], base.head.weight)  # the heads did train


def test_nonfinite_client_stops_alone():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(10, 6, generator=g), torch.randn(7, 6, generator=g)]
    feats[1][3, 0] = float("inf")
    labels = [torch.randint(0, 3, (10,), generator=g), torch.randint(0, 3, (7,), generator=g)]
    w0, b0 = torch.randn(2, 3, 6, generator=g), torch.zeros(2, 3)
    settings = OptimSettings(batch_size=4)
    w, b, losses, errors = train_heads(feats, labels, w0, b0, epochs=2, lr=0.1, settings=settings, seeds=[1, 2])
    alone = train_heads(feats[:1], labels[:1], w0[:1], b0[:1], epochs=2, lr=0.1, settings=settings, seeds=[1])
    assert errors[0] is None and errors[1][0] == 0  # client 1 fails in epoch 0, client 0 is untouched
    torch.testing.assert_close(w[0], alone[0][0])
    assert losses[0] == pytest.approx(alone[2][0]) and losses[1] == []


def test_personalize_with_batched_probe_equals_loop(tiny_clients, accelerator):
    """LP-FT through personalize: batched probing + the loop's fine-tuning == the loop for both phases."""
    strategy = build_strategy("lp_ft", {"lp_epochs": 2}, budget=Budget(epochs=3, lr=0.01))
    global_model = build_model("timm:test_resnet", num_classes=4, image_size=32, seed=4)
    settings = OptimSettings(batch_size=8)
    seeds, clients = [21, 22], tiny_clients[:2]
    probed = probe_all_clients(strategy, global_model, clients, settings=settings, accelerator=accelerator,
                               seeds=seeds)
    assert probed is not None
    for client, seed, result in zip(clients, seeds, probed):
        a, rec_a = personalize(strategy, global_model, client, settings=settings, accelerator=accelerator, seed=seed,
                               probed=result)
        b, rec_b = personalize(strategy, global_model, client, settings=settings, accelerator=accelerator, seed=seed)
        assert [r["phase"] for r in rec_a] == [r["phase"] for r in rec_b] == ["probe", "finetune"]
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(va, vb, rtol=1e-3, atol=1e-4, msg=k)


def test_failed_client_raises_the_loop_error(tiny_clients, accelerator):
    strategy = build_strategy("lp", budget=Budget(epochs=1, lr=0.1))
    model = build_model("timm:test_resnet", num_classes=4, image_size=32, seed=4)
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    settings = OptimSettings(batch_size=8)
    probed = probe_all_clients(strategy, model, tiny_clients[:1], settings=settings, accelerator=accelerator, seeds=[1])
    with pytest.raises(NonFiniteLossError, match="phase 'probe', epoch 0"):
        personalize(strategy, model, tiny_clients[0], settings=settings, accelerator=accelerator, seed=1,
                    probed=probed[0])


def test_batching_refused_when_not_equal():
    model = build_model("timm:test_resnet", num_classes=4, image_size=32)
    settings = OptimSettings()
    assert batched_probe_blocker(build_strategy("lp"), model, settings) is None
    assert "not the head only" in batched_probe_blocker(build_strategy("ft"), model, settings)
    assert "adamw" in batched_probe_blocker(build_strategy("lp"), model, OptimSettings(optimizer="adamw"))
    assert "BatchNorm" in batched_probe_blocker(build_strategy("lp", {"bn": "train"}), model, settings)
    assert "ingredients" in batched_probe_blocker(build_strategy("soup_ft"), model, settings)


def test_pipeline_batched_probe_shared_eval_and_stage_timings(tmp_path, tiny_ds_path):
    """In a run: probing is batched, LP is evaluated from θ_G's shared features (same accuracies as
    evaluating its saved model), and run_record.json splits the time by stage."""
    import json

    from hf_lpft.config import load_config
    from hf_lpft.data.federate import load_manifest
    from hf_lpft.data.load import client_tensors, load_source
    from hf_lpft.models.backbone import SplitModel
    from hf_lpft.pipeline import run
    from hf_lpft.train.loop import accuracy

    cfg = load_config(None, {"data": {"dataset": tiny_ds_path, "num_classes": 4},
                             "fedavg": {"rounds": 1, "batch_size": 16},
                             "pft": {"strategies": ["lp", "lp_ft"], "epochs": 2, "batch_size": 16, "batched_probe": True,
                                     "strategy_args": {"lp_ft": {"lp_epochs": 1}}},
                             "run": {"output_dir": str(tmp_path / "out"), "num_threads": 1}})
    result = run(cfg)
    record = json.loads((result.output_dir / "run_record.json").read_text())
    probes = [u["phases"][0] for u in record["train_info"]["personalization"]]
    assert len(probes) == 6 and all(p["phase"] == "probe" and p.get("batched_probe") for p in probes)
    timings = record["run_info"]["timings_seconds"]
    stages = {f"personalize_{s}_{k}_seed_0" for s in ("lp", "lp_ft") for k in ("train", "evaluate", "export")}
    steps = ["federate", "fedavg_seed_0", "evaluate_global_model_seed_0", "personalize_seed_0", "write_results"]
    assert set(timings) == {"data_load", "partition", "decode_inputs", "total", *steps, *stages}
    assert all(t > 0 for t in timings.values()), timings
    # nested intervals of one clock: the parts of a step add up to no more than the step (1 µs for rounding)
    assert timings["data_load"] + timings["partition"] + timings["decode_inputs"] <= timings["federate"] + 1e-6
    assert sum(timings[k] for k in stages) <= timings["personalize_seed_0"] + 1e-6
    assert sum(timings[k] for k in steps) <= timings["total"] + 1e-6
    ds = load_source(tiny_ds_path)
    fed = load_manifest(result.output_dir / "federation" / "manifest.json", num_rows=len(ds))
    clients = client_tensors(ds, fed, image_column="image", label_column="label", image_size=32)
    model = SplitModel.from_pretrained(result.output_dir / "clients" / "lp" / "b")
    row = result.results.query("strategy == 'lp' and client_id == 'b'").iloc[0]
    assert list(row.acc_by_client) == pytest.approx([accuracy(model, c.test_x, c.test_y) for c in clients])
