"""report.md, figures, distortion columns, cross-client matrix and trackers on a tiny end-to-end run."""

import importlib.util
import shutil

import numpy as np
import pandas as pd
import pytest

from hf_lpft.config import ConfigError, load_config
from hf_lpft.evaluation.clients import NO_DISTORTION, evaluate_on_clients, reference_features
from hf_lpft.evaluation.report import cross_client_frame, cross_client_matrix, write_report
from hf_lpft.layout import RunLayout
from hf_lpft.pipeline import run
from hf_lpft.run.settings import eval_settings

PNG = b"\x89PNG\r\n\x1a\n"
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def _cfg(tmp_path, name, path, **run_extra):
    return load_config(None, {
        "data": {"dataset": path, "num_classes": 4}, "fedavg": {"rounds": 1, "batch_size": 16},
        "pft": {"strategies": ["ft", "lp"], "epochs": 1, "batch_size": 16, "eval_every": 1},
        "run": {"output_dir": str(tmp_path / name), **run_extra}})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_ds_path):
    """One run serves every test here (runs are the slow part); it logs to TensorBoard when installed."""
    report_to = "tensorboard" if HAS_TENSORBOARD else "none"
    return run(_cfg(tmp_path_factory.mktemp("report"), "run", tiny_ds_path, report_to=report_to))


def test_results_carry_distortion_against_the_global_model(tiny_run):
    df = tiny_run.results
    for col in ["distortion_local", "distortion_global", "cka_local", "cka_global"]:
        assert df[col].notna().all(), col
    g = df[df.strategy == "global_model"]
    assert (g.distortion_local == 0).all() and (g.distortion_global == 0).all() and (g.cka_local == 1).all()
    assert (df[df.strategy == "ft"].distortion_local > 0).all()  # every weight and BN statistic moved
    # LP trains the head only with BatchNorm frozen: the head-input features cannot change.
    lp = df[df.strategy == "lp"]
    assert (lp.distortion_local == 0).all() and (lp.distortion_global == 0).all()
    assert "Δ own" in tiny_run.markdown and "Δ own" in (tiny_run.output_dir / "summary.md").read_text()


def test_cross_client_and_curves_files(tiny_run):
    out = tiny_run.output_dir
    cross = pd.read_parquet(out / "cross_client.parquet")
    assert len(cross) == 3 * 3 * 3  # (global model, ft, lp) x 3 model clients x 3 test splits
    row = tiny_run.results.query("strategy == 'ft' and client_id == 'b'").iloc[0]
    diag = cross.query("strategy == 'ft' and model_client == 'b' and data_client == 'b'").accuracy.item()
    assert diag == pytest.approx(row.local_acc)
    others = cross.query("strategy == 'ft' and model_client == 'b' and data_client != 'b'").accuracy.mean()
    assert others == pytest.approx(row.global_acc)
    matrix = cross_client_matrix(cross, "ft")  # what the heatmap shows
    assert matrix.shape == (3, 3) and list(matrix.index) == list(matrix.columns) == ["a", "b", "c"]
    np.testing.assert_allclose(matrix.loc["b"].to_numpy(), row.acc_by_client)
    curves = pd.read_parquet(out / "curves.parquet")
    assert set(curves.strategy) == {"ft", "lp"} and (curves.epoch == 1).all()
    assert {"local_acc", "global_acc", "distortion_local", "distortion_global"} <= set(curves.columns)
    # One epoch: the curve's last point is the final model.
    ft_b = curves.query("strategy == 'ft' and client_id == 'b'").iloc[-1]
    assert ft_b.global_acc == pytest.approx(row.global_acc) and ft_b.distortion_local == pytest.approx(
        row.distortion_local)


def test_report_summary_first_then_figures(tiny_run):
    out = tiny_run.output_dir
    text = (out / "report.md").read_text()
    sections = ["## Summary", "## Feature distortion", "## Epoch curves", "## Cross-client"]
    positions = [text.index(s) for s in sections]
    assert positions == sorted(positions)
    assert "| LP |" in text and "| global model | 0 |" in text
    for name in ["distortion_vs_global", "epoch_curves", "cross_client"]:
        assert f"figures/{name}.png" in text
        assert (out / "figures" / f"{name}.png").read_bytes()[:8] == PNG
    assert not list(out.rglob("*.tmp"))


