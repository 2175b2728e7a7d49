"""The node side of the Flower App: a node's own data, its personalization, its scores of other clients' models.

Each node finds its data from its node config (``flower-supernode --node-config '...'``):

* ``partition-id=i manifest="/path/manifest.json"`` [``dataset="/path/or/name"``]: client i of a saved
  federation manifest (rebuilt exactly, with its shifts) from the source dataset (default the study's
  ``data.dataset``);
* ``partition-id=i dataset-dir="/path"`` [``client-id="name"``]: the node's own dataset folder (written by
  ``datasets.Dataset.save_to_disk``), split into train/test (stratified, ``data.test_fraction``, ``data.seed``);
* ``partition-id=i`` alone (Flower's simulation sets it): client i of the study's own partition of ``data.dataset``.

``partition-id`` orders the clients (0..n-1, each once); seeds derive from the client id, as in the built-in engine.
Nothing but model weights, metrics and counts leaves the node (arXiv 2511.12695, Sec. 3: post-hoc PFT is local).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from pathlib import Path

import datasets
import torch
import yaml
from accelerate import Accelerator
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from hf_lpft import __version__
from hf_lpft.config import ConfigError, ExperimentConfig, load_config
from hf_lpft.data.federate import Federation, federate, federate_from_config
from hf_lpft.data.tensors import ClientData
from hf_lpft.evaluation.distortion import extract_features, features_and_predictions, linear_cka, mean_feature_distance
from hf_lpft.evaluation.shared_features import SharedBackbone
from hf_lpft.hub.load import _build
from hf_lpft.models.backbone import SplitModel, build_model
from hf_lpft.pipeline import (build_strategies, check_dataset, client_inputs, cross_accuracy, load_dataset_checked,
                              model_dir, personalize_unit, save_model)
from hf_lpft.train.loop import accuracy

NODE_KEYS = ("partition-id", "num-partitions", "manifest", "dataset", "dataset-dir", "client-id")


@dataclasses.dataclass
class Node:
    """What one node holds: its client index, its data, the class count and the study it serves."""

    index: int
    client: ClientData
    num_classes: int
    cfg: ExperimentConfig
    summary: dict  # the client's manifest entry without row indices (counts, label histograms, shift)


def study_of(conf: ConfigRecord) -> tuple[ExperimentConfig, int]:
    """The study config (YAML sent by the server) and the seed of a message; the server's own
    ``data.manifest`` path means nothing on a node (its node config names its data)."""
    values = yaml.safe_load(str(conf["study"]))
    values["data"]["manifest"] = None
    return load_config(None, values), int(conf["seed"])


def _own_folder(cfg: ExperimentConfig, node_config: dict) -> tuple[datasets.Dataset, Federation, ExperimentConfig]:
    """The node's own ``save_to_disk`` folder as a one-client federation (stratified train/test split)."""
    path = Path(str(node_config["dataset-dir"]))
    if not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
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


def _partition(cfg: ExperimentConfig, node_config: dict) -> tuple[datasets.Dataset, Federation, ExperimentConfig]:
    """Client ``partition-id`` of a manifest (or of the study's own partition) of the source dataset."""
    data = dataclasses.replace(cfg.data, dataset=str(node_config.get("dataset", cfg.data.dataset)),
                               manifest=str(node_config["manifest"]) if "manifest" in node_config else None)
    cfg = dataclasses.replace(cfg, data=data)
    ds = load_dataset_checked(cfg)
    check_dataset(cfg, ds)
    ds, fed = federate_from_config(ds, data)
    return ds, fed, cfg


def load_node(cfg: ExperimentConfig, node_config: dict) -> Node:
    """This node's client (see the module docstring for the node config keys).

    Raises:
        ConfigError: a missing or bad node config value, named.
    """
    unknown = sorted(set(node_config) - set(NODE_KEYS))
    if "partition-id" not in node_config or unknown:
        raise ConfigError(f"node config {dict(node_config)!r}: needs partition-id (and manifest=..., dataset-dir=... "
                          f"or neither); unknown keys {unknown}; allowed: {list(NODE_KEYS)}")
    i = int(node_config["partition-id"])
    own = "dataset-dir" in node_config
    ds, fed, cfg = _own_folder(cfg, node_config) if own else _partition(cfg, node_config)
    k = 0 if own else i
    if not 0 <= k < len(fed.clients):
        raise ConfigError(f"node config partition-id={i} but the federation has {len(fed.clients)} clients")
    mine = dataclasses.replace(fed, clients=[fed.clients[k]])  # decode this client's rows only
    client = client_inputs(cfg, ds, mine)[0]
    entry = mine.to_manifest()["clients"][0]
    summary = {key: entry[key] for key in ("client_id", "n_train", "n_test", "label_hist_train", "label_hist_test",
                                           "shift")}
    summary["indices_sha256"] = hashlib.sha256(json.dumps([entry["train_indices"], entry["test_indices"]])
                                               .encode()).hexdigest()
    return Node(i, client, fed.num_classes, cfg, summary)


