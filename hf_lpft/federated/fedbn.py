"""FedBN (``fedavg.bn: local``): the global model a client starts from carries the client's own BatchNorm."""

from __future__ import annotations

import copy

from hf_lpft.federated.fedavg import load_client_bn
from hf_lpft.models.backbone import SplitModel


def client_global_model(global_model: SplitModel, client_bn: dict | None, client_id: str) -> SplitModel:
    """The global model client ``client_id`` starts from: with FedBN (``fedavg.bn: local``) a copy that
    carries the client's own BatchNorm tensors (saved with the last FedAvg round), otherwise θ_G itself."""
    if not client_bn or client_id not in client_bn:
        return global_model
    return load_client_bn(copy.deepcopy(global_model), client_bn, client_id).eval()
