import numpy as np
import pandas as pd
import pytest

from hf_lpft.evaluation.metrics import format_markdown, local_global, summarize_clients, summary_table


def test_local_global_excludes_own_client():
    local, global_ = local_global([0.9, 0.5, 0.2], own=0)
    assert local == 0.9
    assert global_ == pytest.approx((0.5 + 0.2) / 2)  # own split excluded, not (0.9+0.5+0.2)/3


def test_summary_matches_hand_computed_example():
    local = np.array([0.8, 0.6, 1.0])
    global_ = np.array([0.5, 0.4, 0.6])
    s = summarize_clients(local, global_, reference_global=np.array([0.55, 0.3, 0.7]))
    assert s["local"] == pytest.approx(0.8)
    assert s["global"] == pytest.approx(0.5)
    assert s["c_std"] == pytest.approx(np.sqrt(((0.0) ** 2 + 0.2 ** 2 + 0.2 ** 2) / 3))
    assert s["worst"] == pytest.approx(0.6)
    assert s["avg_lg"] == pytest.approx(0.65)
    assert s["avg_lgw"] == pytest.approx((0.8 + 0.5 + 0.6) / 3)
    assert s["below_global_share"] == pytest.approx(2 / 3)


def _rows(seed, strategy, accs):
    out = []
    for i, row in enumerate(accs):
        local, global_ = local_global(row, i)
        out.append({"seed": seed, "strategy": strategy, "client_id": f"c{i}", "client_index": i,
                    "local_acc": local, "global_acc": global_})
    return out


def test_summary_table_mean_and_std_over_seeds():
    rows = _rows(0, "ft", [[1.0, 0.0], [0.0, 1.0]]) + _rows(1, "ft", [[0.5, 0.5], [0.5, 0.5]])
    table = summary_table(pd.DataFrame(rows))
    row = table.iloc[0]
    assert row.seeds == 2
    assert row["local"] == pytest.approx(0.75)  # seed 0: 1.0, seed 1: 0.5
    assert row["local_std"] == pytest.approx(np.std([1.0, 0.5], ddof=1))
    assert row["global"] == pytest.approx(0.25)
    md = format_markdown(table)
    assert "| FT | 75.00 (35.36) | 25.00 (35.36) |" in md


def test_cross_client_matrix_worst_and_c_std_hand_example():
    # Client 0's model: 0.9 on its own split, 0.3 on client 1's; client 1's model: 0.5 / 0.7.
    rows = []
    for i, row in enumerate([[0.9, 0.3], [0.5, 0.7]]):
        local, global_ = local_global(row, i)
        rows.append({"seed": 0, "strategy": "ft", "client_id": f"c{i}", "client_index": i, "local_acc": local,
                     "global_acc": global_, "acc_by_client": row})
    table = summary_table(pd.DataFrame(rows)).iloc[0]
    entries = [0.9, 0.3, 0.5, 0.7]  # mean 0.6; deviations .3 -.3 -.1 .1
    assert table["worst_matrix"] == pytest.approx(0.3)  # over the matrix; over Local it is 0.7
    assert table["worst"] == pytest.approx(0.7)
    assert table["c_std_matrix"] == pytest.approx(np.sqrt((0.09 + 0.09 + 0.01 + 0.01) / 4))
    assert table["c_std"] == pytest.approx(0.1)  # Local 0.9 / 0.7
    assert table["avg_lgw_matrix"] == pytest.approx((0.8 + 0.4 + 0.3) / 3)
    assert np.std(entries) == pytest.approx(table["c_std_matrix"])
    md = format_markdown(summary_table(pd.DataFrame(rows)))
    assert "C-Std (Local)" in md and "Worst (matrix)" in md and "| 70.00 |" in md  # one seed: no std


