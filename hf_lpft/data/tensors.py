"""Client data as pre-decoded tensors, and batch iteration over them.

Small images are decoded once into uint8 tensors (not every epoch); batches are sliced from a
seeded permutation, which is deterministic and has no per-sample collate overhead.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

# Images are scaled to [-1, 1]: a dataset-agnostic normalisation suited to models trained from scratch.
MEAN, STD = 0.5, 0.5


@dataclass
class ClientData:
    """One client's train and test tensors (images as uint8 NCHW, labels as int64)."""

    client_id: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def n_train(self) -> int:
        return int(self.train_y.numel())

    @property
    def n_test(self) -> int:
        return int(self.test_y.numel())


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> normalised float32."""
    if x.dtype == torch.uint8:
        return (x.float() / 255.0 - MEAN) / STD
    return x


def iterate_batches(x: torch.Tensor, y: torch.Tensor, *, batch_size: int,
                    generator: torch.Generator | None = None, shuffle: bool = True,
                    device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (inputs, labels) batches; a seeded permutation when ``shuffle``."""
    n = int(y.numel())
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        yield to_float(x[idx]).to(device), y[idx].to(device)
