"""RunLayout: the one owner of every path in a run's output folder.

The folder (a contract): ``config.yaml``, ``run_record.json``, ``federation/manifest.json``, ``global/`` (the
global model), ``clients/<strategy>/<client_id>/`` (personalized weights), ``checkpoints/`` (resume points),
``results.parquet``, ``cross_client.parquet``, ``curves.parquet``, ``summary.md``, ``report.md`` with
``figures/``, ``logs/`` (trackers) and ``hub/`` (the Hub-ready folders). With several seeds, model folders get
a ``seed_<s>`` level (``global/seed_<s>/``, ``clients/<strategy>/<client_id>/seed_<s>/``); that rule lives
here only. ``checkpoints/`` belongs to :class:`hf_lpft.checkpoint.Checkpoints` (``layout.checkpoints``), whose
paths always carry the seed level (``checkpoints/seed_<s>/...``).

A layout is built once per run from the config (``hf_lpft.run.settings.run_layout``) and handed down; this
module does not read the config. Its seeds are explicit: ``RunLayout(root, seeds)``, or
``RunLayout.without_seeds(root)`` for the run-level files of a folder whose seeds are unknown or irrelevant
(whose model folder paths then raise instead of guessing the one-seed layout).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from hf_lpft._faults import fault_point
from hf_lpft.checkpoint import Checkpoints
from hf_lpft.errors import ConfigError
from hf_lpft.io import atomic_path
from hf_lpft.speed import contiguous_weights

logger = logging.getLogger(__name__)

OUTPUT_NAMES = ("config.yaml", "run_record.json", "federation", "global", "clients", "checkpoints",
                "results.parquet", "curves.parquet", "summary.md", "cross_client.parquet", "report.md", "figures",
                "logs", "hub")
# Settings a resumed run may change: run control and publishing.
_RESUMABLE = ("run.resume", "run.overwrite", "run.report_to")


@dataclass(frozen=True)
class RunLayout:
    """Every path of the output folder ``root`` of a run over ``seeds`` (None: unknown, see :meth:`without_seeds`)."""

    root: Path
    seeds: tuple[int, ...] | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "seeds", None if self.seeds is None else tuple(self.seeds))

    @classmethod
    def without_seeds(cls, root: str | Path) -> RunLayout:
        """The run-level paths of ``root`` (``config.yaml``, ``run_record.json``, results, ``hub/``, ...), for a
        folder whose seeds are not known here; asking it for a model folder raises."""
        return cls(Path(root), None)

    # -- files and folders of the whole run
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def record(self) -> Path:
        return self.root / "run_record.json"

    @property
    def manifest(self) -> Path:
        return self.root / "federation" / "manifest.json"

    @property
    def results(self) -> Path:
        return self.root / "results.parquet"

    @property
    def cross_client(self) -> Path:
        return self.root / "cross_client.parquet"

    @property
    def curves(self) -> Path:
        return self.root / "curves.parquet"

    @property
    def summary(self) -> Path:
        return self.root / "summary.md"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def hub(self) -> Path:
        return self.root / "hub"

    @property
    def hub_model(self) -> Path:
        """The Hub-ready model repository folder."""
        return self.hub / "model"

    @property
    def hub_results(self) -> Path:
        """The Hub-ready results dataset folder."""
        return self.hub / "results"

    @property
    def checkpoints(self) -> Checkpoints:
        """The run's resume points (``checkpoints/``)."""
        return Checkpoints(self.root)

    @property
    def provenance(self) -> tuple[Path, ...]:
        """The files that say how the run was made (copied beside the models into the Hub folder)."""
        return self.config, self.record, self.manifest, self.summary

    # -- model folders: the seed level only with several seeds
    def seed_part(self, seed: int) -> tuple[str, ...]:
        """``("seed_<s>",)`` when the run has several seeds, else ``()``."""
        if self.seeds is None:
            raise ValueError(f"the layout of {str(self.root)!r} was built without its seeds "
                             "(RunLayout.without_seeds): its model folders depend on them; build "
                             "RunLayout(root, seeds)")
        return (f"seed_{seed}",) if len(self.seeds) > 1 else ()

    def global_rel(self, seed: int) -> Path:
        """``global`` or ``global/seed_<s>``, relative to the root (also the Hub folder's layout)."""
        return Path("global", *self.seed_part(seed))

    def global_dir(self, seed: int) -> Path:
        return self.root / self.global_rel(seed)

    def client_rel(self, strategy: str, client_id: str, seed: int) -> Path:
        """``clients/<strategy>/<client_id>`` (+ ``seed_<s>``), relative to the root."""
        return Path("clients", strategy, client_id, *self.seed_part(seed))

    def client_dir(self, strategy: str, client_id: str, seed: int) -> Path:
        return self.root / self.client_rel(strategy, client_id, seed)

    # -- preparing the folder
    def check(self, *, resume: bool, overwrite: bool, config: dict, defaults: dict | None = None) -> Path:
        """The folder can be used as asked (fresh, ``resume``d with the same ``config``: the run's resolved config
        as a plain dict, or ``overwrite``n) and written; creates nothing (a probe file in the nearest existing
        folder is created and deleted)."""
        out = self.root
        if out.exists() and not out.is_dir():
            raise ConfigError(f"run.output_dir={str(out)!r} exists and is not a folder")
        if resume and self.config.is_file():
            self._check_resumable(config, defaults or {})
        elif out.is_dir() and any(out.iterdir()) and not overwrite and not resume:
            raise ConfigError(f"run.output_dir={str(out)!r} is not empty; pass --run.resume true to continue "
                              "it, --run.overwrite true to start again, or choose another folder")
        existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
        try:
            if not existing.is_dir():
                raise NotADirectoryError(f"{existing} is a file")
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as err:
            raise ConfigError(f"run.output_dir={str(out)!r} is not writable ({err.strerror or err}); "
                              "choose a folder you can create and write files in") from err
        return out

    def _check_resumable(self, config: dict, defaults: dict) -> None:
        """The saved ``config.yaml`` is readable and differs from ``config`` only in what a resume may change; a
        setting the saved file lacks (written before the setting existed) counts as its value in ``defaults``."""
        try:
            saved = yaml.safe_load(self.config.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot resume {str(self.root)!r}: its config.yaml is unreadable ({err}); "
                              "use --run.overwrite true to start again") from None
        diff = config_differences(with_defaults(saved if isinstance(saved, dict) else {}, defaults), config)
        if diff:
            raise ConfigError(f"cannot resume {str(self.root)!r}: the config differs from the saved one: {diff}")

    def prepare(self, *, resume: bool, overwrite: bool, config: dict, defaults: dict | None = None) -> Path:
        """Create the folder (checked first by :meth:`check`, same arguments); a non-empty one that is not resumed
        with the same config is overwritten: only what a run writes is removed."""
        out = self.check(resume=resume, overwrite=overwrite, config=config, defaults=defaults)
        resuming = resume and self.config.is_file()
        if not resuming and out.is_dir() and any(out.iterdir()):
            self.check_writable()
            for name in OUTPUT_NAMES:  # start again: remove only what a run writes
                target = out / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        self.check_writable()
        self.remove_stale_temporaries()
        return out

    def check_writable(self) -> None:
        """Create the root and write (then delete) a probe file in it: ``os.access`` misses read-only mounts and
        root."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as err:
            raise ConfigError(f"run.output_dir={str(self.root)!r} is not writable ({err.strerror or err}); "
                              "choose a folder you can create and write files in") from err

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete what a killed run left half-written (``atomic_path`` names: ``.<name>.<random>.tmp``)."""
        stale = sorted(p for p in self.root.rglob(".*.tmp") if p.is_dir() or p.is_file())
        for p in stale:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        if stale:
            logger.info("removed %d half-written file(s) of an interrupted run in %s", len(stale), self.root)
        return stale


def with_defaults(saved: dict, defaults: dict) -> dict:
    """``saved`` with every setting it lacks taken from ``defaults`` (nested sections merged)."""
    out = dict(defaults)
    for k, v in saved.items():
        out[k] = with_defaults(v, defaults[k]) if isinstance(v, dict) and isinstance(defaults.get(k), dict) else v
    return out


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every setting a resumed run may not change (publishing and run control may)."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{k}.")
        elif a != b and f"{prefix}{k}" not in _RESUMABLE and prefix + k != "hub" and not prefix.startswith("hub."):
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out



def save_model(model, path: Path, strategy=None) -> None:
    """Export ``model`` (through ``strategy.export`` when given, else ``save_pretrained``) into a temporary
    folder, then rename onto ``path`` (no half-written checkpoint); weights are saved NCHW-contiguous."""
    with atomic_path(path, directory=True) as tmp, contiguous_weights(model):  # files never depend on the format
        if strategy is None:
            model.save_pretrained(tmp)
        else:
            strategy.export(model, tmp)
        fault_point("export_model")  # test hook (hf_lpft._faults); a no-op in real runs