def test_global_drop_split_hand_example():
    from hf_lpft.evaluation.metrics import drop_split_table, global_drop_split

    # Global per (seed, client): global model 0.80 / 0.70; bn_adapt 0.60 / 0.65; ft 0.50 / 0.45; lp (no bn row
    # for client c1 in seed 1 -> NaN split there).
    g = {("global_model", "c0"): 0.80, ("global_model", "c1"): 0.70, ("bn_adapt", "c0"): 0.60,
         ("bn_adapt", "c1"): 0.65, ("ft", "c0"): 0.50, ("ft", "c1"): 0.45}
    rows = [{"seed": 0, "strategy": s, "client_id": c, "global_acc": v} for (s, c), v in g.items()]
    out = global_drop_split(pd.DataFrame(rows)).set_index(["strategy", "client_id"])
    assert out.loc[("ft", "c0"), "global_drop"] == pytest.approx(0.30)
    assert out.loc[("ft", "c0"), "global_drop_bn"] == pytest.approx(0.20)
    assert out.loc[("ft", "c0"), "global_drop_weights"] == pytest.approx(0.10)
    assert out.loc[("ft", "c1"), "global_drop_bn"] == pytest.approx(0.05)
    assert out.loc[("ft", "c1"), "global_drop_weights"] == pytest.approx(0.20)
    assert out.loc[("global_model", "c1"), "global_drop"] == pytest.approx(0.0)
    table = drop_split_table(pd.DataFrame(rows)).set_index("strategy")
    assert table.loc["ft", "global_drop_mean"] == pytest.approx(0.275)  # (0.30 + 0.25) / 2
    assert table.loc["ft", "global_drop_bn_mean"] == pytest.approx(0.125)
    no_bn = global_drop_split(pd.DataFrame([r for r in rows if r["strategy"] != "bn_adapt"]))
    assert no_bn.global_drop_bn.isna().all() and no_bn.global_drop.notna().all()


def test_one_seed_table_prints_values_alone_and_says_so_once():
    md = format_markdown(summary_table(pd.DataFrame(_rows(0, "ft", [[0.9, 0.3], [0.5, 0.7]]))))
    assert "(0.00)" not in md and "(" not in md.split("\n")[2]  # the FT row: no std anywhere
    assert md.count("1 seed") == 1


def test_every_column_of_the_table_has_one_legend_line():
    from hf_lpft.evaluation.metrics import COLUMN_LEGEND, EXTRA_COLUMNS, METRIC_HEADERS

    rows = [r | {"distortion_local": 0.1, "distortion_global": 0.2} for r in _rows(0, "ft", [[0.9, 0.3], [0.5, 0.7]])]
    md = format_markdown(summary_table(pd.DataFrame(rows)))
    for header in (*METRIC_HEADERS, *EXTRA_COLUMNS.values()):
        assert sum(line.startswith(f"- **{header}**: ") for line in md.splitlines()) == 1, header
        assert COLUMN_LEGEND[header] in md
    assert "Global < global model" in md and "FedAvg global model" in md
    assert "- **" not in format_markdown(summary_table(pd.DataFrame(rows)), legend=False)


def test_drop_split_reads_na_for_strategies_that_keep_batchnorm_frozen():
    from hf_lpft.evaluation.metrics import drop_split_table, format_drop_split, global_drop_split, split_exemptions
    from hf_lpft.strategies import get_strategy

    describe = {name: get_strategy(name)().describe() for name in ("lp", "ft", "lp_ft", "bn_adapt")}
    exempt = split_exemptions(describe)
    assert set(exempt) == {"lp"}  # derived from the phases' bn, not from a list of names
    g = {"global_model": 0.80, "bn_adapt": 0.60, "ft": 0.50, "lp": 0.70}
    rows = pd.DataFrame([{"seed": 0, "strategy": s, "client_id": "c0", "global_acc": v} for s, v in g.items()])
    out = global_drop_split(rows, exempt=exempt).set_index("strategy")
    assert out.loc["lp", "global_drop"] == pytest.approx(0.10) and np.isnan(out.loc["lp", "global_drop_bn"])
    assert out.loc["ft", "global_drop_bn"] == pytest.approx(0.20)
    md = format_drop_split(drop_split_table(rows, exempt=exempt))
    lp_line = next(line for line in md.splitlines() if line.startswith("| LP |"))
    ft_line = next(line for line in md.splitlines() if line.startswith("| FT |"))
    assert "10.00" in lp_line and "n/a: BatchNorm statistics stay frozen" in lp_line and "-" not in lp_line[5:10]
    assert ft_line == "| FT | 30.00 | 20.00 | 10.00 |"  # one seed: no (0.00)


def test_no_batchnorm_backbone_splits_no_strategy():
    from hf_lpft.evaluation.metrics import split_exemptions
    from hf_lpft.evaluation.report import drop_split_section

    describe = {name: {"phases": [{"bn": "train"}]} for name in ("ft", "bn_adapt")}
    exempt = split_exemptions(describe, batchnorm=False)
    assert set(exempt) == {"ft", "bn_adapt"} and "no BatchNorm" in exempt["ft"]
    rows = pd.DataFrame([{"seed": 0, "strategy": s, "client_id": "c0", "global_acc": 0.5}
                         for s in ("global_model", "bn_adapt", "ft")])
    text = "\n".join(drop_split_section(rows, exempt))
    assert "Not split: the backbone has no BatchNorm layer" in text and "add bn_adapt" not in text
