"""Any Hugging Face ``Dataset`` -> clients: flwr-datasets partitioners, per-client splits, a manifest.

The partition itself comes from flwr-datasets (``NaturalIdPartitioner``, ``DirichletPartitioner``);
what is ours is the bookkeeping: row indices of every client's train and test split, label histograms,
and a hashed manifest that rebuilds exactly the same federation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from sklearn.model_selection import train_test_split

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
SCHEMES = ("natural", "dirichlet")
_ROW = "__hf_lpft_row__"


class FederationError(ValueError):
    """The dataset cannot be federated as asked."""


@dataclass
class ClientSplit:
    """Row indices (into the source dataset) of one client's train and test split."""

    client_id: str
    train_indices: list[int]
    test_indices: list[int]
    label_hist_train: list[int] = field(default_factory=list)
    label_hist_test: list[int] = field(default_factory=list)


@dataclass
class Federation:
    """A partition of a dataset into clients, with the parameters that made it."""

    scheme: str
    params: dict
    seed: int
    num_rows: int
    num_classes: int
    clients: list[ClientSplit]

    @property
    def client_ids(self) -> list[str]:
        return [c.client_id for c in self.clients]

    def indices_hash(self) -> str:
        """SHA-256 over every client's id and indices: two federations match iff their hashes do."""
        payload = [[c.client_id, c.train_indices, c.test_indices] for c in self.clients]
        return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()

    def to_manifest(self) -> dict:
        return {"version": MANIFEST_VERSION, "scheme": self.scheme, "params": self.params, "seed": self.seed,
                "num_rows": self.num_rows, "num_classes": self.num_classes, "indices_sha256": self.indices_hash(),
                "clients": [{"client_id": c.client_id, "n_train": len(c.train_indices), "n_test": len(c.test_indices),
                             "label_hist_train": c.label_hist_train, "label_hist_test": c.label_hist_test,
                             "train_indices": c.train_indices, "test_indices": c.test_indices} for c in self.clients]}


def num_classes_of(ds: datasets.Dataset, label_column: str) -> int:
    """Class count from a ClassLabel feature, else max label + 1."""
    feature = ds.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    return int(max(ds[label_column])) + 1


def check_columns(ds: datasets.Dataset, columns: dict[str, str]) -> None:
    """Fail naming the missing column and the columns the dataset has."""
    for role, name in columns.items():
        if name not in ds.column_names:
            raise FederationError(f"{role}={name!r} is not a column of the dataset; columns: {ds.column_names}")


def _partitioner(scheme: str, *, partition_by: str, num_clients: int, alpha: float, min_partition_size: int, seed: int):
    from flwr_datasets.partitioner import DirichletPartitioner, NaturalIdPartitioner

    if scheme == "natural":
        return NaturalIdPartitioner(partition_by=partition_by)
    if scheme == "dirichlet":
        return DirichletPartitioner(num_partitions=num_clients, partition_by=partition_by, alpha=alpha,
                                    min_partition_size=min_partition_size, self_balancing=False, seed=seed)
    raise FederationError(f"scheme={scheme!r} is not allowed; choose one of {list(SCHEMES)}")


def _client_ids(scheme: str, partitioner, n: int) -> list[str]:
    if scheme == "natural":
        return [str(partitioner.partition_id_to_natural_id[i]) for i in range(n)]
    return [f"client_{i:02d}" for i in range(n)]


