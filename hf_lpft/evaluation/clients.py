"""A model on every client's test split: accuracy, distortion, result rows, epoch curves.

Local is client i's model on its own test split, Global on the other clients' test splits (the metrics
of arXiv 2511.12695, Table 2); the epoch curves are its Figure 2. The functions take :class:`EvalSettings`
(built from the config by ``hf_lpft.run.settings.eval_settings``), not the config.

With more than ``EvalSettings.global_clients`` + 1 clients, every model of client i (each strategy's and the
global model's) is scored only on its own split and a seeded sample of K other clients' splits
(:func:`scored_others`, drawn from (run seed, i) alone, so the comparison between strategies stays paired):
Global is then an estimate with a standard error (``global_acc_se``) and the rows say which clients were
scored (``global_sample``); unscored entries of ``acc_by_client`` are NaN. Exact runs write neither column."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from hf_lpft._faults import fault_point
from hf_lpft.data.tensors import ClientData
from hf_lpft.evaluation.distortion import distortion_by_client, extract_features, features_and_predictions
from hf_lpft.evaluation.metrics import (
    format_markdown,
    global_drop_split,
    global_estimate,
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
        global_clients: At most this many other clients score each model (``run.global_eval_clients``): with
            more, a seeded sample of this many (Global estimated); None = every other client (exact).
    """

    batch_size: int
    distortion: bool
    eval_every: int
    global_clients: int | None = None

    def sample(self, n: int, i: int, seed: int) -> list[int] | None:
        """The other clients client i's models are scored on (:func:`scored_others`); None = all (exact)."""
        return scored_others(n, i, k=self.global_clients, seed=seed)


# Mixed into the sample's seed so that it draws a stream of its own, not one a training seed also draws.
SAMPLE_STREAM = 2611


def scored_others(n: int, i: int, *, k: int | None, seed: int) -> list[int] | None:
    """K of the n-1 clients other than i, drawn uniformly without replacement from (run seed, i): the same for every
    strategy and for the global model's row i, so strategies are compared on the same clients. None (score every
    client: Global exact) when ``k`` is None or ``k >= n - 1``."""
    if k is None or k >= n - 1:
        return None
    rng = np.random.default_rng([SAMPLE_STREAM, seed, i])
    others = np.delete(np.arange(n), i)
    return sorted(int(j) for j in rng.choice(others, size=k, replace=False))


def scored(n: int, i: int, sample: list[int] | None) -> list[int]:
    """Indices of the test splits a model of client i is evaluated on: all, or its own and the sample's."""
    return list(range(n)) if sample is None else sorted([i, *sample])


def spread(n: int, indices: list[int], values: list[float]) -> list[float]:
    """A row over all n clients with ``values`` at ``indices`` and NaN elsewhere (the unscored pairs)."""
    row = [float("nan")] * n
    for j, v in zip(indices, values):
        row[j] = v
    return row


def cross_accuracy(model, clients: list[ClientData], *, settings: EvalSettings, device,
                   shared: SharedBackbone | None = None, only: list[int] | None = None) -> list[float]:
    """The model's accuracy on every client's test split (row of the cross-client matrix); from θ_G's
    features computed once (``shared``) when the model's backbone is θ_G's (e.g. LP). ``only``: score these
    clients' splits alone (NaN elsewhere)."""
    if only is not None:
        picked = [clients[j] for j in only]
        sub = shared.subset(only) if shared is not None else None
        return spread(len(clients), only, cross_accuracy(model, picked, settings=settings, device=device, shared=sub))
    if shared is not None and (accs := shared.accuracies(model)) is not None:
        return accs
    return [accuracy(model, c.test_x, c.test_y, batch_size=settings.batch_size, device=device) for c in clients]


