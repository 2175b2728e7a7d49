"""A global model θ_G trained elsewhere (``model.global_model``, ``hf-lpft personalize``).

The paper (arXiv 2511.12695, Sec. 3) studies post-hoc personalization of a FedAvg global model; the
fine-tuning stage does not depend on how θ_G was trained, so θ_G may come from a previous run or from
another federated-learning system. Accepted forms (a local path, or a Hub model id downloaded with
``huggingface_hub.snapshot_download``):

- ``hf_lpft``: a folder written by ``SplitModel.save_pretrained`` (a run's ``global/``), loaded as it is;
  its head must have the federation's class count, its backbone and image size must match the config.
- ``timm``: a timm folder (``timm.models.save_for_hf`` / ``push_to_hub``: ``config.json`` with an
  ``architecture``), or a timm checkpoint file with ``model.backbone: timm:<architecture>``. Weights load
  through timm's own pretrained path (which adapts e.g. position embeddings to ``data.image_size``).
- ``transformers``: a folder with a transformers ``config.json`` (``model_type``), loaded with ``AutoModel``.

The head of a plain timm / transformers model: a timm classifier that is an ``nn.Linear`` with the
federation's class count and the feature width is kept (a global model from another FL system keeps its
trained head); otherwise the head is new, ``nn.Linear``'s default initialisation drawn from the torch seed
``derive_seed(run seed, "init")``: the same head FedAvg would start from. The run record says which.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
from torch import nn

from hf_lpft.config import ConfigError, ExperimentConfig
from hf_lpft.models.backbone import SplitModel, build_model
from hf_lpft.spec import BackboneSpec
from hf_lpft.train.loop import derive_seed

KINDS = ("hf_lpft", "timm", "timm_checkpoint", "transformers")


def resolve_source(value: str) -> Path:
    """The local folder / file of ``model.global_model``: the path itself, or a Hub snapshot of that id."""
    path = Path(value)
    if path.exists():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return Path(snapshot_download(value))
    except (OSError, ValueError, HfHubHTTPError) as err:
        raise ConfigError(f"model.global_model={value!r} is not a local folder or file and cannot be downloaded "
                          f"from the Hub ({type(err).__name__}: {err})") from err


ANY_MODEL = ("give a run's global/ folder, a timm folder (save_for_hf), a transformers model folder or a timm "
             "checkpoint file")
# The weights a model folder may hold (hf_lpft and timm: model.safetensors; transformers also shards or .bin).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def model_kind(path: Path, value: str) -> tuple[str, dict]:
    """(kind, its ``config.json``) of a global model folder or checkpoint file (see :data:`KINDS`); a peft adapter
    folder (a LoRA client) and a missing, unreadable or invalid ``config.json`` are ConfigErrors naming the folder."""
    if path.is_file():
        return "timm_checkpoint", {}
    if (path / "adapter_config.json").is_file():
        raise ConfigError(adapter_message(path, value))
    config = read_config(path, value)
    if BackboneSpec.is_spec(config.get("backbone")) and "num_classes" in config:
        return "hf_lpft", config
    if "architecture" in config:
        return "timm", config
    if "model_type" in config:
        return "transformers", config
    raise ConfigError(f"model.global_model={value!r}: its config.json is neither hf_lpft's (backbone), timm's "
                      "(architecture) nor a transformers config (model_type)")


def read_config(path: Path, value: str) -> dict:
    """The folder's ``config.json`` as a dict; ConfigError when it is missing, unreadable or not a JSON object."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"model.global_model={value!r} has no config.json; {ANY_MODEL}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"model.global_model={value!r}: its config.json is not valid JSON ({err}); the folder is "
                          "damaged or incomplete: copy or save it again") from None
    if not isinstance(config, dict):
        raise ConfigError(f"model.global_model={value!r}: its config.json holds a {type(config).__name__}, not a "
                          f"JSON object; {ANY_MODEL}")
    return config


