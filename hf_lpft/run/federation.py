"""The run's federation: the checked dataset partitioned into clients, its manifest, every client's tensors."""

from __future__ import annotations

import time
from pathlib import Path

import datasets

from hf_lpft.config import ExperimentConfig
from hf_lpft.data.federate import Federation, save_manifest
from hf_lpft.data.load import client_tensors, client_text_tensors
from hf_lpft.data.preprocess import preprocessing_for
from hf_lpft.data.tensors import ClientData
from hf_lpft.layout import RunLayout
from hf_lpft.models.backbone import load_tokenizer
from hf_lpft.run.preflight import federation_checked


def client_inputs(cfg: ExperimentConfig, ds: datasets.Dataset, fed: Federation) -> list[ClientData]:
    """Every client's tensors: decoded images, or text tokenized with the backbone's tokenizer."""
    d = cfg.data
    if d.text_column:
        return client_text_tensors(ds, fed, text_column=d.text_column, label_column=d.label_column,
                                   tokenizer=load_tokenizer(cfg.model.backbone), max_length=d.max_seq_len)
    return client_tensors(ds, fed, image_column=d.image_column, label_column=d.label_column, image_size=d.image_size,
                          preprocessing=preprocessing_for(cfg))


def build_federation(cfg: ExperimentConfig, out: Path, timings: dict | None = None, *, write: bool = True,
                     federated: tuple | None = None) -> tuple[Federation, list[ClientData]]:
    """The checked federation (``federated``, from ``federation_checked``, or computed now), its manifest
    written (``write``: False on all but the main process) and every client's decoded tensors; seconds of
    each step into ``timings``: data_load, partition, decode_inputs."""
    ds, fed, stage_seconds = federated if federated is not None else federation_checked(cfg)
    t = time.perf_counter()
    if write:
        save_manifest(fed, RunLayout(out).manifest)
    clients = client_inputs(cfg, ds, fed)
    stage_seconds["decode_inputs"] = time.perf_counter() - t
    if timings is not None:
        timings.update(stage_seconds)
    return fed, clients
