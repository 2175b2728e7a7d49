"""``hf-lpft`` console entry: a thin wrapper over the pipeline and the registry."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from hf_lpft.config import ConfigError, load_config


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hf_lpft").setLevel(level)


def run_from_args(argv: list[str], *, defaults: dict | None = None, description: str = "") -> int:
    """Parse ``[--config FILE] [--section.key value ...]``, run the pipeline, print the table."""
    parser = argparse.ArgumentParser(description=description or "Run an hf_lpft study.",
                                     epilog="Any config value can be overridden as --section.key value "
                                            "(or --key value when the name is unique), e.g. --fedavg.rounds 10.")
    parser.add_argument("--config", default=None, help="YAML config (sections data/model/fedavg/pft/run).")
    parser.add_argument("--log_level", default="INFO", help="Log level of hf_lpft (DEBUG, INFO, WARNING).")
    args, overrides = parser.parse_known_args(argv)
    setup_logging(args.log_level.upper())
    try:
        cfg = load_config(args.config, overrides, defaults=defaults)
        from hf_lpft.pipeline import run

        result = run(cfg)
    except ConfigError as err:
        print(f"hf-lpft: configuration error: {err}", file=sys.stderr)
        return 2
    print(f"\nResults ({len(cfg.run.seeds)} seed(s)), accuracy %, mean (std over seeds):\n")
    print(result.markdown)
    print(f"\nOutputs written to {result.output_dir}")
    return 0


def list_strategies() -> int:
    """Print every registered strategy with a one-line description and its defaults."""
    from hf_lpft.strategies import STRATEGIES

    for name, cls in sorted(STRATEGIES.items()):
        defaults = {f.name: f.default for f in dataclasses.fields(cls.config_cls)}
        print(f"{name:12s} {cls.description}\n{'':12s} defaults: {defaults}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": "run a study from a config", "strategies": "list the registered PFT strategies"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: hf-lpft {run,strategies} [options]\n" + "\n".join(f"  {k:12s} {v}" for k, v in commands.items()))
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    if argv[0] == "strategies":
        return list_strategies()
    return run_from_args(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