def adapter_message(path: Path, value: str) -> str:
    """What to say when a peft adapter folder (a LoRA client's export) is given where a full model is expected."""
    try:
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        base = None
    instead = f"pass its base model --model.global_model {base}" if base else "pass the run's global/ folder"
    return (f"model.global_model={value!r} is a peft adapter folder (adapter_config.json: a LoRA client's export), "
            f"not a full model; {instead} (the global model it was trained from), or load the client itself with "
            "hf_lpft.load_personalized(<run folder>, client_id, strategy)")


def check_weights(path: Path, value: str) -> None:
    """A model folder holds a weights file, and every safetensors file (and zip-format torch file) is complete: a
    missing or truncated copy fails in milliseconds (headers only), not when the model is loaded."""
    from safetensors import SafetensorError, safe_open

    if path.is_dir() and not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(f"model.global_model={value!r} has no weights file ({' or '.join(WEIGHT_FILES[::2])}); "
                          "the folder is incomplete: copy or save it again")
    for f in [path] if path.is_file() else sorted(path.iterdir()):
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt"):
                    pass
            elif f.suffix in (".bin", ".pth", ".pt") and _starts_with(f, b"PK\x03\x04"):
                zipfile.ZipFile(f).close()  # torch.save's zip format: a truncated file has no central directory
        except (OSError, SafetensorError, zipfile.BadZipFile) as err:
            raise ConfigError(f"model.global_model={value!r}: {f.name} is damaged or incomplete ({err}); copy or "
                              "save the model again") from None


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def check_global_model(cfg: ExperimentConfig, num_classes: int) -> None:
    """Before the output folder exists: the given ``model.global_model`` is a full model of a known kind that fits
    the config (:func:`check_fits`) and its files are complete (:func:`check_weights`)."""
    if cfg.model.global_model is None:
        return
    path = resolve_source(cfg.model.global_model)
    kind, config = model_kind(path, cfg.model.global_model)
    check_fits(cfg, kind, config, num_classes)
    check_weights(path, cfg.model.global_model)


def check_fits(cfg: ExperimentConfig, kind: str, config: dict, num_classes: int) -> None:
    """The given model fits the config: its backbone (and an hf_lpft model's image size and head) match
    ``model.backbone`` (``data.image_size``, the federation's class count)."""
    value, prefix = cfg.model.global_model, cfg.model.spec.kind
    if kind == "hf_lpft":
        _must_match(value, "backbone", config["backbone"], cfg.model.backbone, "model.backbone")
        _must_match(value, "image size", config.get("image_size"), cfg.data.image_size, "data.image_size")
        if config["num_classes"] != num_classes:
            raise ConfigError(f"model.global_model={value!r} has a head for {config['num_classes']} classes but the "
                              f"federation has {num_classes}; personalize it on data with {config['num_classes']} "
                              "classes")
    elif kind == "transformers" and prefix != "hf":
        raise ConfigError(f"model.global_model={value!r} is a transformers model but model.backbone="
                          f"{cfg.model.backbone!r}; set --model.backbone hf:{value}")
    elif kind == "timm":
        _must_match(value, "backbone", f"timm:{config['architecture']}", cfg.model.backbone, "model.backbone")
    elif kind == "timm_checkpoint" and prefix != "timm":
        raise ConfigError(f"model.global_model={value!r} is a checkpoint file; it needs model.backbone "
                          f"timm:<architecture>, not {cfg.model.backbone!r}")


def backbone_of(value: str) -> dict:
    """Config defaults implied by the given model (``hf-lpft personalize`` applies them before the YAML):
    its backbone (and for an hf_lpft folder its image size); {} for a timm checkpoint file."""
    path = resolve_source(value)
    kind, config = model_kind(path, value)
    if kind == "hf_lpft":
        return {"model": {"backbone": config["backbone"]}, "data": {"image_size": config["image_size"]}}
    if kind == "timm":
        return {"model": {"backbone": f"timm:{config['architecture']}"}}
    return {"model": {"backbone": f"hf:{value}"}} if kind == "transformers" else {}


