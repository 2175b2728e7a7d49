"""Offline evaluate metrics against hand-made predictions."""

import evaluate
import numpy as np
import pytest

from hf_lpft.evaluation.hf_metrics import Accuracy, FederatedSummary, accuracy_matrix, load_metric

# A[i, j] = accuracy of client i's model on client j's test split (two examples per pair).
A = np.array([[1.0, 0.5, 0.0],
              [0.5, 1.0, 0.5],
              [0.0, 0.0, 0.5]])
PREDS_FOR = {1.0: [0, 1], 0.5: [0, 0], 0.0: [1, 0]}  # against references [0, 1]


def _examples():
    rows = {"predictions": [], "references": [], "model_client": [], "data_client": []}
    for i in range(3):
        for j in range(3):
            rows["predictions"] += PREDS_FOR[A[i, j]]
            rows["references"] += [0, 1]
            rows["model_client"] += [i, i]
            rows["data_client"] += [j, j]
    return rows


def test_accuracy_metric_is_an_offline_evaluate_metric():
    metric = load_metric("accuracy")
    assert isinstance(metric, evaluate.Metric)
    assert metric.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2]) == {"accuracy": 0.75}
    metric.add_batch(predictions=[1, 1], references=[1, 0])
    metric.add(predictions=3, references=3)
    assert metric.compute()["accuracy"] == pytest.approx(2 / 3)


def test_accuracy_matrix_from_tagged_predictions():
    ex = _examples()
    np.testing.assert_allclose(accuracy_matrix(ex["predictions"], ex["references"], ex["model_client"],
                                               ex["data_client"]), A)


def test_federated_summary_hand_computed():
    out = FederatedSummary().compute(**_examples(), reference_global=[0.3, 0.4, 0.1])
    local = [1.0, 1.0, 0.5]
    global_ = [0.25, 0.5, 0.0]  # mean over the *other* clients' splits: own split excluded
    assert out["local_per_client"] == local and out["global_per_client"] == global_
    assert out["local"] == pytest.approx(5 / 6)
    assert out["global"] == pytest.approx(0.25)
    assert out["c_std"] == pytest.approx(np.sqrt(1 / 18))  # population std of Local
    assert out["worst"] == 0.5
    assert out["avg_lg"] == pytest.approx((5 / 6 + 0.25) / 2)
    assert out["avg_lgw"] == pytest.approx((5 / 6 + 0.25 + 0.5) / 3)
    assert out["below_global_share"] == pytest.approx(2 / 3)  # clients 0 and 2 fell below the global model
    np.testing.assert_allclose(out["accuracy_matrix"], A)


def test_federated_summary_streams_batches_and_omits_share_without_reference():
    ex = _examples()
    metric = load_metric("federated_summary")
    half = len(ex["predictions"]) // 2
    metric.add_batch(**{k: v[:half] for k, v in ex.items()})
    metric.add_batch(**{k: v[half:] for k, v in ex.items()})
    out = metric.compute()
    assert out["global"] == pytest.approx(0.25) and "below_global_share" not in out


def test_federated_summary_rejects_missing_pairs_and_unknown_metric():
    ex = {k: v[:-2] for k, v in _examples().items()}  # drop client 2's model on client 2's split
    with pytest.raises(ValueError, match="client 2's test split scored by client 2's model"):
        FederatedSummary().compute(**ex)
    with pytest.raises(ValueError, match="not available offline"):
        load_metric("bleu")
    assert isinstance(Accuracy(), evaluate.Metric)
