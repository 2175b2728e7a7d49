"""Where does LP-FT help on our data? LP-FT − FT over normalization x fine-tuning dose x shift (3 seeds).

    python recipes/regime_map.py                              # the whole map (long: 32 cells x 3 seeds)
    python recipes/regime_map.py --quick                      # 1 seed, a third of the FedAvg rounds (est. <= 87 min)
    python recipes/regime_map.py --cells 'groupnorm/*' --run.num_threads 1   # a part (e.g. one per process)
    python recipes/regime_map.py --collect                    # tabulate the saved cells, run nothing
    python recipes/regime_map.py --collect --cells '*/spurious_correlation/*' \
        --earlier benchmarks/regime_map/regime_map_issue14.md   # + a heatmap with an earlier session's cells

Writes <output_dir>/<norm>/<shift>/<dose>/ (one pipeline run each; re-running resumes), the shared FedAvg
results in <output_dir>/fedavg_cache/, and regime_map.md / .parquet / .png plus regime_results.parquet.
"""

import sys
from pathlib import Path

from hf_lpft.cli import run_recipe, setup_logging
from hf_lpft.studies.regime_map import (
    collect_cells,
    load_cells,
    merge_tables,
    plot_regime_map,
    run_cells,
    select_cells,
    table_from_markdown,
    write_regime_map,
)
from hf_lpft.studies.sweep import sweep_output, sweep_parser

FOLDER = Path(__file__).parent / "configs" / "regime"


def main(argv: list[str]) -> int:
    parser = sweep_parser(__doc__, folder=str(FOLDER), folder_help="Folder of base.yaml and axes.yaml.",
                          name="regime_map", collect_help="Run nothing: tabulate the cells' saved results (e.g. after "
                          "running parts with --cells in several processes).")
    parser.add_argument("--cells", default=None, help="Comma-separated glob patterns over cell names norm/shift/dose "
                        "(e.g. 'groupnorm/*'): run only those; the table covers the cells run.")
    parser.add_argument("--earlier", nargs="*", default=[], help="Markdown tables of cells run in earlier sessions "
                        "(e.g. benchmarks/regime_map/*.md): the heatmap regime_map_all.png shows them beside the cells "
                        "tabulated now.")
    args, overrides = parser.parse_known_args(argv)
    setup_logging(args.log_level.upper())
    out = sweep_output(args)
    try:
        cells = select_cells(load_cells(args.folder, output_dir=out, quick=args.quick, overrides=overrides), args.cells)
        results, seconds = collect_cells(cells) if args.collect else run_cells(cells)
    except ValueError as err:  # a bad axis file, pattern or config, or --collect before the cells ran
        print(f"regime_map: {err}", file=sys.stderr)
        return 2
    table, markdown = write_regime_map(out, results, seconds)
    if args.earlier:
        earlier = [table_from_markdown(Path(p).read_text()) for p in args.earlier]
        plot_regime_map(merge_tables(table, earlier), out / "regime_map_all.png")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(run_recipe(main, sys.argv[1:], "regime_map"))
