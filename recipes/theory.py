"""Section 4 theory simulator (Chen et al., arXiv 2511.12695): FT vs LP-FT global loss against lambda.

    python recipes/theory.py                              # both shifts, defaults of TheoryConfig
    python recipes/theory.py --shift combined --lams 0.05:40:160 --eps 1.0

Writes <output_dir>/theory_sweep.png and theory_sweep.json; prints a table and lambda* per shift.
The model, its geometry and the conditions behind each claim: hf_lpft/evaluation/theory.py.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from hf_lpft.evaluation.theory import TheoryConfig, find_lambda_star, plot_sweep, save_sweep, sweep_lambda


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
    p.add_argument("--output_dir", default="outputs/theory")
    args = p.parse_args(argv)
    shifts = ["concept", "combined"] if args.shift == "both" else [args.shift]
    try:
        cfgs = {s: TheoryConfig(shift=s, eps=args.eps, lr=args.lr, overlap=args.overlap, seed=args.seed)
                for s in shifts}
    except ValueError as exc:
        p.error(str(exc))
    rows, lam_star = [], {}
    for shift, cfg in cfgs.items():
        sub = sweep_lambda(cfg, args.lams)
        lam_star[shift] = find_lambda_star(cfg, args.lams)
        rows += sub
        print(f"\n{shift} shift  ({cfg})")
        print(f"{'lambda':>8} {'FT global':>12} {'LP-FT global':>13} {'FT local':>11} {'LP-FT local':>12}"
              "  LP-FT<=FT")
        for r in sub[:: max(1, len(sub) // 20)]:
            print(f"{r['lam']:8.3f} {r['ft_global']:12.5g} {r['lpft_global']:13.5g} {r['ft_local']:11.4g} "
                  f"{r['lpft_local']:12.4g}  {r['lpft_global'] <= r['ft_global']}")
        worse = np.array([r["lpft_global"] > r["ft_global"] for r in sub])
        flips = [f"{sub[k]['lam']:.3g}-{sub[k + 1]['lam']:.3g}" for k in np.flatnonzero(np.diff(worse))]
        star = lam_star[shift]
        print(f"lambda* ({shift}) = {'none in range' if star is None else f'{star:.6g}'};"
              f" sign changes of LP-FT - FT on the grid: {flips or 'none'}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_sweep(rows, out / "theory_sweep.png", lam_star=lam_star)
    save_sweep(rows, lam_star, cfgs, out / "theory_sweep.json")
    print(f"\nwrote {out / 'theory_sweep.png'} and {out / 'theory_sweep.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
