"""Any Hugging Face ``Dataset`` -> clients: flwr-datasets partitioners, per-client shifts, splits, a manifest.

Schemes (iid, dirichlet, pathological, natural, quantity, natural+dirichlet, and any registered at run time)
live in ``hf_lpft.data.schemes``, one ``@register_scheme`` class each: its options, its flwr-datasets
partitioner and what the manifest records of it. Infeasible partitions (e.g. no Dirichlet draw leaves every
client ``min_partition_size`` examples within 10 attempts) are a ``FederationError`` naming the values.

``partition_by`` may join columns with ``+`` (``Blond_Hair+Male``): the partitioner then sees their joint
value, e.g. a Dirichlet over (label, spurious attribute) groups gives every client its own correlation
between the two (CelebA-style spurious correlations that differ by client).

Per-client shifts live in ``hf_lpft.data.shifts``, one ``@register_shift`` class each (built in: one CIFAR-10-C
corruption (family, severity) a client with ``corruption="per_client"``, and a seeded permutation of
``label_permutation`` classes a client; others switched on by name in ``shifts``): each client's spec is
recorded in the manifest and applied by ``apply_client_shifts``.

What is ours is the bookkeeping: row indices of every client's train and test split, label histograms,
the class names (a ``ClassLabel``'s names: imagefolder's class folders, data files' string labels) and a hashed
manifest that rebuilds exactly the same federation.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from sklearn.model_selection import train_test_split

from hf_lpft.data.schemes import (  # noqa: F401 - FederationError, SCHEMES, QUANTITY_MODES: data's vocabulary
    QUANTITY_MODES,
    SCHEMES,
    FederationError,
    PartitionArgs,
    get_scheme,
    partition_view,
)
from hf_lpft.data.shifts import (  # noqa: F401 - CORRUPTION_MODES: data's vocabulary
    CORRUPTION_MODES,
    client_shifts,
    recorded_shifts,
    shift_problem,
    shifted_labels,
)
from hf_lpft.io import write_text

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
_TOLD_UNNAMED: set[str] = set()  # label columns already reported as unnamed (said once a process)


@dataclass
class ClientSplit:
    """Row indices (into the source dataset) of one client's train and test split, and its shift."""

    client_id: str
    train_indices: list[int]
    test_indices: list[int]
    label_hist_train: list[int] = field(default_factory=list)
    label_hist_test: list[int] = field(default_factory=list)
    shift: dict = field(default_factory=dict)


@dataclass
class Federation:
    """A partition of a dataset into clients, with the parameters that made it."""

    scheme: str
    params: dict
    seed: int
    num_rows: int
    num_classes: int
    clients: list[ClientSplit]
    source: dict = field(default_factory=dict)  # the dataset's identity (dataset_identity); {} = not recorded
    class_names: list[str] | None = None  # index -> name (the label column's ClassLabel); None = unnamed

    @property
    def client_ids(self) -> list[str]:
        return [c.client_id for c in self.clients]

    def label_names(self) -> list[str]:
        """The name of every class index: the recorded names, else the indices as strings."""
        return class_names_or_indices(self.class_names, self.num_classes)

    def indices_hash(self) -> str:
        """SHA-256 over every client's id, indices and (when any) shift: federations match iff hashes do."""
        with_shift = any(c.shift for c in self.clients)
        payload = [[c.client_id, c.train_indices, c.test_indices] + ([c.shift] if with_shift else [])
                   for c in self.clients]
        return hashlib.sha256(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()).hexdigest()

    def to_manifest(self) -> dict:
        return {"version": MANIFEST_VERSION, "scheme": self.scheme, "params": self.params, "seed": self.seed,
                "num_rows": self.num_rows, "num_classes": self.num_classes, "indices_sha256": self.indices_hash(),
                "clients": [{"client_id": c.client_id, "n_train": len(c.train_indices), "n_test": len(c.test_indices),
                             "label_hist_train": c.label_hist_train, "label_hist_test": c.label_hist_test,
                             "shift": c.shift, "train_indices": c.train_indices, "test_indices": c.test_indices}
                            for c in self.clients]} | ({"dataset": self.source} if self.source else {}) \
            | ({"class_names": self.class_names} if self.class_names is not None else {})


