"""Section 4 theory simulator (Chen et al., arXiv 2511.12695): FT vs LP-FT global loss against lambda.

    python recipes/theory.py                              # both shifts, defaults of TheoryConfig
    python recipes/theory.py --shift combined --lams 0.05:40:160 --eps 1.0 --global_target mixture

lambda* and lambda** are the exact roots of FT - LP-FT = lambda^2 (c0 + c1 lambda + c2 lambda^2); the sweep
over --lams is a cross-check and the plot. Prints the Markdown report and writes theory_report.md,
theory_sweep.json and theory_sweep.png into --output_dir. The model and its conditions:
hf_lpft/studies/theory.py.
"""

import argparse
import sys

import numpy as np

from hf_lpft.cli import run_recipe
from hf_lpft.studies.theory import GLOBAL_TARGETS, TheoryConfig
from hf_lpft.studies.theory_report import analyse, render_report, save_report


def parse_lams(spec: str) -> np.ndarray:
    """'start:stop:num' -> np.linspace(start, stop, num)."""
    try:
        start, stop, num = spec.split(":")
        lams = np.linspace(float(start), float(stop), int(num))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--lams {spec!r}: expected start:stop:num, e.g. 0.05:10:100") from exc
    if len(lams) < 2 or lams.min() < 0:
        raise argparse.ArgumentTypeError(f"--lams {spec!r}: need num >= 2 and start, stop >= 0")
    return lams


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shift", choices=["concept", "combined", "both"], default="both")
    p.add_argument("--lams", type=parse_lams, default=parse_lams("0.05:40:160"), help="start:stop:num")
    p.add_argument("--eps", type=float, default=TheoryConfig.eps, help="covariate noise (combined shift)")
    p.add_argument("--lr", type=float, default=TheoryConfig.lr)
    p.add_argument("--overlap", type=float, default=TheoryConfig.overlap)
    p.add_argument("--seed", type=int, default=TheoryConfig.seed)
    p.add_argument("--global_target", choices=GLOBAL_TARGETS, default=TheoryConfig.global_target,
                   help="global loss over the other clients, or the mixture of all clients (own included)")
    p.add_argument("--output_dir", default="outputs/theory")
    args = p.parse_args(argv)
    shifts = ["concept", "combined"] if args.shift == "both" else [args.shift]
    try:
        cfgs = {s: TheoryConfig(shift=s, eps=args.eps, lr=args.lr, overlap=args.overlap, seed=args.seed,
                                global_target=args.global_target) for s in shifts}
    except ValueError as exc:
        p.error(str(exc))
    results = {shift: analyse(cfg, args.lams) for shift, cfg in cfgs.items()}
    print(render_report(results))
    paths = save_report(results, args.output_dir)
    print("wrote " + ", ".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    sys.exit(run_recipe(main, sys.argv[1:], "theory", resumes=False))
