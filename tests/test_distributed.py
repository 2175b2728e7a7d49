"""Clients sharded over 2 processes (torchrun, CPU, gloo) give the 1-process results.

Tolerance: local training, sampling and seeds never depend on the rank; only the order of the float64
additions in the FedAvg all-reduce differs, which can move an element of the float32 global weights by
1 ulp (~6e-8 relative; in practice they come out bit-identical). Results are compared with rtol 1e-5.
One torchrun launch runs four studies (process start-up dominates on this machine): plain FedAvg with
3 of 3 clients a round (2 on rank 0, 1 on rank 1), FedBN with 1 client a round (rank 1 idle, BatchNorm
shared across ranks), SCAFFOLD with 1 client a round (uploads all-reduced, control variates shared), and the
resume of a 1-process run whose last units were lost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from hf_lpft.config import load_config
from hf_lpft.pipeline import run

pytestmark = pytest.mark.distributed
RTOL, ATOL = 1e-5, 1e-7

DRIVER = textwrap.dedent("""
    import json, sys
    from hf_lpft.config import load_config
    from hf_lpft.pipeline import run
    for overrides in json.loads(open(sys.argv[1]).read()):
        run(load_config(None, overrides))
""")


def _overrides(data: str, out: Path, **extra) -> dict:
    base = {"data": {"dataset": data, "num_classes": 4}, "fedavg": {"rounds": 2, "batch_size": 16},
            "pft": {"epochs": 2, "batch_size": 16, "strategy_args": {"lp_ft": {"lp_epochs": 1}}},
            "run": {"output_dir": str(out), "num_threads": 1}}
    for section, values in extra.items():
        base.setdefault(section, {}).update(values)
    return base


def assert_same_results(a: Path, b: Path) -> None:
    """results.parquet equal: identical keys and ids, numbers within (RTOL, ATOL)."""
    x, y = pd.read_parquet(a / "results.parquet"), pd.read_parquet(b / "results.parquet")
    assert list(x.columns) == list(y.columns) and len(x) == len(y)
    for col in x.columns:
        if col == "acc_by_client":
            np.testing.assert_allclose(np.stack(x[col]), np.stack(y[col]), rtol=RTOL, atol=ATOL, err_msg=col)
        elif pd.api.types.is_float_dtype(x[col]):
            np.testing.assert_allclose(x[col], y[col], rtol=RTOL, atol=ATOL, equal_nan=True, err_msg=col)
        else:
            assert x[col].fillna("-").tolist() == y[col].fillna("-").tolist(), col


def assert_same_global_model(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "global" / "model.safetensors")), load_file(str(b / "global" / "model.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_allclose(x[k].double().numpy(), y[k].double().numpy(), rtol=RTOL, atol=ATOL, err_msg=k)


def test_two_processes_equal_one_process(tmp_path, tiny_ds_path):
    studies = {
        "plain": {},  # every client every round
        "fedbn": {"fedavg": {"rounds": 2, "batch_size": 16, "bn": "local", "client_fraction": 0.34},
                  "pft": {"strategies": ["lp", "ft"]}},
        # a stateful general-FL algorithm: 1 client a round (rank 1 idle, adds zeros to the all-reduce of the
        # uploads), its control variate shared across ranks for the round it is next sampled
        "scaffold": {"fedavg": {"rounds": 3, "batch_size": 16, "fl_strategy": "scaffold", "client_fraction": 0.34},
                     "pft": {"strategies": ["lp"]}},
    }
    for name, extra in studies.items():  # the 1-process references, in this process
        run(load_config(None, _overrides(tiny_ds_path, tmp_path / f"{name}_1", **extra)))
    # An interrupted 1-process run: FedAvg and the first units done, the lp_ft units and the outputs lost.
    resumed = tmp_path / "resumed"
    run(load_config(None, _overrides(tiny_ds_path, resumed)))
    for path in [*(resumed / "checkpoints" / "seed_0" / "units" / "lp_ft").glob("*.json"),
                 resumed / "checkpoints" / "seed_0" / "units" / "lp" / "c.json",
                 resumed / "results.parquet", resumed / "run_record.json"]:
        path.unlink()

    jobs = [_overrides(tiny_ds_path, tmp_path / f"{name}_2", **extra) for name, extra in studies.items()]
    jobs.append(_overrides(tiny_ds_path, resumed, run={"output_dir": str(resumed), "num_threads": 1, "resume": True}))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(tmp_path / "driver.py"), str(tmp_path / "jobs.json")],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]

    for name in studies:
        one, two = tmp_path / f"{name}_1", tmp_path / f"{name}_2"
        assert json.loads((two / "run_record.json").read_text())["run_info"]["num_processes"] == 2
        assert_same_global_model(one, two)
        assert_same_results(one, two)
        for strategy in pd.read_parquet(one / "results.parquet").strategy.unique():
            if strategy != "global_model":  # every unit's model exported, by whichever rank ran it
                for client in ("a", "b", "c"):
                    assert (two / "clients" / strategy / client / "model.safetensors").is_file()
        assert not list(two.rglob("*.tmp")), "temporary files left behind"
    assert_same_results(tmp_path / "plain_1", resumed)
    record = json.loads((resumed / "run_record.json").read_text())
    assert record["run_info"]["resumed"] and record["run_info"]["num_processes"] == 2


@pytest.mark.slow  # about 100 s on 2 shared cores: three torchrun runs
def test_two_processes_store_and_reuse_one_fedavg_result(tmp_path, tiny_ds_path):
    """Under torchrun: a miss trains and stores once (FedBN client BatchNorm included), a match loads it on
    every process (no FedAvg), and a given global model personalizes; the main process alone writes."""
    cache = str(tmp_path / "cache")
    fedbn = {"fedavg": {"rounds": 2, "batch_size": 16, "bn": "local"}, "pft": {"strategies": ["lp", "ft"]}}
    jobs = [_overrides(tiny_ds_path, tmp_path / name, **fedbn, run={"output_dir": str(tmp_path / name),
                                                                      "num_threads": 1, "fedavg_cache": cache})
            for name in ("miss", "hit")]
    jobs.append(_overrides(tiny_ds_path, tmp_path / "given", model={"global_model": str(tmp_path / "miss" / "global")},
                           pft={"strategies": ["lp"]}))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "driver.py").write_text(DRIVER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(tmp_path / "driver.py"), str(tmp_path / "jobs.json")], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = {n: json.loads((tmp_path / n / "run_record.json").read_text())["run_info"]["global_model"]["0"]
            for n in ("miss", "hit", "given")}
    assert info["miss"]["source"] == "fedavg" and info["miss"]["stored"] is True
    assert info["hit"] == {"source": "fedavg_cache", "key": info["miss"]["key"], "fedavg_cache": cache}
    assert info["given"]["source"] == "given"
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "hit" / "results.parquet"),
                                  pd.read_parquet(tmp_path / "miss" / "results.parquet"))
    assert [p.name for p in Path(cache).iterdir()] == [info["miss"]["key"]]
    assert (Path(cache) / info["miss"]["key"] / "checkpoints" / "seed_0" / "fedavg" / "client_bn.safetensors").is_file()
