"""(d) Peak memory and time per client personalizing 5 vs 50 clients (goal: flat: one client's model alive at a time).

    python benchmarks/bench_memory.py                      # defaults: timm:test_resnet, ft+lp+lp_ft, 1 epoch
    python benchmarks/bench_memory.py --few 5 --many 50 --strategies ft,lp_ft

Runs the pipeline's ``personalize_all`` (train, evaluate on every client, export each unit) on small
synthetic clients, first for ``--few`` then for ``--many`` clients, in one process. A thread samples the
process RSS (psutil) every few milliseconds; reported are the peak RSS and its rise during
``personalize_all`` above the level just before (client data are built before, so the rise excludes them),
and the growth per extra client next to the size of one model copy, and the wall time per client. The global
model is in the memory format the pipeline gives it (``run.memory_format`` auto: channels_last for CNNs).
Torch tensors live outside Python's allocator, so tracemalloc would not see them; RSS does.
"""

from __future__ import annotations

import tempfile
import threading
import time

import psutil
from accelerate import Accelerator
from common import model_parser, report, set_threads, synthetic_client

import hf_lpft.run.units as units
from hf_lpft.config import load_config
from hf_lpft.models.backbone import build_model
from hf_lpft.run.preflight import build_strategies
from hf_lpft.run.settings import eval_settings, run_layout
from hf_lpft.run.units import personalize_all
from hf_lpft.speed import use_memory_format


class RssSampler:
    """Max RSS (bytes) of this process while the context is open, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.005):
        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def personalize_clients(k: int, args, accelerator) -> tuple[float, float, list[float], float]:
    """RSS rise (MB) during ``personalize_all`` over ``k`` clients, peak RSS, RSS after each unit, seconds a client."""
    clients = [synthetic_client(f"c{i}", n_train=args.n_train, n_test=16, seed=i) for i in range(k)]
    global_model = use_memory_format(build_model(args.backbone, num_classes=10, image_size=32, seed=0), "auto")
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, {"pft": {"strategies": args.strategies.split(","), "epochs": args.epochs,
                                         "batch_size": 32, "strategy_args": {"lp_ft": {"lp_epochs": 1}}},
                                 "run": {"output_dir": out}})
        proc, after_unit = psutil.Process(), []
        original = units.log_unit

        def log_unit(acc, record):  # called once per finished unit: sample RSS there
            after_unit.append(proc.memory_info().rss / 2**20)
            original(acc, record)

        units.log_unit = log_unit
        try:
            start = time.perf_counter()
            with RssSampler() as rss:
                personalize_all(cfg, build_strategies(cfg), global_model, clients, seed=0, layout=run_layout(cfg.run),
                                accelerator=accelerator, evaluation=eval_settings(cfg.run, cfg.pft))
        finally:
            units.log_unit = original
    return (rss.peak - rss.start) / 2**20, rss.peak / 2**20, after_unit, (time.perf_counter() - start) / k


def main() -> None:
    ap = model_parser(__doc__, n_train=32, batch_size=None)
    ap.add_argument("--few", type=int, default=5)
    ap.add_argument("--many", type=int, default=50)
    ap.add_argument("--strategies", default="ft,lp,lp_ft")
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)
    accelerator = Accelerator(cpu=True)
    personalize_clients(2, args, accelerator)  # warm-up: allocator pools, lazy imports, kernels
    few = personalize_clients(args.few, args, accelerator)
    many = personalize_clients(args.many, args, accelerator)
    units = many[2]
    half = len(units) // 2
    lines = [f"{args.few:3d} clients: RSS rise during personalization {few[0]:7.1f} MB (peak RSS {few[1]:.0f} MB)",
             f"{args.many:3d} clients: RSS rise during personalization {many[0]:7.1f} MB (peak RSS {many[1]:.0f} MB)",
             f"{args.many} clients, RSS after each unit: first {units[0]:.0f} MB, median of first half "
             f"{sorted(units[:half])[half // 2]:.0f} MB, of second half "
             f"{sorted(units[half:])[(len(units) - half) // 2]:.0f} MB, "
             f"last {units[-1]:.0f} MB ({len(units)} units)"]
    model_mb = sum(t.numel() * t.element_size() for t in build_model(args.backbone, num_classes=10, image_size=32)
                   .state_dict().values()) / 2**20
    per_client = (many[0] - few[0]) / (args.many - args.few)
    lines.append(f"growth per extra client {per_client:.2f} MB; one model copy is {model_mb:.2f} MB "
                 f"(a deep copy kept per unit would add {model_mb * len(args.strategies.split(',')):.2f} MB a client)")
    lines.append(f"time per client (all strategies): {few[3]:.2f} s with {args.few} clients, {many[3]:.2f} s with "
                 f"{args.many} (ratio {many[3] / few[3]:.2f}; each client is also evaluated on every client's test "
                 "split, "
                 "so part of the time grows with the number of clients)")
    report(f"bench_memory: {args.backbone}, strategies {args.strategies}, {args.epochs} epochs, "
           f"{args.n_train} examples a client", lines, f"peak RSS {args.many} / {args.few} clients",
           many[1] / few[1], "about 1 (flat)")


if __name__ == "__main__":
    main()
