"""The heavy node messages of the Flower App: personalize every strategy, score other clients' models.

Kept apart from :mod:`hf_lpft.flower_app.node` so the general-FL messages (a fresh process each on
a SuperNode) do not import the pipeline, the strategies and peft.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from hf_lpft.data.tensors import ClientData
from hf_lpft.evaluation.clients import EvalSettings, cross_accuracy
from hf_lpft.evaluation.distortion import extract_features, features_and_predictions, linear_cka, mean_feature_distance
from hf_lpft.evaluation.shared_features import SharedBackbone
from hf_lpft.flower_app.node import Node, skeleton
from hf_lpft.hub.load import _build
from hf_lpft.layout import RunLayout, save_model
from hf_lpft.run.preflight import build_strategies
from hf_lpft.run.settings import eval_settings
from hf_lpft.run.units import personalize_unit
from hf_lpft.speed import use_memory_format
from hf_lpft.train.loop import accuracy


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file of an exported model folder, by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def personalize_reply(msg: Message, node: Node, seed: int, accelerator: Accelerator) -> Message:
    """TRAIN ``pft``: every strategy on this node's data from θ_G (``personalize_unit``, the pipeline's own
    unit: same seeds, loop and export); replies the unit records, θ_G's and each model's accuracy on
    the own test split and the exported model folders (models travel, data does not)."""
    cfg, client = node.cfg, node.client
    device, evaluation = accelerator.device, eval_settings(node.cfg.run, node.cfg.pft)
    global_model = skeleton(cfg, node.num_classes, msg.content["arrays"].to_torch_state_dict(),
                            class_names=node.class_names).to(device)
    reference = ([extract_features(global_model, client.test_x, batch_size=evaluation.batch_size, device=device)]
                 if evaluation.distortion else None)
    shared = SharedBackbone(global_model, [client], batch_size=evaluation.batch_size, device=device)
    records, files = {}, ConfigRecord({})
    with tempfile.TemporaryDirectory(prefix="hf_lpft_node_") as tmp:
        layout = RunLayout(Path(tmp), cfg.run.seeds)
        for name, strategy in build_strategies(cfg).items():
            records[name] = personalize_unit(cfg, strategy, global_model, [client], 0, seed=seed, layout=layout,
                                             accelerator=accelerator, evaluation=evaluation, reference=reference,
                                             shared=shared)
            folder = layout.client_dir(name, client.client_id, seed)
            for rel, content in (folder_files(folder) if folder.is_dir() else {}).items():
                files[f"{name}/{rel}"] = content
    global_acc = cross_accuracy(global_model, [client], settings=evaluation, device=device)[0]
    info = ConfigRecord({"records": json.dumps(records)})
    metrics = MetricRecord({"client-index": node.index, "global-acc": global_acc})
    return Message(RecordDict({"metrics": metrics, "records": info, "files": files}), reply_to=msg)


def _scores(model, ref, client: ClientData, evaluation: EvalSettings, device) -> dict:
    """Accuracy (and Δ, CKA against θ_G's features ``ref``) of ``model`` on the client's test split:
    the per-split numbers ``evaluate_on_clients`` computes in the pipeline."""
    if ref is None:
        acc = accuracy(model, client.test_x, client.test_y, batch_size=evaluation.batch_size, device=device)
        return {"acc": acc, "distortion": float("nan"), "cka": float("nan")}
    feats, pred = features_and_predictions(model, client.test_x, batch_size=evaluation.batch_size, device=device)
    acc = (pred == client.test_y).float().mean().item() if len(client.test_y) else float("nan")
    return {"acc": acc, "distortion": mean_feature_distance(ref, feats), "cka": linear_cka(ref, feats)}


def cross_reply(msg: Message, node: Node, seed: int, accelerator: Accelerator) -> Message:
    """EVALUATE ``cross``: other clients' personalized models (their exported folders) scored on this
    node's test split: accuracy, and with ``run.distortion`` Δ and CKA against θ_G (the paper's Global)."""
    cfg, device, evaluation = node.cfg, accelerator.device, eval_settings(node.cfg.run, node.cfg.pft)
    global_model = skeleton(cfg, node.num_classes, msg.content["arrays"].to_torch_state_dict(),
                            class_names=node.class_names)
    ref = (extract_features(global_model.to(device), node.client.test_x, batch_size=evaluation.batch_size,
                            device=device) if evaluation.distortion else None)
    wanted = json.loads(str(msg.content["config"]["models"]))  # [[strategy, client_id], ...]
    files = msg.content["files"]
    scores = []
    with tempfile.TemporaryDirectory(prefix="hf_lpft_node_") as tmp:
        layout = RunLayout(Path(tmp), (seed,))  # one model per client here: no seed level
        save_model(global_model.cpu(), layout.global_dir(seed))
        for strategy, client_id in wanted:
            folder, prefix = layout.client_dir(strategy, client_id, seed), f"{strategy}/{client_id}/"
            for key in (k for k in files if k.startswith(prefix)):
                (folder / key[len(prefix):]).parent.mkdir(parents=True, exist_ok=True)
                (folder / key[len(prefix):]).write_bytes(files[key])
            model = use_memory_format(_build(layout, layout.client_rel(strategy, client_id, seed).as_posix(),
                                             seed=seed).to(device), cfg.run.memory_format)  # as the reference
            with torch.no_grad():
                scores.append(_scores(model, ref, node.client, evaluation, device))
    return Message(RecordDict({"metrics": MetricRecord({"client-index": node.index}),
                               "scores": ConfigRecord({"scores": json.dumps(scores)})}), reply_to=msg)


__all__ = ["cross_reply", "folder_files", "personalize_reply"]
