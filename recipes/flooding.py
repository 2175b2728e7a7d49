"""Loss-flooding ablation (Figure 3b of Chen et al., arXiv 2511.12695): Global accuracy at equal local loss.

Flooding (Ishida et al. 2020) trains on |loss - b| + b: gradient ascent once the training loss falls below
the flood level b, so the final local loss is held near b. One full run per level (FedAvg is repeated:
same seed, same global model), flooding the chosen strategies through ``pft.strategy_args.<s>.flood``.

    python recipes/flooding.py                                   # digits5, b in 0.1,0.5,1.0, FT and LP-FT
    python recipes/flooding.py --config recipes/configs/digits5.yaml --floods 0,0.1,0.5,1.0  # 0 = no flooding

Writes <run.output_dir>/flood_<b>/ (ordinary run folders) and flooding.md / flooding.csv / flooding.png.
"""

import argparse
import sys
from pathlib import Path

from hf_lpft.cli import run_recipe, setup_logging
from hf_lpft.config import ConfigError, load_config
from hf_lpft.studies.flooding import flooding_configs, run_flooding, write_flooding

DEFAULTS = {
    "data": {"dataset": "digits5", "scheme": "natural", "partition_by": "domain"},
    "fedavg": {"rounds": 30, "local_epochs": 1, "lr": 0.05},
    "pft": {"epochs": 15, "lr": 0.01},
    "run": {"output_dir": "outputs/flooding", "overwrite": True},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config; any --section.key value overrides it.")
    p.add_argument("--floods", default="0.1,0.5,1.0", help="Comma-separated flood levels b >= 0 (0 = off).")
    p.add_argument("--flood_strategies", default="ft,lp_ft", help="Strategies to flood and compare.")
    args, overrides = p.parse_known_args(argv)
    setup_logging()
    try:
        floods = [float(b) for b in args.floods.split(",")]
    except ValueError:
        p.error(f"--floods {args.floods!r}: expected comma-separated numbers, e.g. 0.1,0.5,1.0")
    try:
        base = load_config(args.config, overrides, defaults=DEFAULTS)
        strategies = [s.strip() for s in args.flood_strategies.split(",") if s.strip()]
        results = run_flooding(flooding_configs(base, floods, strategies))
    except ConfigError as err:
        print(f"flooding: configuration error: {err}", file=sys.stderr)
        return 2
    _, markdown = write_flooding(base.run.output_dir, results)
    print(markdown + f"\n\nwrote {Path(base.run.output_dir) / 'flooding.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_recipe(main, sys.argv[1:], "flooding", resumes=False))
