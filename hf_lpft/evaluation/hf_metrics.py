"""The project's metrics as offline ``evaluate.Metric`` subclasses.

``evaluate.load("accuracy")`` fetches its script from the Hub, which is not reachable offline, so the
metrics are defined here and instantiated directly (or by name through :func:`load_metric`); they
support ``add_batch`` / ``add`` / ``compute`` like any ``evaluate`` module.

* :class:`Accuracy` -- top-1 accuracy of class predictions.
* :class:`FederatedSummary` -- the paper's per-method summary (Chen et al., arXiv 2511.12695, Table 2)
  from per-example predictions tagged with ``model_client`` (whose personalized model predicted) and
  ``data_client`` (whose test split the example is from). It builds the cross-client accuracy matrix
  and delegates the maths to :mod:`hf_lpft.evaluation.metrics` (Local, Global over the *other*
  clients, C-Std, Worst, both Averages), so the two can never disagree.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from hf_lpft.evaluation.metrics import local_global, summarize_clients

_CITATION = """@article{chen2025closer,
  title={A Closer Look at Personalized Fine-Tuning in Heterogeneous Federated Learning},
  author={Chen, Minghui and Ghoukasian, Hrad and Jin, Ruinan and Wang, Zehua and Karimireddy, Sai Praneeth
          and Li, Xiaoxiao},
  journal={arXiv preprint arXiv:2511.12695}, year={2025}}"""


class Accuracy(evaluate.Metric):
    """Top-1 accuracy: share of ``predictions`` equal to ``references`` (NaN for no examples)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Top-1 accuracy (offline, hf_lpft).", citation="",
            inputs_description="predictions: predicted class ids; references: true class ids.",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}))

    def _compute(self, predictions, references) -> dict:
        p, r = np.asarray(predictions), np.asarray(references)
        return {"accuracy": float((p == r).mean()) if len(r) else float("nan")}


def accuracy_matrix(predictions, references, model_client, data_client, num_clients: int | None = None) -> np.ndarray:
    """``A[i, j]`` = accuracy of client i's model on client j's test examples.

    Raises:
        ValueError: on a negative client index or an (i, j) pair with no examples.
    """
    p, r = np.asarray(predictions), np.asarray(references)
    m, d = np.asarray(model_client, dtype=int), np.asarray(data_client, dtype=int)
    if len(m) and min(m.min(), d.min()) < 0:
        raise ValueError("model_client and data_client must be client indices >= 0")
    n = num_clients if num_clients is not None else int(max(m.max(), d.max())) + 1 if len(m) else 0
    correct, count = np.zeros((n, n)), np.zeros((n, n))
    np.add.at(correct, (m, d), (p == r).astype(float))
    np.add.at(count, (m, d), 1.0)
    missing = np.argwhere(count == 0)
    if len(missing):
        i, j = missing[0]
        raise ValueError(f"no examples of client {j}'s test split scored by client {i}'s model "
                         f"({len(missing)} empty pairs); every model must predict on every client's split")
    return correct / count


class FederatedSummary(evaluate.Metric):
    """Local / Global / C-Std / Worst / Average of one method from cross-client predictions.

    Inputs per example: ``predictions``, ``references``, ``model_client`` (index of the client whose
    personalized model made the prediction) and ``data_client`` (index of the client whose test split
    holds the example). ``compute`` also takes ``num_clients`` (default: largest index + 1) and
    ``reference_global`` (the global model's Global per client, for the share of clients that fell
    below it).
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Federated personalization summary (Chen et al. 2025): Local, Global (other clients), "
                        "C-Std, Worst, (L+G)/2, (L+G+W)/3.",
            citation=_CITATION,
            inputs_description="predictions, references: class ids; model_client, data_client: client indices.",
            features=datasets.Features({k: datasets.Value("int64") for k in
                                        ("predictions", "references", "model_client", "data_client")}))

    def _compute(self, predictions, references, model_client, data_client, num_clients: int | None = None,
                 reference_global=None) -> dict:
        matrix = accuracy_matrix(predictions, references, model_client, data_client, num_clients)
        per_client = [local_global(matrix[i], i) for i in range(len(matrix))]
        local = np.array([lg[0] for lg in per_client])
        global_ = np.array([lg[1] for lg in per_client])
        out = summarize_clients(local, global_, reference_global, matrix)
        if reference_global is None:
            out.pop("below_global_share")
        return out | {"local_per_client": local.tolist(), "global_per_client": global_.tolist(),
                      "accuracy_matrix": matrix.tolist()}


METRICS: dict[str, type[evaluate.Metric]] = {"accuracy": Accuracy, "federated_summary": FederatedSummary}


def load_metric(name: str, **kwargs) -> evaluate.Metric:
    """The offline counterpart of ``evaluate.load(name)`` for this project's metrics."""
    if name not in METRICS:
        raise ValueError(f"metric {name!r} is not available offline; choose one of {sorted(METRICS)}")
    return METRICS[name](**kwargs)