def _must_match(value: str, what: str, given, configured, key: str) -> None:
    if given != configured:
        raise ConfigError(f"model.global_model={value!r} has {what} {given!r} but {key}={configured!r}; set "
                          f"--{key} {given} (hf-lpft personalize does so unless the config sets it)")


def load_global_model(cfg: ExperimentConfig, num_classes: int, *, seed: int) -> tuple[SplitModel, dict]:
    """The given global model as a SplitModel for ``num_classes`` classes, and what the run record says of it.

    Raises:
        ConfigError: naming ``model.global_model`` when it cannot be loaded, its class count differs from the
            federation's (hf_lpft folders), or its backbone / image size differs from the config.
    """
    value = cfg.model.global_model
    path = resolve_source(value)
    kind, config = model_kind(path, value)
    head_seed = derive_seed(seed, "init") % 2**31
    info = {"source": "given", "global_model": value, "kind": kind}
    check_fits(cfg, kind, config, num_classes)
    try:
        if kind == "hf_lpft":
            return SplitModel.from_pretrained(path), info | {"head": "the global model's own"}
        if kind == "transformers":
            model = build_model(f"hf:{path}", num_classes=num_classes, image_size=cfg.data.image_size,
                                pretrained=True, pooling=cfg.model.pooling, dropout=cfg.model.dropout, seed=head_seed)
            return model, info | {"head": f"new (nn.Linear default init, torch seed {head_seed})"}
        return timm_global_model(cfg, path, kind, config, num_classes=num_classes, head_seed=head_seed, info=info)
    except (OSError, RuntimeError, ValueError, KeyError) as err:  # weights that do not fit or do not load
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigError(f"model.global_model={value!r} cannot be loaded ({type(err).__name__}: {first}); "
                          f"{ANY_MODEL}") from err


def _create_full_timm(name: str, *, image_size: int, **kwargs) -> nn.Module:
    """A timm model with its own classifier, weights through timm's pretrained path (adapts to img_size)."""
    import timm

    try:
        return timm.create_model(name, pretrained=True, img_size=image_size, **kwargs)
    except TypeError:  # CNNs take no img_size
        return timm.create_model(name, pretrained=True, **kwargs)


def timm_global_model(cfg: ExperimentConfig, path: Path, kind: str, config: dict, *, num_classes: int,
                      head_seed: int, info: dict) -> tuple[SplitModel, dict]:
    """A timm folder or checkpoint file as a SplitModel; its classifier becomes the head when it fits."""
    from timm.models import get_pretrained_cfg_value, load_state_dict

    if kind == "timm":
        arch = config["architecture"]
        full = _create_full_timm(f"local-dir:{path}", image_size=cfg.data.image_size)
    else:
        arch = cfg.model.spec.name
        weight = f"{get_pretrained_cfg_value(arch, 'classifier') or 'head'}.weight"
        state = load_state_dict(str(path))
        n = int(state[weight].shape[0]) if weight in state else 0
        full = _create_full_timm(arch, image_size=cfg.data.image_size, num_classes=n,
                                 pretrained_cfg_overlay={"file": str(path), "num_classes": n})
    classifier = full.get_classifier()
    full.reset_classifier(0)
    model = build_model(f"timm:{arch}", num_classes=num_classes, image_size=cfg.data.image_size, seed=head_seed)
    model.backbone.load_state_dict(full.state_dict())
    if isinstance(classifier, nn.Linear) and classifier.weight.shape == model.head.weight.shape:
        with torch.no_grad():
            model.head.load_state_dict(classifier.state_dict())
        return model, info | {"head": "the timm checkpoint's classifier"}
    found = classifier.out_features if isinstance(classifier, nn.Linear) else "no linear"
    return model, info | {"head": f"new (nn.Linear default init, torch seed {head_seed}); the checkpoint's "
                                  f"classifier has {found} classes, the federation {num_classes}"}
