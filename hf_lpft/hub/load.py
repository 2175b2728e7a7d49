"""``load_personalized``: any client's personalized model from a Hub repo, a Hub-ready folder or a run folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from hf_lpft.layout import RunLayout
from hf_lpft.models.backbone import SplitModel
from hf_lpft.spec import REPO_ID


def _local_root(path: Path) -> Path:
    """A run folder's Hub-ready ``hub/model`` if it was exported, else the folder itself."""
    hub_model = RunLayout.without_seeds(path).hub_model
    return hub_model if RunLayout.without_seeds(hub_model).record.is_file() else path


def _client_rel(record: dict, strategy: str, client_id: str, seed: int | None) -> tuple[str, int]:
    """``clients/<strategy>/<client>[/seed_<s>]`` after checking the names against the run record."""
    info = record["run_info"]
    seeds, strategies, clients = info["seeds"], list(info.get("strategies", {})), info["clients"]
    if strategy not in strategies:
        raise ValueError(f"strategy={strategy!r} was not run; this run has {strategies}")
    if client_id not in clients:
        raise ValueError(f"client_id={client_id!r} is not a client of this run; clients: {clients}")
    seed = seeds[0] if seed is None else seed
    if seed not in seeds:
        raise ValueError(f"seed={seed!r} was not run; seeds: {seeds}")
    return RunLayout(Path("."), seeds).client_rel(strategy, client_id, seed).as_posix(), seed


def _check_source(repo_or_dir: str | Path) -> None:
    """A path that is not a folder fails as such (not as a malformed Hub repo id)."""
    text, local = str(repo_or_dir), Path(repo_or_dir)
    if local.is_dir():
        return
    if local.exists():
        raise NotADirectoryError(f"{text!r} is a file, not a folder; give a run output folder, its hub/model "
                                 "folder, or a Hub repo id 'namespace/name'")
    if isinstance(repo_or_dir, Path) or not REPO_ID.match(text) or text.startswith((".", "~")):
        raise FileNotFoundError(f"no such folder: {text!r}; give a run output folder, its hub/model folder, or a "
                                "Hub repo id 'namespace/name'")


def _check_run_folder(folder: Path) -> None:
    """A local folder without ``run_record.json`` fails with what it is instead: one model of a run (an adapter,
    a client or the global model: the call that loads it) or something else."""
    if RunLayout.without_seeds(folder).record.is_file():
        return
    what = "a peft adapter folder (a LoRA client)" if (folder / "adapter_config.json").is_file() else \
        "a model folder" if (folder / "config.json").is_file() else "a folder"
    run = next((p for p in folder.absolute().parents if RunLayout.without_seeds(p).record.is_file()), None)
    parts = folder.absolute().relative_to(run).parts if run is not None else ()
    if len(parts) >= 3 and parts[0] == "clients":
        hint = f"call load_personalized({str(run)!r}, client_id={parts[2]!r}, strategy={parts[1]!r})"
    elif what == "a model folder":
        hint = "load a model folder itself with hf_lpft.models.backbone.SplitModel.from_pretrained(folder)"
    else:
        hint = "give a run output folder, its hub/model folder, or a Hub repo id 'namespace/name'"
    raise FileNotFoundError(f"{str(folder)!r} is {what}, not a run folder (it has no run_record.json); {hint}")


def _fetch(repo_id: str, patterns: list[str], *, revision: str | None, token: str | bool | None) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=patterns, revision=revision, token=token))


