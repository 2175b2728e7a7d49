"""The Flower App on a real (local) deployment and general-FL strategies other than FedAvg.

The deployment test runs the README's one-machine trial as written (its bash block: a SuperLink and two
SuperNodes on 127.0.0.1, insecure, free ports, ``flwr run --stream``), checks the stream's progress lines,
compares the output folder with the built-in engine's, and stops every process it started by its pid (and the
trial's session) in a ``finally``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from conftest import make_image_dataset
from safetensors.torch import load_file

from hf_lpft.config import ConfigError, load_config
from hf_lpft.pipeline import run

pytest.importorskip("flwr", reason="Flower is not installed: pip install 'hf-lpft[flower]'")

ROOT = Path(__file__).resolve().parents[1]
STUDY = {"fedavg": {"rounds": 2, "batch_size": 16, "client_fraction": 0.67},
         "pft": {"strategies": ["lp", "ft"], "epochs": 2, "batch_size": 16}, "run": {"num_threads": 1}}


def _overrides(values: dict) -> str:
    return " ".join(f"--{s}.{k} {','.join(v) if isinstance(v, list) else v}" for s, kv in values.items()
                    for k, v in kv.items())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    # own session: its pid is also its process group, so stopping it also stops the children it spawns; the
    # child holds its own copy of the log's descriptor, so ours is closed at once (not left to the garbage collector)
    with log.open("w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _superlink(bin_dir: Path, port: int, log: Path, env: dict, *, simulation: bool = False) -> subprocess.Popen:
    """A SuperLink on 127.0.0.1:``port`` without TLS (test only); ``simulation`` runs the nodes in-process."""
    return _start([str(bin_dir / "flower-superlink"), "--insecure", *(["--simulation"] if simulation else []),
                   "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"], log, env)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=5)


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early ({proc.returncode}): {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s: {log.read_text()[-2000:]}")


def _flower_env(tmp_path: Path, port: int) -> dict:
    home = tmp_path / "flwr_home"  # a private Flower config: the connection "test" points at our SuperLink
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    return os.environ | {"FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                         "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def readme_trial() -> str:
    """The first bash block of the README's "Run on a real federation" section: the one-machine trial, as written."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Run on a real federation"):]
    section = section[:section.find("\n## ", 1) if "\n## " in section[1:] else len(section)]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README.md: no bash block in the section 'Run on a real federation'"
    return block.group(1)


def _free_ports(n: int) -> int:
    """A port p with p .. p + n - 1 all free (the trial's SuperLink and its SuperNodes' local APIs)."""
    for _ in range(50):
        p = _free_port()
        if p + n < 65536 and all(_bindable(p + k) for k in range(n)):
            return p
    raise RuntimeError(f"no {n} consecutive free ports")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _stop_trial(shell: subprocess.Popen, fed: Path) -> None:
    """Stop every process the trial started: the pids it saved, then its whole session (the shell's group)."""
    for pid_file in fed.glob("*.pid"):
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        except (ValueError, ProcessLookupError):
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(shell.pid, sig)
        except ProcessLookupError:
            break
        time.sleep(2)
    shell.wait(timeout=10)


