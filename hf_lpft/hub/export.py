"""Make a run's output folder Hub-ready: ``<output_dir>/hub/model`` and ``<output_dir>/hub/results``.

``hub/model`` is exactly the model repository: the global model at the root (``config.json`` +
``model.safetensors``, a ``SplitModel``) with its card ``README.md``; each client's personalized weights
under ``clients/<strategy>/<client_id>/`` (+ ``seed_<s>/`` with several seeds, whose global models are
then also under ``global/seed_<s>/``), each with its card and a ``personalization.json`` saying how to
load it:

- ``peft_adapter`` (LoRA, LP-LoRA): the standard peft folder (adapters + head as ``modules_to_save``);
- ``head`` (LP with frozen BatchNorm, or any client whose backbone equals the global one): ``head.safetensors``;
- ``full`` (FT, LP-FT, soups, ...): ``model.safetensors`` + ``config.json``.

Every model folder also holds the files that turn raw inputs into model inputs, as the run saved them:
``preprocessor_config.json`` (images) or the tokenizer's files (text), so a client's folder classifies
raw inputs on its own. ``config.json`` names the classes (``id2label`` / ``label2id``).

Plus the provenance files (``config.yaml``, ``run_record.json``, ``federation/manifest.json``,
``summary.md``). ``hub/results`` is the results dataset repository: ``README.md`` (card whose ``configs``
metadata makes the folder loadable with ``load_dataset``), ``<experiment>/clients-*.parquet`` and
``<experiment>-summary/summary-*.parquet``. Weights are hard-linked from the run folder when possible.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from safetensors.torch import load_file, save_file

from hf_lpft.hub.cards import RunInfo, client_card, global_card, results_card
from hf_lpft.io import atomic_path, write_json
from hf_lpft.layout import RunLayout

logger = logging.getLogger(__name__)

CLIENTS_SPLIT, SUMMARY_SPLIT = "clients", "summary"


@dataclass
class HubFolders:
    """The two Hub-ready folders of a run and the experiment (dataset config) name."""

    model: Path
    results: Path
    experiment: str


def hub_endpoint() -> str:
    """The Hub endpoint: ``HF_ENDPOINT`` if set now, else huggingface_hub's (read at its import)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def experiment_name(output_dir: str | Path, experiment: str | None = None) -> str:
    """The dataset config name of this run: ``experiment`` or the output folder's name, made Hub-safe."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", experiment or Path(output_dir).resolve().name).strip("-.")
    if not name:
        raise ValueError(f"cannot make an experiment name from {experiment or str(output_dir)!r}; pass one")
    return name


def _link(src: Path, dst: Path) -> None:
    """Hard-link (no extra disk for weights), else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _link_side_files(src: Path, dst: Path) -> None:
    """Link every file of the model folder ``src`` that no format rewrites: the input files
    (``preprocessor_config.json``, a tokenizer's files) and ``config.json``; weights and cards are not."""
    for path in sorted(src.iterdir()):
        if path.is_file() and path.name not in _NOT_SIDE_FILES:
            _link(path, dst / path.name)


_NOT_SIDE_FILES = {"model.safetensors", "adapter_model.safetensors", "adapter_config.json", "README.md",
                   "personalization.json"}


