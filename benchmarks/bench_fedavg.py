"""(f) A FedAvg round against the best bare loop on the same samples; (g) channels_last against contiguous for
FedAvg and personalization; torch threads 1 against 2.

    python benchmarks/bench_fedavg.py                    # 5 clients x 600 examples, 5 rounds a call, 1 thread
    python benchmarks/bench_fedavg.py --repeats 5 --compare_threads 0   # skip the 2-thread bare loop

"fedavg" is the pipeline's FedAvg stage as ``pretrain`` runs it: ``run_fedavg`` with ``eval_every`` (default 5:
one evaluation in 5 rounds) and a round checkpoint written every round (``Checkpoints.save_round``, atomic).
"bare" trains one model over exactly the same samples in the same batches (each client's examples in batches
of 64, a seeded permutation, pre-converted floats) with forward / cross-entropy / zero_grad / backward / SGD
step and nothing else: no reset, no averaging, no evaluation, no checkpoint. Both run in the same memory format
and threads. "pft" is ``personalize`` with FT on one client. Goal (a): fedavg >= 0.9 x the best bare loop.
"""

from __future__ import annotations

import copy
import tempfile

from accelerate import Accelerator
from bench_loop import bare_epoch
from common import interleaved, median, model_parser, report, set_threads, synthetic_client

from hf_lpft.checkpoint import Checkpoints
from hf_lpft.data.tensors import to_float
from hf_lpft.federated.fedavg import run_fedavg
from hf_lpft.models.backbone import build_model
from hf_lpft.run.personalize import personalize
from hf_lpft.speed import apply_memory_format
from hf_lpft.strategies import Budget, build_strategy
from hf_lpft.train.loop import OptimSettings

FORMATS = ("channels_last", "contiguous")


def make_runs(args, clients, base, accelerator, ckpt_dir: str) -> dict:
    """The interleaved alternatives: bare / fedavg / pft in each memory format (+ bare at more threads)."""
    settings = OptimSettings(batch_size=args.batch_size)
    floats = [(to_float(c.train_x), c.train_y) for c in clients]
    ft = build_strategy("ft", budget=Budget(epochs=args.pft_epochs, lr=0.01))
    models = {fmt: apply_memory_format(copy.deepcopy(base), fmt) for fmt in FORMATS}

    def bare(fmt: str, threads: int | None = None):
        def fn():
            set_threads(threads or args.threads)
            model = copy.deepcopy(models[fmt])
            for r in range(args.rounds):
                for i, (x, y) in enumerate(floats):
                    bare_epoch(model, x, y, batch_size=args.batch_size, lr=0.05, seed=r * 1000 + i)
            set_threads(args.threads)
        return fn

    def fedavg(fmt: str):
        ckpt = Checkpoints(ckpt_dir)

        def fn():
            run_fedavg(copy.deepcopy(models[fmt]), clients, rounds=args.rounds, local_epochs=1, lr=0.05,
                       client_fraction=1.0, settings=settings, accelerator=accelerator, seed=0,
                       eval_every=args.eval_every, on_round_end=lambda r, s, h: ckpt.save_round(0, s, h))
        return fn

    def pft(fmt: str):
        return lambda: personalize(ft, models[fmt], clients[0], settings=settings, accelerator=accelerator, seed=0)

    runs = {f"{kind} {fmt}": make(fmt) for fmt in FORMATS for kind, make in (("bare", bare), ("fedavg", fedavg))}
    if args.compare_threads:
        runs[f"bare channels_last {args.compare_threads} threads"] = bare("channels_last", args.compare_threads)
    runs.update({f"pft {fmt}": pft(fmt) for fmt in FORMATS})
    return runs


def main() -> None:
    ap = model_parser(__doc__, n_train=600, repeats=3)
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5, help="FedAvg rounds per timed call")
    ap.add_argument("--eval_every", type=int, default=5, help="fedavg.eval_every (the config's default: 5)")
    ap.add_argument("--pft_epochs", type=int, default=3)
    ap.add_argument("--compare_threads", type=int, default=2,
                    help="also time the bare loop at this many threads (0 = no)")
    args = ap.parse_args()
    set_threads(args.threads)
    clients = [synthetic_client(f"c{i}", n_train=args.n_train, n_test=200, seed=i) for i in range(args.clients)]
    base = build_model(args.backbone, num_classes=10, image_size=32, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        times = interleaved(make_runs(args, clients, base, Accelerator(cpu=True), tmp), repeats=args.repeats)
    med = {k: median(v) for k, v in times.items()}
    per_round = args.clients * args.n_train
    lines = [f"{k:34s} {med[k] / (1 if k.startswith('pft') else args.rounds):7.3f} s "
             f"{'a call' if k.startswith('pft') else 'a round'} (runs {[round(t, 2) for t in v]} s)"
             for k, v in times.items()]
    best = min(FORMATS, key=lambda f: med[f"bare {f}"])
    lines += [f"best bare loop: {best} ({per_round * args.rounds / med[f'bare {best}']:.0f} samples/s)",
              f"(b) channels_last speed-up: bare {med['bare contiguous'] / med['bare channels_last']:.2f}x, "
              f"FedAvg {med['fedavg contiguous'] / med['fedavg channels_last']:.2f}x, "
              f"PFT (FT) {med['pft contiguous'] / med['pft channels_last']:.2f}x",
              f"fedavg / bare, contiguous both: {med['bare contiguous'] / med['fedavg contiguous']:.2f}"]
    if args.compare_threads:
        lines.append(f"threads: bare channels_last 1 thread / {args.compare_threads} threads time = "
                     f"{med['bare channels_last'] / med[f'bare channels_last {args.compare_threads} threads']:.2f} "
                     f"(> 1: more threads faster)")
    report(f"bench_fedavg: {args.backbone}, {args.clients} clients x {args.n_train} examples, {args.rounds} rounds a "
           "call, "
           f"batch {args.batch_size}, eval_every {args.eval_every}", lines,
           f"FedAvg round / best bare loop throughput ({best}, same threads)",
           med[f"bare {best}"] / med[f"fedavg {best}"], ">= 0.9")


if __name__ == "__main__":
    main()
