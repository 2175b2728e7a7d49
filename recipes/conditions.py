"""When does LP-FT help? Run every condition of recipes/configs/conditions/ and tabulate LP-FT − FT.

    python recipes/conditions.py                        # every condition, 3 seeds (long: the full sweep)
    python recipes/conditions.py --quick                # 1 seed, a third of the FedAvg rounds
    python recipes/conditions.py --conditions baseline,fedbn_local --output_dir outputs/cond
    python recipes/conditions.py --quick --pft.epochs 5 # any config override applies to every condition

Writes <output_dir>/<condition>/ (one pipeline run each; re-running resumes), and <output_dir>/
conditions.md, conditions.parquet, conditions.png. Exit status 1 if a condition was skipped or failed.
"""

import sys
from pathlib import Path

from hf_lpft.cli import run_recipe, setup_logging
from hf_lpft.studies.conditions import load_conditions, run_conditions, write_conditions
from hf_lpft.studies.sweep import sweep_output, sweep_parser

FOLDER = Path(__file__).parent / "configs" / "conditions"


def main(argv: list[str]) -> int:
    parser = sweep_parser(__doc__, folder=str(FOLDER), folder_help="Folder of base.yaml and the condition configs.",
                          name="conditions")
    parser.add_argument("--conditions", default=None, help="Comma-separated condition names (default: all).")
    args, overrides = parser.parse_known_args(argv)
    setup_logging(args.log_level.upper())
    out = sweep_output(args)
    names = [n.strip() for n in args.conditions.split(",") if n.strip()] if args.conditions else None
    conditions = load_conditions(args.folder, output_dir=out, names=names, quick=args.quick, overrides=overrides)
    results = run_conditions(conditions)
    _, markdown = write_conditions(out, results, conditions)
    print(markdown)
    return 1 if any(c.skipped for c in conditions) else 0


if __name__ == "__main__":
    sys.exit(run_recipe(main, sys.argv[1:], "conditions"))
