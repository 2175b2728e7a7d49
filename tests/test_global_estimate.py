"""Global estimated on a seeded sample of K other clients (run.global_eval_clients, issue 26 item 2): unbiased
against the exact value, its standard error, the same sample for every strategy, and how runs state it."""

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from hf_lpft.config import ConfigError, load_config
from hf_lpft.evaluation.clients import EvalSettings, result_row, scored_others
from hf_lpft.evaluation.metrics import format_markdown, global_estimate, local_global, summary_table

# A cross-client row of N = 8 clients (own = 2): accuracies spread enough for the variance to matter.
ROW = [0.91, 0.40, 0.88, 0.73, 0.55, 0.97, 0.62, 0.30]
OWN, K = 2, 3
OTHERS = [j for j in range(len(ROW)) if j != OWN]


def test_mean_of_the_estimates_over_every_k_subset_is_the_exact_global():
    exact = local_global(ROW, OWN)[1]
    estimates = [global_estimate(ROW, list(s)) for s in itertools.combinations(OTHERS, K)]
    means = np.array([m for m, _ in estimates])
    assert means.mean() == pytest.approx(exact, abs=1e-12)  # unbiased: exactly, over the full enumeration
    # the SE's square (s^2 with the finite-population correction) is unbiased for the estimator's variance
    assert np.mean([se ** 2 for _, se in estimates]) == pytest.approx(means.var(ddof=0), rel=1e-9)


def test_se_formula_by_hand_and_its_limits():
    values = np.array([ROW[j] for j in (0, 3, 7)])
    mean, se = global_estimate(ROW, [0, 3, 7])
    assert mean == pytest.approx(values.mean())
    assert se == pytest.approx(np.sqrt((1 - 3 / 7) * values.var(ddof=1) / 3))
    assert global_estimate(ROW, OTHERS) == (pytest.approx(local_global(ROW, OWN)[1]), 0.0)  # K = N-1: exact
    assert np.isnan(global_estimate(ROW, [1])[1])  # one value: no variance
    with pytest.raises(ValueError, match="distinct"):
        global_estimate(ROW, [1, 1])


def test_sampling_function_over_seeds_is_unbiased_within_its_standard_error():
    exact, n = local_global(ROW, OWN)[1], len(ROW)
    draws = [global_estimate(ROW, scored_others(n, OWN, k=K, seed=s)) for s in range(4000)]
    means, ses = np.array([m for m, _ in draws]), np.array([se for _, se in draws])
    true_se = np.sqrt((1 - K / (n - 1)) * np.var([ROW[j] for j in OTHERS], ddof=1) / K)
    assert abs(means.mean() - exact) < 4 * true_se / np.sqrt(len(draws))  # unbiased within 4 SE of the mean
    assert means.std(ddof=1) == pytest.approx(true_se, rel=0.05)  # the formula matches the empirical spread
    assert np.sqrt(np.mean(ses ** 2)) == pytest.approx(true_se, rel=0.05)


def test_sample_is_seeded_by_run_seed_and_client_only():
    a = scored_others(50, 7, k=5, seed=0)
    assert a == scored_others(50, 7, k=5, seed=0) and a == sorted(a) and 7 not in a and len(set(a)) == 5
    assert a != scored_others(50, 7, k=5, seed=1) and a != scored_others(50, 8, k=5, seed=0)
    assert scored_others(50, 7, k=49, seed=0) is None and scored_others(50, 7, k=None, seed=0) is None
    assert EvalSettings(256, True, 0, 5).sample(50, 7, 0) == a


def test_exact_rows_and_summary_are_unchanged():
    import torch

    from hf_lpft.data.tensors import ClientData

    client = ClientData("a", torch.zeros(2, 3, 4, 4), torch.zeros(2), torch.zeros(2, 3, 4, 4), torch.zeros(2))
    row = result_row(0, "ft", 0, client, [0.9, 0.5, 0.7], 0.1)
    assert list(row) == ["seed", "strategy", "client_id", "client_index", "n_train", "n_test", "local_acc",
                         "global_acc", "acc_by_client", "final_train_loss"]
    rows = [result_row(0, "ft", i, client, [0.9, 0.5, 0.7], 0.1) | {"error": None} for i in range(3)]
    summary = summary_table(pd.DataFrame(rows))
    assert "global_se" not in summary and "estimate" not in format_markdown(summary)


@pytest.mark.parametrize("value, allowed", [(1, ">= 2"), (-1, ">= 2"), (-3, ">= 2"), (2.5, "integer"),
                                            ("many", "integer"), (True, "integer")])
def test_bad_values_fail_naming_the_value(value, allowed):
    with pytest.raises(ConfigError, match=f"run.global_eval_clients={value!r}.*{allowed}"):
        load_config(None, {"run": {"global_eval_clients": value}})


def test_flower_app_refuses_a_sample(tmp_path, tiny_ds_path):
    from hf_lpft.run.preflight import preflight

    cfg = load_config(None, {"data": {"dataset": tiny_ds_path, "num_classes": 4},
                             "run": {"output_dir": str(tmp_path / "app"), "global_eval_clients": 3}})
    with pytest.raises(ConfigError, match="global_eval_clients=3: the Flower App .* cannot sample"):
        preflight(cfg, engine="flower-app")


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory, tiny_ds_path):
    from hf_lpft.pipeline import run

    out = tmp_path_factory.mktemp("estimate") / "run"
    cfg = load_config(None, {"data": {"dataset": tiny_ds_path, "num_classes": 4, "scheme": "iid", "num_clients": 6},
                             "fedavg": {"rounds": 1, "batch_size": 16},
                             "pft": {"epochs": 1, "batch_size": 16, "strategies": ["ft", "lp"]},
                             "run": {"output_dir": str(out), "global_eval_clients": 2}})
    return run(cfg)


def test_pipeline_rows_carry_the_estimate_on_the_same_clients(sampled_run):
    df = pd.read_parquet(sampled_run.output_dir / "results.parquet")
    assert set(df.strategy) == {"global_model", "ft", "lp"} and df.global_acc_se.notna().all()
    for (seed, i), group in df.groupby(["seed", "client_index"]):
        samples = {tuple(s) for s in group.global_sample}
        assert len(samples) == 1, "every strategy and the global model scored on the same clients"
        (sample,) = samples
        assert len(sample) == 2 and i not in sample
        for r in group.itertuples():
            accs = np.asarray(r.acc_by_client, float)
            scored = sorted({i, *sample})
            assert np.isnan(np.delete(accs, scored)).all() and not np.isnan(accs[scored]).any()
            assert (r.global_acc, r.global_acc_se) == pytest.approx(global_estimate(accs, list(sample)), nan_ok=True)
    cross = pd.read_parquet(sampled_run.output_dir / "cross_client.parquet")
    assert len(cross) == len(df) * 3  # own split + K = 2 others per model: linear in N


def test_summary_record_and_cards_say_estimate(sampled_run):
    out = sampled_run.output_dir
    summary = (out / "summary.md").read_text()
    assert "**Global is an estimate**" in summary and "2 of the 5 other clients" in summary and " ± " in summary
    assert sampled_run.summary.c_std_matrix.isna().all() and sampled_run.summary.worst_matrix.isna().all()
    info = json.loads((out / "run_record.json").read_text())["run_info"]["global_eval"]
    assert info["global"] == "estimate" and (info["clients_scored_per_model"], info["other_clients"]) == (2, 5)
    cards = [p.read_text() for p in (out / "hub").rglob("README.md")]
    assert cards and all("estimate on 2 of the 5 other clients" in c for c in cards)
    assert "Global is an estimate" in (out / "report.md").read_text()
