"""From 5 to 500 clients: FedAvg round, PFT and evaluation time, peak RSS and disk, with Flower's simulation engine
and Apple's pfl-research simulator side by side on the same work (issue 26, item 1).

    python benchmarks/bench_scale.py                                   # N = 5, 20, 50, 100, 200, 500; 5 rounds
    python benchmarks/bench_scale.py --sizes 5,20 --rounds 2           # a smoke run
    python benchmarks/bench_scale.py --engines builtin,flower          # without pfl

Data: the embedded digits5 pooled (5 x 1250 images), split by Dirichlet label skew (alpha 1.0) into N clients of
at least ``--min_size`` and at most ``--cap`` examples (a quarter for test; ``bench_global_estimate.build_clients``):
12 a client at most keeps the client size about the same from 5 to 500 clients (the pool gives ~12.5 a client at
500; a minimum of 8 fails to draw there). Model: timm
``test_resnet`` + linear head, seed 0, channels_last, 1 torch thread. FedAvg: hf_lpft's defaults (1 local epoch,
SGD lr 0.05 momentum 0.9, batch 64), ``--rounds`` rounds, every client a round below N = ``--partial_from``
(100) and ``client_fraction`` ``--fraction`` (0.1) from there on; no evaluation during FedAvg (``eval_every 0``).

Per N, interleaved ``--repeats`` times (builtin, flower, pfl, builtin, ...), each with the load average before and
after:

* builtin: ``run_fedavg`` in this process (the pipeline's FedAvg stage, without its checkpoint).
* flower: ``run_flower_fedavg`` (Flower ServerApp / ClientApp in Flower's Ray simulation, one virtual node per
  client, ``--flower_cpus`` CPUs for Ray, one per virtual client); Ray's start and stop are inside the wall time.
* pfl: ``pfl_fedavg.py`` run by ``--pfl_python`` (a separate venv: pfl 0.6 pins attrs<24, absl-py<2):
  ``FederatedAveraging`` on ``SimulatedBackend`` with ``WeightByDatapoints``, the same clients, model and
  optimizer, a cohort of as many clients as hf_lpft samples. Its wall is ``FederatedAveraging.run`` alone; the
  subprocess's imports and data building are reported apart.

"round s" is the median time between two round ends (steady state); "wall" is the whole call, so wall - rounds x
round s is the engine's start-up. Then, on the global model after one built-in round (the timings do not depend
on its accuracy), for ``--pft_clients`` clients: FT for ``--pft_epochs`` epochs (``personalize``), the pipeline's
evaluation of the personalized model
(``evaluate_on_clients`` with the default ``run.global_eval_clients``: exact up to 50 clients, a sample of 49
others above) and the per-seed reference features (O(N) once, divided by N). Disk: the global model and each
personalized client written as a run writes them (``Strategy.export`` and the Hub folder's ``export_client``),
bytes counted once per inode; the folder at N is projected as global + N x bytes a client (one strategy).
Peak RSS: summed over this process and its children (Ray's processes, the pfl subprocess), sampled every 50 ms;
shared pages count once per process, so Flower's is an upper bound.
Writes ``--out``/bench_scale.json and bench_scale.png (log-log: round time and per-client cost against N).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from accelerate import Accelerator
from bench_global_estimate import build_clients
from bench_memory import RssSampler
from common import command, set_threads
from safetensors.torch import load_file

from hf_lpft.config import load_config
from hf_lpft.evaluation.clients import evaluate_on_clients, reference_features
from hf_lpft.federated.fedavg import run_fedavg
from hf_lpft.federated.flower import run_flower_fedavg
from hf_lpft.hub.export import export_client
from hf_lpft.models.backbone import build_model
from hf_lpft.run.personalize import personalize
from hf_lpft.run.preflight import build_strategies
from hf_lpft.run.settings import eval_settings
from hf_lpft.speed import use_memory_format
from hf_lpft.train.optim import settings_from

HERE = Path(__file__).resolve().parent


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def logged(what: str, fn):
    """Run ``fn``, print its wall time with the load average before and after; its dict plus ``load``."""
    before = load()
    result = fn()
    after = load()
    print(f"  {what}: {result.get('wall', float('nan')):.2f} s  [load {before} -> {after}]", flush=True)
    return result | {"load": [before, after]}


class TreeRss(RssSampler):
    """Peak RSS summed over this process and its descendants, every 50 ms."""

    def __init__(self):
        super().__init__(interval=0.05)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = self.proc.memory_info().rss
            for child in self.proc.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:  # ended meanwhile
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)


def timed_rounds(call) -> dict:
    """Wall seconds of ``call(stamp)``, the median time between round ends, peak RSS (MB)."""
    stamps: list[float] = []
    with TreeRss() as rss:
        t0 = time.perf_counter()
        call(lambda *_: stamps.append(time.perf_counter()))
        wall = time.perf_counter() - t0
    return {"wall": wall, "round": steady(stamps, wall), "rss_mb": rss.peak / 2**20}


def steady(stamps: list[float], wall: float) -> float:
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(gaps) if gaps else wall


def engines(n: int, args, cfg, clients, base, accelerator) -> dict:
    """The FedAvg calls to compare, each returning timed_rounds' dict."""
    f = cfg.fedavg
    common = {"rounds": args.rounds, "local_epochs": f.local_epochs, "lr": f.lr, "client_fraction": fraction(n, args),
              "settings": settings_from(f), "seed": 0, "eval_every": 0}

    def builtin():
        return timed_rounds(lambda stamp: run_fedavg(copy.deepcopy(base), clients, accelerator=accelerator,
                                                     on_round_end=stamp, **common))

    def flower():
        backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": args.flower_cpus}}
        return timed_rounds(lambda stamp: run_flower_fedavg(copy.deepcopy(base), clients, on_round_end=stamp,
                                                            num_threads=args.threads, backend_config=backend, **common))

    def pfl():
        options = {"n": n, "rounds": args.rounds, "cohort": cohort(n, args), "cap": args.cap, "min_size": args.min_size,
                   "lr": f.lr, "momentum": f.momentum, "batch_size": f.batch_size, "local_epochs": f.local_epochs,
                   "threads": args.threads}
        cmd = [args.pfl_python, str(HERE / "pfl_fedavg.py")]
        cmd += [x for k, v in options.items() for x in (f"--{k}", str(v))]
        env = os.environ | {"PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
        with TreeRss() as rss:
            t0 = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            process = time.perf_counter() - t0
        if out.returncode:
            raise RuntimeError(f"pfl failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
        res = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
        ends = res["round_ends"]
        return {"wall": res["seconds"], "round": steady(ends, res["seconds"]), "rss_mb": rss.peak / 2**20,
                "process_s": process}

    return {name: fn for name, fn in {"builtin": builtin, "flower": flower, "pfl": pfl}.items() if name in args.engines}


def fraction(n: int, args) -> float:
    return args.fraction if n >= args.partial_from else 1.0


def cohort(n: int, args) -> int:
    return max(1, int(round(fraction(n, args) * n)))  # as hf_lpft.federated.fedavg.sample_clients


def personalization(n: int, args, cfg, clients, model, accelerator) -> dict:
    """FT, evaluation and export of ``--pft_clients`` clients from the global ``model``; seconds a client, bytes."""
    strategy, optim, es = build_strategies(cfg)["ft"], settings_from(cfg.pft), eval_settings(cfg.run, cfg.pft)
    with TreeRss() as rss, tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        refs = reference_features(es, model, clients, None, accelerator.device)
        ref = (time.perf_counter() - t) / n
        model.save_pretrained(Path(tmp) / "global")
        base_state = load_file(str(Path(tmp) / "global" / "model.safetensors"))
        train, evals, k = [], [], min(args.pft_clients, n)
        for i in range(k):
            t = time.perf_counter()
            tuned, _ = personalize(strategy, model, clients[i], settings=optim, accelerator=accelerator, seed=i)
            train.append(time.perf_counter() - t)
            t = time.perf_counter()
            evaluate_on_clients(tuned, clients, i, settings=es, device=accelerator.device, reference=refs[i],
                                sample=es.sample(n, i, 0))
            evals.append(time.perf_counter() - t)
            src = Path(tmp) / "run" / "ft" / f"client_{i}"
            strategy.export(tuned, src)
            export_client(src, Path(tmp) / "hub" / "ft" / f"client_{i}", base_state, base_ref=str(Path(tmp) / "global"))
        client_bytes = disk(Path(tmp) / "run", Path(tmp) / "hub") / k
        global_bytes = disk(Path(tmp) / "global")
    sampled = es.sample(n, 0, 0)
    return {"pft": statistics.median(train), "eval": statistics.median(evals), "ref": ref, "rss_mb": rss.peak / 2**20,
            "client_kb": client_bytes / 1024, "folder_mb": (global_bytes + n * client_bytes) / 2**20,
            "global_eval": "exact" if sampled is None else f"K={len(sampled)}",
            "wall": statistics.median(train) + statistics.median(evals) + ref}


def disk(*folders: Path) -> int:
    """Bytes of the files under ``folders``, each inode once (a hard link between them is not counted twice)."""
    seen, total = set(), 0
    for p in (p for folder in folders for p in folder.rglob("*")):
        st = p.lstat()
        if p.is_file() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def measure(n: int, args, accelerator) -> dict:
    print(f"N = {n}: building clients [load {load()}]", flush=True)
    t = time.perf_counter()
    clients = build_clients(n, args)
    build = time.perf_counter() - t
    cfg = load_config(None, {"pft": {"strategies": ["ft"], "epochs": args.pft_epochs},
                             "run": {"num_threads": args.threads}})
    base = use_memory_format(build_model("timm:test_resnet", num_classes=10, image_size=32, seed=0), "auto")
    calls, runs = engines(n, args, cfg, clients, base, accelerator), {}
    for _ in range(args.repeats):
        for name, fn in calls.items():
            runs.setdefault(name, []).append(logged(f"{name} FedAvg, {args.rounds} rounds", fn))
    fed = {name: {key: statistics.median(r[key] for r in rs) for key in ("wall", "round", "rss_mb")}
           | {"load": [rs[0]["load"][0], rs[-1]["load"][1]]} for name, rs in runs.items()}
    if "pfl" in runs:
        fed["pfl"]["process_s"] = statistics.median(r["process_s"] for r in runs["pfl"])
    global_model = run_fedavg(copy.deepcopy(base), clients, rounds=1, local_epochs=1, lr=cfg.fedavg.lr,
                              client_fraction=fraction(n, args), settings=settings_from(cfg.fedavg),
                              accelerator=accelerator, seed=0, eval_every=0)[0]
    pft = logged(f"PFT + evaluation of {min(args.pft_clients, n)} clients (per client)",
                 lambda: personalization(n, args, cfg, clients, global_model, accelerator))
    return {"n": n, "examples": statistics.mean(c.n_train + c.n_test for c in clients), "build_s": build,
            "cohort": cohort(n, args), "fedavg": fed, "pft": pft}


def tables(rows: list[dict], args) -> str:
    names = [e for e in ("builtin", "flower", "pfl") if e in args.engines]
    peers = names[1:] if names[0] == "builtin" else []  # ratios need the built-in engine
    head = ["N", "clients a round"] + [f"{e} r/s (wall r/s)" for e in names] + [
        f"{e} / builtin, round time" for e in peers] + ["load before -> after"]
    out = ["FedAvg rounds per second (steady: 1 / median time between round ends; wall: rounds / whole call)", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        f = r["fedavg"]
        cells = [str(r["n"]), str(r["cohort"])]
        cells += [f"{1 / f[e]['round']:.2f} ({args.rounds / f[e]['wall']:.2f})" for e in names]
        cells += [f"{f[e]['round'] / f['builtin']['round']:.2f}" for e in peers]
        out.append("| " + " | ".join(cells + [f"{f[names[0]]['load'][0]} -> {f[names[-1]]['load'][1]}"]) + " |")
    out += ["", "Per N (built-in engine; times in seconds)", "",
            "| N | examples / client | round s | round s / client in round | PFT s / client | eval s / client "
            "(Global) | personalization s / client | peak RSS MB FedAvg (builtin / flower / pfl) | peak RSS MB PFT "
            "| KB / client | folder MB (projected) | load before -> after (PFT) |", "|" + "---|" * 12]
    for r in rows:
        f, p = r["fedavg"], r["pft"]
        b = f.get("builtin", {"round": float("nan")})
        rss = " / ".join(f"{f[e]['rss_mb']:.0f}" for e in names)
        out.append(f"| {r['n']} | {r['examples']:.1f} | {b['round']:.3f} | {b['round'] / r['cohort']:.4f} | "
                   f"{p['pft']:.3f} | {p['eval'] + p['ref']:.3f} ({p['global_eval']}) | {p['wall']:.3f} | {rss} | "
                   f"{p['rss_mb']:.0f} | {p['client_kb']:.0f} | {p['folder_mb']:.1f} | {p['load'][0]} -> "
                   f"{p['load'][1]} |")
    first, last = rows[0], rows[-1]
    per = {r["n"]: r["pft"]["wall"] for r in (first, last)}
    out += ["", f"RATIO personalization s / client, N = {last['n']} / N = {first['n']}: "
            f"{per[last['n']] / per[first['n']]:.2f} (goal <= 1.5)"]
    for e in peers:
        at = ", ".join(f"N = {r['n']}: {r['fedavg'][e]['round'] / r['fedavg']['builtin']['round']:.2f}" for r in rows)
        out.append(f"RATIO {e} / builtin FedAvg round time: {at}")
    return "\n".join(out)


def figure(rows: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for e in ("builtin", "flower", "pfl"):
        if e in args.engines:
            a.plot(ns, [r["fedavg"][e]["round"] for r in rows], "o-", label=e)
            b.plot(ns, [r["fedavg"][e]["round"] / r["cohort"] for r in rows], "o--", label=f"FedAvg ({e}), per client "
                   "in a round")
    b.plot(ns, [r["pft"]["pft"] for r in rows], "s-", label="PFT (FT), per client")
    b.plot(ns, [r["pft"]["eval"] + r["pft"]["ref"] for r in rows], "^-", label="evaluation, per client")
    a.set(title="FedAvg round time", xlabel="clients N", ylabel="seconds a round", xscale="log", yscale="log")
    b.set(title="Per-client cost", xlabel="clients N", ylabel="seconds", xscale="log", yscale="log")
    for ax in (a, b):
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="5,20,50,100,200,500")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--engines", default="builtin,flower,pfl")
    ap.add_argument("--cap", type=int, default=12, help="examples per client at most (a quarter for test)")
    ap.add_argument("--min_size", type=int, default=4, help="examples per client at least (Dirichlet redraws)")
    ap.add_argument("--partial_from", type=int, default=100, help="N from which FedAvg samples --fraction a round")
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--pft_clients", type=int, default=3, help="clients personalized and evaluated per N")
    ap.add_argument("--pft_epochs", type=int, default=15)
    ap.add_argument("--flower_cpus", type=int, default=1, help="CPUs Ray may use (one virtual client each)")
    ap.add_argument("--pfl_python", default="/work/benchvenv/bin/python", help="a Python with pfl 0.6 installed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="/tmp/bench_scale")
    args = ap.parse_args()
    args.engines = args.engines.split(",")
    set_threads(args.threads)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    accelerator = Accelerator(cpu=True)
    start = load()
    rows = [measure(int(n), args, accelerator) for n in args.sizes.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_scale.json").write_text(json.dumps({"command": command(), "rows": rows}, indent=1))
    figure(rows, args, out / "bench_scale.png")
    print("\n" + tables(rows, args))
    print(f"\nload average at start: {start}; at end: {load()}; cpus: {os.cpu_count()}; "
          f"python {sys.version.split()[0]}")
    print(f"wrote {out / 'bench_scale.json'}, {out / 'bench_scale.png'}\ncommand: {command()}")


if __name__ == "__main__":
    main()
