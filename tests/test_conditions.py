"""The conditions sweep: every condition config validates; the table is right on hand-made results."""

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hf_lpft.studies.conditions import condition_table, format_condition_table, load_conditions, write_conditions

FOLDER = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "conditions"


def _results(with_distortion: bool) -> pd.DataFrame:
    """Two conditions, two seeds, two clients; accuracies chosen so client means are easy to check."""
    acc = {  # (condition, seed, strategy) -> (local, global) of client 0; client 1 is 0.1 lower on both
        ("c1", 0, "global_model"): (0.6, 0.6), ("c1", 0, "ft"): (0.9, 0.7), ("c1", 0, "lp_ft"): (0.9, 0.75),
        ("c1", 1, "global_model"): (0.6, 0.6), ("c1", 1, "ft"): (0.8, 0.7), ("c1", 1, "lp_ft"): (0.85, 0.8),
        ("c1", 0, "lp"): (0.8, 0.65), ("c1", 1, "lp"): (0.8, 0.65),
        ("c2", 0, "ft"): (0.9, 0.8), ("c2", 0, "lp_ft"): (0.9, 0.7),
    }
    rows = []
    for (cond, seed, strategy), (local, global_) in acc.items():
        for i in range(2):
            row = {"condition": cond, "seed": seed, "strategy": strategy, "client_index": i,
                   "local_acc": local - 0.1 * i, "global_acc": global_ - 0.1 * i, "error": None}
            if with_distortion:
                row |= {"distortion_local": 2.0 if strategy == "ft" else 1.0, "distortion_global": 0.5}
            rows.append(row)
    # A failed client is left out (its NaN would otherwise poison the means).
    rows.append({"condition": "c1", "seed": 0, "strategy": "ft", "client_index": 2, "local_acc": np.nan,
                 "global_acc": np.nan, "error": "loss is nan"})
    return pd.DataFrame(rows)


def test_condition_table_on_hand_made_results():
    table = condition_table(_results(with_distortion=False)).set_index("condition")
    c1, c2 = table.loc["c1"], table.loc["c2"]
    assert c1.seeds == 2 and c2.seeds == 1
    # Per-seed LP-FT − FT on Global: seed 0: 0.05, seed 1: 0.10 -> mean 0.075, sample std 0.0354.
    assert c1.lpft_minus_ft_global == pytest.approx(0.075)
    assert c1.lpft_minus_ft_global_std == pytest.approx(np.std([0.05, 0.10], ddof=1))
    assert c1.lpft_minus_ft_local == pytest.approx(0.025)  # seed 0: 0, seed 1: 0.05
    assert c1.ft_global_acc == pytest.approx(0.65)  # client means 0.65 and 0.65, mean over seeds
    assert c1.lp_local_acc == pytest.approx(0.75)
    assert np.isnan(c1.bn_adapt_global_acc) and np.isnan(c2.global_model_local_acc)
    assert c1.verdict == "LP-FT higher"
    assert c2.lpft_minus_ft_global == pytest.approx(-0.1) and c2.lpft_minus_ft_global_std == 0.0
    assert c2.verdict == "FT higher (1 seed)"
    assert np.isnan(c1.ft_distortion_global)  # no distortion columns in these results
    markdown = format_condition_table(table.reset_index(), {"c3": "config: bad"})
    assert "| c1 | 2 | +2.50 (3.54) | +7.50 (3.54) | LP-FT higher |" in markdown
    assert "Skipped: **c3** (config: bad)" in markdown


def test_condition_table_reports_distortion_when_present(tmp_path):
    results = _results(with_distortion=True)
    table, markdown = write_conditions(tmp_path, results, [])
    row = table.set_index("condition").loc["c1"]
    assert row.ft_distortion_local == pytest.approx(2.0) and row.lp_ft_distortion_local == pytest.approx(1.0)
    assert row.lp_ft_distortion_global == pytest.approx(0.5)
    assert "| 2 / 0.5 | 1 / 0.5 |" in markdown.splitlines()[2]
    assert pd.read_parquet(tmp_path / "conditions.parquet").condition.tolist() == ["c1", "c2"]
    assert (tmp_path / "conditions.png").read_bytes()[:4] == b"\x89PNG"


def test_every_condition_config_validates(tmp_path):
    conditions = load_conditions(FOLDER, output_dir=tmp_path, quick=True)
    names = [c.name for c in conditions]
    assert names[0] == "baseline" and "base" not in names
    bad = {c.name: c.skipped for c in conditions if c.skipped and c.name != "text_minilm"}
    assert not bad
    by = {c.name: c.config for c in conditions if c.config is not None}
    assert by["baseline"].run.seeds == [0] and by["baseline"].fedavg.rounds == 10  # quick: 1 seed, 30 // 3
    assert by["strength_rounds_10"].fedavg.rounds == 3
    assert by["fedbn_local"].fedavg.bn == "local" and by["baseline"].fedavg.bn == "averaged"
    assert by["norm_gn_efficientnet"].model.backbone == "timm:test_efficientnet_gn"
    assert all(set(cfg.pft.strategies) >= {"ft", "lp_ft", "lp", "bn_adapt"} for cfg in by.values())
    assert Path(by["baseline"].run.output_dir) == tmp_path / "baseline" and by["baseline"].run.resume
    with pytest.raises(ValueError, match="nope"):
        load_conditions(FOLDER, output_dir=tmp_path, names=["nope"])


@pytest.mark.slow
def test_recipe_smoke_on_tiny_dataset(tmp_path, tiny_ds_path):
    spec = importlib.util.spec_from_file_location("conditions_recipe", FOLDER.parents[1] / "conditions.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = tmp_path / "sweep"
    status = recipe.main([
        "--quick", "--conditions", "baseline,fedbn_local,norm_gn_efficientnet",
        "--output_dir", str(out), "--log_level", "WARNING",
        "--data.dataset", tiny_ds_path, "--data.num_classes", "4", "--data.num_clients", "3",
        "--data.min_partition_size", "4", "--fedavg.rounds", "1", "--fedavg.batch_size", "16",
        "--pft.epochs", "6", "--pft.batch_size", "16"])  # 6 >= lp_epochs 5 of the base
    assert status == 0
    table = pd.read_parquet(out / "conditions.parquet")
    assert table.condition.tolist() == ["baseline", "fedbn_local", "norm_gn_efficientnet"]
    assert (table.seeds == 1).all() and table.lpft_minus_ft_global.notna().all()
    assert table.bn_adapt_global_acc.notna().all()
    # GroupNorm has no running statistics: BN-adapt is the global model itself.
    gn = table.set_index("condition").loc["norm_gn_efficientnet"]
    assert gn.bn_adapt_local_acc == pytest.approx(gn.global_model_local_acc)
    assert (out / "conditions.png").is_file()
    assert (out / "conditions.md").read_text().count("\n| ") == 3  # one table row per condition
    assert (out / "baseline" / "results.parquet").is_file()