def num_classes_of(ds: datasets.Dataset, label_column: str) -> int:
    """Class count from a ClassLabel feature, else max label + 1 (booleans count as 2 classes)."""
    feature = ds.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    return int(np.asarray(ds[label_column]).astype(np.int64).max()) + 1


def class_names_of(ds: datasets.Dataset, label_column: str) -> list[str] | None:
    """The class names of the label column: a ClassLabel's names (imagefolder's class folders, string labels
    encoded from data files), else None (e.g. an integer column) and said once in the log."""
    feature = ds.features.get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return [str(name) for name in feature.names]
    if label_column not in _TOLD_UNNAMED:
        _TOLD_UNNAMED.add(label_column)
        logger.info("label column %r has no class names (it is not a ClassLabel): models, cards and figures name "
                    "the classes by their indices as strings ('0', '1', ...)", label_column)
    return None


def class_names_or_indices(names: Sequence[str] | None, num_classes: int) -> list[str]:
    """``names`` as a list, or the class indices as strings when the dataset names none."""
    return [str(n) for n in names] if names is not None else [str(i) for i in range(num_classes)]


def identity_columns(fed: Federation) -> list[str]:
    """The columns a federation was computed from: the label and the partition column(s)."""
    names = [fed.params.get("label_column")] + (fed.params.get("partition_by") or "").split("+")
    names.append(fed.params.get("domain_column"))  # recorded by a scheme that reads it (natural+dirichlet)
    return list(dict.fromkeys(n for n in names if n))


def dataset_identity(ds: datasets.Dataset, columns: list[str], *, name: str | None = None,
                     config: str | None = None, split: str | None = None) -> dict:
    """What a manifest records of its dataset: name, config, split, rows, ``datasets`` fingerprint and a
    SHA-256 of the values of ``columns`` (label and partition columns: what the clients are made of).

    The content hash decides whether a manifest fits a dataset (the fingerprint of the same data differs
    between, e.g., a rebuilt and a cached copy); name and fingerprint are kept for the error message.
    """
    digest = hashlib.sha256()
    for column in columns:
        digest.update(json.dumps([column, ds[column]], separators=(",", ":"), default=str).encode())
    return {"name": name, "config": config, "split": split, "num_rows": len(ds),
            "fingerprint": getattr(ds, "_fingerprint", None), "columns": columns, "content_sha256": digest.hexdigest()}


def check_manifest_source(fed: Federation, ds: datasets.Dataset, path: str | Path, *, name: str | None = None) -> None:
    """A manifest that records its dataset must be used with that dataset (same label/partition values)."""
    source = fed.source
    if not source:
        logger.warning("manifest %s records no dataset identity (written by an older hf_lpft); only its size is "
                       "checked", path)
        return
    made_for = f"dataset {source.get('name')!r} (config {source.get('config')!r}, split {source.get('split')!r}, " \
               f"{source.get('num_rows')} rows)"
    missing = [c for c in source["columns"] if c not in ds.column_names]
    if missing:
        raise FederationError(f"manifest {str(path)!r} was made for {made_for}; this dataset ({name!r}) lacks its "
                              f"column(s) {missing}; give the manifest of this dataset or leave data.manifest unset")
    if dataset_identity(ds, source["columns"])["content_sha256"] != source["content_sha256"]:
        raise FederationError(f"manifest {str(path)!r} was made for {made_for}; this dataset ({name!r}) has other "
                              f"values in {source['columns']}; give the manifest of this dataset or leave "
                              "data.manifest unset to partition it anew")


def check_columns(ds: datasets.Dataset, columns: dict[str, str]) -> None:
    """Fail naming the missing column and the columns the dataset has."""
    for role, name in columns.items():
        if name not in ds.column_names:
            raise FederationError(f"{role}={name!r} is not a column of the dataset; columns: {ds.column_names}")


