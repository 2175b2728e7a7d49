"""(a) Our training loop vs a bare hand-written PyTorch loop: same model, data, batch size and threads.

    python benchmarks/bench_loop.py                       # defaults: timm:test_resnet, 512 examples, batch 64, 1 thread
    python benchmarks/bench_loop.py --threads 2 --repeats 15

"ours" is the pipeline's path: ``run_phase`` of the FT strategy (hooks, flooding check, NaN check,
accelerate backward). "bare" slices pre-converted float tensors from a seeded permutation and does
forward / cross-entropy / zero_grad / backward / SGD step, nothing else. Goal: ours >= 0.9 x bare.
"""

from __future__ import annotations

import copy

import torch
from accelerate import Accelerator
from common import interleaved, median, model_parser, report, set_threads, synthetic_client
from torch import nn

from hf_lpft.data.tensors import to_float
from hf_lpft.models.backbone import build_model
from hf_lpft.run.personalize import run_phase
from hf_lpft.strategies import build_strategy
from hf_lpft.strategies.base import Budget
from hf_lpft.train.loop import OptimSettings, train_phase


def bare_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, lr: float, seed: int) -> None:
    """The minimal loop: what anyone would write by hand."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(y), batch_size):
        idx = order[start:start + batch_size]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def main() -> None:
    ap = model_parser(__doc__, n_train=512, repeats=9)
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)  # the same threads for both loops
    data = synthetic_client("c0", n_train=args.n_train)
    base = build_model(args.backbone, num_classes=10, image_size=32, seed=0)
    accelerator = Accelerator(cpu=True)
    settings = OptimSettings(batch_size=args.batch_size)
    strategy = build_strategy("ft", budget=Budget(epochs=args.epochs, lr=0.01))
    phase = strategy.phases()[0]
    xf = to_float(data.train_x)  # the bare loop gets its floats for free

    def ours_pipeline():
        run_phase(strategy, copy.deepcopy(base), phase, data, settings=settings, accelerator=accelerator, seed=1)

    def ours_loop():
        train_phase(copy.deepcopy(base), phase, data, settings=settings, accelerator=accelerator, seed=1)

    def bare():
        model = copy.deepcopy(base)
        for e in range(args.epochs):
            bare_epoch(model, xf, data.train_y, batch_size=args.batch_size, lr=0.01, seed=e)

    times = interleaved({"bare": bare, "train_phase": ours_loop, "run_phase (pipeline)": ours_pipeline},
                        repeats=args.repeats)
    n = args.n_train * args.epochs
    thr = {k: n / median(v) for k, v in times.items()}
    lines = [f"{k:22s} {v:8.0f} samples/s (median of {args.repeats}; runs {[round(t, 3) for t in times[k]]} s)"
             for k, v in thr.items()]
    lines.append(f"train_phase / bare = {thr['train_phase'] / thr['bare']:.2f}")
    report(f"bench_loop: {args.backbone}, {args.n_train} examples x {args.epochs} epoch(s), batch {args.batch_size}",
           lines, "ours (run_phase, FT) / bare throughput", thr["run_phase (pipeline)"] / thr["bare"], ">= 0.9")


if __name__ == "__main__":
    main()
