"""The paper's Table 2 on our data: every PFT method, one row block per shift kind, 3 seeds.

    python recipes/table2.py                                   # every block (long; resumes where it stopped)
    python recipes/table2.py --blocks feature_shift,label_shift # some blocks (e.g. one per process)
    python recipes/table2.py --blocks text_label_shift --seeds 0  # one seed part (joined by --collect)
    python recipes/table2.py --collect                         # tabulate the saved blocks, run nothing
    python recipes/table2.py --collect --publish benchmarks/table2  # ... and keep their small files in git
    python recipes/table2.py --collect --output_dir benchmarks/table2  # tabulate what was published
    python recipes/table2.py --quick                           # 1 seed, a third of the FedAvg rounds

Writes <output_dir>/<block>/ (one pipeline run each), the shared FedAvg results in <output_dir>/fedavg_cache/,
and table2.md, table2.parquet, table2_<block>.png. Blocks and the one PFT regime: recipes/configs/table2/.
"""

import sys
from pathlib import Path

from hf_lpft.cli import run_recipe, setup_logging
from hf_lpft.studies.sweep import sweep_output, sweep_parser
from hf_lpft.studies.table2 import (
    collect_blocks,
    load_blocks,
    publish_blocks,
    run_blocks,
    select_blocks,
    write_table2,
)

FOLDER = Path(__file__).parent / "configs" / "table2"


def main(argv: list[str]) -> int:
    parser = sweep_parser(__doc__, folder=str(FOLDER), folder_help="Folder of base.yaml and blocks.yaml.",
                          name="table2", collect_help="Run nothing: tabulate the blocks already run (blocks "
                          "without results are left out, with a warning).")
    parser.add_argument("--blocks", default=None, help="Comma-separated block names (default: all).")
    parser.add_argument("--seeds", default=None, help="Comma-separated seeds of the blocks to run, each as its own "
                        "seed part <block>/seed_<s>/ (e.g. one per process or session); --collect joins the parts.")
    parser.add_argument("--publish", default=None, help="Also copy the finished blocks' results, curves, config and "
                        "run record, and the table, into this folder (e.g. benchmarks/table2, committed).")
    args, overrides = parser.parse_known_args(argv)
    setup_logging(args.log_level.upper())
    out = sweep_output(args)
    try:
        blocks = select_blocks(load_blocks(args.folder, output_dir=out, quick=args.quick, overrides=overrides),
                               args.blocks)
        seeds = parse_seeds(args.seeds)
        if not args.collect:
            run_blocks(blocks, seeds=seeds)
        finished = collect_blocks(blocks, allow_missing=args.collect or seeds is not None)
    except ValueError as err:  # a bad block file, name, seed or config
        print(f"table2: {err}", file=sys.stderr)
        return 2
    print(write_table2(out, finished))
    if args.publish:  # the published table covers every block published there so far, not only these
        dest = publish_blocks(finished, args.publish)
        everything = load_blocks(args.folder, output_dir=dest, quick=args.quick, overrides=overrides)
        write_table2(dest, collect_blocks(everything, allow_missing=True))
        print(f"published to {dest}")
    return 0


def parse_seeds(text: str | None) -> list[int] | None:
    """``--seeds 0,2`` as a list of ints (None when not given)."""
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1") from None


if __name__ == "__main__":
    sys.exit(run_recipe(main, sys.argv[1:], "table2"))
