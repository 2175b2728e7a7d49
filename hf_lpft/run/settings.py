"""The run's objects, built from the config in one place and handed down: lower layers take these, not the
config (``train/`` takes ``OptimSettings`` from ``hf_lpft.train.optim.settings_from`` the same way).

- :func:`run_layout`: the output folder's :class:`~hf_lpft.layout.RunLayout` (with its checkpoints);
- :func:`check_folder` / :func:`prepare_folder`: the folder checked / made ready as ``run.resume`` and
  ``run.overwrite`` ask;
- :func:`eval_settings`: the :class:`~hf_lpft.evaluation.clients.EvalSettings` of ``evaluation/``.
"""

from __future__ import annotations

from pathlib import Path

from hf_lpft.config import GLOBAL_EVAL_CLIENTS, ExperimentConfig, PFTConfig, RunConfig
from hf_lpft.evaluation.clients import EvalSettings
from hf_lpft.layout import RunLayout


def run_layout(run: RunConfig) -> RunLayout:
    """The layout of ``run.output_dir`` for ``run.seeds``."""
    return RunLayout(Path(run.output_dir), tuple(run.seeds))


def check_folder(cfg: ExperimentConfig, layout: RunLayout) -> Path:
    """``layout``'s folder can be used as ``cfg`` asks (fresh, resumed with the same config, overwritten); read only."""
    return layout.check(resume=cfg.run.resume, overwrite=cfg.run.overwrite, config=cfg.to_dict(),
                        defaults=type(cfg)().to_dict())


def prepare_folder(cfg: ExperimentConfig, layout: RunLayout) -> Path:
    """Create ``layout``'s folder as ``cfg`` asks (see :meth:`RunLayout.prepare`)."""
    return layout.prepare(resume=cfg.run.resume, overwrite=cfg.run.overwrite, config=cfg.to_dict(),
                          defaults=type(cfg)().to_dict())


def eval_settings(run: RunConfig, pft: PFTConfig) -> EvalSettings:
    """How the run evaluates models on the clients: ``run.eval_batch_size``, ``run.distortion``,
    ``pft.eval_every``, ``run.global_eval_clients``."""
    return EvalSettings(batch_size=run.eval_batch_size, distortion=run.distortion, eval_every=pft.eval_every,
                        global_clients=global_clients(run))


def global_clients(run: RunConfig) -> int | None:
    """The most other clients that score each model (None: all of them), from ``run.global_eval_clients``: null
    is the measured default, 0 is every other client."""
    k = GLOBAL_EVAL_CLIENTS if run.global_eval_clients is None else run.global_eval_clients
    return k or None
