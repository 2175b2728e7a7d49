"""(b) A probing epoch on cached features vs through the frozen backbone; and all clients' heads batched.

    python benchmarks/bench_cache.py                       # defaults: timm:test_resnet, 512 examples, 1 thread
    python benchmarks/bench_cache.py --clients 50 --epochs 15

Measured side by side (interleaved) in one process, through ``train_phase`` (the pipeline's loop):

1. one probing epoch (head only, BatchNorm frozen) with ``cache_features`` on vs off: the epochs after
   the first, so the one-off feature pass is not in it (goal: cached >= 10x faster);
2. the whole probing phase (``--epochs``), the cached run including its one feature pass;
3. probing ``--clients`` clients' heads: client by client with the loop vs all at once
   (:func:`hf_lpft.train.batched_probe.probe_clients`), on fixed features (a SplitModel whose backbone is
   the identity, fed with feature matrices), so only head training is compared.
"""

from __future__ import annotations

import copy
import time

import torch
from accelerate import Accelerator
from common import interleaved, median, model_parser, report, set_threads, synthetic_client
from torch import nn

from hf_lpft.data.tensors import ClientData
from hf_lpft.models.backbone import build_model
from hf_lpft.train.batched_probe import probe_clients
from hf_lpft.train.loop import OptimSettings, train_phase
from hf_lpft.train.phase import Phase


def epoch_times(model, phase, data, settings, accelerator) -> list[float]:
    """Seconds of each epoch of ``train_phase`` (the first one includes the feature pass when cached)."""
    stamps = [time.perf_counter()]
    train_phase(model, phase, data, settings=settings, accelerator=accelerator, seed=1,
                on_epoch_end=lambda e, loss: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])]


def feature_clients(k: int, *, n: int, dim: int, num_classes: int) -> list[ClientData]:
    """Clients whose inputs are already features (float, (n, dim))."""
    g = torch.Generator().manual_seed(0)
    return [ClientData(f"c{i}", torch.randn(n + 7 * i, dim, generator=g),
                       torch.randint(0, num_classes, (n + 7 * i,), generator=g), torch.zeros(0, dim),
                       torch.zeros(0, dtype=torch.long)) for i in range(k)]


def main() -> None:
    ap = model_parser(__doc__, n_train=512)
    ap.add_argument("--epochs", type=int, default=5, help="epochs of the probing phase")
    ap.add_argument("--clients", type=int, default=10, help="clients for the batched-heads comparison")
    args = ap.parse_args()
    if args.epochs < 2:  # the per-epoch time is measured on the epochs after the first (which caches)
        ap.error(f"--epochs {args.epochs}: need at least 2 (the first epoch also computes the cache)")
    set_threads(args.threads)
    accelerator = Accelerator(cpu=True)
    data = synthetic_client("c0", n_train=args.n_train)
    base = build_model(args.backbone, num_classes=10, image_size=32, seed=0)
    phase = Phase("probe", "head", args.epochs, 0.01, bn="frozen")
    runs: dict[str, list[list[float]]] = {"cached": [], "uncached": []}

    def run(cache: bool):
        settings = OptimSettings(batch_size=args.batch_size, cache_features=cache)
        runs["cached" if cache else "uncached"].append(epoch_times(copy.deepcopy(base), phase, data, settings,
                                                                   accelerator))

    interleaved({"cached": lambda: run(True), "uncached": lambda: run(False)}, repeats=args.repeats, warmup=0)
    later = {k: median([t for r in v for t in r[1:]]) for k, v in runs.items()}  # epochs after the first
    whole = {k: median([sum(r) for r in v]) for k, v in runs.items()}

    # Heads only: K clients through the loop one by one vs all at once, on fixed features.
    dim = base.num_features
    clients = feature_clients(args.clients, n=args.n_train, dim=dim, num_classes=10)
    probe_model = copy.deepcopy(base)
    probe_model.backbone = nn.Identity()
    settings = OptimSettings(batch_size=args.batch_size)
    seeds = list(range(args.clients))

    def loop_heads():
        for c, s in zip(clients, seeds):
            train_phase(copy.deepcopy(probe_model), phase, c, settings=settings, accelerator=accelerator, seed=s)

    def batched_heads():
        probe_clients(copy.deepcopy(probe_model), phase, clients, settings=settings, seeds=seeds)

    heads = {k: median(v) for k, v in interleaved({"loop": loop_heads, "batched": batched_heads},
                                                   repeats=args.repeats).items()}
    lines = [f"probing epoch (after the first): cached {later['cached'] * 1e3:.1f} ms, "
             f"uncached {later['uncached'] * 1e3:.1f} ms  -> {later['uncached'] / later['cached']:.0f}x",
             f"whole probing phase ({args.epochs} epochs, cached incl. its feature pass): cached {whole['cached']:.2f} "
             "s, "
             f"uncached {whole['uncached']:.2f} s  -> {whole['uncached'] / whole['cached']:.1f}x",
             f"{args.clients} clients' heads ({args.epochs} epochs, ~{args.n_train} examples each, d={dim}): "
             f"loop one by one {heads['loop']:.3f} s, batched {heads['batched']:.3f} s  -> "
             f"{heads['loop'] / heads['batched']:.1f}x"]
    report(f"bench_cache: {args.backbone}, {args.n_train} examples, batch {args.batch_size}", lines,
           "probing epoch uncached / cached time", later["uncached"] / later["cached"], ">= 10")


if __name__ == "__main__":
    main()
