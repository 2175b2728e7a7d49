"""(h) The built-in FedAvg engine against the Flower simulation engine on the same rounds.

    python benchmarks/bench_flower.py                      # 5 clients x 600 examples, 3 rounds, 2 repeats
    python benchmarks/bench_flower.py --rounds 5 --repeats 3

Both engines train the same thing (same local seeds, sampling and float64 aggregation; the max difference of
the two global models is printed): ``run_fedavg`` in this process, and ``run_flower_fedavg`` (Flower's
ServerApp / ClientApp in its local Ray simulation, one CPU per virtual client). Both with
``fedavg.eval_every`` from the config (default 5, so only the last round is evaluated here), the same
memory format and torch threads. Flower's time includes starting and stopping its simulation each call,
which is what a run pays once per seed. Needs ``pip install 'hf-lpft[flower]'``.
"""

from __future__ import annotations

import copy
import logging

from accelerate import Accelerator
from common import interleaved, median, model_parser, report, set_threads, synthetic_client

from hf_lpft.config import load_config
from hf_lpft.federated.fedavg import run_fedavg
from hf_lpft.federated.flower import run_flower_fedavg
from hf_lpft.models.backbone import build_model
from hf_lpft.speed import use_memory_format
from hf_lpft.train.loop import OptimSettings


def main() -> None:
    ap = model_parser(__doc__, n_train=600, repeats=2)
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    set_threads(args.threads)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    clients = [synthetic_client(f"c{i}", n_train=args.n_train, n_test=200, seed=i) for i in range(args.clients)]
    cfg = load_config(None, {"fedavg": {"rounds": args.rounds, "batch_size": args.batch_size, "engine": "flower"},
                             "run": {"num_threads": args.threads or None}})
    f = cfg.fedavg
    base = use_memory_format(build_model(args.backbone, num_classes=10, image_size=32, seed=0), cfg.run.memory_format)
    accelerator, out = Accelerator(cpu=True), {}

    def builtin():
        out["builtin"] = run_fedavg(copy.deepcopy(base), clients, rounds=f.rounds, local_epochs=f.local_epochs, lr=f.lr,
                                    client_fraction=f.client_fraction, accelerator=accelerator, seed=0,
                                    settings=OptimSettings(f.optimizer, f.momentum, f.weight_decay, f.batch_size),
                                    eval_every=f.eval_every)[0]

    def flower():
        out["flower"] = run_flower_fedavg(copy.deepcopy(base), clients, rounds=f.rounds, local_epochs=f.local_epochs,
                                          lr=f.lr, client_fraction=f.client_fraction, seed=0,
                                          settings=OptimSettings(f.optimizer, f.momentum, f.weight_decay, f.batch_size),
                                          eval_every=f.eval_every, num_threads=cfg.run.num_threads)[0]

    times = interleaved({"builtin": builtin, "flower": flower}, repeats=args.repeats)
    a, b = out["builtin"].state_dict(), out["flower"].state_dict()
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    med = {k: median(v) for k, v in times.items()}
    lines = [f"{k:8s} {med[k]:7.2f} s for {args.rounds} rounds (runs {[round(t, 2) for t in v]} s)" for k,
             v in times.items()]
    lines.append(f"max |builtin - flower| over the global weights: {diff:.2e}")
    report(f"bench_flower: {args.backbone}, {args.clients} clients x {args.n_train} examples, {args.rounds} rounds, "
           f"memory format {cfg.run.memory_format}", lines, "Flower time / built-in time",
           med["flower"] / med["builtin"])


if __name__ == "__main__":
    main()