def skeleton(cfg: ExperimentConfig, num_classes: int, state: dict | None = None) -> SplitModel:
    """The study's architecture (weights from ``state``, e.g. the global arrays of a message)."""
    m = cfg.model
    model = build_model(m.backbone, num_classes=num_classes, image_size=cfg.data.image_size, pretrained=False,
                        pooling=m.pooling, dropout=m.dropout)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def describe_reply(msg: Message, node: Node) -> Message:
    """QUERY: who this node is (client index and id, counts, classes), for the server's client list."""
    metrics = MetricRecord({"client-index": node.index, "n-train": node.client.n_train, "n-test": node.client.n_test,
                            "num-classes": node.num_classes})
    info = ConfigRecord({"summary": json.dumps(node.summary), "hf-lpft": __version__})
    return Message(RecordDict({"metrics": metrics, "node": info}), reply_to=msg)


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file of an exported model folder, by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def personalize_reply(msg: Message, node: Node, seed: int, accelerator: Accelerator) -> Message:
    """TRAIN ``pft``: every strategy on this node's data from θ_G (``personalize_unit``, the pipeline's own
    unit: same seeds, loop and export); replies the unit records, θ_G's and each model's accuracy on
    the own test split and the exported model folders (models travel, data does not)."""
    cfg, client = node.cfg, node.client
    device = accelerator.device
    global_model = skeleton(cfg, node.num_classes, msg.content["arrays"].to_torch_state_dict()).to(device)
    reference = ([extract_features(global_model, client.test_x, batch_size=cfg.run.eval_batch_size, device=device)]
                 if cfg.run.distortion else None)
    shared = SharedBackbone(global_model, [client], batch_size=cfg.run.eval_batch_size, device=device)
    records, files = {}, ConfigRecord({})
    with tempfile.TemporaryDirectory(prefix="hf_lpft_node_") as tmp:
        for name, strategy in build_strategies(cfg).items():
            records[name] = personalize_unit(cfg, strategy, global_model, [client], 0, seed=seed, out=Path(tmp),
                                             accelerator=accelerator, reference=reference, shared=shared)
            folder = model_dir(Path(tmp), cfg, seed, "clients", name, client.client_id)
            for rel, content in (folder_files(folder) if folder.is_dir() else {}).items():
                files[f"{name}/{rel}"] = content
    global_acc = cross_accuracy(global_model, [client], cfg=cfg, device=device)[0]
    info = ConfigRecord({"records": json.dumps(records)})
    metrics = MetricRecord({"client-index": node.index, "global-acc": global_acc})
    return Message(RecordDict({"metrics": metrics, "records": info, "files": files}), reply_to=msg)


def _scores(model, ref, client: ClientData, cfg: ExperimentConfig, device) -> dict:
    """Accuracy (and Δ, CKA against θ_G's features ``ref``) of ``model`` on the client's test split:
    the per-split numbers ``evaluate_on_clients`` computes in the pipeline."""
    if ref is None:
        acc = accuracy(model, client.test_x, client.test_y, batch_size=cfg.run.eval_batch_size, device=device)
        return {"acc": acc, "distortion": float("nan"), "cka": float("nan")}
    feats, pred = features_and_predictions(model, client.test_x, batch_size=cfg.run.eval_batch_size, device=device)
    acc = (pred == client.test_y).float().mean().item() if len(client.test_y) else float("nan")
    return {"acc": acc, "distortion": mean_feature_distance(ref, feats), "cka": linear_cka(ref, feats)}


def cross_reply(msg: Message, node: Node, seed: int, accelerator: Accelerator) -> Message:
    """EVALUATE ``cross``: other clients' personalized models (their exported folders) scored on this
    node's test split: accuracy, and with ``run.distortion`` Δ and CKA against θ_G (the paper's Global)."""
    cfg, device = node.cfg, accelerator.device
    global_model = skeleton(cfg, node.num_classes, msg.content["arrays"].to_torch_state_dict())
    ref = (extract_features(global_model.to(device), node.client.test_x, batch_size=cfg.run.eval_batch_size,
                            device=device) if cfg.run.distortion else None)
    wanted = json.loads(str(msg.content["config"]["models"]))  # [[strategy, client_id], ...]
    files = msg.content["files"]
    scores = []
    with tempfile.TemporaryDirectory(prefix="hf_lpft_node_") as tmp:
        root = Path(tmp)
        save_model(global_model.cpu(), root / "global")
        for strategy, client_id in wanted:
            folder, prefix = root / "clients" / strategy / client_id, f"{strategy}/{client_id}/"
            for key in (k for k in files if k.startswith(prefix)):
                (folder / key[len(prefix):]).parent.mkdir(parents=True, exist_ok=True)
                (folder / key[len(prefix):]).write_bytes(files[key])
            model = _build(root, f"clients/{strategy}/{client_id}", seed=seed, multi_seed=False).to(device)
            with torch.no_grad():
                scores.append(_scores(model, ref, node.client, cfg, device))
    return Message(RecordDict({"metrics": MetricRecord({"client-index": node.index}),
                               "scores": ConfigRecord({"scores": json.dumps(scores)})}), reply_to=msg)


__all__ = ["NODE_KEYS", "Node", "cross_reply", "describe_reply", "load_node", "personalize_reply", "skeleton",
           "study_of"]
