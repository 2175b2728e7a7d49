"""The node side of the Flower App: a node's own data, its personalization, its scores of other clients' models.

Each node finds its data from its node config (``flower-supernode --node-config '...'``):

* ``partition-id=i manifest="/path/manifest.json"`` [``dataset="/path/or/name"``]: client i of a saved
  federation manifest (rebuilt exactly, with its shifts) from the source dataset (default the study's
  ``data.dataset``);
* ``partition-id=i dataset-dir="/path"`` [``client-id="name"``]: the node's own dataset folder (written by
  ``datasets.Dataset.save_to_disk``), split into train/test (stratified, ``data.test_fraction``, ``data.seed``);
* ``partition-id=i`` alone (Flower's simulation sets it): client i of the study's own partition of ``data.dataset``.

``partition-id`` orders the clients (0..n-1, each once); seeds derive from the client id, as in the built-in engine.
A SuperNode starts one process per message, so the decoded client is cached on the node (``cache-dir``,
default ``<tmp>/hf_lpft_node_cache``; keyed by the data settings, the node config and the manifest's bytes),
and the heavy modules (pipeline, strategies, peft) are imported only by the messages that personalize or
score models (``node_pft``).
Nothing but model weights, metrics and counts leaves the node (arXiv 2511.12695, Sec. 3: post-hoc PFT is local).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from pathlib import Path

import torch
import yaml
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from hf_lpft import __version__
from hf_lpft.config import ConfigError, ExperimentConfig, load_config
from hf_lpft.data.preprocess import preprocessing_for
from hf_lpft.data.tensors import ClientData, TextInputs
from hf_lpft.io import atomic_path
from hf_lpft.models.backbone import SplitModel, build_model
from hf_lpft.speed import use_memory_format

NODE_KEYS = ("partition-id", "num-partitions", "manifest", "dataset", "dataset-dir", "client-id", "cache-dir")


@dataclasses.dataclass
class Node:
    """What one node holds: its client index, its data, the class count (and names) and the study it serves."""

    index: int
    client: ClientData
    num_classes: int
    cfg: ExperimentConfig
    summary: dict  # the client's manifest entry without row indices (counts, label histograms, shift)
    class_names: list[str] | None = None  # the dataset's class names (None: unnamed)


def study_of(conf: ConfigRecord) -> tuple[ExperimentConfig, int]:
    """The study config (YAML sent by the server) and the seed of a message; the server's own
    ``data.manifest`` path means nothing on a node (its node config names its data). The YAML travels as
    bytes (Flower's strategy log prints ``<bytes>`` instead of the whole study); text is read too."""
    study = conf["study"]
    values = yaml.safe_load(study.decode() if isinstance(study, bytes) else str(study))
    values["data"]["manifest"] = None
    return load_config(None, values), int(conf["seed"])


def _own_folder(cfg: ExperimentConfig, node_config: dict) -> tuple:
    """The node's own ``save_to_disk`` folder as a one-client federation (stratified train/test split)."""
    import datasets

    from hf_lpft.data.federate import federate

    path = Path(str(node_config["dataset-dir"]))
    if not any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise ConfigError(f"node config dataset-dir={str(path)!r} is not a folder written by Dataset.save_to_disk")
    ds, d = datasets.load_from_disk(str(path)), cfg.data
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[d.split]
    try:
        fed = federate(ds, scheme="iid", num_clients=1, label_column=d.label_column, test_fraction=d.test_fraction,
                       max_examples_per_client=d.max_examples_per_client, seed=d.seed)
    except ValueError as err:
        raise ConfigError(f"node config dataset-dir={str(path)!r}: {err}") from err
    fed.clients[0].client_id = str(node_config.get("client-id", path.name))
    return ds, fed, dataclasses.replace(cfg, data=dataclasses.replace(d, dataset=str(path)))


def _partition(cfg: ExperimentConfig, node_config: dict) -> tuple:
    """Client ``partition-id`` of a manifest (or of the study's own partition) of the source dataset."""
    from hf_lpft.data.federate import federate_from_config
    from hf_lpft.run.preflight import check_dataset, load_dataset_checked

    data = dataclasses.replace(cfg.data, dataset=str(node_config.get("dataset", cfg.data.dataset)),
                               manifest=str(node_config["manifest"]) if "manifest" in node_config else None)
    cfg = dataclasses.replace(cfg, data=data)
    ds = load_dataset_checked(cfg)
    check_dataset(cfg, ds)
    ds, fed = federate_from_config(ds, data)
    return ds, fed, cfg


def _cache_file(cfg: ExperimentConfig, node_config: dict) -> Path:
    """Where this node's decoded client is cached: a hash of everything that decides it."""
    manifest = Path(str(node_config.get("manifest", "")))
    key = json.dumps([dataclasses.asdict(cfg.data), cfg.model.backbone, sorted((k, str(v)) for k, v in
                      node_config.items() if k != "cache-dir"),
                      hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None], default=str)
    root = Path(str(node_config.get("cache-dir", Path(tempfile.gettempdir()) / "hf_lpft_node_cache")))
    return root / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"


def load_node(cfg: ExperimentConfig, node_config: dict) -> Node:
    """This node's client (see the module docstring for the node config keys), from the node's cache when
    an earlier message decoded it.

    Raises:
        ConfigError: a missing or bad node config value, named.
    """
    unknown = sorted(set(node_config) - set(NODE_KEYS))
    if "partition-id" not in node_config or unknown:
        raise ConfigError(f"node config {dict(node_config)!r}: needs partition-id (and manifest=..., dataset-dir=... "
                          f"or neither); unknown keys {unknown}; allowed: {list(NODE_KEYS)}")
    cache = _cache_file(cfg, node_config)
    if cache.is_file():
        with torch.serialization.safe_globals([ClientData, TextInputs]):  # no arbitrary pickles, even our own
            saved = torch.load(cache, weights_only=True)
        return Node(saved["index"], saved["client"], saved["num_classes"], cfg, saved["summary"],
                    saved.get("class_names"))
    node = _decode_node(cfg, node_config)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        torch.save({"index": node.index, "client": node.client, "num_classes": node.num_classes,
                    "summary": node.summary, "class_names": node.class_names}, tmp)
    return node


def _decode_node(cfg: ExperimentConfig, node_config: dict) -> Node:
    from hf_lpft.run.federation import client_inputs

    i = int(node_config["partition-id"])
    own = "dataset-dir" in node_config
    ds, fed, data_cfg = _own_folder(cfg, node_config) if own else _partition(cfg, node_config)
    k = 0 if own else i
    if not 0 <= k < len(fed.clients):
        raise ConfigError(f"node config partition-id={i} but the federation has {len(fed.clients)} clients")
    mine = dataclasses.replace(fed, clients=[fed.clients[k]])  # decode this client's rows only
    client = client_inputs(data_cfg, ds, mine)[0]
    entry = mine.to_manifest()["clients"][0]
    summary = {key: entry[key] for key in ("client_id", "n_train", "n_test", "label_hist_train", "label_hist_test",
                                           "shift")}
    summary["indices_sha256"] = hashlib.sha256(json.dumps([entry["train_indices"], entry["test_indices"]])
                                               .encode()).hexdigest()
    return Node(i, client, fed.num_classes, cfg, summary, fed.class_names)


def skeleton(cfg: ExperimentConfig, num_classes: int, state: dict | None = None, *,
             class_names: list[str] | None = None) -> SplitModel:
    """The study's architecture named ``class_names`` (weights from ``state``, e.g. the global arrays of a message)."""
    m = cfg.model
    model = build_model(m.backbone, num_classes=num_classes, image_size=cfg.data.image_size, pretrained=False,
                        pooling=m.pooling, dropout=m.dropout, preprocessing=preprocessing_for(cfg),
                        class_names=class_names)
    model = use_memory_format(model, cfg.run.memory_format)  # as the built-in engine trains (hf_lpft.speed)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def describe_reply(msg: Message, node: Node) -> Message:
    """QUERY: who this node is (client index and id, counts, classes and their names), for the server's client
    list."""
    metrics = MetricRecord({"client-index": node.index, "n-train": node.client.n_train, "n-test": node.client.n_test,
                            "num-classes": node.num_classes})
    info = ConfigRecord({"summary": json.dumps(node.summary), "hf-lpft": __version__,
                         "class-names": json.dumps(node.class_names)})
    return Message(RecordDict({"metrics": metrics, "node": info}), reply_to=msg)


__all__ = ["NODE_KEYS", "Node", "describe_reply", "load_node", "skeleton", "study_of"]