def _check_params(scheme: str, values: dict, *, test_fraction: float, num_rows: int) -> None:
    """Reject bad scheme and shift parameters (``values``) with a message naming the value and what is allowed."""
    num_clients, alpha, min_partition_size, classes_per_client, quantity_mode, clients_per_domain = (
        values[k] for k in ("num_clients", "alpha", "min_partition_size", "classes_per_client", "quantity_mode",
                            "clients_per_domain"))
    checks = [
        (scheme in SCHEMES, f"scheme={scheme!r} is not allowed; choose one of {list(SCHEMES)}"),
        (num_clients >= 1, f"num_clients={num_clients!r} must be >= 1"),
        (alpha > 0, f"alpha={alpha!r} must be > 0"),
        (min_partition_size >= 0, f"min_partition_size={min_partition_size!r} must be >= 0"),
        (classes_per_client >= 1, f"classes_per_client={classes_per_client!r} must be >= 1"),
        (quantity_mode in QUANTITY_MODES,
         f"quantity_mode={quantity_mode!r} is not allowed; choose one of {list(QUANTITY_MODES)}"),
        (clients_per_domain >= 1, f"clients_per_domain={clients_per_domain!r} must be >= 1"),
        (not (shifts := shift_problem(values)), shifts),  # the shift registry: hf_lpft.data.shifts
        (0.0 < test_fraction < 1.0, f"test_fraction={test_fraction!r} must be in (0, 1)"),
    ]
    if scheme in SCHEMES and "num_clients" in SCHEMES[scheme].options:
        checks.append((num_clients <= num_rows, f"num_clients={num_clients} exceeds the dataset's {num_rows} examples"))
    for ok, msg in checks:
        if not ok:
            raise FederationError(msg)


def _partition(ds: datasets.Dataset, scheme: str, *, by: str | None, label_column: str,
               **options) -> list[tuple[str, np.ndarray]]:
    """(client id, source rows) for every client of ``scheme`` (``hf_lpft.data.schemes``)."""
    view, columns = partition_view(ds, [k for k in (by, label_column) if k])
    return get_scheme(scheme).partition(view, PartitionArgs(by=by, label_column=label_column, columns=columns,
                                                            **options))


