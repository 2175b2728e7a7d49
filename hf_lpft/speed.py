"""Measured speed choices of a run: the memory format of convolutional models and torch's CPU threads.

Both were chosen by measurement on the project's 2-core CPU machine (``benchmarks/bench_fedavg.py``, numbers
in ``benchmarks/README.md``), so that the FedAvg stage and personalization of arXiv 2511.12695 (Sections 3
and 5) run as fast as a bare PyTorch loop:

- **channels_last** (NHWC): timm's ``test_resnet`` trains about 1.3x faster than in NCHW on this CPU (oneDNN's
  convolution and BatchNorm kernels prefer it). Converting the model is enough: a convolution whose weight is
  channels_last gives a channels_last output from an NCHW input, so the rest of the network stays NHWC and the
  inputs need no conversion. ``auto`` picks it for convolutional networks (more than one ``Conv2d``; a ViT's
  single patch-embedding convolution gains nothing) and keeps transformers and text models as they are.
  Only the arithmetic's summation order changes (results agree to float tolerance, not bit for bit);
  saved weights are always written contiguous, so a file does not depend on the format it was trained in.
- **threads**: one torch thread a process. On the shared 2-core machine two intra-op threads ran 1.5-5x
  *slower* than one whenever other jobs ran (threads spin at barriers while their partner is descheduled),
  and the small models of the quickstart gain little from a second thread even when the machine is quiet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from hf_lpft.config import MEMORY_FORMATS

DEFAULT_NUM_THREADS = 1


def resolve_num_threads(num_threads: int | None) -> int:
    """``run.num_threads``, or the measured default (:data:`DEFAULT_NUM_THREADS`) when it is None."""
    return DEFAULT_NUM_THREADS if num_threads is None else int(num_threads)


def is_convolutional(model: nn.Module) -> bool:
    """True for networks built from 2-d convolutions (ResNets, EfficientNets, ConvNeXts), not a ViT's patch embed."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def resolve_memory_format(model: nn.Module, choice: str) -> str:
    """``run.memory_format`` for ``model``: ``auto`` = channels_last for convolutional networks, else contiguous.

    Raises:
        ValueError: ``choice`` is not one of :data:`MEMORY_FORMATS`.
    """
    if choice not in MEMORY_FORMATS:
        raise ValueError(f"memory_format={choice!r} is not allowed; choose one of {list(MEMORY_FORMATS)}")
    if choice == "auto":
        return "channels_last" if is_convolutional(model) else "contiguous"
    return choice


def apply_memory_format(model: nn.Module, memory_format: str) -> nn.Module:
    """Convert the 4-d weights and buffers of ``model`` in place (``Module.to``); other tensors are untouched."""
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    return model.to(memory_format=fmt)


def memory_format_of(model: nn.Module) -> str:
    """``channels_last`` when some 4-d parameter is stored NHWC (not NCHW-contiguous), else ``contiguous``."""
    for p in model.parameters():
        if p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last):
            return "channels_last"
    return "contiguous"


@contextlib.contextmanager
def contiguous_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Hold ``model``'s tensors NCHW-contiguous while saving (safetensors refuses strided tensors), then
    restore the memory format it had: a saved file is the same whatever format the run trained in."""
    before = memory_format_of(model)
    if before == "contiguous":
        yield model
        return
    apply_memory_format(model, "contiguous")
    try:
        yield model
    finally:
        apply_memory_format(model, before)


def use_memory_format(model: nn.Module, choice: str) -> nn.Module:
    """``model`` converted in place to the memory format ``choice`` resolves to (:func:`resolve_memory_format`)."""
    return apply_memory_format(model, resolve_memory_format(model, choice))