def _same_backbone(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> bool:
    """True when every non-head tensor (weights and BatchNorm buffers) equals the global model's."""
    body = {k for k in state if not k.startswith("head.")}
    return body == {k for k in base if not k.startswith("head.")} and all(torch.equal(state[k], base[k]) for k in body)


def set_adapter_base(folder: Path, base: str) -> None:
    """Record in a peft adapter folder the global model it applies to (``base_model_name_or_path``)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    write_json(folder / "adapter_config.json", config)


def export_client(src: Path, dst: Path, base_state: dict[str, torch.Tensor], *, base_ref: str) -> str:
    """Write one client's weights in the smallest exact format; returns the format name. ``base_ref``: the
    global model LoRA adapters apply to (a repo id, or a local folder ``SplitModel.from_pretrained`` reads)."""
    dst.mkdir(parents=True, exist_ok=True)
    if (src / "adapter_config.json").is_file():
        shutil.copy2(src / "adapter_config.json", dst / "adapter_config.json")
        set_adapter_base(dst, base_ref)
        _link(src / "adapter_model.safetensors", dst / "adapter_model.safetensors")
        _link_side_files(src, dst)
        return "peft_adapter"
    if not (src / "model.safetensors").is_file():
        raise FileNotFoundError(f"{str(src)!r} holds neither a peft adapter nor model.safetensors")
    _link_side_files(src, dst)
    state = load_file(str(src / "model.safetensors"))
    if _same_backbone(state, base_state):
        save_file({k: v.contiguous() for k, v in state.items() if k.startswith("head.")}, str(dst / "head.safetensors"))
        return "head"
    _link(src / "model.safetensors", dst / "model.safetensors")
    return "full"


def write_model_folder(info: RunInfo, out: Path, dst: Path, *, repo_id: str | None, results_repo_id: str | None,
                       endpoint: str, ref: str) -> None:
    """Fill ``dst`` with the model repository's files (see the module docstring); ``ref`` is what the cards
    load from: ``repo_id``, or the folder ``dst`` becomes."""
    layout = info.layout
    first = out / layout.global_rel(info.seeds[0])
    _link(first / "model.safetensors", dst / "model.safetensors")
    _link_side_files(first, dst)
    bases = {}
    for seed in info.seeds:
        src = out / layout.global_rel(seed)
        bases[seed] = load_file(str(src / "model.safetensors"))
        if layout.seed_part(seed):  # several seeds: each global model in its own folder too
            _link(src / "model.safetensors", dst / layout.global_rel(seed) / "model.safetensors")
            _link_side_files(src, dst / layout.global_rel(seed))
    folders = {}
    strategies = info.record["run_info"].get("strategies", {})
    for row in info.ok[info.ok.strategy != "global_model"].itertuples(index=False):
        rel = layout.client_rel(row.strategy, row.client_id, row.seed)
        base = layout.global_rel(row.seed).as_posix() if layout.seed_part(row.seed) else "."
        base_ref = repo_id if repo_id and base == "." else model_ref(ref, base, is_repo=repo_id is not None)
        fmt = export_client(out / rel, dst / rel, bases[row.seed], base_ref=base_ref)
        write_json(dst / rel / "personalization.json", {"format": fmt, "strategy": row.strategy,
                                                        "client_id": row.client_id, "seed": int(row.seed),
                                                        "base": base})
        card = client_card(info, row, strategy_desc=strategies.get(row.strategy, {}), fmt=fmt, folder=rel.as_posix(),
                           base=base, repo_id=repo_id, endpoint=endpoint, repo_ref=ref)
        card.save(dst / rel / "README.md")
        folders[(row.strategy, row.client_id, row.seed)] = rel.as_posix()
    for rel in info.layout.provenance:  # relative to the run folder, as in the Hub folder
        if (out / rel).is_file():
            _link(out / rel, dst / rel)
    global_card(info, repo_id=repo_id, results_repo_id=results_repo_id, endpoint=endpoint,
                client_folders=folders, repo_ref=ref).save(dst / "README.md")


def model_ref(ref: str, subfolder: str, *, is_repo: bool) -> str:
    """``ref`` itself for a repo (peft cannot name a subfolder there), else the local path of ``subfolder``."""
    return ref if is_repo or subfolder in ("", ".") else Path(ref, subfolder).as_posix()


def write_run_cards(info: RunInfo, out: Path) -> None:
    """The run folder's own cards (``global/``, ``clients/...``) from the same templates as the Hub cards, and
    each LoRA adapter's ``base_model_name_or_path`` set to its global model's folder (absolute path)."""
    ref, strategies, folders = str(out), info.record["run_info"].get("strategies", {}), {}
    for row in info.ok[info.ok.strategy != "global_model"].itertuples(index=False):
        rel = info.layout.client_rel(row.strategy, row.client_id, row.seed)
        base = info.layout.global_rel(row.seed).as_posix()
        fmt = "peft_adapter" if info.export_kind(row.strategy) == "adapter" else "full"
        if fmt == "peft_adapter":
            set_adapter_base(out / rel, str((out / base).resolve()))
        client_card(info, row, strategy_desc=strategies.get(row.strategy, {}), fmt=fmt, folder=rel.as_posix(),
                    base=base, repo_id=None, endpoint=hub_endpoint(), repo_ref=ref).save(out / rel / "README.md")
        folders[(row.strategy, row.client_id, row.seed)] = rel.as_posix()
    for seed in info.seeds:
        base = info.layout.global_rel(seed).as_posix()
        global_card(info, repo_id=None, results_repo_id=None, endpoint=hub_endpoint(), client_folders=folders,
                    repo_ref=ref, base=base).save(out / base / "README.md")


def results_datasets(info: RunInfo) -> dict[str, datasets.Dataset]:
    """``{config_name: Dataset}``: per-client rows (``<experiment>``) and the summary (``<experiment>-summary``)."""
    rows = info.results.copy()
    rows["error"] = rows["error"].astype("string") if "error" in rows else None
    summary = info.summary()
    summary.insert(0, "experiment", info.experiment)
    return {info.experiment: datasets.Dataset.from_pandas(rows, preserve_index=False),
            f"{info.experiment}-summary": datasets.Dataset.from_pandas(summary, preserve_index=False)}


def dataset_configs(experiment: str) -> list[dict]:
    """The ``configs`` card metadata of one experiment, in the layout ``Dataset.push_to_hub`` writes."""
    return [{"config_name": experiment,
             "data_files": [{"split": CLIENTS_SPLIT, "path": f"{experiment}/{CLIENTS_SPLIT}-*"}]},
            {"config_name": f"{experiment}-summary",
             "data_files": [{"split": SUMMARY_SPLIT, "path": f"{experiment}-summary/{SUMMARY_SPLIT}-*"}]}]


def write_results_folder(info: RunInfo, dst: Path, *, repo_id: str | None, model_repo_id: str | None,
                         endpoint: str, ref: str | None = None) -> None:
    """Fill ``dst`` with the results dataset repository (loadable with ``load_dataset(str(dst), <config>)``)."""
    for (config, ds), split in zip(results_datasets(info).items(), (CLIENTS_SPLIT, SUMMARY_SPLIT)):
        (dst / config).mkdir(parents=True, exist_ok=True)
        with quiet_datasets():  # a one-batch write: its "Creating parquet" bar says nothing
            ds.to_parquet(str(dst / config / f"{split}-00000-of-00001.parquet"))
    card = results_card(info, repo_id=repo_id, model_repo_id=model_repo_id, endpoint=endpoint,
                        metadata={"configs": dataset_configs(info.experiment)}, repo_ref=ref)
    card.save(dst / "README.md")


@contextlib.contextmanager
def quiet_datasets():
    """``datasets``' progress bars off within the block, restored after (unless they were off already)."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_off = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_off:
            enable_progress_bars()


def default_results_repo(repo_id: str | None) -> str | None:
    return f"{repo_id}-results" if repo_id else None


def export_run(output_dir: str | Path, *, repo_id: str | None = None, results_repo_id: str | None = None,
               experiment: str | None = None, endpoint: str | None = None) -> HubFolders:
    """Write (or rewrite) ``<output_dir>/hub/{model,results}`` from a finished run folder.

    Args:
        output_dir: The run's output folder (``config.yaml``, ``results.parquet``, ``global/``, ``clients/``...).
        repo_id: The model repository the folder is meant for (cards link to it); None = local only.
        results_repo_id: The results dataset repository; default ``<repo_id>-results``.
        experiment: Dataset config name; default the output folder's name.
        endpoint: For links in the cards; default :func:`hub_endpoint`.
    """
    out = Path(output_dir).resolve()  # local cards name absolute folders: they load from any working directory
    info = RunInfo.read(out, experiment_name(out, experiment))
    endpoint = endpoint or hub_endpoint()
    results_repo_id = results_repo_id or default_results_repo(repo_id)
    write_run_cards(info, out)
    layout = RunLayout(out, info.seeds)
    with atomic_path(layout.hub_model, directory=True) as tmp:
        write_model_folder(info, out, tmp, repo_id=repo_id, results_repo_id=results_repo_id, endpoint=endpoint,
                           ref=repo_id or str(layout.hub_model))
    with atomic_path(layout.hub_results, directory=True) as tmp:
        write_results_folder(info, tmp, repo_id=results_repo_id, model_repo_id=repo_id, endpoint=endpoint,
                             ref=str(layout.hub_results))
    logger.info("Hub-ready folders written to %s", layout.hub)
    return HubFolders(layout.hub_model, layout.hub_results, info.experiment)
