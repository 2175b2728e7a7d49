"""(c) LP-FT vs FT wall time at the same epoch budget (the paper: 15 local epochs for every method).

    python benchmarks/bench_lpft_vs_ft.py                  # defaults: timm:test_resnet, 256 examples, 15 epochs
    python benchmarks/bench_lpft_vs_ft.py --epochs 15 --lp_epochs 5 --n_train 512

Both go through ``personalize`` (the pipeline's path) on the same client and global model, interleaved.
LP-FT spends ``lp_epochs`` of the budget probing the head on cached features, so it should cost about
``(epochs - lp_epochs) / epochs`` of FT; "LP-FT, no cache" shows what the cache saves.
"""

from __future__ import annotations

from accelerate import Accelerator
from common import interleaved, median, model_parser, report, set_threads, synthetic_client

from hf_lpft.models.backbone import build_model
from hf_lpft.run.personalize import personalize
from hf_lpft.strategies import build_strategy
from hf_lpft.strategies.base import Budget
from hf_lpft.train.loop import OptimSettings


def main() -> None:
    ap = model_parser(__doc__, n_train=256)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lp_epochs", type=int, default=5)
    args = ap.parse_args()
    set_threads(args.threads)
    accelerator = Accelerator(cpu=True)
    data = synthetic_client("c0", n_train=args.n_train)
    global_model = build_model(args.backbone, num_classes=10, image_size=32, seed=0)
    budget = Budget(epochs=args.epochs, lr=0.01)
    ft = build_strategy("ft", budget=budget)
    lp_ft = build_strategy("lp_ft", {"lp_epochs": args.lp_epochs}, budget=budget)

    def job(strategy, cache: bool):
        settings = OptimSettings(batch_size=args.batch_size, cache_features=cache)
        return lambda: personalize(strategy, global_model, data, settings=settings, accelerator=accelerator, seed=0)

    times = interleaved({"FT": job(ft, True), "LP-FT": job(lp_ft, True), "LP-FT, no cache": job(lp_ft, False)},
                        repeats=args.repeats, warmup=0)
    med = {k: median(v) for k, v in times.items()}
    lines = [f"{k:16s} {v:7.2f} s  (runs {[round(t, 2) for t in times[k]]})" for k, v in med.items()]
    lines.append(f"expected LP-FT / FT if probing were free: {(args.epochs - args.lp_epochs) / args.epochs:.2f}")
    lines.append(f"LP-FT without cache / FT: {med['LP-FT, no cache'] / med['FT']:.2f}")
    report(f"bench_lpft_vs_ft: {args.backbone}, {args.n_train} examples, {args.epochs} epochs "
           f"(LP-FT: {args.lp_epochs} probe + {args.epochs - args.lp_epochs} FT)", lines,
           "LP-FT / FT wall time", med["LP-FT"] / med["FT"])


if __name__ == "__main__":
    main()
