"""The Table 2 study: its shipped blocks validate, Global at matched Local is read as defined (hand-made curves),
the standard error and the aligned / reversed split are what a hand calculation gives, and the table is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hf_lpft.studies import table2 as T

FOLDER = Path(__file__).parents[1] / "recipes" / "configs" / "table2"


def test_shipped_blocks_validate_with_one_pft_regime(tmp_path):
    blocks = T.load_blocks(FOLDER, output_dir=tmp_path)
    names = [b.name for b in blocks]
    assert names[:3] == ["feature_shift", "input_shift", "concept_shift"] and "label_shift" in names
    table = [b for b in blocks if b.name != "concept_shift_shape_only"]
    # one regime: optimizer, lr, epochs, batch size and strategy options are the same in every Table 2 block
    regimes = {(b.config.pft.optimizer, b.config.pft.lr, b.config.pft.epochs, b.config.pft.batch_size,
                str(b.config.pft.strategy_args), tuple(b.config.pft.strategies)) for b in table}
    assert len(regimes) == 1, regimes
    assert {"ft", "lp", "lp_ft", "proximal_ft", "sparse_ft", "soup_ft", "lss_ft", "lora", "lp_lora",
            "bn_adapt"} <= set(table[0].config.pft.strategies)
    by = {b.name: b.config for b in blocks}
    assert by["input_shift"].data.num_clients == 50 and by["input_shift"].data.dataset == "digits-c"
    assert by["text_label_shift"].model.backbone == "hf:all-MiniLM-L6-v2"
    assert all(b.config.run.fedavg_cache == str(tmp_path / "fedavg_cache") for b in blocks)
    assert T.select_blocks(blocks, "label_shift,feature_shift") == [blocks[0], by_name(blocks, "label_shift")]
    with pytest.raises(ValueError, match=r"unknown block\(s\) \['nope'\]"):
        T.select_blocks(blocks, "nope")


def by_name(blocks, name):
    return next(b for b in blocks if b.name == name)


def _results(locals_: dict, globals_: dict, seed: int = 0) -> pd.DataFrame:
    rows = []
    for strategy, values in locals_.items():
        for i, (lo, g) in enumerate(zip(values, globals_[strategy])):
            rows.append({"seed": seed, "strategy": strategy, "client_id": f"c{i}", "client_index": i, "n_train": 10,
                         "n_test": 100, "local_acc": lo, "global_acc": g, "error": None})
    return pd.DataFrame(rows)


def _curves(strategy: str, points: list[tuple[int, float, float]], seed: int = 0) -> pd.DataFrame:
    """Both clients log the same (epoch, local, global) points."""
    return pd.DataFrame([{"seed": seed, "strategy": strategy, "client_id": c, "epoch": e, "local_acc": lo,
                          "global_acc": g} for c in ("c0", "c1") for e, lo, g in points])


def test_matched_local_reads_the_first_epoch_reaching_fts_final_local():
    results = _results({"global_model": [0.5, 0.5], "ft": [0.9, 0.8], "lp_ft": [0.9, 0.9], "lp": [0.7, 0.7],
                        "soup_ft": [0.9, 0.9]},
                       {"global_model": [0.6, 0.6], "ft": [0.3, 0.3], "lp_ft": [0.4, 0.4], "lp": [0.6, 0.6],
                        "soup_ft": [0.3, 0.3]})
    curves = pd.concat([
        _curves("ft", [(1, 0.86, 0.50), (2, 0.85, 0.45), (3, 0.85, 0.30)]),   # FT's final Local: mean(0.9, 0.8) = 0.85
        _curves("lp_ft", [(1, 0.70, 0.58), (2, 0.84, 0.52), (3, 0.88, 0.40)]),
        _curves("lp", [(1, 0.65, 0.60), (2, 0.70, 0.61), (3, 0.69, 0.62)]),
        _curves("soup_ft", [(1, 0.9, 0.3)]),
    ])
    m = T.matched_local(curves, results).set_index("strategy")
    assert m.loc["ft", "epoch"] == 1 and m.loc["ft", "global_acc"] == pytest.approx(0.50)  # FT after one epoch
    assert m.loc["lp_ft", "epoch"] == 3 and m.loc["lp_ft", "global_acc"] == pytest.approx(0.40)
    assert m.loc["ft", "target"] == pytest.approx(0.85) and m.loc["lp_ft", "reached"]
    # LP never reaches 0.85: the epoch of the nearest Local (0.70 at epoch 2), marked as not reached
    assert m.loc["lp", "epoch"] == 2 and not m.loc["lp", "reached"] and m.loc["lp", "global_acc"] == pytest.approx(0.61)
    assert "soup_ft" not in m.index  # its curve is its ingredients', not the soup's


def test_matched_local_counts_epoch_zero_and_only_epochs_every_client_logged():
    results = _results({"global_model": [0.9, 0.9], "ft": [0.8, 0.8]}, {"global_model": [0.7, 0.7], "ft": [0.2, 0.2]})
    curves = _curves("ft", [(1, 0.8, 0.2)])
    curves = pd.concat([curves, curves.iloc[:1].assign(epoch=2)])  # epoch 2 logged by one client only
    m = T.matched_local(curves, results).set_index("strategy")
    assert m.loc["ft", "epoch"] == 0 and m.loc["ft", "global_acc"] == pytest.approx(0.7)  # the global model already
    assert list(T.client_mean_curve(curves, results, 0, "ft").index) == [0, 1]


def test_standard_error_and_aligned_reversed_split_by_hand():
    results = _results({"global_model": [0.9, 0.8, 0.3]}, {"global_model": [0.5, 0.5, 0.5]})
    results["client_id"] = ["0_aligned_p0.95", "1_aligned_p0.90", "2_reversed_p0.10"]
    results["n_test"] = [100, 200, 300]
    se = T.global_standard_error(results)
    assert se["n_other"] == pytest.approx((500 + 400 + 300) / 3)
    assert se["se_max"] == pytest.approx(np.sqrt(0.25 / 400))
    split = T.aligned_vs_reversed(results).iloc[0]
    assert split["aligned"] == pytest.approx(0.85) and split["reversed"] == pytest.approx(0.3)
    assert T.side_of("client_03") is None


def test_write_table2_from_saved_blocks(tmp_path):
    blocks = T.load_blocks(FOLDER, output_dir=tmp_path)
    block = blocks[0]
    results = pd.concat([_results({"global_model": [0.5, 0.6], "ft": [0.9, 0.8], "lp_ft": [0.9, 0.9]},
                                  {"global_model": [0.5, 0.6], "ft": [0.3, 0.35], "lp_ft": [0.4, 0.4]}, seed=s)
                         for s in (0, 1)])
    results["acc_by_client"] = [[a, b] for a, b in zip(results.local_acc, results.global_acc)]
    curves = pd.concat([_curves(s, [(1, 0.9, 0.4)], seed=seed) for s in ("ft", "lp_ft") for seed in (0, 1)])
    found = T.BlockResults(block, results, curves, 60.0)
    markdown = T.write_table2(tmp_path, [found])
    assert "### feature_shift" in markdown and "*paper, Digit5*" in markdown
    assert "LP-FT − FT (2 seeds" in markdown and "Global +7.50 (0.00)" in markdown  # 0.40 - mean(0.30, 0.35)
    assert (tmp_path / "table2_feature_shift.png").stat().st_size > 0
    saved = pd.read_parquet(tmp_path / "table2.parquet")
    assert list(saved.strategy) == ["global_model", "ft", "lp_ft"]
    with pytest.raises(ValueError, match="blocks not run yet"):
        T.collect_blocks(blocks[1:2])


def test_publish_keeps_a_folder_that_collect_reads_again(tmp_path):
    blocks = T.load_blocks(FOLDER, output_dir=tmp_path / "runs")
    block = blocks[0]
    run = Path(block.config.run.output_dir)
    run.mkdir(parents=True)
    results = _results({"global_model": [0.5, 0.6], "ft": [0.9, 0.8]}, {"global_model": [0.5, 0.6], "ft": [0.3, 0.4]})
    results.to_parquet(run / "results.parquet")
    (run / "run_record.json").write_text('{"run_info": {"timings_seconds": {"total": 120.0}}, "train_info": {"x": 1}}')
    (run / "models.bin").write_text("large files stay behind")
    T.publish_blocks(T.collect_blocks([block]), tmp_path / "published")
    kept = sorted(p.name for p in (tmp_path / "published" / "feature_shift").iterdir())
    assert kept == ["results.parquet", "run_record.json"]
    again = T.collect_blocks(T.load_blocks(FOLDER, output_dir=tmp_path / "published")[:1])
    assert "train_info" not in (tmp_path / "published" / "feature_shift" / "run_record.json").read_text()
    assert again[0].seconds == 120.0 and again[0].results.equals(pd.read_parquet(run / "results.parquet"))


def _fake_run(folder: Path, seed: int = 0) -> None:
    folder.mkdir(parents=True)
    results = _results({"global_model": [0.5, 0.6], "ft": [0.9, 0.8], "lp_ft": [0.9, 0.9]},
                       {"global_model": [0.5, 0.6], "ft": [0.3, 0.4], "lp_ft": [0.4, 0.4]}, seed=seed)
    results["acc_by_client"] = [[a, b] for a, b in zip(results.local_acc, results.global_acc)]
    results.to_parquet(folder / "results.parquet")
    (folder / "run_record.json").write_text('{"run_info": {"timings_seconds": {"total": 60.0}}}')


def test_recipe_publish_tabulates_every_block_published_so_far(tmp_path, monkeypatch):
    """Publishing one block after another (e.g. in two sessions) keeps the earlier block in the published table."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("table2_recipe", FOLDER.parents[1] / "table2.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    published = tmp_path / "published"
    _fake_run(tmp_path / "session1" / "feature_shift")
    _fake_run(tmp_path / "session2" / "label_shift")
    for session in ("session1", "session2"):
        assert recipe.main(["--collect", "--output_dir", str(tmp_path / session), "--publish", str(published),
                            "--log_level", "WARNING"]) == 0
    table = (published / "table2.md").read_text()
    assert "### feature_shift" in table and "### label_shift" in table
    assert recipe.main(["--seeds", "0,x", "--collect"]) == 2