@pytest.mark.distributed
@pytest.mark.slow  # 356 s at load 6-7 on 2 cores: each message round starts a Python process per node (Flower)
def test_readme_federation_trial_on_superlink_equals_the_builtin_engine(tmp_path):
    """The README's one-machine trial AS WRITTEN (its bash block; only $FED and $LINK_PORT set, to a temporary
    folder and free ports): a SuperLink, two SuperNodes with partition-id alone (embedded digits5 built on each
    node), ``flwr run --stream``; the stream shows every stage and the output folder, which equals the built-in
    engine's run of the same study."""
    fed, port = tmp_path / "fed", _free_ports(3)
    env = os.environ | {"FED": str(fed), "LINK_PORT": str(port), "FLWR_TELEMETRY_ENABLED": "0",
                        "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONPATH": os.pathsep.join(sys.path),
                        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    log = tmp_path / "trial.log"
    with log.open("w") as out:
        shell = subprocess.Popen(["bash", "-c", readme_trial()], cwd=ROOT, env=env, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        shell.wait(timeout=900)
    finally:
        _stop_trial(shell, fed)
    stream, out = log.read_text(), fed / "out"
    assert shell.returncode == 0 and (out / "results.parquet").is_file(), stream[-4000:]
    for line in ("2 node(s) ready", "general FL round 1/2 done", "general FL round 2/2 done",
                 "PFT done on client_00", "PFT done on client_01", "scoring done on client_00",
                 "scoring done on client_01", "| LP-FT |", f"Outputs written to {out}"):
        assert line in stream, (line, stream[-4000:])
    assert "n_per_domain" not in stream  # the study YAML is summarised, not printed per config record
    builtin = run(load_config(str(ROOT / "recipes" / "configs" / "federation_study.yaml"),
                              ["--run.output_dir", str(tmp_path / "builtin")]))
    # Global came from the nodes' scores of each other's exported models: the same numbers as in one process
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), builtin.results, rtol=1e-5)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "cross_client.parquet"),
                                  pd.read_parquet(builtin.output_dir / "cross_client.parquet"), rtol=1e-5)
    a = load_file(str(out / "global" / "model.safetensors"))
    b = load_file(str(builtin.output_dir / "global" / "model.safetensors"))
    for k in a:
        np.testing.assert_allclose(a[k].double().numpy(), b[k].double().numpy(), rtol=1e-6, atol=1e-7, err_msg=k)
    record = json.loads((out / "run_record.json").read_text())
    built = json.loads((builtin.output_dir / "run_record.json").read_text())
    assert record["train_info"]["fedavg_history"] == built["train_info"]["fedavg_history"]
    assert record["run_info"]["general_fl"]["name"] == "fedavg"
    assert [n["client_id"] for n in record["run_info"]["engine"]["nodes"]] == ["client_00", "client_01"]
    assert (out / "clients" / "lp_ft" / "client_01" / "model.safetensors").is_file()
    assert (out / "hub" / "model" / "README.md").is_file()


@pytest.mark.distributed
def test_flwr_run_in_simulation_equals_the_builtin_engine(tmp_path):
    """The same app under ``flwr run`` on a SuperLink in simulation mode (virtual SuperNodes in Ray actors;
    each node partitions the study's dataset itself from its ``partition-id``)."""
    pytest.importorskip("ray", reason="Flower's simulation needs Ray: pip install 'flwr[simulation]'")
    from hf_lpft.flower_app import APP_DIR

    tiny_ds_path = str(tmp_path / "data")
    datasets.DatasetDict({"train": make_image_dataset(40, domains=("a", "b"))}).save_to_disk(tiny_ds_path)
    data = {"dataset": tiny_ds_path, "num_classes": 4}
    builtin = run(load_config(None, STUDY | {"data": data, "run": {"num_threads": 1,
                                                                   "output_dir": str(tmp_path / "builtin")}}))
    port = _free_port()
    env, bin_dir = _flower_env(tmp_path, port), Path(sys.executable).parent
    procs: list[subprocess.Popen] = []
    try:
        link_log = tmp_path / "superlink.log"
        procs.append(_superlink(bin_dir, port, link_log, env, simulation=True))
        _wait_port(port, procs[0], link_log)
        run_config = tmp_path / "run_config.toml"
        run_config.write_text(f'overrides = "{_overrides(STUDY | {"data": data})}"\n'
                              f'output-dir = "{tmp_path / "flower"}"\nnum-nodes = 2\ntimeout = 600.0\n')
        done = subprocess.run([str(bin_dir / "flwr"), "run", str(APP_DIR), "test", "--stream", "--run-config",
                               str(run_config), "--federation-config", "num-supernodes=2"],
                              env=env, capture_output=True, text=True, timeout=900)
        logs = done.stdout + done.stderr
        assert done.returncode == 0 and (tmp_path / "flower" / "run_record.json").is_file(), logs[-4000:]
    finally:
        _stop(procs)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "flower" / "results.parquet"), builtin.results,
                                  rtol=1e-5)


def _cfg(tmp_path, name, path, **fedavg):
    return load_config(None, STUDY | {"data": {"dataset": path, "num_classes": 4},
                                      "fedavg": STUDY["fedavg"] | {"engine": "flower"} | fedavg,
                                      "run": {"output_dir": str(tmp_path / name), "num_threads": 1}})


