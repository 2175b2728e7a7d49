"""Load the source dataset (embedded, local folder, or Hub) and turn client splits into tensors (images)
or token ids (text)."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from hf_lpft.data.federate import Federation, FederationError, check_columns
from hf_lpft.data.images import decode_image
from hf_lpft.data.preprocess import Preprocessing
from hf_lpft.data.tensors import ClientData, TextInputs

logger = logging.getLogger(__name__)


def load_source(name: str, *, split: str = "train", config_name: str | None = None,
                builtin_kwargs: dict | None = None, data_dir: str | None = None,
                data_files: list[str] | None = None) -> datasets.Dataset:
    """The dataset to federate.

    Args:
        name: An embedded dataset (see ``hf_lpft.data.builtin.BUILTIN_DATASETS``), a local folder written
            by ``save_to_disk``, a packaged builder reading your files (``imagefolder``, ``csv``, ``json``,
            ``parquet``) or a Hub dataset id (``load_dataset``; needs the network or the HF cache).
        split: Split to use.
        data_dir, data_files: Passed to ``datasets.load_dataset`` (your own folder of images or data files).
    """
    from hf_lpft.data.builtin import BUILTIN_DATASETS, load_builtin

    if name in BUILTIN_DATASETS:
        loaded = load_builtin(name, **(builtin_kwargs or {}))
    elif Path(name).exists():
        loaded = datasets.load_from_disk(name)
    else:
        return datasets.load_dataset(name, config_name, split=split, data_dir=data_dir, data_files=data_files)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise FederationError(f"split={split!r} is not in dataset {name!r}; splits: {list(loaded)}")
        return loaded[split]
    return loaded


def builtin_options(data, *, given: set[str] | None = None) -> dict:
    """The options an embedded builder gets from ``data`` (a DataConfig): its size and image size always (a
    builder ignores what it does not take), ``num_clients`` when the user set it (``given``; default: the keys
    whose value differs from the DataConfig default) and ``data.dataset_config`` as the builder's ``config``.
    ``hf_lpft.run.preflight.check_sizes`` refuses a given option the builder does not take."""
    import dataclasses

    if given is None:
        defaults = {f.name: f.default for f in dataclasses.fields(data) if f.default is not dataclasses.MISSING}
        given = {k for k, v in defaults.items() if getattr(data, k) != v}
    options = {"n_per_domain": data.n_per_domain, "image_size": data.image_size}
    if "num_clients" in given:
        options["num_clients"] = data.num_clients
    if data.dataset_config is not None:
        options["config"] = data.dataset_config
    return options


def load_from_config(data, *, builtin_kwargs: dict | None = None) -> datasets.Dataset:
    """The dataset ``data`` (a DataConfig) names, made ready to federate: your own files through
    :func:`load_source`, the domain column from a folder level (``data.domain_level``), a column of image
    paths cast to images and, in data files, string labels encoded as a ClassLabel."""
    ds = load_source(data.dataset, split=data.split, config_name=data.dataset_config, builtin_kwargs=builtin_kwargs,
                     data_dir=data.data_dir, data_files=data.data_files)
    if data.domain_level is not None:
        ds = domain_from_folder(ds, image_column=data.image_column, data_dir=data.data_dir, level=data.domain_level,
                                domain_column=data.domain_column)
    if data.data_files and not data.text_column and _is_string(ds, data.image_column):
        ds = ds.cast_column(data.image_column, datasets.Image())  # paths, e.g. a csv column of file names
    if data.data_files and _is_string(ds, data.label_column):  # csv / json label names
        ds = ds.class_encode_column(data.label_column)
    return ds


def _is_string(ds: datasets.Dataset, column: str) -> bool:
    return getattr(ds.features.get(column), "dtype", None) in ("string", "large_string")


def domain_from_folder(ds: datasets.Dataset, *, image_column: str, data_dir: str, level: int,
                       domain_column: str) -> datasets.Dataset:
    """Add ``domain_column``: the name of folder level ``level`` below ``data_dir`` of every image file
    (``imagefolder`` reads ``<data_dir>/<domain>/<class>/<image>``; its labels are the class folders)."""
    if image_column not in ds.column_names or not isinstance(ds.features[image_column], datasets.Image):
        raise FederationError(f"domain_level needs image files: image_column={image_column!r} is not an Image "
                              f"column of the dataset; columns: {ds.column_names}")
    root = Path(data_dir).resolve()
    paths = ds.cast_column(image_column, datasets.Image(decode=False))[image_column]
    domains = []
    for item in paths:
        parts = Path(item["path"]).resolve().relative_to(root).parts[:-1]  # folders only
        if level >= len(parts):
            raise FederationError(f"domain_level={level} but {item['path']!r} lies only {len(parts)} folder "
                                  f"level(s) below data_dir={str(root)!r}")
        domains.append(parts[level])
    if domain_column in ds.column_names:
        ds = ds.remove_columns(domain_column)
    return ds.add_column(domain_column, domains)


def images_to_tensor(ds: datasets.Dataset, rows: list[int], *, image_column: str, image_size: int,
                     preprocessing: Preprocessing | None = None) -> torch.Tensor:
    """Decode the images of ``rows`` once into a uint8 NCHW tensor: RGB, resized to ``image_size`` with the
    model's ``preprocessing`` (its interpolation; default the from-scratch one, bicubic)."""
    prep = preprocessing or Preprocessing(image_size=image_size)
    if prep.image_size != image_size:
        raise ValueError(f"preprocessing.image_size={prep.image_size} differs from image_size={image_size}")
    if not isinstance(ds.features[image_column], datasets.Image):
        raise FederationError(f"image_column={image_column!r} is a {type(ds.features[image_column]).__name__} "
                              "column, not an Image column")
    out = np.empty((len(rows), image_size, image_size, 3), dtype=np.uint8)
    feature = ds.features[image_column]
    stored = ds.select(rows).select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    for i, example in enumerate(tqdm(stored, desc="decode images", leave=False, disable=len(rows) < 5000)):
        out[i] = np.asarray(prep.pil(decode_image(feature, example[image_column], row=rows[i], column=image_column)))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def client_tensors(ds: datasets.Dataset, federation: Federation, *, image_column: str, label_column: str,
                   image_size: int, preprocessing: Preprocessing | None = None) -> list[ClientData]:
    """Pre-decoded train/test tensors for every client of ``federation`` (resized with ``preprocessing``)."""
    check_columns(ds, {"image_column": image_column, "label_column": label_column})
    needed = sorted({i for c in federation.clients for i in c.train_indices + c.test_indices})
    images = images_to_tensor(ds, needed, image_column=image_column, image_size=image_size,
                              preprocessing=preprocessing)
    labels = torch.as_tensor(np.asarray(ds.select(needed)[label_column]), dtype=torch.long)
    pos = {row: k for k, row in enumerate(needed)}
    out = []
    for c in federation.clients:
        tr = torch.as_tensor([pos[i] for i in c.train_indices], dtype=torch.long)
        te = torch.as_tensor([pos[i] for i in c.test_indices], dtype=torch.long)
        out.append(ClientData(c.client_id, images[tr], labels[tr], images[te], labels[te]))
    return out


