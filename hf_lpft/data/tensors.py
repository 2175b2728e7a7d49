"""Client data as pre-decoded tensors, and batch iteration over them.

Small images are decoded once into uint8 tensors (not every epoch); batches are sliced from a
seeded permutation, which is deterministic and has no per-sample collate overhead.

Text is tokenized once into :class:`TextInputs` (token ids and attention mask of every example, padded
to the longest example of the client); :func:`collate_text` cuts each batch down to the longest example
*of the batch*, which is exactly dynamic padding (``DataCollatorWithPadding``) without re-padding lists.
A model then receives a batch as a dict ``{"input_ids", "attention_mask"}`` instead of an image tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

# The from-scratch normalization (pixels in [-1, 1]); a model normalizes its uint8 inputs itself with its own
# preprocessing (hf_lpft.data.preprocess), whose from-scratch default is this.
MEAN, STD = 0.5, 0.5


@dataclass
class TextInputs:
    """Tokenized text of N examples: ``input_ids`` and ``attention_mask``, both (N, T) int64, padded to T.

    Indexing with row indices (as for an image tensor) gives the ``TextInputs`` of those rows.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, rows) -> TextInputs:
        return TextInputs(self.input_ids[rows], self.attention_mask[rows])

    @classmethod
    def from_lists(cls, ids: Sequence[Sequence[int]], *, pad_token_id: int, padding_side: str = "right") -> TextInputs:
        """Pad token id lists (of different lengths) to the longest one, on ``padding_side``."""
        width = max((len(i) for i in ids), default=0)
        input_ids = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            cols = slice(0, len(seq)) if padding_side == "right" else slice(width - len(seq), width)
            input_ids[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, cols] = 1
        return cls(input_ids, mask)


def collate_text(x: TextInputs, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A batch as model inputs, padded only to its own longest example (columns that are padding in
    every row are dropped, so this works for either padding side)."""
    keep = x.attention_mask.any(0)
    return {"input_ids": x.input_ids[:, keep].to(device), "attention_mask": x.attention_mask[:, keep].to(device)}


@dataclass
class ClientData:
    """One client's train and test inputs (images as uint8 NCHW, or :class:`TextInputs`) and int64 labels."""

    client_id: str
    train_x: torch.Tensor | TextInputs
    train_y: torch.Tensor
    test_x: torch.Tensor | TextInputs
    test_y: torch.Tensor

    @property
    def n_train(self) -> int:
        return int(self.train_y.numel())

    @property
    def n_test(self) -> int:
        return int(self.test_y.numel())


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 normalized as from scratch ([-1, 1]); models normalize uint8 input themselves."""
    if x.dtype == torch.uint8:
        return (x.float() / 255.0 - MEAN) / STD
    return x


def iterate_batches(x: torch.Tensor | TextInputs, y: torch.Tensor, *, batch_size: int,
                    generator: torch.Generator | None = None, shuffle: bool = True,
                    device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor | dict, torch.Tensor]]:
    """Yield (inputs, labels) batches; a seeded permutation when ``shuffle``. Inputs are tensors as stored
    (uint8 images, which a ``SplitModel`` normalizes with its own preprocessing; float features), or for
    :class:`TextInputs` dynamically padded dicts of tensors (:func:`collate_text`)."""
    n = int(y.numel())
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        xb = collate_text(x[idx], device) if isinstance(x, TextInputs) else x[idx].to(device)
        yield xb, y[idx].to(device)