@pytest.mark.distributed  # Flower's simulation: Ray worker processes
def test_fedprox_general_fl_then_personalization(tmp_path, tiny_ds_path):
    pytest.importorskip("ray", reason="Flower's simulation needs Ray: pip install 'flwr[simulation]'")
    prox = run(_cfg(tmp_path, "fedprox", tiny_ds_path, fl_strategy="fedprox", fl_strategy_args={"proximal_mu": 1.0}))
    df = prox.results
    assert sorted(df.strategy.unique()) == ["ft", "global_model", "lp"] and df.error.isna().all()
    history = json.loads((prox.output_dir / "run_record.json").read_text())["train_info"]["fedavg_history"]["0"]
    assert [h["round"] for h in history] == [1, 2]
    config = (prox.output_dir / "config.yaml").read_text()
    assert "fl_strategy: fedprox" in config and "proximal_mu: 1.0" in config
    card = (prox.output_dir / "hub" / "model" / "README.md").read_text()  # the global model's card says so too
    assert "| general FL | fedprox (proximal_mu=1.0), engine flower: 2 rounds" in card
    # the proximal term acted: the global model differs from FedAvg's with the same seeds and sampling (the
    # built-in engine's, which the Flower FedAvg equals: tests/test_flower.py); aggregation alone moves ~1e-7
    avg = run(_cfg(tmp_path, "fedavg", tiny_ds_path, engine="builtin"))
    a = load_file(str(prox.output_dir / "global" / "model.safetensors"))
    b = load_file(str(avg.output_dir / "global" / "model.safetensors"))
    assert max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point()) > 1e-4
    # FedProx is a registered algorithm (hf_lpft.algorithms.fedprox): the built-in engine runs it too,
    # with the same proximal term and aggregation, so the same global model
    builtin = run(_cfg(tmp_path, "fedprox_builtin", tiny_ds_path, engine="builtin", fl_strategy="fedprox",
                       fl_strategy_args={"proximal_mu": 1.0}))
    c = load_file(str(builtin.output_dir / "global" / "model.safetensors"))
    for k in a:
        np.testing.assert_allclose(a[k].double().numpy(), c[k].double().numpy(), rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("fedavg, match", [
    ({"fl_strategy": "fedfoo"}, "fedavg.fl_strategy='fedfoo' is not allowed"),
    ({"fl_strategy": "fedadam", "engine": "builtin"}, "needs fedavg.engine='flower'"),
])
def test_fl_strategy_config_errors(tmp_path, tiny_ds_path, fedavg, match):
    from hf_lpft.run.preflight import preflight

    with pytest.raises(ConfigError, match=match):  # the registry's check, before any work
        preflight(_cfg(tmp_path, "x", tiny_ds_path, **fedavg))


def test_fl_strategy_options_are_checked_against_flower():
    from hf_lpft.algorithms import ALGORITHMS
    from hf_lpft.algorithms.flower_adapters import FLOWER_CLASSES
    from hf_lpft.federated.flower import AlgorithmStrategy, build_fl_strategy
    from hf_lpft.run.flower_engine import check_fl_strategy

    assert set(FLOWER_CLASSES) <= set(ALGORITHMS) and {"fedavg", "fedprox", "scaffold"} <= set(ALGORITHMS)
    assert check_fl_strategy("fedadam", {"eta": "0.01", "tau": 1}) == {"eta": 0.01, "tau": 1.0}
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['mu'\] for 'fedprox'; allowed: \['proximal_mu'\]"):
        check_fl_strategy("fedprox", {"mu": 0.1})
    with pytest.raises(ConfigError, match="fraction_train"):  # sampling is hf_lpft's (fedavg.client_fraction)
        check_fl_strategy("fedavgm", {"fraction_train": 0.5})
    with pytest.raises(ConfigError, match="server_momentum='x' must be a number"):
        check_fl_strategy("fedavgm", {"server_momentum": "x"})
    with pytest.raises(ConfigError, match=r"'qfedavg' needs option\(s\) \['client_learning_rate'\]"):
        check_fl_strategy("qfedavg", {})
    for name in ALGORITHMS:  # every registered algorithm builds (with its defaults where it has them)
        args = {"client_learning_rate": 0.1} if name == "qfedavg" else None
        strategy = build_fl_strategy(name, args, n_clients=3, client_fraction=1.0, seed=0)
        assert strategy.n_clients == 3 and hasattr(strategy, "aggregate_train")
        assert isinstance(strategy, AlgorithmStrategy) == (name not in FLOWER_CLASSES)


def test_flower_app_config_and_refusals(tmp_path):
    from flwr.cli.config_utils import load_and_validate

    from hf_lpft.flower_app import APP_DIR
    from hf_lpft.flower_app.server import study_config
    from hf_lpft.run.preflight import preflight

    config, _ = load_and_validate(APP_DIR / "pyproject.toml")  # what `flwr run` checks, components included
    assert config["tool"]["flwr"]["app"]["components"]["clientapp"].endswith("apps:client_app")
    cfg = study_config({"overrides": "--fedavg.fl_strategy fedadam --fedavg.fl_strategy_args '{eta: 0.01}'",
                        "output-dir": str(tmp_path / "o")})
    assert cfg.fedavg.engine == "flower" and cfg.run.output_dir == str(tmp_path / "o")
    # what a federation cannot honour: the App's part of the preflight (run_study calls it before any message;
    # tests/test_app_preflight.py checks that on a recording Grid)
    with pytest.raises(ConfigError, match="pft.eval_every=2"):
        preflight(study_config({"overrides": "--pft.eval_every 2"}), engine="flower-app")
    with pytest.raises(ConfigError, match="unknown option"):
        preflight(study_config({"overrides": "--fedavg.fl_strategy fedadam --fedavg.fl_strategy_args '{lr: 0.01}'"}),
                  engine="flower-app")


def test_node_finds_its_data_from_its_node_config(tmp_path, tiny_ds_path):
    import torch

    from hf_lpft.flower_app.node import load_node
    from hf_lpft.layout import RunLayout
    from hf_lpft.run.federation import build_federation

    cfg = load_config(None, {"data": {"dataset": tiny_ds_path, "num_classes": 4}})
    _, clients = build_federation(cfg, RunLayout(tmp_path / "run", cfg.run.seeds))  # the built-in engine's clients and manifest
    manifest = str(tmp_path / "run" / "federation" / "manifest.json")
    for attempt in ("decoded", "cached"):
        node = load_node(cfg, {"partition-id": 1, "manifest": manifest, "cache-dir": str(tmp_path / "cache")})
        assert node.index == 1 and node.num_classes == 4 and node.client.client_id == clients[1].client_id, attempt
        for part in ("train_x", "train_y", "test_x", "test_y"):
            assert torch.equal(getattr(node.client, part), getattr(clients[1], part)), (attempt, part)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    own = tmp_path / "site"  # a data holder's own folder, split on the node
    datasets.DatasetDict({"train": make_image_dataset(20, domains=("z",))}).save_to_disk(str(own))
    node = load_node(cfg, {"partition-id": 0, "dataset-dir": str(own), "client-id": "hospital-z",
                           "cache-dir": str(tmp_path / "cache")})
    assert node.client.client_id == "hospital-z" and (node.client.n_train, node.client.n_test) == (15, 5)
    assert set(node.client.test_y.tolist()) == {0, 1, 2, 3}  # stratified by label
    with pytest.raises(ConfigError, match="needs partition-id"):
        load_node(cfg, {"manifest": manifest})
    with pytest.raises(ConfigError, match="unknown keys \\['partition'\\]"):
        load_node(cfg, {"partition-id": 0, "partition": 1})
    with pytest.raises(ConfigError, match="partition-id=7 but the federation has 3 clients"):
        load_node(cfg, {"partition-id": 7, "manifest": manifest, "cache-dir": str(tmp_path / "cache")})
    with pytest.raises(ConfigError, match="is not a folder written by Dataset.save_to_disk"):
        load_node(cfg, {"partition-id": 0, "dataset-dir": str(tmp_path), "cache-dir": str(tmp_path / "cache")})