def evaluate_on_clients(model, clients: list[ClientData], i: int, *, settings: EvalSettings, device,
                        reference: list | None = None, shared: SharedBackbone | None = None,
                        sample: list[int] | None = None) -> tuple[list[float], dict]:
    """Accuracy on every client's test split and, given the start model's features there (``reference``),
    the distortion columns (hf_lpft.evaluation.distortion), from one forward pass per split. ``sample``: the
    other clients to score (:meth:`EvalSettings.sample`); the others' entries are NaN and Δ / CKA on the others
    are means over the sample."""
    if sample is not None:
        only = scored(len(clients), i, sample)
        accs, dist = evaluate_on_clients(model, [clients[j] for j in only], only.index(i), settings=settings,
                                         device=device, shared=shared.subset(only) if shared is not None else None,
                                         reference=[reference[j] for j in only] if reference is not None else None)
        return spread(len(clients), only, accs), dist
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


def local_and_global(accs: list[float], i: int, sample: list[int] | None) -> tuple[float, float, dict]:
    """Local, Global and, for a sampled Global, the row's extra columns (``global_acc_se``, ``global_sample``)."""
    if sample is None:
        return (*local_global(accs, i), {})
    global_, se = global_estimate(accs, sample)
    return float(accs[i]), global_, {"global_acc_se": se, "global_sample": list(sample)}


def result_row(seed: int, strategy: str, i: int, client: ClientData, accs: list[float],
               final_loss: float | None, *, sample: list[int] | None = None) -> dict:
    """One ``results.parquet`` row: a (seed, strategy, client) unit's Local and Global accuracy; with a
    ``sample`` of other clients, Global is its estimate and the row adds ``global_acc_se`` and ``global_sample``."""
    local, global_, extra = local_and_global(accs, i, sample)
    se = {"global_acc_se": extra["global_acc_se"]} if extra else {}
    return {"seed": seed, "strategy": strategy, "client_id": client.client_id, "client_index": i,
            "n_train": client.n_train, "n_test": client.n_test, "local_acc": local, "global_acc": global_, **se,
            "acc_by_client": accs, "final_train_loss": final_loss,
            **({"global_sample": extra["global_sample"]} if extra else {})}


def global_model_accuracies(settings: EvalSettings, global_model: SplitModel, clients: list[ClientData],
                            client_bn: dict | None, device, *, seed: int = 0) -> list[list[float]]:
    """Row i: accuracies on every client's test split of the model client i personalizes from (the
    ``global_model`` rows: with FedBN, θ_G with client i's BatchNorm, also on the other clients' data); with a
    sampled Global, on client i's own split and its sample (``seed``'s, :meth:`EvalSettings.sample`) only."""
    n = len(clients)
    samples = [settings.sample(n, i, seed) for i in range(n)]
    if not client_bn:
        row = cross_accuracy(global_model, clients, settings=settings, device=device)  # one model: O(N) anyway
        return [row if s is None else spread(n, scored(n, i, s), [row[j] for j in scored(n, i, s)])
                for i, s in enumerate(samples)]
    return [cross_accuracy(client_global_model(global_model, client_bn, c.client_id), clients, settings=settings,
                           device=device, only=None if s is None else scored(n, i, s))
            for i, (c, s) in enumerate(zip(clients, samples))]


def epoch_curve_callback(settings: EvalSettings, clients: list[ClientData], i: int, curves: list, device,
                         reference: list | None = None, strategy=None, sample: list[int] | None = None):
    """Record Local and Global (and, with ``reference``, Δ) every ``settings.eval_every`` epochs (counted across
    phases); with a ``sample``, Global is its estimate."""
    counter = {"epoch": 0}

    def callback(model, phase: str, epoch: int, loss: float) -> None:
        fault_point("personalize_epoch")
        counter["epoch"] += 1
        if settings.eval_every and counter["epoch"] % settings.eval_every == 0:
            view = strategy.eval_view(model) if strategy is not None else model
            accs, dist = evaluate_on_clients(view, clients, i, settings=settings, device=device, reference=reference,
                                             sample=sample)
            local, global_, _ = local_and_global(accs, i, sample)
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
