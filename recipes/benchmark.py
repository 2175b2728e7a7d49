"""Run any configuration: the paper's comparison on a federated dataset.

    accelerate launch recipes/benchmark.py --config recipes/configs/digits5.yaml
    python recipes/benchmark.py --config recipes/configs/digits5.yaml --pft.strategies lp_ft,ft --run.seeds 0,1,2
"""

import sys

from hf_lpft.cli import run_from_args

if __name__ == "__main__":
    sys.exit(run_from_args(sys.argv[1:], description=__doc__))
