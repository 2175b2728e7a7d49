"""Quickstart: digits5 (five digit domains, one client each), FedAvg, then FT / LP / LP-FT and BN-adapt.

    accelerate launch recipes/quickstart.py         # or: python recipes/quickstart.py (one process)
    python recipes/quickstart.py --fedavg.rounds 10  # any override

The personalization regime follows what is known of the paper's setup (arXiv 2511.12695; the likely lineage of
its Digit5 code trains with Adam at lr 5e-4): Adam, lr 5e-4, 15 epochs, LP-FT probing 5 of them. It was chosen
before the regime map's results, not because it favours a method. BN-adapt (BatchNorm statistics re-estimated on
the client, no weight changed) is the reference row that splits each method's Global drop into BatchNorm
statistics and weights. Where LP-FT helps on our data and why: the regime map, benchmarks/README.md.
"""

import sys

from hf_lpft.cli import run_from_args

DEFAULTS = {
    "data": {"dataset": "digits5", "scheme": "natural", "partition_by": "domain"},
    "model": {"backbone": "timm:test_resnet"},
    "fedavg": {"rounds": 30, "local_epochs": 1, "lr": 0.05},
    "pft": {"strategies": ["ft", "lp", "lp_ft", "bn_adapt"], "epochs": 15, "optimizer": "adam", "lr": 5e-4},
    "run": {"output_dir": "outputs/quickstart", "overwrite": True, "seeds": [0]},
}

if __name__ == "__main__":
    sys.exit(run_from_args(sys.argv[1:], defaults=DEFAULTS, description=__doc__))
