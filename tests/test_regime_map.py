"""The regime map's shipped axes (all four shift kinds of the paper), and its table read back from Markdown so a
map that grows over several sessions can be tabulated and drawn from the committed tables of earlier cells."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hf_lpft.studies import regime_map as R

FOLDER = Path(__file__).parents[1] / "recipes" / "configs" / "regime"
EARLIER = Path(__file__).parents[1] / "benchmarks" / "regime_map" / "regime_map_issue14.md"


def test_shipped_axes_cover_the_four_shift_kinds(tmp_path):
    cells = R.load_cells(FOLDER, output_dir=tmp_path)
    shifts = {c.shift: c.config.data for c in cells}
    assert set(shifts) == {"one_domain_a_client", "dirichlet_0.1", "corruption_50_clients", "spurious_correlation"}
    assert len(cells) == 2 * 4 * 4
    assert shifts["corruption_50_clients"].dataset == "digits-c" and shifts["corruption_50_clients"].num_clients == 50
    assert shifts["spurious_correlation"].dataset == "spurious-digits" and shifts["spurious_correlation"].num_classes == 2
    chosen = R.select_cells(cells, "batchnorm/spurious_correlation/adam_lr5e-4_logreg*")
    assert [c.dose for c in chosen] == ["adam_lr5e-4", "adam_lr5e-4_logreg_probe_ft_lr0.1x"]  # + the rows it borrows


def _table() -> pd.DataFrame:
    rows = []
    for k, (norm, shift, dose) in enumerate([("batchnorm", "s1", "d1"), ("groupnorm", "s2", "d2")]):
        row = {"norm": norm, "shift": shift, "dose": dose, "seeds": 3, "lpft_minus_ft_local": -0.0123 * (k + 1),
               "lpft_minus_ft_local_std": 0.0045, "lpft_minus_ft_global": 0.1092 - k, "lpft_minus_ft_global_std": 0.012,
               "verdict": "LP-FT higher", "ft_global_drop": 0.1, "ft_global_drop_bn": 0.05}
        row |= {f"{s}_{m}": 0.5 for s in R.ROWS for m in ("local_acc", "global_acc")}
        rows.append(row)
    return pd.DataFrame(rows)


def test_markdown_round_trip_keeps_axes_and_differences():
    table = _table()
    back = R.table_from_markdown(R.format_regime_table(table))
    assert list(back[["norm", "shift", "dose"]].itertuples(index=False, name=None)) == [
        ("batchnorm", "s1", "d1"), ("groupnorm", "s2", "d2")]
    for col in ("lpft_minus_ft_local", "lpft_minus_ft_global", "lpft_minus_ft_global_std"):
        np.testing.assert_allclose(back[col], table[col], atol=5e-5)  # printed with two decimals in points
    with pytest.raises(ValueError, match="cannot read global cell 'x'"):
        R.table_from_markdown("| a | b | c | 3 | +1.00 (0.10) | x | v |")


def test_earlier_tables_join_the_heatmap(tmp_path):
    earlier = R.table_from_markdown(EARLIER.read_text())
    assert len(earlier) == 16 and earlier.seeds.eq(3).all()  # the committed 16 cells of issue 14
    current = _table().iloc[:1].assign(norm="batchnorm", shift="one_domain_a_client", dose="sgd_lr0.01")
    merged = R.merge_tables(current, [earlier])
    assert len(merged) == 16  # the cell run now replaces its earlier reading
    again = merged[(merged["shift"] == "one_domain_a_client") & (merged.dose == "sgd_lr0.01")
                   & (merged.norm == "batchnorm")]
    assert again.lpft_minus_ft_global.item() == pytest.approx(0.1092)
    assert R.plot_regime_map(merged, tmp_path / "all.png").stat().st_size > 0