def _split(rows: np.ndarray, labels: np.ndarray, *, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified by label when every class has 2+ examples; otherwise a plain random split."""
    _, counts = np.unique(labels, return_counts=True)
    stratify = labels if counts.min() >= 2 and len(counts) <= test_fraction * len(rows) else None
    train, test = train_test_split(rows, test_size=test_fraction, random_state=seed, stratify=stratify)
    return sorted(int(i) for i in train), sorted(int(i) for i in test)


def _hist(labels: np.ndarray, rows: list[int], num_classes: int) -> list[int]:
    return np.bincount(labels[rows], minlength=num_classes).astype(int).tolist()


def federate(ds: datasets.Dataset, *, scheme: str = "natural", partition_by: str | None = None,
             label_column: str = "label", domain_column: str = "domain", num_clients: int = 5,
             alpha: float = 0.5, min_partition_size: int = 10, test_fraction: float = 0.25,
             max_examples_per_client: int | None = None, seed: int = 0) -> Federation:
    """Partition ``ds`` into clients, each with a stratified train/test split.

    Args:
        scheme: ``natural`` (one client per value of ``partition_by``, default ``domain_column``) or
            ``dirichlet`` (label skew with concentration ``alpha`` over ``partition_by``, default the label).
        max_examples_per_client: Cap (random subset) applied before the split.

    Raises:
        FederationError: unknown scheme or column, or fewer examples than clients.
    """
    partition_by = partition_by or (domain_column if scheme == "natural" else label_column)
    check_columns(ds, {"label_column": label_column, "partition_by": partition_by})
    if scheme == "dirichlet" and num_clients > len(ds):
        raise FederationError(f"num_clients={num_clients} exceeds the dataset's {len(ds)} examples")
    partitioner = _partitioner(scheme, partition_by=partition_by, num_clients=num_clients, alpha=alpha,
                               min_partition_size=min_partition_size, seed=seed)
    partitioner.dataset = ds.select_columns(list(dict.fromkeys([label_column, partition_by]))).add_column(_ROW, list(range(len(ds))))
    n = partitioner.num_partitions
    labels = np.asarray(ds[label_column])
    k = num_classes_of(ds, label_column)
    rng = np.random.default_rng(seed)
    clients = []
    for pid, cid in enumerate(_client_ids(scheme, partitioner, n)):
        rows = np.asarray(partitioner.load_partition(pid)[_ROW])
        if max_examples_per_client is not None and len(rows) > max_examples_per_client:
            rows = np.sort(rng.choice(rows, size=max_examples_per_client, replace=False))
        if len(rows) < 2:
            raise FederationError(f"client {cid!r} has {len(rows)} example(s); need >= 2 for a train/test split")
        train, test = _split(rows, labels[rows], test_fraction=test_fraction, seed=seed + pid)
        clients.append(ClientSplit(cid, train, test, _hist(labels, train, k), _hist(labels, test, k)))
    params = {"partition_by": partition_by, "label_column": label_column, "test_fraction": test_fraction,
              "max_examples_per_client": max_examples_per_client}
    if scheme == "dirichlet":
        params.update(num_clients=num_clients, alpha=alpha, min_partition_size=min_partition_size)
    return Federation(scheme, params, seed, len(ds), k, clients)


def save_manifest(federation: Federation, path: str | Path) -> Path:
    """Write the manifest as JSON atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(federation.to_manifest(), f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_manifest(path: str | Path, *, num_rows: int | None = None) -> Federation:
    """Rebuild a Federation from a manifest; verify its hash and, if given, the dataset size."""
    data = json.loads(Path(path).read_text())
    if data.get("version") != MANIFEST_VERSION:
        raise FederationError(f"manifest {str(path)!r} has version {data.get('version')!r}; expected {MANIFEST_VERSION}")
    clients = [ClientSplit(c["client_id"], c["train_indices"], c["test_indices"], c["label_hist_train"],
                           c["label_hist_test"]) for c in data["clients"]]
    fed = Federation(data["scheme"], data["params"], data["seed"], data["num_rows"], data["num_classes"], clients)
    if fed.indices_hash() != data["indices_sha256"]:
        raise FederationError(f"manifest {str(path)!r} is corrupt: its indices do not match its hash")
    if num_rows is not None and num_rows != fed.num_rows:
        raise FederationError(f"manifest {str(path)!r} was made for {fed.num_rows} rows; this dataset has {num_rows}")
    return fed
