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
from hf_lpft.data.tensors import ClientData, TextInputs

logger = logging.getLogger(__name__)


def load_source(name: str, *, split: str = "train", config_name: str | None = None,
                builtin_kwargs: dict | None = None) -> datasets.Dataset:
    """The dataset to federate.

    Args:
        name: An embedded dataset (see ``hf_lpft.data.builtin.BUILTIN_DATASETS``), a local folder written
            by ``save_to_disk``, or a Hub dataset id (``load_dataset``; needs the network or the HF cache).
        split: Split to use.
    """
    from hf_lpft.data.builtin import BUILTIN_DATASETS, load_builtin

    if name in BUILTIN_DATASETS:
        loaded = load_builtin(name, **(builtin_kwargs or {}))
    elif Path(name).exists():
        loaded = datasets.load_from_disk(name)
    else:
        return datasets.load_dataset(name, config_name, split=split)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise FederationError(f"split={split!r} is not in dataset {name!r}; splits: {list(loaded)}")
        return loaded[split]
    return loaded


def images_to_tensor(ds: datasets.Dataset, rows: list[int], *, image_column: str, image_size: int) -> torch.Tensor:
    """Decode the images of ``rows`` once into a uint8 NCHW tensor, resized to ``image_size``."""
    if not isinstance(ds.features[image_column], datasets.Image):
        raise FederationError(f"image_column={image_column!r} is a {type(ds.features[image_column]).__name__} "
                              "column, not an Image column")
    out = np.empty((len(rows), image_size, image_size, 3), dtype=np.uint8)
    subset = ds.select(rows).select_columns([image_column])
    for i, example in enumerate(tqdm(subset, desc="decode images", leave=False, disable=len(rows) < 5000)):
        img = example[image_column].convert("RGB")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size))
        out[i] = np.asarray(img)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def client_tensors(ds: datasets.Dataset, federation: Federation, *, image_column: str, label_column: str,
                   image_size: int) -> list[ClientData]:
    """Pre-decoded train/test tensors for every client of ``federation``."""
    check_columns(ds, {"image_column": image_column, "label_column": label_column})
    needed = sorted({i for c in federation.clients for i in c.train_indices + c.test_indices})
    images = images_to_tensor(ds, needed, image_column=image_column, image_size=image_size)
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
    if not isinstance(ds.features[text_column], datasets.Value) or ds.features[text_column].dtype not in ("string", "large_string"):
        raise FederationError(f"text_column={text_column!r} is a {ds.features[text_column]!r} column, not a string column")

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