def _split(rows: np.ndarray, labels: np.ndarray, *, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified by label when every class has 2+ examples; otherwise a plain random split."""
    _, counts = np.unique(labels, return_counts=True)
    stratify = labels if counts.min() >= 2 and len(counts) <= test_fraction * len(rows) else None
    train, test = train_test_split(rows, test_size=test_fraction, random_state=seed, stratify=stratify)
    return sorted(int(i) for i in train), sorted(int(i) for i in test)


def _hist(labels: np.ndarray, rows: list[int], num_classes: int, shift: dict, *, seed: int) -> list[int]:
    """Label counts of ``rows`` as the client sees them (its label shifts applied)."""
    y = shifted_labels(labels, rows, shift, seed=seed)
    return np.bincount(y, minlength=num_classes).astype(int).tolist()


def default_partition_by(scheme: str, *, label_column: str, domain_column: str) -> str | None:
    """The column a scheme partitions by when ``partition_by`` is not given (its ``partition_by_default``)."""
    return {"label": label_column, "domain": domain_column}.get(get_scheme(scheme).partition_by_default)


def _recorded_params(scheme: str, values: dict, *, partition_by, label_column, test_fraction,
                     max_examples_per_client) -> dict:
    """The parameters a federation records in its manifest: those its scheme and shifts use, nothing else."""
    params = {"partition_by": partition_by, "label_column": label_column, "test_fraction": test_fraction,
              "max_examples_per_client": max_examples_per_client}
    return params | get_scheme(scheme).recorded(values) | recorded_shifts(values)


def federate(ds: datasets.Dataset, *, scheme: str = "natural", partition_by: str | None = None,
             label_column: str = "label", domain_column: str = "domain", num_clients: int = 5,
             alpha: float = 0.5, min_partition_size: int = 10, classes_per_client: int = 2,
             quantity_mode: str = "dirichlet", clients_per_domain: int = 2, corruption: str = "none",
             corruption_families: Sequence[str] | None = None, corruption_severities: Sequence[int] | None = None,
             label_permutation: int = 0, shifts: Sequence[str] = (), shift_args: dict | None = None,
             test_fraction: float = 0.25, max_examples_per_client: int | None = None, seed: int = 0) -> Federation:
    """Partition ``ds`` into clients (see the module docstring for the schemes), each with a stratified split.

    Args:
        partition_by: Column (or ``a+b`` joint columns) the scheme partitions by; default the domain column
            for ``natural``/``natural+dirichlet`` and the label for ``dirichlet``/``pathological``.
        max_examples_per_client: Cap (random subset) applied before the split.
        corruption: ``per_client`` gives client i the i-th pair of ``shifts.corruption_schedule``.
        label_permutation: Classes permuted on each client (0 = off).
        shifts: Further registered shifts (``hf_lpft.data.shifts.register_shift``) to switch on by name;
            ``shift_args`` maps a name to its options.

    Raises:
        FederationError: bad parameter, unknown column, infeasible partition; the message names the value.
    """
    values = {"num_clients": num_clients, "alpha": alpha, "min_partition_size": min_partition_size,
              "classes_per_client": classes_per_client, "quantity_mode": quantity_mode, "domain_column": domain_column,
              "clients_per_domain": clients_per_domain, "corruption": corruption,
              "corruption_families": corruption_families, "corruption_severities": corruption_severities,
              "label_permutation": label_permutation, "shifts": list(shifts), "shift_args": dict(shift_args or {})}
    _check_params(scheme, values, test_fraction=test_fraction, num_rows=len(ds))
    partition_by = partition_by or default_partition_by(scheme, label_column=label_column, domain_column=domain_column)
    check_columns(ds, {"label_column": label_column})
    for column in (partition_by.split("+") if partition_by else []):
        check_columns(ds, {"partition_by": column})
    parts = _partition(ds, scheme, by=partition_by, label_column=label_column, domain_column=domain_column,
                       num_clients=num_clients, alpha=alpha, min_partition_size=min_partition_size,
                       classes_per_client=classes_per_client, quantity_mode=quantity_mode,
                       clients_per_domain=clients_per_domain, seed=seed)
    labels = np.asarray(ds[label_column]).astype(np.int64)
    k = num_classes_of(ds, label_column)
    specs = client_shifts(len(parts), values, num_classes=k, seed=seed)
    rng = np.random.default_rng(seed)
    clients = []
    for pid, ((cid, rows), shift) in enumerate(zip(parts, specs)):
        rows = np.sort(rows)
        if max_examples_per_client is not None and len(rows) > max_examples_per_client:
            rows = np.sort(rng.choice(rows, size=max_examples_per_client, replace=False))
        if len(rows) < 2:
            raise FederationError(f"client {cid!r} has {len(rows)} example(s); need >= 2 for a train/test split")
        train, test = _split(rows, labels[rows], test_fraction=test_fraction, seed=seed + pid)
        clients.append(ClientSplit(cid, train, test, _hist(labels, train, k, shift, seed=seed),
                                   _hist(labels, test, k, shift, seed=seed), shift))
    params = _recorded_params(scheme, values, partition_by=partition_by, label_column=label_column,
                              test_fraction=test_fraction, max_examples_per_client=max_examples_per_client)
    return Federation(scheme, params, seed, len(ds), k, clients, class_names=class_names_of(ds, label_column))


def federate_from_config(ds: datasets.Dataset, data) -> tuple[datasets.Dataset, Federation]:
    """Partition (or rebuild from ``data.manifest``) as a ``DataConfig`` says, then apply the client shifts.

    Returns:
        The dataset to decode client tensors from (shifted rows where clients have shifts) and the federation.
    """
    text = getattr(data, "text_column", None)
    check_columns(ds, {"data.text_column" if text else "data.image_column": text or data.image_column,
                       "data.label_column": data.label_column})
    if not text and not isinstance(ds.features[data.image_column], datasets.Image):
        raise FederationError(f"data.image_column={data.image_column!r} is a "
                              f"{type(ds.features[data.image_column]).__name__} column, not an Image column")
    if data.manifest:
        fed = load_manifest(data.manifest, num_rows=len(ds))
        check_manifest_source(fed, ds, data.manifest, name=getattr(data, "dataset", None))
        if fed.class_names is None:  # a manifest written before class names were recorded: the dataset's own
            fed.class_names = class_names_of(ds, data.label_column)
    else:
        fed = federate(ds, scheme=data.scheme, partition_by=data.partition_by, label_column=data.label_column,
                       domain_column=data.domain_column, num_clients=data.num_clients, alpha=data.alpha,
                       min_partition_size=data.min_partition_size, classes_per_client=data.classes_per_client,
                       quantity_mode=data.quantity_mode, clients_per_domain=data.clients_per_domain,
                       corruption=data.corruption, corruption_families=data.corruption_families,
                       corruption_severities=data.corruption_severities, label_permutation=data.label_permutation,
                       shifts=data.shifts, shift_args=data.shift_args, test_fraction=data.test_fraction,
                       max_examples_per_client=data.max_examples_per_client, seed=data.seed)
        fed.source = dataset_identity(ds, identity_columns(fed), name=getattr(data, "dataset", None),
                                      config=getattr(data, "dataset_config", None), split=getattr(data, "split", None))
    return apply_client_shifts(ds, fed, image_column=data.image_column, label_column=data.label_column), fed


def apply_client_shifts(ds: datasets.Dataset, fed: Federation, *, image_column: str,
                        label_column: str) -> datasets.Dataset:
    """``ds`` with every client's rows shifted as its manifest entry says (unchanged if none), by the registered
    shifts whose keys the entry holds (``hf_lpft.data.shifts.shift_dataset``)."""
    rows = {i: c.shift for c in fed.clients if c.shift for i in c.train_indices + c.test_indices}
    if not rows:
        return ds
    from hf_lpft.data.shifts import shift_dataset

    try:
        return shift_dataset(ds, rows, image_column=image_column, label_column=label_column, seed=fed.seed)
    except ValueError as err:
        raise FederationError(str(err)) from err


def save_manifest(federation: Federation, path: str | Path, *, stats: bool = True) -> Path:
    """Write the manifest as JSON atomically; with ``stats``, also ``stats.json`` and ``label_heatmap.png``
    beside it."""
    path = Path(path)
    write_text(path, json.dumps(federation.to_manifest(), indent=1))
    if stats:
        from hf_lpft.data.stats import save_stats

        save_stats(federation, path.parent)
    return path


def load_manifest(path: str | Path, *, num_rows: int | None = None) -> Federation:
    """Rebuild a Federation from a manifest; verify its hash, its indices and, if given, the dataset size.

    Raises:
        FederationError: not JSON / not a manifest, another version, a hash mismatch, an index out of range
            or of a dataset of another size; the message names the file. Nothing is written.
    """
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        version = data.get("version") if isinstance(data, dict) else None
        raise FederationError(f"manifest {str(path)!r} has version {version!r}; expected {MANIFEST_VERSION}")
    clients = [ClientSplit(c["client_id"], c["train_indices"], c["test_indices"], c["label_hist_train"],
                           c["label_hist_test"], c.get("shift") or {}) for c in data["clients"]]
    fed = Federation(data["scheme"], data["params"], data["seed"], data["num_rows"], data["num_classes"], clients,
                     data.get("dataset") or {}, _recorded_names(data, path))
    if fed.indices_hash() != data["indices_sha256"]:
        raise FederationError(f"manifest {str(path)!r} is corrupt: its indices do not match its hash")
    if num_rows is not None and num_rows != fed.num_rows:
        raise FederationError(f"manifest {str(path)!r} was made for {fed.num_rows} rows; this dataset has {num_rows}")
    _check_indices(fed, path)
    return fed


def _recorded_names(manifest: dict, path: str | Path) -> list[str] | None:
    """A manifest's ``class_names`` (older manifests have none: None), one string per class."""
    names = manifest.get("class_names")
    if names is not None and (not isinstance(names, list) or len(names) != manifest["num_classes"]
                              or not all(isinstance(n, str) for n in names)):
        raise FederationError(f"manifest {str(path)!r}: class_names must be a list of {manifest['num_classes']} "
                              f"strings (one per class), not {names!r}")
    return names


def _check_indices(fed: Federation, path: str | Path) -> None:
    """Every index an integer row of the dataset, no row in both splits of a client."""
    for c in fed.clients:
        for split, rows in (("train", c.train_indices), ("test", c.test_indices)):
            bad = [i for i in rows if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < fed.num_rows]
            if bad:
                raise FederationError(f"manifest {str(path)!r}: client {c.client_id!r} has {split} index {bad[0]!r} "
                                      f"outside the dataset's rows [0, {fed.num_rows})")
        if both := set(c.train_indices) & set(c.test_indices):
            raise FederationError(f"manifest {str(path)!r}: client {c.client_id!r} has row {min(both)} in both its "
                                  "train and test split")
