"""A tiny end-to-end run: the output folder contract and exact reproducibility."""

import json

import pandas as pd
import pytest

from hf_lpft.config import load_config
from hf_lpft.data.federate import load_manifest
from hf_lpft.models.backbone import SplitModel
from hf_lpft.pipeline import run


def _cfg(tmp_path, name, path, **extra):
    base = {"data": {"dataset": path, "num_classes": 4}, "fedavg": {"rounds": 2, "batch_size": 16},
            "pft": {"epochs": 2, "batch_size": 16, "strategy_args": {"lp_ft": {"lp_epochs": 1}}},
            "run": {"output_dir": str(tmp_path / name)}}
    for section, values in extra.items():
        base.setdefault(section, {}).update(values)
    return load_config(None, base)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_ds_path):
    tmp = tmp_path_factory.mktemp("runs")
    return tmp, run(_cfg(tmp, "a", tiny_ds_path))


# run_record.json's run_info keys common to both drivers (hf_lpft.run.records.run_record), in order
RUN_INFO = ["seeds", "timings_seconds", "manifest_sha256", "clients", "federation", "resumed", "num_processes", "strategies",
            "batchnorm", "general_fl", "global_model", "preprocessing"]


def test_output_folder_contract(first_run):
    _, result = first_run
    out = result.output_dir
    for rel in ["config.yaml", "run_record.json", "federation/manifest.json", "global/model.safetensors",
                "global/config.json", "results.parquet", "summary.md"]:
        assert (out / rel).is_file(), rel
    for strategy in ["ft", "lp", "lp_ft"]:
        for client in ["a", "b", "c"]:
            assert (out / "clients" / strategy / client / "model.safetensors").is_file()
    df = pd.read_parquet(out / "results.parquet")
    for col in ["seed", "strategy", "client_id", "n_train", "n_test", "local_acc", "global_acc"]:
        assert col in df.columns
    assert sorted(df.strategy.unique()) == ["ft", "global_model", "lp", "lp_ft"]
    assert len(df) == 4 * 3
    record = json.loads((out / "run_record.json").read_text())
    assert list(record) == ["run_info", "train_info", "meta_info"]
    assert list(record["run_info"]) == RUN_INFO + ["mixed_precision", "speed"]  # keys and order kept (issue 24)
    assert list(record["run_info"]["speed"]) == ["torch_threads", "fedavg_eval_every", "memory_format"]
    assert record["run_info"]["strategies"]["lp_ft"]["phases"][0]["bn"] == "frozen"
    assert "| global-model |" in result.markdown and "| LP-FT |" in result.markdown
    assert not list(out.rglob("*.tmp")), "temporary files left behind"


def test_saved_client_model_reproduces_its_local_accuracy(first_run, tiny_ds_path):
    from hf_lpft.data.load import client_tensors, load_source
    from hf_lpft.train.loop import accuracy

    _, result = first_run
    out = result.output_dir
    ds = load_source(tiny_ds_path)
    fed = load_manifest(out / "federation" / "manifest.json", num_rows=len(ds))
    clients = client_tensors(ds, fed, image_column="image", label_column="label", image_size=32)
    model = SplitModel.from_pretrained(out / "clients" / "lp_ft" / "b")
    row = result.results.query("strategy == 'lp_ft' and client_id == 'b'").iloc[0]
    assert accuracy(model, clients[1].test_x, clients[1].test_y) == pytest.approx(row.local_acc)


def test_same_config_and_seed_twice_gives_identical_results(first_run, tiny_ds_path):
    tmp, result = first_run
    again = run(_cfg(tmp, "b", tiny_ds_path))
    assert (result.output_dir / "results.parquet").read_bytes() == (again.output_dir / "results.parquet").read_bytes()


def test_manifest_rebuilds_the_same_federation(first_run, tiny_ds_path):
    tmp, result = first_run
    manifest = result.output_dir / "federation" / "manifest.json"
    again = run(_cfg(tmp, "c", tiny_ds_path, data={"manifest": str(manifest)}, pft={"strategies": ["lp"], "strategy_args": {}}))
    a = json.loads(manifest.read_text())
    b = json.loads((again.output_dir / "federation" / "manifest.json").read_text())
    assert a["indices_sha256"] == b["indices_sha256"] and a["clients"] == b["clients"]


def test_refuses_non_empty_output_dir(first_run, tiny_ds_path):
    from hf_lpft.config import ConfigError

    tmp, _ = first_run
    with pytest.raises(ConfigError, match="not empty"):
        run(_cfg(tmp, "a", tiny_ds_path))


def test_one_run_record_builder_with_engine_extras(tiny_ds_path, tmp_path):
    """Both drivers build run_record.json with run.records.run_record: the common run_info, then the engine's
    extras (the Flower App's: its speed settings and nodes), from the same global-model rows."""
    from types import SimpleNamespace

    from hf_lpft.run.preflight import build_strategies
    from hf_lpft.run.records import global_model_rows, run_record, speed_info

    cfg = _cfg(tmp_path, "r", tiny_ds_path)
    clients = [SimpleNamespace(client_id=c, n_train=4, n_test=2) for c in ("a", "b")]
    records = global_model_rows(0, clients, [[0.5, 0.25]] * 2, history=[{"round": 1}], source={"source": "fedavg"},
                                distortion=True, memory_format="channels_last")
    assert [r["row"]["local_acc"] for r in records] == [0.5, 0.25] and records[1]["fedavg_history"] is None
    engine = {"name": "flower-app", "nodes": [{"client_id": "a"}, {"client_id": "b"}]}
    record = run_record(cfg, build_strategies(cfg), records, timings={}, manifest_sha256="x", client_ids=["a", "b"],
                        federation={"scheme": "iid", "params": {}}, num_processes=1, extras={"speed": speed_info(cfg, records), "engine": engine})
    assert list(record["run_info"]) == RUN_INFO + ["speed", "engine"]
    assert record["run_info"]["global_model"] == {0: {"source": "fedavg"}}
    assert record["run_info"]["speed"] == {"fedavg_eval_every": cfg.fedavg.eval_every, "memory_format": "channels_last"}
    assert record["train_info"]["fedavg_history"] == {0: [{"round": 1}]}
