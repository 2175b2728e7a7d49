"""One personalized model alive at a time: every client's copy of the global model is released after its unit."""

import gc
import weakref

import torch

import hf_lpft.run.personalize as personalize_module
from hf_lpft.config import load_config
from hf_lpft.models.backbone import build_model
from hf_lpft.run.preflight import build_strategies
from hf_lpft.run.settings import eval_settings, run_layout
from hf_lpft.run.units import personalize_all


def test_client_copies_are_released(tiny_clients, accelerator, tmp_path, monkeypatch):
    copies, alive_at_copy = [], []
    original = personalize_module.fresh_copy

    def tracked_copy(model):
        alive_at_copy.append(sum(r() is not None for r in copies))  # copies still alive when a new one is made
        copy = original(model)
        copies.append(weakref.ref(copy))
        return copy

    monkeypatch.setattr(personalize_module, "fresh_copy", tracked_copy)
    cfg = load_config(None, {"pft": {"strategies": ["ft", "lp"], "epochs": 1, "batch_size": 16},
                             "run": {"output_dir": str(tmp_path)}})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machine: one thread is faster; this test checks references only
    try:
        global_model = build_model("timm:test_resnet", num_classes=4, image_size=32, seed=0)
        personalize_all(cfg, build_strategies(cfg), global_model, tiny_clients, seed=0,
                        layout=run_layout(cfg.run), accelerator=accelerator, evaluation=eval_settings(cfg.run, cfg.pft))
    finally:
        torch.set_num_threads(threads)
    assert len(copies) == 6
    assert max(alive_at_copy) == 0, alive_at_copy  # freed by reference counting, before the next unit starts
    gc.collect()
    assert all(r() is None for r in copies)
