"""(e) The quickstart's time split by stage, before and after the speed-ups.

    python benchmarks/bench_stages.py                      # the full quickstart (30 FedAvg rounds), before and after
    python benchmarks/bench_stages.py --rounds 3           # shorter FedAvg; personalization unchanged
    python benchmarks/bench_stages.py --variants after -- --pft.epochs 5   # extra quickstart overrides after --
    python benchmarks/bench_stages.py --variants uncached_probe,batched_probe --rounds 3   # issue 14's comparison

Runs ``recipes/quickstart.py`` in a subprocess per variant, one after the other, and reads the stage
timings the pipeline writes into ``run_record.json`` (``run_info.timings_seconds``):

- before: ``--fedavg.eval_every 1 --run.memory_format contiguous``: FedAvg as it was before issue 18 (the
  global model evaluated after every round, NCHW tensors);
- after: the defaults (``fedavg.eval_every 5``, ``run.memory_format auto`` = channels_last for the CNN);
- uncached_probe: ``--pft.cache_features false`` (every probing epoch goes through the frozen backbone);
- batched_probe: ``--pft.batched_probe true`` (cached features, all clients' heads trained at once; LP evaluated
  from θ_G's shared test features).

Both variants of a comparison use the same ``--run.num_threads`` (``--threads``). The summary table of each
variant is printed too, to compare the results (channels_last changes the float summation order only).

Wall time is measured around the subprocess; "start-up, report, publish" is wall minus the recorded total
(interpreter and import start-up, ``report.md`` plots, Hub folder).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import command

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"before": ["--fedavg.eval_every", "1", "--run.memory_format", "contiguous"], "after": [],
            "uncached_probe": ["--pft.cache_features", "false"], "batched_probe": ["--pft.batched_probe", "true"]}


def run_quickstart(name: str, args, extra: list[str]) -> tuple[float, dict]:
    """Wall seconds and the recorded stage timings of one quickstart run."""
    out = Path(args.output_root) / name
    cmd = [sys.executable, str(ROOT / "recipes" / "quickstart.py"), "--fedavg.rounds", str(args.rounds),
           "--run.output_dir", str(out), "--run.num_threads", str(args.threads), "--log_level", "WARNING",
           *VARIANTS[name], *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"quickstart ({name}) failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")
    timings = json.loads((out / "run_record.json").read_text())["run_info"]["timings_seconds"]
    return wall, timings


def stages(timings: dict, wall: float) -> dict[str, float]:
    """Group the recorded timings into the stages of the quickstart."""
    out = {k: timings.get(k, 0.0) for k in ("data_load", "partition", "decode_inputs")}
    out["fedavg"] = sum(v for k, v in timings.items() if k.startswith("fedavg_seed_"))
    out["evaluate global model"] = sum(v for k, v in timings.items() if k.startswith("evaluate_global_model_seed_"))
    for k, v in timings.items():
        if k.startswith("personalize_") and not k.startswith("personalize_seed_"):
            name = k[len("personalize_"):k.rindex("_seed_")]
            out[name] = out.get(name, 0.0) + v
    out["write results"] = timings.get("write_results", 0.0)
    out["start-up, report, publish"] = wall - timings["total"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30, help="FedAvg rounds (the quickstart: 30)")
    ap.add_argument("--threads", type=int, default=1, help="run.num_threads of the quickstart")
    ap.add_argument("--variants", default="before,after", help=f"comma-separated, from {sorted(VARIANTS)}")
    ap.add_argument("--output_root", default="/tmp/hf_lpft_bench_stages")
    args, extra = ap.parse_known_args()
    extra = [a for a in extra if a != "--"]
    names = args.variants.split(",")
    if bad := [n for n in names if n not in VARIANTS]:
        sys.exit(f"--variants: {bad} unknown; choose from {sorted(VARIANTS)}")
    results = {n: run_quickstart(n, args, extra) for n in names}
    split = {n: stages(t, w) for n, (w, t) in results.items()}
    keys = list(dict.fromkeys(k for s in split.values() for k in s))
    print(f"== bench_stages: recipes/quickstart.py --fedavg.rounds {args.rounds} --run.num_threads {args.threads} "
          f"{' '.join(extra)}")
    print("  " + f"{'stage':34s}" + "".join(f"{n:>18s}" for n in names))
    for k in keys:
        print("  " + f"{k:34s}" + "".join(f"{split[n].get(k, 0.0):9.1f} s "
                                          f"{100 * split[n].get(k, 0.0) / results[n][0]:4.0f}%"
                                        for n in names))
    print("  " + f"{'wall':34s}" + "".join(f"{results[n][0]:9.1f} s {'':5s}" for n in names))
    for n in names:
        print(f"  summary table ({n}):\n" + (Path(args.output_root) / n / "summary.md").read_text())
    if len(names) == 2:
        a, b = names
        personal = {n: sum(v for k, v in split[n].items() if k.rsplit("_", 1)[-1] in ("train", "evaluate", "export"))
                    for n in names}
        print(f"  personalization (all strategies): {a} {personal[a]:.1f} s, {b} {personal[b]:.1f} s "
              f"-> {personal[a] / personal[b]:.2f}x; FedAvg {split[a]['fedavg'] / split[b]['fedavg']:.2f}x")
        print(f"RATIO quickstart wall time {a} / {b} = {results[a][0] / results[b][0]:.2f}")
    else:
        (w, t), = results.values()
        print(f"RATIO personalization share of wall time = {t.get('personalize_seed_0', 0.0) / w:.2f}")
    print(f"command: {command()}")


if __name__ == "__main__":
    main()
