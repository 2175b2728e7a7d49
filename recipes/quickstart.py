"""Quickstart: digits5 (five digit domains, one client each), FedAvg, then FT / LP / LP-FT.

    accelerate launch recipes/quickstart.py          # or: python recipes/quickstart.py
    python recipes/quickstart.py --fedavg.rounds 10  # any override
"""

import sys

from hf_lpft.cli import run_from_args

DEFAULTS = {
    "data": {"dataset": "digits5", "scheme": "natural", "partition_by": "domain"},
    "model": {"backbone": "timm:test_resnet"},
    "fedavg": {"rounds": 30, "local_epochs": 1, "lr": 0.05},
    "pft": {"strategies": ["ft", "lp", "lp_ft"], "epochs": 15, "lr": 0.01},
    "run": {"output_dir": "outputs/quickstart", "overwrite": True, "seeds": [0]},
}

if __name__ == "__main__":
    sys.exit(run_from_args(sys.argv[1:], defaults=DEFAULTS, description=__doc__))
