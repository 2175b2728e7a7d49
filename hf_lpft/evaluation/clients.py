"""A model on every client's test split: accuracy, distortion, result rows, epoch curves.

Local is client i's model on its own test split, Global on the other clients' test splits (the metrics
of arXiv 2511.12695, Table 2); the epoch curves are its Figure 2. The functions take :class:`EvalSettings`
(built from the config by ``hf_lpft.run.settings.eval_settings``), not the config."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from hf_lpft._faults import fault_point
from hf_lpft.data.tensors import ClientData
from hf_lpft.evaluation.distortion import distortion_by_client, extract_features, features_and_predictions
from hf_lpft.evaluation.metrics import (
    format_markdown,
    global_drop_split,
    local_global,
    split_exemptions,
    summary_table,
)
from hf_lpft.evaluation.report import cross_client_frame, has_batchnorm
from hf_lpft.evaluation.shared_features import SharedBackbone
from hf_lpft.federated.fedbn import client_global_model
from hf_lpft.io import atomic_path, write_text
from hf_lpft.layout import RunLayout
from hf_lpft.models.backbone import SplitModel
from hf_lpft.train.loop import accuracy

NO_DISTORTION = {"distortion_local": float("nan"), "distortion_global": float("nan"),
                 "cka_local": float("nan"), "cka_global": float("nan")}
# A global_model row compares the model a client starts from with itself: Δ = 0 and CKA = 1 by definition
# (NaN, like every row, when run.distortion is off).
SELF_DISTORTION = {"distortion_local": 0.0, "distortion_global": 0.0, "cka_local": 1.0, "cka_global": 1.0}


@dataclass(frozen=True)
class EvalSettings:
    """How models are evaluated on the clients' test splits.

    Args:
        batch_size: Examples per forward pass (``run.eval_batch_size``).
        distortion: Whether result rows get the distortion and CKA columns (``run.distortion``).
        eval_every: Record the epoch curves every this many personalization epochs; 0 = no curves
            (``pft.eval_every``).
    """

    batch_size: int
    distortion: bool
    eval_every: int


def cross_accuracy(model, clients: list[ClientData], *, settings: EvalSettings, device,
                   shared: SharedBackbone | None = None) -> list[float]:
    """The model's accuracy on every client's test split (row of the cross-client matrix); from θ_G's
    features computed once (``shared``) when the model's backbone is θ_G's (e.g. LP)."""
    if shared is not None and (accs := shared.accuracies(model)) is not None:
        return accs
    return [accuracy(model, c.test_x, c.test_y, batch_size=settings.batch_size, device=device) for c in clients]


def evaluate_on_clients(model, clients: list[ClientData], i: int, *, settings: EvalSettings, device,
                        reference: list | None = None,
                        shared: SharedBackbone | None = None) -> tuple[list[float], dict]:
    """Accuracy on every client's test split and, given the start model's features there (``reference``),
    the distortion columns (hf_lpft.evaluation.distortion), from one forward pass per split."""
    if reference is None:
        return cross_accuracy(model, clients, settings=settings, device=device, shared=shared), dict(NO_DISTORTION)
    if shared is not None and (accs := shared.accuracies(model)) is not None:
        return accs, distortion_by_client(reference, reference, i)  # θ_G's backbone bit for bit: Δ = 0
    accs, feats = [], []
    for c in clients:
        f, pred = features_and_predictions(model, c.test_x, batch_size=settings.batch_size, device=device)
        feats.append(f)
        accs.append((pred == c.test_y).float().mean().item() if len(c.test_y) else float("nan"))
    return accs, distortion_by_client(reference, feats, i)


def reference_features(settings: EvalSettings, global_model: SplitModel, clients: list[ClientData],
                       client_bn: dict | None, device) -> list[list] | None:
    """Per client i: head-input features, on every client's test split, of the model client i starts from
    (θ_G, or with FedBN θ_G with client i's BatchNorm); None when ``settings.distortion`` is off."""
    if not settings.distortion:
        return None

    def feats(model):
        return [extract_features(model, c.test_x, batch_size=settings.batch_size, device=device) for c in clients]
    if not client_bn:
        return [feats(global_model)] * len(clients)
    return [feats(client_global_model(global_model, client_bn, c.client_id)) for c in clients]


def result_row(seed: int, strategy: str, i: int, client: ClientData, accs: list[float],
               final_loss: float | None) -> dict:
    """One ``results.parquet`` row: a (seed, strategy, client) unit's Local and Global accuracy."""
    local, global_ = local_global(accs, i)
    return {"seed": seed, "strategy": strategy, "client_id": client.client_id, "client_index": i,
            "n_train": client.n_train, "n_test": client.n_test, "local_acc": local, "global_acc": global_,
            "acc_by_client": accs, "final_train_loss": final_loss}


def global_model_accuracies(settings: EvalSettings, global_model: SplitModel, clients: list[ClientData],
                            client_bn: dict | None, device) -> list[list[float]]:
    """Row i: accuracies on every client's test split of the model client i personalizes from (the
    ``global_model`` rows: with FedBN, θ_G with client i's BatchNorm, also on the other clients' data)."""
    if not client_bn:
        return [cross_accuracy(global_model, clients, settings=settings, device=device)] * len(clients)
    return [cross_accuracy(client_global_model(global_model, client_bn, c.client_id), clients, settings=settings,
                           device=device) for c in clients]


def epoch_curve_callback(settings: EvalSettings, clients: list[ClientData], i: int, curves: list, device,
                         reference: list | None = None, strategy=None):
    """Record Local and Global (and, with ``reference``, Δ) every ``settings.eval_every`` epochs (counted across
    phases)."""
    counter = {"epoch": 0}

    def callback(model, phase: str, epoch: int, loss: float) -> None:
        fault_point("personalize_epoch")
        counter["epoch"] += 1
        if settings.eval_every and counter["epoch"] % settings.eval_every == 0:
            view = strategy.eval_view(model) if strategy is not None else model
            accs, dist = evaluate_on_clients(view, clients, i, settings=settings, device=device, reference=reference)
            local, global_ = local_global(accs, i)
            curves.append({"epoch": counter["epoch"], "phase": phase, "train_loss": loss, "local_acc": local,
                           "global_acc": global_, "distortion_local": dist["distortion_local"],
                           "distortion_global": dist["distortion_global"]})
    return callback


def write_curves(layout: RunLayout, records: list[dict]) -> None:
    """Epoch curves (Local/Global every k epochs), when recorded, as ``curves.parquet``."""
    rows = [{k: r["row"][k] for k in ("seed", "strategy", "client_id")} | c for r in records for c in r["curves"]]
    if rows:
        with atomic_path(layout.curves) as tmp:
            pd.DataFrame(rows).to_parquet(tmp, index=False)


def write_results(layout: RunLayout, rows: list[dict], *, strategies: dict[str, dict] | None = None
                  ) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """``results.parquet`` and ``summary.md``; rows of failed clients are kept with their error.

    ``strategies``: ``Strategy.describe()`` per strategy; their phases say where the Global-drop split applies.
    """
    # + where Global went: BN statistics vs weights (n/a for strategies that never touch BatchNorm statistics)
    exempt = split_exemptions(strategies or {}, batchnorm=has_batchnorm(layout.root))
    results = global_drop_split(pd.DataFrame(rows), exempt=exempt)
    with atomic_path(layout.results) as tmp:
        results.to_parquet(tmp, index=False)
    failed = results[results.error.notna()]
    summary = summary_table(results[results.error.isna()])
    markdown = format_markdown(summary)
    if len(failed):
        markdown += "\n\nFailed (excluded from the table): " + ", ".join(
            f"{r.strategy}/{r.client_id}/seed {r.seed}" for r in failed.itertuples())
    write_text(layout.summary, markdown + "\n")
    return results, summary, markdown


def write_cross_client(layout: RunLayout, results: pd.DataFrame) -> None:
    """``cross_client.parquet``: the model of client i on the test split of client j."""
    with atomic_path(layout.cross_client) as tmp:
        cross_client_frame(results).to_parquet(tmp, index=False)
