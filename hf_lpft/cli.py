"""``hf-lpft`` console entry: a thin wrapper over the pipeline and the registry."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

import yaml

from hf_lpft import __version__
from hf_lpft.config import ConfigError, add_config_help, load_config
from hf_lpft.hub import HubPushError

WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)  # disk full, permissions


class _ProgressAwareHandler(logging.StreamHandler):
    """Writes log lines through ``tqdm.write``: a line logged while a progress bar is drawn goes above the bar
    instead of being glued to its end, and the bar is redrawn below it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging's own contract: never raise from emit
            self.handleError(record)


def setup_logging(level: str = "INFO") -> None:
    """Log lines ``LEVEL name: message`` on stderr (hf_lpft at ``level``, other libraries at WARNING), written
    so that they do not break the progress bars."""
    handler = _ProgressAwareHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("hf_lpft").setLevel(level)


class _OptionsFormatter(argparse.HelpFormatter):
    """Help formatter writing an option's type once after all its names (``--data.alpha, --alpha float``)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        return f"{', '.join(action.option_strings)} {self._format_args(action, action.dest.upper())}"


class ConfigHelp(argparse.Action):
    """``-h/--help`` that lists every config option by section (:func:`hf_lpft.config.add_config_help`),
    with ``defaults`` (a recipe's) shown as the defaults; the options are added only to print the help,
    so parsing the overrides stays :func:`hf_lpft.config.parse_overrides`'."""

    def __init__(self, option_strings: list[str], dest: str, defaults: dict | None = None, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.defaults = defaults

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        add_config_help(parser, self.defaults)
        parser.formatter_class = _OptionsFormatter
        parser.print_help()
        parser.exit()


def run_from_args(argv: list[str], *, defaults: dict | None = None, description: str = "",
                  prog: str | None = None) -> int:
    """Parse ``[--config FILE] [--section.key value ...]``, run the pipeline, print the table."""
    usage = "%(prog)s [-h] [--config FILE] [--log_level LEVEL] [--section.key value ...]"
    parser = argparse.ArgumentParser(prog=prog, description=description or "Run an hf_lpft study.", add_help=False,
                                     usage=usage,
                                     epilog="Any config value can be overridden as --section.key value "
                                            "(or --key value when the name is unique), e.g. --fedavg.rounds 10; "
                                            "seeds: --data.seed is the partition, --run.seeds the training seeds "
                                            "(a bare --seed is refused); "
                                            "lists are comma-separated (--run.seeds 0,1,2), mappings YAML "
                                            "({lp_ft: {lp_epochs: 5}}), a boolean alone means true (--run.resume).")
    parser.add_argument("-h", "--help", action=ConfigHelp, defaults=defaults,
                        help="Show this help (every option, by section, with its type and default) and exit.")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML config (sections data/model/fedavg/pft/run).")
    parser.add_argument("--log_level", default="INFO", metavar="LEVEL",
                        help="Log level of hf_lpft (DEBUG, INFO, WARNING).")
    args, overrides = parser.parse_known_args(argv)
    setup_logging(args.log_level.upper())
    with Interrupts() as interrupts:  # the failure's line is printed while a second signal is still ignored
        code, cfg, result = run_config(args.config, overrides, defaults=defaults, interrupts=interrupts)
    if code is not None:
        return code
    from accelerate import PartialState

    if not PartialState().is_main_process:  # several processes: the main one prints the table
        return 0
    seeds = len(cfg.run.seeds)
    print(f"\nResults ({seeds} seeds), accuracy %, mean (std over seeds):\n" if seeds > 1 else
          "\nResults (1 seed), accuracy %:\n")
    print(result.markdown)
    print(f"\nOutputs written to {result.output_dir}")
    return 0


def run_config(path: str | None, overrides: list[str], *, defaults: dict | None, interrupts: Interrupts):
    """Load, check and run a config: ``(None, cfg, result)``, or a failure's exit code (its one line printed on
    stderr) with the config as far as it was loaded: 2 bad input, 3 cannot write or publish, 4 training
    diverged, 128 + the signal when interrupted (130 for Ctrl-C)."""
    cfg = None
    try:
        cfg = load_config(path, overrides, defaults=defaults)
        from hf_lpft.pipeline import run

        return None, cfg, run(cfg)
    except KeyboardInterrupt:  # Ctrl-C (SIGINT) or SIGTERM: one line with the command that resumes the run
        interrupts.signum = interrupts.signum or signal.SIGINT  # from now on further signals are ignored
        if int(os.environ.get("RANK", "0")) == 0:
            print(interrupted_message(cfg), file=sys.stderr, flush=True)
        return 128 + interrupts.signum, cfg, None
    except ConfigError as err:
        print(f"hf-lpft: configuration error: {err}", file=sys.stderr)
        return 2, cfg, None
    except HubPushError as err:  # the run's outputs are complete; only publishing failed
        print(f"hf-lpft: the run finished but publishing failed: {err}", file=sys.stderr)
        return 3, cfg, None
    except OSError as err:
        if err.errno not in WRITE_ERRORS:
            raise
        print(f"hf-lpft: cannot write {err.filename or 'an output file'}: {err.strerror}. Nothing half-written was "
              "left behind; free space or fix permissions, then rerun with --run.resume true to continue from "
              "the last complete round or client", file=sys.stderr)
        return 3, cfg, None
    except RuntimeError as err:
        from hf_lpft.train.loop import NonFiniteLossError

        if not isinstance(err, NonFiniteLossError):
            raise
        print(f"hf-lpft: training stopped: {err}. Rounds and clients completed so far are saved in the output "
              "folder; after changing what diverged, rerun with --run.resume true to continue from them (with "
              "run.on_error continue a client whose loss diverges is recorded as failed and the others go on)",
              file=sys.stderr)
        return 4, cfg, None


class Interrupts:
    """Within the block, SIGINT and SIGTERM raise KeyboardInterrupt once; the first signal is kept (the exit code
    is 128 + it) and later ones are ignored until the block is left, so that the one-line message and the exit
    are not cut short: ``accelerate launch`` follows the terminal's SIGINT with a SIGTERM to its child, and a
    second Ctrl-C would otherwise end in a traceback. A signal that was ignored (``nohup``) stays ignored."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            raise KeyboardInterrupt

    def __exit__(self, kind, value, tb) -> bool:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        return False


def run_recipe(main, argv: list[str], name: str, *, resumes: bool = True) -> int:
    """A study recipe's ``main(argv)``, ended by Ctrl-C (SIGINT) or SIGTERM with one line and 128 + the signal
    instead of a traceback. A sweep resumes its finished points when rerun (``resumes``): the line says so and
    gives the command as it was typed."""
    with Interrupts() as interrupts:
        try:
            return main(argv)
        except KeyboardInterrupt:
            interrupts.signum = interrupts.signum or signal.SIGINT
            again = shlex.join(["python", *sys.argv]) if sys.argv and sys.argv[0] else f"{name} again"
            print(f"{name}: interrupted; " + (f"rerun {again} to continue: finished runs and seeds are reused"
                                              if resumes else "nothing to resume, run it again"),
                  file=sys.stderr, flush=True)
            return 128 + interrupts.signum


def interrupted_message(cfg) -> str:
    """The line an interrupted run ends with: the command that resumes it from its own ``config.yaml`` (a run
    writes it into its output folder before any work), or what to do when nothing of it was saved."""
    if cfg is None:
        return "hf-lpft: interrupted before the run started; nothing was written"
    from hf_lpft.layout import config_differences
    from hf_lpft.run.settings import run_layout

    config = run_layout(cfg.run).config
    try:
        saved = yaml.safe_load(config.read_text()) if config.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict) or config_differences(saved, cfg.to_dict()):
        return (f"hf-lpft: interrupted before {cfg.run.output_dir} held anything of this run; nothing to resume, "
                "run the same command again")
    command = f"run --config {shlex.quote(str(config))} --run.resume true"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # several processes: the same launcher again
        return f"hf-lpft: interrupted; resume with: <your launcher and its options> -m hf_lpft.cli {command}"
    return f"hf-lpft: interrupted; resume with: hf-lpft {command}"


# The Hub folder's formats (hf_lpft.hub.export.export_client) in the words of the strategies listing.
HUB_FORMATS = {"full": "full model", "head": "head only: the backbone stays the global model's",
               "peft_adapter": "peft adapter + head"}


def export_text(strategy) -> str:
    """What a strategy's export writes, as ``hf-lpft strategies`` says it (with its default options)."""
    if strategy.export_kind == "adapter":
        return "exports a peft adapter + head"
    return f"run folder: full model; Hub folder: {HUB_FORMATS[strategy.hub_format()]}"


def list_strategies() -> int:
    """Print every registered strategy with a one-line description and its defaults."""
    from hf_lpft.strategies import STRATEGIES

    for name, cls in sorted(STRATEGIES.items()):
        defaults = dataclasses.asdict(cls.config_cls())  # also resolves default_factory fields
        print(f"{name:12s} {cls.display_name} ({export_text(cls())}): {cls.description}\n"
              f"{'':12s} defaults: {defaults}")
    list_general_fl()
    return 0


def list_general_fl() -> None:
    """Print every registered general-FL algorithm (``fedavg.fl_strategy``): engines, description, defaults."""
    from hf_lpft.algorithms import ALGORITHMS
    from hf_lpft.algorithms.flower_adapters import FlowerAdapter

    print("\ngeneral-FL algorithms (--fedavg.fl_strategy, options in --fedavg.fl_strategy_args):")
    for name, cls in sorted(ALGORITHMS.items()):
        options = ("Flower's constructor arguments" if issubclass(cls, FlowerAdapter)
                   else dataclasses.asdict(cls.config_cls()))
        print(f"{name:14s} {cls.display_name} (engine {' or '.join(cls.engines)}): {cls.description}\n"
              f"{'':14s} defaults: {options}")


def partition_from_args(argv: list[str]) -> int:
    """``hf-lpft partition``: federate the configured dataset, write manifest + stats + heatmap, print a table."""
    parser = argparse.ArgumentParser(prog="hf-lpft partition", description="Preview a federation without training.",
                                     epilog="Data options are overridden as --data.key value, e.g. --data.scheme iid.")
    parser.add_argument("--config", default=None, help="YAML config (its data section is used).")
    parser.add_argument("--output_dir", default=None, help="Folder for federation/ (default run.output_dir).")
    parser.add_argument("--log_level", default="INFO", help="Log level of hf_lpft (DEBUG, INFO, WARNING).")
    args, overrides = parser.parse_known_args(argv)
    setup_logging(args.log_level.upper())
    from hf_lpft.data.federate import FederationError
    from hf_lpft.data.preview import preview_federation
    from hf_lpft.data.stats import format_table
    from hf_lpft.run.preflight import check_scheme_options, check_sizes, federation_checked

    try:
        cfg = load_config(args.config, overrides)
        out = args.output_dir or cfg.run.output_dir
        check_scheme_options(cfg)
        check_sizes(cfg)
        shifted, fed, _ = federation_checked(cfg, for_training=False)  # everything checked before federation/
        fed = preview_federation(cfg.data, out, federated=(shifted, fed))
    except (ConfigError, FederationError) as err:
        print(f"hf-lpft: configuration error: {err}", file=sys.stderr)
        return 2
    print(format_table(fed))
    folder = Path(out) / "federation"
    written = ", ".join(sorted(p.name for p in folder.iterdir() if p.is_file()))  # every file preview wrote
    print(f"\nFederation written to {folder} ({written})")
    return 0


def push_from_args(argv: list[str]) -> int:
    """``hf-lpft push OUTPUT_DIR --hub_repo_id me/x [--hub_private] [--local_only]``: publish a finished run."""
    parser = argparse.ArgumentParser(prog="hf-lpft push", description="Publish a run folder: model repo in one "
                                     "commit + results dataset. Endpoint from HF_ENDPOINT, token from HF_TOKEN or the "
                                     "login cache.")
    parser.add_argument("output_dir")
    parser.add_argument("--hub_repo_id", required=True, help="Model repo 'namespace/name'.")
    parser.add_argument("--hub_private", action="store_true", help="Create the repos private.")
    parser.add_argument("--hub_results_repo_id", default=None,
                        help="Results dataset repo (default <hub_repo_id>-results).")
    parser.add_argument("--hub_experiment", default=None, help="Dataset config name (default: the folder's name).")
    parser.add_argument("--local_only", action="store_true", help="Only rewrite <output_dir>/hub; push nothing.")
    args = parser.parse_args(argv)
    setup_logging()
    from hf_lpft.config import HubConfig
    from hf_lpft.hub.push import publish_run

    try:
        hub = HubConfig(push_to_hub=not args.local_only, hub_repo_id=args.hub_repo_id, hub_private=args.hub_private,
                        hub_results_repo_id=args.hub_results_repo_id, hub_experiment=args.hub_experiment)
        result = publish_run(hub, args.output_dir)
    except (ConfigError, FileNotFoundError, HubPushError) as err:
        print(f"hf-lpft push: {err}", file=sys.stderr)
        return 2
    print(f"published: {result.model_commit_url}" if result else f"Hub-ready folders in {args.output_dir}/hub")
    return 0


def personalize_from_args(argv: list[str]) -> int:
    """``hf-lpft personalize --global_model X [--config FILE] [--section.key value ...]``: PFT, evaluation and
    export of a given global model (no FedAvg); the backbone (and image size) default to the model's own."""
    parser = argparse.ArgumentParser(prog="hf-lpft personalize", add_help=False)
    parser.add_argument("--global_model", "--model.global_model", dest="global_model", default=None)
    args, rest = parser.parse_known_args(argv)
    if args.global_model is None:
        if any(a in ("-h", "--help") for a in rest):
            return run_from_args(rest, description=PERSONALIZE_HELP, prog="hf-lpft personalize")
        print("hf-lpft personalize: --global_model is required (a run's global/ folder, a timm or transformers "
              "model folder, a timm checkpoint file, or a Hub model id)", file=sys.stderr)
        return 2
    from hf_lpft.run.given_model import backbone_of

    try:
        load_config(None, {"model": {"global_model": args.global_model}})  # a bad value fails here, named
        defaults = backbone_of(args.global_model)
    except ConfigError as err:
        print(f"hf-lpft: configuration error: {err}", file=sys.stderr)
        return 2
    return run_from_args(rest + ["--model.global_model", args.global_model], defaults=defaults,
                         description=PERSONALIZE_HELP, prog="hf-lpft personalize")


PERSONALIZE_HELP = ("Personalize a given global model (--global_model: a run's global/ folder, a timm or transformers "
                    "model folder, a timm checkpoint file, or a Hub id) on a federation (--config and/or "
                    "--data.manifest): PFT, evaluation and export only, no FedAvg.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": "run a study from a config",
                "strategies": "list the registered PFT strategies and general-FL algorithms",
                "personalize": "personalize a given global model (no FedAvg): PFT, evaluation, export",
                "partition": "preview a federation (manifest, stats, heatmap) without training",
                "push": "publish a finished run folder to the Hub (or rewrite its Hub-ready folder)"}
    if argv and argv[0] in ("-V", "--version"):
        print(f"hf-lpft {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: hf-lpft {" + ",".join(commands) + "} [options] | hf-lpft --version\n"
              + "\n".join(f"  {k:12s} {v}" for k, v in commands.items()))
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    try:  # run and personalize end an interruption with their resume command (run_config); the rest here
        if argv[0] == "strategies":
            return list_strategies()
        if argv[0] == "partition":
            return partition_from_args(argv[1:])
        if argv[0] == "push":
            return push_from_args(argv[1:])
        if argv[0] == "personalize":
            return personalize_from_args(argv[1:])
        return run_from_args(argv[1:], prog="hf-lpft run")
    except KeyboardInterrupt:
        print(f"hf-lpft {argv[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
