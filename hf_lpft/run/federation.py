"""The run's federation: the checked dataset partitioned into clients, its manifest, every client's tensors."""

from __future__ import annotations

import time

import datasets

from hf_lpft.config import ConfigError, ExperimentConfig
from hf_lpft.data.federate import Federation, FederationError, save_manifest
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


def federation_inputs(cfg: ExperimentConfig, federated: tuple | None = None
                      ) -> tuple[Federation, list[ClientData], dict[str, float]]:
    """The checked federation (``federated``, from ``federation_checked``, or computed now) and every client's
    decoded tensors, with the seconds of each step (data_load, partition, decode_inputs); writes nothing, so the
    pipeline runs it before the output folder exists.

    Raises:
        ConfigError: also for an image that cannot be decoded, naming its file (or row).
    """
    ds, fed, seconds = federated if federated is not None else federation_checked(cfg)
    t = time.perf_counter()
    try:
        clients = client_inputs(cfg, ds, fed)
    except FederationError as err:
        raise ConfigError(f"data.dataset={cfg.data.dataset!r}: {err}") from err
    seconds["decode_inputs"] = time.perf_counter() - t
    return fed, clients, seconds


def build_federation(cfg: ExperimentConfig, layout: RunLayout, timings: dict | None = None, *, write: bool = True,
                     inputs: tuple | None = None) -> tuple[Federation, list[ClientData]]:
    """The federation and its clients' tensors (``inputs``, from :func:`federation_inputs`, or computed now),
    its manifest written into ``layout`` (``write``: False on all but the main process); the seconds of each
    step into ``timings``."""
    fed, clients, seconds = inputs if inputs is not None else federation_inputs(cfg)
    if write:
        save_manifest(fed, layout.manifest)
    if timings is not None:
        timings.update(seconds)
    return fed, clients
