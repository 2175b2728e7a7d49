"""Global exact vs estimated on a sample of K other clients: time per client at several N (issue 26, item 2).

    python benchmarks/bench_global_estimate.py                         # N = 10, 50, 100, 200; K = 20, 99
    python benchmarks/bench_global_estimate.py --sizes 10,50 --k 20 --clients 2 --repeats 1

Data: the embedded digits5 (1250 per domain, pooled), split by Dirichlet label skew (alpha 1.0) into N
small clients of at most ``--cap`` examples each (a quarter for test), so that a client's size does not
change with N. Model: timm ``test_resnet`` + linear head, randomly initialised (the timings do not depend
on its accuracy), channels_last as the pipeline trains it.

Per N, for ``--clients`` clients: FT for ``--epochs`` epochs (``personalize``, the pipeline's own function), then
the evaluation the pipeline runs on the model (``evaluate_on_clients`` with the distortion columns on, the
default), exact (every client's test split) and with each K (own split + K sampled), interleaved
(exact, K1, K2, exact, ...) ``--repeats`` times; medians. "per client" = train + evaluation (+ the per-seed
reference features, O(N) once, divided by N). Prints a Markdown table and the load average (``uptime``).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

from accelerate import Accelerator
from common import command, interleaved, set_threads

from hf_lpft.config import load_config
from hf_lpft.data.federate import federate
from hf_lpft.data.load import client_tensors, load_source
from hf_lpft.evaluation.clients import EvalSettings, evaluate_on_clients, reference_features
from hf_lpft.models.backbone import build_model
from hf_lpft.run.personalize import personalize
from hf_lpft.run.preflight import build_strategies
from hf_lpft.speed import use_memory_format
from hf_lpft.train.optim import settings_from


def build_clients(n: int, args) -> list:
    ds = load_source("digits5", builtin_kwargs={"n_per_domain": 1250, "image_size": 32})
    fed = federate(ds, scheme="dirichlet", num_clients=n, alpha=1.0, min_partition_size=getattr(args, "min_size", 8),
                   max_examples_per_client=args.cap, seed=0)
    return client_tensors(ds, fed, image_column="image", label_column="label", image_size=32)


def measure(n: int, args, accelerator: Accelerator) -> dict:
    clients = build_clients(n, args)
    model = use_memory_format(build_model("timm:test_resnet", num_classes=10, image_size=32, seed=0), "auto")
    cfg = load_config(None, {"pft": {"strategies": ["ft"], "epochs": args.epochs}})
    strategy, optim = build_strategies(cfg)["ft"], settings_from(cfg.pft)
    exact = EvalSettings(batch_size=256, distortion=True, eval_every=0)
    t = time.perf_counter()
    refs = reference_features(exact, model, clients, None, accelerator.device)
    ref_per_client = (time.perf_counter() - t) / n
    train, evals = [], {"exact": []} | {f"K={k}": [] for k in args.k if k < n - 1}
    for i in range(args.clients):
        t = time.perf_counter()
        tuned, _ = personalize(strategy, model, clients[i], settings=optim, accelerator=accelerator, seed=i)
        train.append(time.perf_counter() - t)
        ways = {"exact": None} | {f"K={k}": EvalSettings(256, True, 0, k).sample(n, i, 0) for k in args.k if k < n - 1}
        times = interleaved({name: (lambda s=s: evaluate_on_clients(tuned, clients, i, settings=exact,
                                                                      device=accelerator.device, reference=refs[i],
                                                                      sample=s)) for name, s in ways.items()},
                            repeats=args.repeats)
        for name, ts in times.items():
            evals[name].append(statistics.median(ts))
    tr = statistics.median(train)
    return {"n": n, "n_test": statistics.mean(c.n_test for c in clients), "train": tr, "ref": ref_per_client,
            "eval": {k: statistics.median(v) for k, v in evals.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,50,100,200")
    ap.add_argument("--k", default="20,99", help="sample sizes K to compare with exact")
    ap.add_argument("--clients", type=int, default=3, help="clients personalized and evaluated per N")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--cap", type=int, default=24, help="examples per client at most")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    args.k = [int(k) for k in args.k.split(",")]
    set_threads(args.threads)
    accelerator = Accelerator(cpu=True)
    start = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows = [measure(int(n), args, accelerator) for n in args.sizes.split(",")]
    end = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    names = ["exact"] + [f"K={k}" for k in args.k]
    print("| N | test ex. / client | train s / client | " + " | ".join(f"eval s ({m})" for m in names)
          + " | " + " | ".join(f"per client s ({m})" for m in names) + " |")
    print("|" + "---|" * (3 + 2 * len(names)))
    for r in rows:
        ev = [r["eval"].get(m, r["eval"]["exact"]) for m in names]  # K >= N-1 is exact
        per = [r["train"] + e + r["ref"] for e in ev]
        print(f"| {r['n']} | {r['n_test']:.1f} | {r['train']:.3f} | " + " | ".join(f"{e:.3f}" for e in ev) + " | "
              + " | ".join(f"{p:.3f}" for p in per) + " |")
    print(f"\nload before: {start}\nload after:  {end}\ncommand: {command()}")


if __name__ == "__main__":
    main()