def test_seed_parts_join_to_the_whole_run(tmp_path, tiny_ds_path):
    """A block run seed by seed (``--seeds``: one seed part a process or session) gives, joined, the rows of
    the same block run over all its seeds at once; a missing part is named; published parts tabulate again."""
    folder = tmp_path / "blocks"
    folder.mkdir()
    (folder / "base.yaml").write_text(f"data: {{dataset: {tiny_ds_path}, num_classes: 4}}\n"
                                      "fedavg: {rounds: 1, batch_size: 16}\n"
                                      "pft: {strategies: [ft, lp_ft], epochs: 2, batch_size: 16, eval_every: 1,"
                                      " strategy_args: {lp_ft: {lp_epochs: 1}}}\n"
                                      "run: {seeds: [0, 1], num_threads: 1}\n")
    (folder / "blocks.yaml").write_text("blocks:\n  tiny: {config: {}}\n")
    whole = T.load_blocks(folder, output_dir=tmp_path / "whole")
    T.run_blocks(whole)
    parts = T.load_blocks(folder, output_dir=tmp_path / "parts")
    T.run_blocks(parts, seeds=[1])
    with pytest.raises(ValueError, match=r"seed part\(s\) \[0\] not run yet"):
        T.collect_blocks(parts)
    assert sorted(T.collect_blocks(parts, allow_missing=True)[0].results.seed.unique()) == [1]
    assert "1 of the 2 planned" in T.write_table2(tmp_path / "parts", T.collect_blocks(parts, allow_missing=True))
    T.run_blocks(parts, seeds=[0])
    joined, one = T.collect_blocks(parts)[0], T.collect_blocks(whole)[0]
    cols = ["seed", "strategy", "client_id", "local_acc", "global_acc"]
    order = ["seed", "strategy", "client_id"]
    pd.testing.assert_frame_equal(joined.results[cols].sort_values(order).reset_index(drop=True),
                                  one.results[cols].sort_values(order).reset_index(drop=True))
    assert len(joined.curves) == len(one.curves)
    T.publish_blocks([joined], tmp_path / "published")
    assert sorted(p.name for p in (tmp_path / "published" / "tiny").iterdir()) == ["seed_0", "seed_1"]
    again = T.collect_blocks(T.load_blocks(folder, output_dir=tmp_path / "published"))[0]
    assert again.results.equals(joined.results)
    with pytest.raises(ValueError, match="has seeds \\[0, 1\\]; got 5"):
        T.run_blocks(parts, seeds=[5])
