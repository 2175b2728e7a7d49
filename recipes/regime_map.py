"""Where does LP-FT help on our data? LP-FT − FT over normalization x fine-tuning dose x shift (3 seeds).

    python recipes/regime_map.py                              # the whole map (long: 16 cells x 3 seeds)
    python recipes/regime_map.py --quick                      # 1 seed, a third of the FedAvg rounds
    python recipes/regime_map.py --cells 'groupnorm/*' --run.num_threads 1   # a part (e.g. one per process)
    python recipes/regime_map.py --collect                    # tabulate the saved cells, run nothing

Writes <output_dir>/<norm>/<shift>/<dose>/ (one pipeline run each; re-running resumes), the shared FedAvg
results in <output_dir>/fedavg_cache/, and regime_map.md / .parquet / .png plus regime_results.parquet.
"""

import sys
from pathlib import Path

from hf_lpft.cli import setup_logging
from hf_lpft.studies.regime_map import collect_cells, load_cells, run_cells, select_cells, write_regime_map
from hf_lpft.studies.sweep import sweep_output, sweep_parser

FOLDER = Path(__file__).parent / "configs" / "regime"


def main(argv: list[str]) -> int:
    parser = sweep_parser(__doc__, folder=str(FOLDER), folder_help="Folder of base.yaml and axes.yaml.",
                          name="regime_map", collect_help="Run nothing: tabulate the cells' saved results (e.g. after "
                          "running parts with --cells in several processes).")
    parser.add_argument("--cells", default=None, help="Comma-separated glob patterns over cell names norm/shift/dose "
                        "(e.g. 'groupnorm/*'): run only those; the table covers the cells run.")
    args, overrides = parser.parse_known_args(argv)
    setup_logging(args.log_level.upper())
    out = sweep_output(args)
    try:
        cells = select_cells(load_cells(args.folder, output_dir=out, quick=args.quick, overrides=overrides), args.cells)
        results, seconds = collect_cells(cells) if args.collect else run_cells(cells)
    except ValueError as err:  # a bad axis file, pattern or config, or --collect before the cells ran
        print(f"regime_map: {err}", file=sys.stderr)
        return 2
    _, markdown = write_regime_map(out, results, seconds)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