def load_personalized(repo_or_dir: str | Path, client_id: str, strategy: str, seed: int | None = None, *,
                      revision: str | None = None, token: str | bool | None = None) -> nn.Module:
    """Load client ``client_id``'s model personalized with ``strategy``, ready for inference (eval mode).

    Args:
        repo_or_dir: A Hub model repo id, a Hub-ready folder (``<run>/hub/model``) or a run output folder.
        client_id: The client (see the card or ``run_record.json``).
        strategy: The strategy name (``ft``, ``lp``, ``lp_ft``, ``lora``, ...).
        seed: Which seed's model when the run had several (default: the first).
        revision, token: For Hub repos (token default: ``HF_TOKEN`` or the login cache).

    Returns:
        A ``SplitModel`` (full or head-only formats) or a ``peft.PeftModel`` wrapping one (LoRA formats).
    """
    local = Path(repo_or_dir)
    _check_source(repo_or_dir)
    if local.is_dir():
        root = _local_root(local)
        _check_run_folder(root)
        record = json.loads(RunLayout.without_seeds(root).record.read_text())
        rel, seed = _client_rel(record, strategy, client_id, seed)
    else:
        root = _fetch(str(repo_or_dir), ["run_record.json"], revision=revision, token=token)
        record = json.loads(RunLayout.without_seeds(root).record.read_text())
        rel, seed = _client_rel(record, strategy, client_id, seed)
        root = _fetch(str(repo_or_dir), [f"{rel}/*", "config.json", "model.safetensors", "global/*/config.json",
                                         "global/*/model.safetensors"], revision=revision, token=token)
    return _build(RunLayout(root, record["run_info"]["seeds"]), rel, seed=seed)


def _build(layout: RunLayout, rel: str, *, seed: int) -> nn.Module:
    """Assemble the model from a folder in the Hub layout or in the run layout (``global/`` + ``clients/``)."""
    root = layout.root
    folder = root / rel
    if not folder.is_dir():
        raise FileNotFoundError(f"no personalized model at {str(folder)!r}")
    meta_path = folder / "personalization.json"
    if meta_path.is_file():  # Hub layout
        meta = json.loads(meta_path.read_text())
        fmt, base_dir = meta["format"], root / meta["base"]
    else:  # the run folder itself
        fmt = "peft_adapter" if (folder / "adapter_config.json").is_file() else "full"
        base_dir = layout.global_dir(seed)
    if fmt == "full":
        return SplitModel.from_pretrained(folder).eval()
    base = SplitModel.from_pretrained(base_dir)
    base.use_tokenizer_from(folder)  # a text client tokenizes with the files in its own folder
    if fmt == "head":
        result = base.load_state_dict(load_file(str(folder / "head.safetensors")), strict=False)
        if result.unexpected_keys or any(k.startswith("head.") for k in result.missing_keys):
            raise RuntimeError(f"{folder}/head.safetensors does not fit the global model: {result}")
        return base.eval()
    if fmt == "peft_adapter":
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(folder)).eval()
    raise ValueError(f"unknown personalization format {fmt!r} in {meta_path}")


@torch.no_grad()
def predict(model: nn.Module, inputs, *, top_k: int | None = None) -> torch.Tensor | list:
    """Logits of a loaded model for raw inputs, preprocessed exactly as in training; with ``top_k``, the
    ``top_k`` most probable classes by name, as a transformers classification pipeline returns them.

    Args:
        model: A ``SplitModel`` or the ``PeftModel`` :func:`load_personalized` returns.
        inputs: A PIL image of any mode and size (or a list of them, or HWC uint8 arrays) for an image
            model; a string (or a list of strings) for a text model.
        top_k: None = logits; k = ``[{"label": name, "score": probability}, ...]`` (softmax, most probable
            first, at most the class count) for one input, a list of such lists for a list of inputs.
            Names are the model's ``id2label`` (the dataset's class names).

    Returns:
        (N, num_classes) float32 logits on the CPU (``logits.argmax(-1)`` is the class index), or the
        label/score lists.
    """
    model.eval()
    logits = model(model.preprocess(inputs)).float().cpu()
    if top_k is None:
        return logits
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r} must be a positive integer (or None for logits)")
    id2label = model.id2label  # a PeftModel hands the attribute on to its SplitModel
    scores, indices = logits.softmax(-1).topk(min(top_k, logits.shape[-1]), dim=-1)
    out = [[{"label": id2label[int(i)], "score": float(p)} for p, i in zip(row, idx)]
           for row, idx in zip(scores.tolist(), indices.tolist())]
    return out if isinstance(inputs, (list, tuple)) else out[0]