def test_report_without_distortion_curves_or_cross_file(tiny_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_run.output_dir, out, ignore=shutil.ignore_patterns("clients", "global", "checkpoints"))
    df = pd.read_parquet(out / "results.parquet")
    df[["distortion_local", "distortion_global"]] = np.nan
    df.to_parquet(out / "results.parquet", index=False)
    (out / "curves.parquet").unlink()
    (out / "cross_client.parquet").unlink()
    shutil.rmtree(out / "figures")
    text = write_report(RunLayout.without_seeds(out)).read_text()
    assert "Not measured" in text and "set pft.eval_every > 0" in text and "Δ own" not in text
    assert (out / "figures" / "cross_client.png").read_bytes()[:8] == PNG  # rebuilt from acc_by_client
    assert len(cross_client_frame(df)) == 27


def test_report_to_is_validated():
    with pytest.raises(ConfigError, match="run.report_to='mlflow'"):
        load_config(None, {"run": {"report_to": "mlflow"}})


def test_distortion_switched_off_gives_nan_columns(tiny_run, tiny_clients):
    cfg = _cfg(tiny_run.output_dir.parent, "unused", "unused", distortion=False)
    from hf_lpft.models.backbone import SplitModel

    model = SplitModel.from_pretrained(tiny_run.output_dir / "global")
    settings = eval_settings(cfg.run, cfg.pft)
    assert reference_features(settings, model, tiny_clients, None, "cpu") is None
    accs, dist = evaluate_on_clients(model, tiny_clients, 0, settings=settings, device="cpu", reference=None)
    assert all(np.isnan(v) for v in dist.values()) and set(dist) == set(NO_DISTORTION)
    on = _cfg(tiny_run.output_dir.parent, "u", "u")
    refs = reference_features(eval_settings(on.run, on.pft), model, tiny_clients, None, "cpu")
    accs2, same = evaluate_on_clients(model, tiny_clients, 0, settings=settings, device="cpu", reference=refs[0])
    assert accs2 == accs and same["distortion_local"] == 0.0  # one-pass accuracy equals cross_accuracy


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install tensorboard)")
def test_report_to_tensorboard_logs_fedavg_and_units(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tiny_run.output_dir / "logs").rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for e in events:
        acc = EventAccumulator(str(e.parent))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert "seed_0/fedavg/global_test_acc" in tags
    assert {"seed_0/ft/a/local_acc", "seed_0/lp/c/global_acc", "seed_0/ft/b/curve/global_acc"} <= tags


def test_one_seed_report_explains_its_columns_and_splits_only_where_it_applies(tiny_run, tmp_path):
    """Legend under the table in summary.md, report.md and the console text; no '(0.00)' for one seed; with a
    BN-adapt reference, LP's split (BatchNorm frozen in every phase, per the run record) reads n/a."""
    for text in (tiny_run.markdown, (tiny_run.output_dir / "summary.md").read_text(),
                 (tiny_run.output_dir / "report.md").read_text()):
        assert "(0.00)" not in text and "1 seed" in text
        assert "- **Global < global model**: " in text and "- **Avg (L+G)/2**: " in text and "- **Δ own**: " in text
    out = tmp_path / "copy"
    shutil.copytree(tiny_run.output_dir, out, ignore=shutil.ignore_patterns("clients", "global", "checkpoints"))
    df = pd.read_parquet(out / "results.parquet")
    bn = df[df.strategy == "global_model"].assign(strategy="bn_adapt", global_acc=lambda d: d.global_acc - 0.1)
    pd.concat([df, bn]).to_parquet(out / "results.parquet", index=False)
    text = write_report(RunLayout.without_seeds(out)).read_text()
    section = text[text.index("## Where Global goes"):text.index("## Feature distortion")]
    lp = next(line for line in section.splitlines() if line.startswith("| LP |"))
    ft = next(line for line in section.splitlines() if line.startswith("| FT |"))
    assert "n/a: BatchNorm statistics stay frozen" in lp
    assert "n/a" not in ft and "(0.00)" not in section


def test_has_batchnorm_reads_the_saved_global_model(tiny_run, tmp_path):
    from hf_lpft.evaluation.report import has_batchnorm

    assert has_batchnorm(tiny_run.output_dir)  # timm test_resnet
    assert has_batchnorm(tmp_path)  # nothing saved yet: split as usual
    import torch
    from safetensors.torch import save_file

    (tmp_path / "global").mkdir()
    save_file({"head.weight": torch.zeros(2, 2), "norm.weight": torch.ones(2)}, str(tmp_path / "global/model.safetensors"))
    assert not has_batchnorm(tmp_path)  # LayerNorm only (a text backbone)