def tokenize(ds: datasets.Dataset, *, text_column: str, tokenizer, max_length: int) -> datasets.Dataset:
    """``input_ids`` of every row, truncated to ``max_length``, not padded (the attention mask follows
    from the lengths when batches are padded).

    A batched ``datasets.map``: for a dataset backed by files (embedded, ``save_to_disk``, Hub) the result
    is cached next to them and reused while the tokenizer and ``max_length`` stay the same.
    """
    if not isinstance(ds.features[text_column], datasets.Value) or ds.features[text_column].dtype not in ("string",
                      "large_string"):
        raise FederationError(f"text_column={text_column!r} is a {ds.features[text_column]!r} column, not a string "
                              "column")

    def encode(batch: dict) -> dict:
        return {"input_ids": tokenizer(batch[text_column], truncation=True, max_length=max_length)["input_ids"]}

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenize")


def client_text_tensors(ds: datasets.Dataset, federation: Federation, *, text_column: str, label_column: str,
                        tokenizer, max_length: int) -> list[ClientData]:
    """Token ids (:class:`TextInputs`) and labels of every client's train and test split."""
    check_columns(ds, {"text_column": text_column, "label_column": label_column})
    tokens = list(tokenize(ds, text_column=text_column, tokenizer=tokenizer, max_length=max_length)["input_ids"])
    labels = torch.as_tensor(np.asarray(ds[label_column]), dtype=torch.long)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def inputs(rows: list[int]) -> TextInputs:
        return TextInputs.from_lists([tokens[i] for i in rows], pad_token_id=pad, padding_side=tokenizer.padding_side)

    return [ClientData(c.client_id, inputs(c.train_indices), labels[c.train_indices], inputs(c.test_indices),
                       labels[c.test_indices]) for c in federation.clients]
