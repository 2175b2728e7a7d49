"""BatchNorm as an explicit choice: frozen / train / reestimate phases, BN-adapt, FedBN through rounds."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.nn.modules.batchnorm import _BatchNorm

from hf_lpft.checkpoint import Checkpoints
from hf_lpft.config import ConfigError, load_config
from hf_lpft.evaluation.clients import cross_accuracy
from hf_lpft.federated.fedavg import bn_keys, run_fedavg, with_client_bn
from hf_lpft.federated.fedbn import client_global_model
from hf_lpft.layout import RunLayout
from hf_lpft.models.backbone import SplitModel, build_model
from hf_lpft.pipeline import run
from hf_lpft.run.federation import build_federation
from hf_lpft.run.personalize import personalize
from hf_lpft.run.settings import eval_settings
from hf_lpft.strategies import Budget, build_strategy
from hf_lpft.train.loop import OptimSettings, derive_seed, train_phase
from hf_lpft.train.phase import Phase


def _model(seed=0):
    return build_model("timm:test_resnet", num_classes=4, image_size=32, seed=seed)


def _bn_buffers(model):
    return {f"{n}.{b}": t.clone() for n, m in model.named_modules() if isinstance(m, _BatchNorm)
            for b, t in m.named_buffers()}


def _first_bn_input(model, x):
    """Input of the first BatchNorm layer to run, for all of ``x`` (float, as the loop feeds it)."""
    from hf_lpft.data.tensors import to_float

    first = next(m for m in model.modules() if isinstance(m, _BatchNorm))
    seen = []
    handle = first.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    model.eval()
    with torch.no_grad():
        model(to_float(x))
    handle.remove()
    return first, seen[0]


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_phase_freezes_or_updates_bn_statistics(bn, tiny_clients, accelerator):
    model = _model()
    before = _bn_buffers(model)
    train_phase(model, Phase("p", "all", 1, 0.05, bn=bn), tiny_clients[0], settings=OptimSettings(batch_size=8),
                accelerator=accelerator, seed=0)
    after = _bn_buffers(model)
    if bn == "frozen":
        assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical, counters included
    else:
        stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
        assert all(not torch.equal(before[k], after[k]) for k in stats)


@pytest.mark.parametrize("name,args",
                         [("ft", {"bn": "frozen"}), ("lp", {}), ("lp_ft", {"lp_epochs": 1, "ft_bn": "frozen"})])
def test_strategies_with_frozen_bn_keep_global_statistics(name, args, tiny_clients, accelerator):
    strategy = build_strategy(name, args, budget=Budget(epochs=2, lr=0.05))
    model = _model()
    personalized, _ = personalize(strategy, model, tiny_clients[1], settings=OptimSettings(batch_size=8),
                                  accelerator=accelerator, seed=1)
    before, after = _bn_buffers(model), _bn_buffers(personalized)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert strategy.describe()["phases"][-1]["bn"] == "frozen"  # the choice is in the run record


def test_bn_adapt_changes_only_bn_buffers_and_matches_hand_computation(tiny_clients, accelerator):
    client = tiny_clients[0]
    n = client.n_train
    strategy = build_strategy("bn_adapt")
    model = _model()
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    record = train_phase(model, strategy.phases()[0], client, settings=OptimSettings(batch_size=n),
                         accelerator=accelerator, seed=0)
    assert record["trainable_params"] == 0 and record["epoch_loss"] == []
    assert all(torch.equal(p, params[k]) for k, p in model.named_parameters())
    changed = {k for k, b in model.named_buffers() if not torch.equal(b, buffers[k])}
    assert changed and changed <= set(bn_keys(model))
    first, x = _first_bn_input(_model(), client.train_x)  # BN-adapt's own stats do not affect the first BN input
    bn = next(m for m in model.modules() if isinstance(m, _BatchNorm))
    # One batch = the whole client: the running statistics are its per-channel mean and unbiased variance.
    torch.testing.assert_close(bn.running_mean, x.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, x.var(dim=(0, 2, 3), unbiased=True), rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 1
    assert all(m.momentum == first.momentum for m in model.modules() if isinstance(m, _BatchNorm))  # restored


def test_bn_adapt_is_a_cumulative_average_over_batches(tiny_clients, accelerator):
    client, batch, seed = tiny_clients[0], 6, 5
    model = _model()
    train_phase(model, Phase("stats", "none", 1, 0.1, bn="reestimate"), client,
                settings=OptimSettings(batch_size=batch), accelerator=accelerator, seed=seed)
    _, x = _first_bn_input(_model(), client.train_x)
    order = torch.randperm(client.n_train, generator=torch.Generator().manual_seed(seed))
    chunks = [x[order[i:i + batch]] for i in range(0, client.n_train, batch)]
    means = torch.stack([c.mean(dim=(0, 2, 3)) for c in chunks])
    variances = torch.stack([c.var(dim=(0, 2, 3), unbiased=True) for c in chunks])
    bn = next(m for m in model.modules() if isinstance(m, _BatchNorm))
    torch.testing.assert_close(bn.running_mean, means.mean(0), rtol=1e-5, atol=1e-6)  # equal-weight batches
    torch.testing.assert_close(bn.running_var, variances.mean(0), rtol=1e-5, atol=1e-6)


def test_phase_that_trains_nothing_with_frozen_bn_changes_nothing(tiny_clients, accelerator):
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    train_phase(model, Phase("noop", "none", 2, 0.1, bn="frozen"), tiny_clients[0],
                settings=OptimSettings(batch_size=8), accelerator=accelerator, seed=0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _fedavg(clients, accelerator, *, rounds, start_round=0, model=None, client_bn=None, on_round_end=None):
    model = model if model is not None else _model(seed=3)
    return run_fedavg(model, clients, rounds=rounds, local_epochs=1, lr=0.05, client_fraction=1.0,
                      settings=OptimSettings(batch_size=8), accelerator=accelerator, seed=11, eval_every=0,
                      start_round=start_round, client_bn=client_bn, on_round_end=on_round_end)


def test_fedbn_keeps_each_clients_statistics_through_rounds(tiny_clients, accelerator, tmp_path):
    # Round 1, checkpointed; the clients' BatchNorm comes back from disk, not from memory.
    ckpt = Checkpoints(tmp_path)
    bn1: dict = {}
    model1, _ = _fedavg(tiny_clients, accelerator, rounds=1, client_bn=bn1,
                        on_round_end=lambda r, s, h: ckpt.save_round(0, s, h, client_bn=bn1))
    state1, _ = ckpt.load_round(0)
    saved = ckpt.load_client_bn(0)
    assert set(saved) == {c.client_id for c in tiny_clients}
    assert all(torch.equal(saved[c][k], bn1[c][k]) for c in bn1 for k in bn1[c])
    # Round 2, resumed from the checkpoint.
    bn2 = copy.deepcopy(saved)
    _fedavg(tiny_clients, accelerator, rounds=2, start_round=1, model=model1, client_bn=bn2)
    # By hand: client i's round-2 statistics derive from its own round-1 statistics, not the average.
    phase = Phase("fedavg_local", "all", 1, 0.05, bn="train")
    client = tiny_clients[1]
    own, averaged = _model(), _model()
    with_client_bn(own, state1, saved, client.client_id)
    averaged.load_state_dict(state1)
    for m in (own, averaged):
        train_phase(m, phase, client, settings=OptimSettings(batch_size=8), accelerator=accelerator,
                    seed=derive_seed(11, "fedavg", 1, client.client_id))
    mean_key = next(k for k in bn2[client.client_id] if k.endswith("running_mean"))
    assert all(torch.equal(own.state_dict()[k], v) for k, v in bn2[client.client_id].items())
    assert not torch.equal(averaged.state_dict()[mean_key], bn2[client.client_id][mean_key])
    # Clients keep different statistics; the global state holds their average only as a fallback.
    assert not torch.equal(bn2["a"][mean_key], bn2["b"][mean_key])
    # And an uninterrupted two-round run gives exactly the same per-client BatchNorm.
    bn_direct: dict = {}
    _fedavg(tiny_clients, accelerator, rounds=2, client_bn=bn_direct)
    assert all(torch.equal(bn_direct[c][k], bn2[c][k]) for c in bn2 for k in bn2[c])


def test_pipeline_fedbn_personalizes_from_each_clients_own_bn(tmp_path, tiny_ds_path):
    cfg = load_config(None, {"data": {"dataset": tiny_ds_path, "num_classes": 4},
                             "fedavg": {"rounds": 1, "batch_size": 16, "bn": "local"},
                             "pft": {"strategies": ["lp", "bn_adapt"], "epochs": 1, "batch_size": 16},
                             "run": {"output_dir": str(tmp_path / "fedbn"), "distortion": False}})
    result = run(cfg)
    out = result.output_dir
    record = json.loads((out / "run_record.json").read_text())["run_info"]["batchnorm"]
    assert record["fedavg"] == "local" and record["pft_phases"]["bn_adapt"] == {"bn_statistics": "reestimate"}
    client_bn = Checkpoints(out).load_client_bn(0)
    global_model = SplitModel.from_pretrained(out / "global")
    _, clients = build_federation(cfg, RunLayout(tmp_path / "rebuild", cfg.run.seeds))
    df = result.results
    for i, cid in enumerate(["a", "b", "c"]):
        lp = load_file(str(out / "clients" / "lp" / cid / "model.safetensors"))
        # LP freezes BatchNorm, so the personalized model carries exactly client i's own FedBN statistics.
        assert all(torch.equal(lp[k], v) for k, v in client_bn[cid].items())
        row = df[(df.strategy == "global_model") & (df.client_id == cid)].iloc[0]
        expected = cross_accuracy(client_global_model(global_model, client_bn, cid), clients,
                                  settings=eval_settings(cfg.run, cfg.pft), device="cpu")
        assert list(row.acc_by_client) == pytest.approx(expected)


def test_bn_options_are_validated():
    with pytest.raises(ConfigError, match="fedavg.bn='fedbn'"):
        load_config(None, {"fedavg": {"bn": "fedbn"}})
    with pytest.raises(ConfigError, match="bn_adapt.passes=0"):
        build_strategy("bn_adapt", {"passes": 0})
    with pytest.raises(ConfigError, match="bn_adapt.bn='frozen'"):
        build_strategy("bn_adapt", {"bn": "frozen"})
    with pytest.raises(ConfigError, match="lp_ft.ft_bn='off'"):
        build_strategy("lp_ft", {"ft_bn": "off"})
