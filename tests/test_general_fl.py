"""General-FL algorithms behind a registry (``fedavg.fl_strategy``): SCAFFOLD against a hand computation,
a throwaway algorithm registered at run time, the registry's one-line errors."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from hf_lpft.algorithms import (
    ALGORITHMS,
    AlgorithmConfig,
    FLState,
    GeneralFL,
    build_algorithm,
    register_algorithm,
    unregister_algorithm,
)
from hf_lpft.algorithms.scaffold import Scaffold, ScaffoldConfig
from hf_lpft.checkpoint import Checkpoints
from hf_lpft.config import ConfigError, load_config
from hf_lpft.data.tensors import ClientData
from hf_lpft.federated.fedavg import fedavg_round, sample_clients
from hf_lpft.models.backbone import SplitModel
from hf_lpft.pipeline import run
from hf_lpft.run.general_fl import algorithm_of
from hf_lpft.train.loop import derive_seed
from hf_lpft.train.optim import OptimSettings
from hf_lpft.train.phase import Phase


# -- SCAFFOLD against a hand computation --------------------------------------------------------------------
def _linear_model(w: np.ndarray, b: np.ndarray) -> SplitModel:
    """A SplitModel that is one linear layer on float features (identity backbone)."""
    model = SplitModel("timm:test_resnet", num_classes=2, image_size=32)
    model.backbone, model.head = nn.Identity(), nn.Linear(3, 2)
    model.head.weight.data = torch.tensor(w, dtype=torch.float32)
    model.head.bias.data = torch.tensor(b, dtype=torch.float32)
    return model


def _grad(w, b, x, y):
    """Mean cross-entropy gradient of the linear model (float64)."""
    logits = x @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = (p - np.eye(2)[y]) / len(y)
    return g.T @ x, g.sum(0)


def _hand_scaffold(x, clients, sampled, c, ci, *, steps, lr, lr_g, weighting):
    """One SCAFFOLD round, option II, full-batch local SGD, by hand: (x+, c+, {client: c_i+})."""
    ys, deltas, new_ci = [], [], {}
    for i in sampled:
        cx, cy = clients[i]
        y = [v.copy() for v in x]
        for _ in range(steps):  # y <- y - lr (g_i(y) - c_i + c)
            g = _grad(y[0], y[1], cx, cy)
            y = [y[k] - lr * (g[k] - ci[i][k] + c[k]) for k in range(2)]
        new_ci[i] = [ci[i][k] - c[k] + (x[k] - y[k]) / (steps * lr) for k in range(2)]
        deltas.append([new_ci[i][k] - ci[i][k] for k in range(2)])
        ys.append(y)
    wts = np.array([1.0 if weighting == "uniform" else len(clients[i][1]) for i in sampled])
    wts = wts / wts.sum()
    mean_y = [sum(wt * y[k] for wt, y in zip(wts, ys)) for k in range(2)]
    x_new = [x[k] + lr_g * (mean_y[k] - x[k]) for k in range(2)]
    c_new = [c[k] + (len(sampled) / len(clients)) * np.mean([d[k] for d in deltas], axis=0) for k in range(2)]
    return x_new, c_new, new_ci


@pytest.mark.parametrize("weighting", ["uniform", "examples"])
def test_scaffold_round_equals_a_hand_computation(accelerator, weighting):
    rng = np.random.default_rng(0)
    sizes = (4, 6, 5)  # 3 clients, 2 sampled a round: c moves by |S|/N of the mean Δc
    data = [(rng.normal(size=(n, 3)), rng.integers(0, 2, n)) for n in sizes]
    clients = [ClientData(f"c{i}", torch.tensor(x, dtype=torch.float32), torch.tensor(y), torch.zeros(1, 3),
                          torch.zeros(1, dtype=torch.int64)) for i, (x, y) in enumerate(data)]
    x = [rng.normal(size=(2, 3)), rng.normal(size=2)]
    c = [0.1 * rng.normal(size=(2, 3)), 0.1 * rng.normal(size=2)]  # non-zero control variates, as mid-run
    ci = {i: [0.1 * rng.normal(size=(2, 3)), 0.1 * rng.normal(size=2)] for i in range(3)}
    steps, lr, lr_g, seed = 3, 0.5, 0.7, 11
    sampled = sample_clients(3, 0.67, np.random.default_rng(derive_seed(seed, "fedavg-sampling", 0)))
    assert len(sampled) == 2
    want_x, want_c, want_ci = _hand_scaffold(x, data, sampled, c, ci, steps=steps, lr=lr, lr_g=lr_g,
                                             weighting=weighting)

    def named(pair):
        return {"head.weight": torch.tensor(pair[0], dtype=torch.float32),
                "head.bias": torch.tensor(pair[1], dtype=torch.float32)}
    state = FLState(server=named(c), clients={f"c{i}": named(v) for i, v in ci.items()})
    model = _linear_model(*x)
    new = fedavg_round(model, {k: v.clone() for k, v in model.state_dict().items()}, clients, rnd=0,
                       phase=Phase("fedavg_local", "all", steps, lr, bn="train"), client_fraction=0.67,
                       settings=OptimSettings(batch_size=6, momentum=0.0), accelerator=accelerator, seed=seed,
                       algorithm=Scaffold(ScaffoldConfig(server_lr=lr_g, weighting=weighting)), fl_state=state)
    tol = {"rtol": 1e-5, "atol": 1e-6}  # float32 training against float64 by hand
    np.testing.assert_allclose(new["head.weight"].numpy(), want_x[0], **tol)
    np.testing.assert_allclose(new["head.bias"].numpy(), want_x[1], **tol)
    np.testing.assert_allclose(state.server["head.weight"].numpy(), want_c[0], **tol)
    np.testing.assert_allclose(state.server["head.bias"].numpy(), want_c[1], **tol)
    for i in range(3):  # sampled clients have new c_i, the other keeps its own
        expect = want_ci.get(i, ci[i])
        np.testing.assert_allclose(state.clients[f"c{i}"]["head.weight"].numpy(), expect[0], **tol)
        np.testing.assert_allclose(state.clients[f"c{i}"]["head.bias"].numpy(), expect[1], **tol)


def test_scaffold_first_round_without_server_lr_is_fedavg_with_uniform_weights(accelerator, tiny_clients):
    """c = c_i = 0 and lr_g = 1: the first round trains as FedAvg and averages uniformly (the paper's mean)."""
    from hf_lpft.algorithms.base import WeightedSums  # noqa: F401  (the registry's public pieces)
    from hf_lpft.models.backbone import build_model

    model = build_model("timm:test_resnet", num_classes=4, image_size=32)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    kw = {"rnd": 0, "phase": Phase("fedavg_local", "all", 1, 0.05), "client_fraction": 1.0,
          "settings": OptimSettings(batch_size=16), "accelerator": accelerator, "seed": 3}
    state = FLState()
    a = fedavg_round(model, start, tiny_clients, **kw, algorithm=Scaffold(ScaffoldConfig(weighting="examples")),
                     fl_state=state)
    b = fedavg_round(model, start, tiny_clients, **kw)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert set(state.clients) == {c.client_id for c in tiny_clients} and state.server.keys() == state.clients["a"].keys()


# -- a throwaway algorithm registered at run time ------------------------------------------------------------
@dataclass
class _CountConfig(AlgorithmConfig):
    pull: float = 1.0


class _CountingAverage(GeneralFL):
    """FedAvg whose clients upload a 1 each and whose server counts the client updates it has seen, then
    moves the global model by ``pull`` of the way to the average: every hook, in a test only."""

    name = "throwaway_count"
    display_name = "Counting average"
    description = "Exists only inside tests/test_general_fl.py."
    engines = ("builtin",)
    config_cls = _CountConfig
    stateful = True

    def client_result(self, *, start, trained, server_state, client_state, steps, lr):
        seen = client_state.get("rounds", torch.zeros(1)) + 1
        return {"ones": torch.ones(1)}, {"rounds": seen}

    def upload_template(self, model):
        return {"ones": torch.zeros(1)}

    def aggregate(self, global_state, weights, uploads, server_state, *, n_sampled, n_clients):
        mean = weights.mean64()
        new = {k: (v.double() + self.config.pull * (mean[k] - v.double())).to(v.dtype) if v.is_floating_point()
               else mean[k] for k, v in global_state.items()}
        return new, {"seen": server_state.get("seen", torch.zeros(1, dtype=torch.float64)) + uploads["ones"]}


@pytest.fixture()
def counting():
    register_algorithm(_CountingAverage)
    try:
        yield _CountingAverage
    finally:
        unregister_algorithm(_CountingAverage.name)
    assert _CountingAverage.name not in ALGORITHMS


def test_an_algorithm_registered_at_run_time_runs_a_study_and_is_recorded(counting, tmp_path, tiny_ds_path):
    cfg = load_config(None, {"data": {"dataset": tiny_ds_path, "num_classes": 4},
                             "fedavg": {"rounds": 2, "batch_size": 16, "fl_strategy": "throwaway_count",
                                        "fl_strategy_args": {"pull": "0.5"}},
                             "pft": {"strategies": ["lp"], "epochs": 1, "batch_size": 16},
                             "run": {"output_dir": str(tmp_path / "out"), "distortion": False}})
    result = run(cfg)
    out = result.output_dir
    record = json.loads((out / "run_record.json").read_text())["run_info"]["general_fl"]
    assert record["name"] == "throwaway_count" and record["options"] == {"pull": 0.5}
    assert record["engine"] == "builtin" and record["display_name"] == "Counting average"
    state = Checkpoints(out).load_fl_state(0)  # the state resumes with the round checkpoint
    assert state.server["seen"].item() == 6  # 3 clients x 2 rounds
    assert {cid: s["rounds"].item() for cid, s in state.clients.items()} == {"a": 2, "b": 2, "c": 2}
    assert "fl_strategy: throwaway_count" in (out / "config.yaml").read_text()
    card = (out / "hub" / "model" / "README.md").read_text()
    assert "| general FL | throwaway_count (pull=0.5), engine builtin: 2 rounds" in card
    assert set(result.results.strategy) == {"global_model", "lp"} and result.results.error.isna().all()


class _Stop(Exception):
    pass


def test_resuming_a_stateful_algorithm_equals_an_uninterrupted_run(tmp_path, tiny_ds_path, monkeypatch):
    """SCAFFOLD's control variates are saved with the round checkpoint: stopped after round 2 of 3 and resumed,
    the global model is the uninterrupted run's, bit for bit."""
    import hf_lpft.federated.fedavg as engine

    def cfg(name, resume=False):
        return load_config(None, {"data": {"dataset": tiny_ds_path, "num_classes": 4},
                                  "fedavg": {"rounds": 3, "batch_size": 16, "fl_strategy": "scaffold",
                                             "client_fraction": 0.67},
                                  "pft": {"strategies": ["lp"], "epochs": 1, "batch_size": 16},
                                  "run": {"output_dir": str(tmp_path / name), "distortion": False, "resume": resume}})
    whole = run(cfg("whole"))
    rounds = []

    def stop_after_two(point):
        rounds.append(point)
        if point == "fedavg_round" and rounds.count(point) == 2:
            raise _Stop
    monkeypatch.setattr(engine, "fault_point", stop_after_two)
    with pytest.raises(_Stop):
        run(cfg("parts"))
    monkeypatch.undo()
    assert Checkpoints(tmp_path / "parts").load_fl_state(0).server  # c after round 2 was saved
    parts = run(cfg("parts", resume=True))
    a = load_file(str(whole.output_dir / "global" / "model.safetensors"))
    b = load_file(str(parts.output_dir / "global" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- the registry's errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fedavg, match", [
    ({"fl_strategy": "fedfoo"}, r"fedavg.fl_strategy='fedfoo' is not allowed; choose one of \[.*'scaffold'"),
    ({"fl_strategy": "fedadam"}, "fedavg.fl_strategy='fedadam' runs on fedavg.engine 'flower', not 'builtin'"),
    ({"fl_strategy": "scaffold", "fl_strategy_args": {"weighting": "bogus"}},
     r"fedavg.fl_strategy_args.weighting='bogus' is not allowed; choose one of \['uniform', 'examples'\]"),
    ({"fl_strategy": "scaffold", "fl_strategy_args": {"server_lr": 0}}, "server_lr=0.0 must be > 0"),
    ({"fl_strategy": "scaffold", "fl_strategy_args": {"lr_g": 1}},
     r"unknown option\(s\) \['lr_g'\] for 'scaffold'; allowed: \['server_lr', 'weighting'\]"),
    ({"fl_strategy": "fedprox", "fl_strategy_args": {"proximal_mu": -1}}, "proximal_mu=-1.0 must be >= 0"),
    ({"fl_strategy": "fedavg", "fl_strategy_args": {"mu": 1}}, r"none \(fedavg is configured by fedavg\.\*\)"),
])
def test_bad_general_fl_settings_fail_in_one_line(tmp_path, tiny_ds_path, fedavg, match):
    from hf_lpft.run.preflight import preflight

    cfg = load_config(None, {"data": {"dataset": tiny_ds_path, "num_classes": 4}, "fedavg": fedavg,
                             "run": {"output_dir": str(tmp_path / "x")}})
    with pytest.raises(ConfigError, match=match) as err:
        preflight(cfg)
    assert "\n" not in str(err.value)


def test_existing_names_still_build():
    assert algorithm_of(load_config(None, {})).name == "fedavg"
    assert build_algorithm("fedprox", {"proximal_mu": "0.1"}, engine="builtin").config.proximal_mu == 0.1
    assert {"fedavg", "fedprox", "scaffold", "fedadam", "krum", "qfedavg"} <= set(ALGORITHMS)
    for name, cls in ALGORITHMS.items():
        assert cls.name == name and cls.display_name and cls.engines
