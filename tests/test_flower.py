"""FedAvg on Flower (``fedavg.engine: flower``): a few simulation rounds, then personalization from its global model.

Flower's simulation runs the ClientApps in Ray actors (``pip install 'hf-lpft[flower]'``); the test is skipped,
with the reason, when flwr or ray is missing.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from hf_lpft.config import ConfigError, load_config
from hf_lpft.pipeline import run

pytest.importorskip("flwr", reason="Flower is not installed: pip install 'hf-lpft[flower]'")
pytest.importorskip("ray", reason="Flower's simulation needs Ray: pip install 'flwr[simulation]'")


def _cfg(tmp_path, name, path, engine, **fedavg):
    return load_config(None, {"data": {"dataset": path, "num_classes": 4},
                              "fedavg": {"rounds": 2, "batch_size": 16, "engine": engine} | fedavg,
                              "pft": {"strategies": ["lp", "ft"], "epochs": 2, "batch_size": 16},
                              "run": {"output_dir": str(tmp_path / name), "num_threads": 1}})


def test_flower_rounds_then_personalization_equal_the_builtin_engine(tmp_path, tiny_ds_path):
    # 2 of 3 clients a round: Flower samples the same clients through hf_lpft's seeded sampling
    flower = run(_cfg(tmp_path, "flower", tiny_ds_path, "flower", client_fraction=0.67))
    builtin = run(_cfg(tmp_path, "builtin", tiny_ds_path, "builtin", client_fraction=0.67))
    out = flower.output_dir
    history = json.loads((out / "run_record.json").read_text())["train_info"]["fedavg_history"]["0"]
    assert [h["round"] for h in history] == [1, 2] and 0 <= history[1]["global_test_acc"] <= 1
    assert "global_test_acc" not in history[0]  # fedavg.eval_every (default 5): every 5th round and the last
    assert (out / "checkpoints" / "seed_0" / "fedavg" / "state.safetensors").is_file()  # resumable per round
    # the personalization step ran from Flower's global model, for every strategy and client
    df = flower.results
    assert sorted(df.strategy.unique()) == ["ft", "global_model", "lp"] and df.error.isna().all()
    assert (out / "clients" / "ft" / "b" / "model.safetensors").is_file()
    # same local seeds, sampling and float64 aggregation in client order: the builtin engine's global model
    a = load_file(str(out / "global" / "model.safetensors"))
    b = load_file(str(builtin.output_dir / "global" / "model.safetensors"))
    for k in a:
        np.testing.assert_allclose(a[k].double().numpy(), b[k].double().numpy(), rtol=1e-6, atol=1e-7, err_msg=k)
    pd.testing.assert_frame_equal(df, builtin.results, rtol=1e-5)
    builtin_record = json.loads((builtin.output_dir / "run_record.json").read_text())
    assert history == builtin_record["train_info"]["fedavg_history"]["0"]


def test_flower_engine_refuses_fedbn(tmp_path, tiny_ds_path):
    with pytest.raises(ConfigError, match="fedavg.bn='local'.*builtin"):
        _cfg(tmp_path, "x", tiny_ds_path, "flower", bn="local")


def test_scaffold_on_flower_equals_the_builtin_engine(tmp_path, tiny_ds_path):
    """SCAFFOLD (which Flower does not ship) through the registry on both engines: control variates travel
    with the TRAIN messages and replies; same local seeds, sampling and float64 sums in client order, so the
    same global model (within rtol 1e-6 / atol 1e-7; bit-identical when last run) and the same control variates."""
    from hf_lpft.checkpoint import Checkpoints

    scaffold = {"client_fraction": 0.67, "rounds": 3, "fl_strategy": "scaffold",
                "fl_strategy_args": {"weighting": "uniform", "server_lr": 1.0}}
    flower = run(_cfg(tmp_path, "flower", tiny_ds_path, "flower", **scaffold))
    builtin = run(_cfg(tmp_path, "builtin", tiny_ds_path, "builtin", **scaffold))
    a = load_file(str(flower.output_dir / "global" / "model.safetensors"))
    b = load_file(str(builtin.output_dir / "global" / "model.safetensors"))
    for k in a:
        np.testing.assert_allclose(a[k].double().numpy(), b[k].double().numpy(), rtol=1e-6, atol=1e-7, err_msg=k)
    sa, sb = Checkpoints(flower.output_dir).load_fl_state(0), Checkpoints(builtin.output_dir).load_fl_state(0)
    assert sa.server.keys() == sb.server.keys() and sa.clients.keys() == sb.clients.keys() == {"a", "b", "c"}
    for k in sa.server:
        np.testing.assert_allclose(sa.server[k].numpy(), sb.server[k].numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
    assert any(float(v.abs().max()) > 0 for v in sa.server.values())  # the control variates did move
    rec = [json.loads((r.output_dir / "run_record.json").read_text())["run_info"]["general_fl"] for r in (flower, builtin)]
    assert rec[0]["name"] == rec[1]["name"] == "scaffold" and [r["engine"] for r in rec] == ["flower", "builtin"]
    # and SCAFFOLD is not FedAvg: the corrections changed the global model
    fedavg = run(_cfg(tmp_path, "fedavg", tiny_ds_path, "builtin", client_fraction=0.67, rounds=3))
    c = load_file(str(fedavg.output_dir / "global" / "model.safetensors"))
    assert max(float((b[k].double() - c[k].double()).abs().max()) for k in b if b[k].is_floating_point()) > 1e-4
