"""Shared helpers of the benchmark scripts: synthetic clients, side-by-side timing, the printed report.

Every benchmark measures its alternatives in one process, interleaved (A, B, A, B, ...), and reports the
ratio of medians, so slow phases of a shared machine hit both sides alike.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from hf_lpft.data.tensors import ClientData  # noqa: E402


def model_parser(doc: str, *, n_train: int | None, repeats: int = 3,
                 batch_size: int | None = 64) -> argparse.ArgumentParser:
    """The options every model benchmark shares: backbone, data size, batch size, repeats, threads."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="timm:test_resnet")
    if n_train is not None:
        ap.add_argument("--n_train", type=int, default=n_train)
    if batch_size is not None:
        ap.add_argument("--batch_size", type=int, default=batch_size)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    return ap


def set_threads(threads: int) -> None:
    """``torch.set_num_threads`` unless 0 (torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def synthetic_client(client_id: str, *, n_train: int, n_test: int = 64, num_classes: int = 10,
                     image_size: int = 32, seed: int = 0) -> ClientData:
    """A client of random uint8 images whose label shifts the mean colour (learnable, no files)."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = torch.randint(0, 128, (n, 3, image_size, image_size), generator=g, dtype=torch.uint8)
        return x + (y * (127 // num_classes)).to(torch.uint8).view(-1, 1, 1, 1), y

    (trx, try_), (tex, tey) = split(n_train), split(n_test)
    return ClientData(client_id, trx, try_, tex, tey)


def interleaved(fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every function ``warmup`` times, then ``repeats`` rounds of all of them in turn; seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def command() -> str:
    """The command line that reproduces this run."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def report(title: str, lines: list[str], ratio_name: str, ratio: float, goal: str | None = None) -> None:
    """Print the measurements, the ratio (and its goal) and the reproducing command."""
    print(f"== {title} (torch threads: {torch.get_num_threads()}, cpus: {os.cpu_count()})")
    for line in lines:
        print("  " + line)
    verdict = "" if goal is None else f"   (goal {goal})"
    print(f"RATIO {ratio_name} = {ratio:.2f}{verdict}")
    print(f"command: {command()}")
