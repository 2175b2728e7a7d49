"""Every YAML file under recipes/configs/ is loaded and validated the way it is used.

A file at the top level or in ``paper/`` is a whole study config (``--config <file>``): it goes through
``load_config``. A file in a sweep folder is a layer over the folder's ``base.yaml``: the folder goes through its
study's loader (``load_conditions``, ``load_cells``, ``load_blocks``), which layers and validates every point. Each
resulting config also passes the data-free preflight checks of a run (scheme options, embedded dataset sizes,
strategy options), holds the values its layers set, and round-trips through ``to_yaml`` / ``load_config``. A YAML
file in a folder no loader below claims fails the coverage test, so a new folder cannot go unvalidated.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from hf_lpft.config import ExperimentConfig, load_config, read_config_file
from hf_lpft.run.preflight import build_strategies, check_scheme_options, check_sizes
from hf_lpft.studies.conditions import load_conditions
from hf_lpft.studies.regime_map import AXES, load_cells
from hf_lpft.studies.sweep import merge_layers
from hf_lpft.studies.table2 import load_blocks

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"
SHIPPED = sorted(CONFIGS.rglob("*.yaml"))
SHIPPED_NOW = 38  # the YAML files shipped when this test was written: fewer means files were lost or moved away
STANDALONE_FOLDERS = (".", "paper")  # one whole study config a file
# run keys the sweep loaders set themselves (every point's own folder, resume on, the shared FedAvg cache)
LOADER_RUN_KEYS = {"output_dir", "resume", "fedavg_cache"}


def _folder(path: Path) -> str:
    return path.parent.relative_to(CONFIGS).as_posix()


def _read(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


# -- sweep folders: each loader's points as (name, config, the layers it was built from) ----------------------
def _conditions(folder: Path, out: Path) -> list[tuple[str, ExperimentConfig, list[dict]]]:
    conditions = load_conditions(folder, output_dir=out)
    assert not {c.name: c.skipped for c in conditions if c.skipped}  # a skipped condition is a config that fails
    files = sorted(p.stem for p in folder.glob("*.yaml") if p.name != "base.yaml")
    assert [c.name for c in conditions] == sorted(files, key=lambda n: (n != "baseline", n))
    base = _read(folder / "base.yaml")
    return [(c.name, c.config, [base, _read(folder / f"{c.name}.yaml")]) for c in conditions]


def _regime(folder: Path, out: Path) -> list[tuple[str, ExperimentConfig, list[dict]]]:
    cells = load_cells(folder, output_dir=out)
    axes, base = _read(folder / "axes.yaml"), _read(folder / "base.yaml")
    assert sorted(p.name for p in folder.glob("*.yaml")) == ["axes.yaml", "base.yaml"]
    assert [c.name for c in cells] == ["/".join(v) for v in itertools.product(*(axes[a] for a in AXES))]
    points = []
    for c in cells:
        dose = {k: v for k, v in (axes["dose"][c.dose] or {}).items() if k != "rows_from"}
        points.append((c.name, c.config, [base, axes["norm"][c.norm] or {}, axes["shift"][c.shift] or {}, dose]))
    return points


def _table2(folder: Path, out: Path) -> list[tuple[str, ExperimentConfig, list[dict]]]:
    blocks = load_blocks(folder, output_dir=out)
    spec, base = _read(folder / "blocks.yaml")["blocks"], _read(folder / "base.yaml")
    assert sorted(p.name for p in folder.glob("*.yaml")) == ["base.yaml", "blocks.yaml"]
    assert [b.name for b in blocks] == list(spec)
    assert all(b.paper == list(spec[b.name].get("paper") or []) for b in blocks)
    return [(b.name, b.config, [base, spec[b.name].get("config") or {}]) for b in blocks]


SWEEPS = {"conditions": _conditions, "regime": _regime, "table2": _table2}


# -- what every config must satisfy ------------------------------------------------------------------------------
def _check(cfg: ExperimentConfig, layers: list[dict], tmp_path: Path, *, loader_run_keys=frozenset()) -> None:
    """The data-free preflight checks pass, the config holds every value its layers set (the last layer wins),
    and it round-trips through to_yaml / load_config unchanged."""
    check_scheme_options(cfg)
    check_sizes(cfg)
    assert set(build_strategies(cfg)) == set(cfg.pft.strategies)
    resolved = cfg.to_dict()
    for section, values in merge_layers(*layers).items():
        for key, value in values.items():
            if section == "run" and key in loader_run_keys:
                continue
            got = resolved[section][key]
            assert got == value, (section, key, got, value)
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_every_shipped_yaml_is_covered():
    assert len(SHIPPED) >= SHIPPED_NOW, f"{len(SHIPPED)} YAML files under {CONFIGS}, expected at least {SHIPPED_NOW}"
    folders = {_folder(p) for p in SHIPPED}
    unclaimed = folders - set(STANDALONE_FOLDERS) - set(SWEEPS)
    assert not unclaimed, f"YAML folders {sorted(unclaimed)} are validated by no test: add them to SWEEPS"
    assert set(STANDALONE_FOLDERS) | set(SWEEPS) <= folders  # a folder this test expects was removed or renamed


@pytest.mark.parametrize("path", [p for p in SHIPPED if _folder(p) in STANDALONE_FOLDERS],
                         ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_standalone_config_validates(path, tmp_path):
    cfg = load_config(path)
    _check(cfg, [read_config_file(path)], tmp_path)


@pytest.mark.parametrize("folder", sorted(SWEEPS))
def test_sweep_folder_validates(folder, tmp_path):
    points = SWEEPS[folder](CONFIGS / folder, tmp_path / "out")
    assert points
    for name, cfg, layers in points:
        _check(cfg, layers, tmp_path, loader_run_keys=LOADER_RUN_KEYS)
        assert cfg.run.output_dir.startswith(str(tmp_path / "out")) and cfg.run.resume, name
