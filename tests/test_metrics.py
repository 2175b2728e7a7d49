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
