"""Every check before heavy work, in one layer: a bad input fails in seconds, before anything is written.

``preflight(cfg)`` runs the checks that need no data, cheapest first: options that do not apply to the
chosen scheme, sizes the embedded builders cannot provide, the strategies and their options, the backbone
(name; weights that need the network), the launch (tracker, FedAvg engine and its options, fp16 on CPU, a given
model with FedBN), the output folder (read only)
and, with ``--push_to_hub``, the Hub (token, repos writable). ``preflight(cfg, engine="flower-app")`` is the
same for the Flower App's server, before its first message, with the App's launch checks (what a federation
cannot honour; the general-FL strategy on Flower) in place of the built-in launch's.
``federation_checked(cfg)`` then loads the dataset (network; a damaged ``save_to_disk`` file is named),
checks its columns and labels and partitions it in memory (a saved manifest must match the dataset and have its
indices in range; one client is refused). The pipeline creates the output folder only after both, the given
global model's check (``hf_lpft.run.given_model.check_global_model``) and the decoding of every client's inputs
(``hf_lpft.run.federation.federation_inputs``: a damaged image is named), so a run rejected by any of them
leaves the file system as it was. Types, finiteness and ranges of single values are
checked by the config dataclasses themselves (``hf_lpft.config``).

The pipeline is that of Chen et al., arXiv 2511.12695 (Sec. 3): FedAvg, then personalized fine-tuning.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import torch

from hf_lpft.config import ONE_CLIENT, ConfigError, ExperimentConfig, given_keys
from hf_lpft.data.federate import (
    Federation,
    FederationError,
    default_partition_by,
    federate_from_config,
    num_classes_of,
)
from hf_lpft.data.load import builtin_options, load_from_config
from hf_lpft.data.schemes import get_scheme, scheme_options
from hf_lpft.run.settings import check_folder, run_layout
from hf_lpft.run.tracking import check_precision, cpu_only_launch, launch_precision
from hf_lpft.spec import BackboneSpec
from hf_lpft.strategies import Budget, Strategy, build_strategy

logger = logging.getLogger(__name__)

PROBE_SECONDS = 3.0  # how long a network probe may take; the whole network check stays under 5 s
PUSH_LATER = ("or run without --push_to_hub and publish the finished run later with "
              "`hf-lpft push <output_dir> --hub_repo_id <namespace/name>`")


ENGINES = ("builtin", "flower-app")  # the drivers: hf_lpft.pipeline, and the Flower App's server


def preflight(cfg: ExperimentConfig, *, engine: str = "builtin") -> dict[str, Strategy]:
    """Run every check that needs no data (see the module docstring); returns the built strategies. The only
    preflight entry point of both drivers: ``engine`` "builtin" (``hf_lpft.pipeline``, general FL on
    ``fedavg.engine``) or "flower-app" (the Flower App's server, before its first message: the data are on
    the nodes, so only the data-free checks can run there, with the App's own launch checks).

    Raises:
        ConfigError: the first bad input, named with its value and what is allowed.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: choose one of {list(ENGINES)}")
    check_scheme_options(cfg)
    check_sizes(cfg)
    strategies = build_strategies(cfg)
    check_backbone(cfg)
    check_strategies(cfg, strategies)
    if engine == "builtin":
        check_launch(cfg)
    else:  # the nodes train: the server's device, processes and trackers say nothing about them
        check_flower_app(cfg)
    check_folder(cfg, run_layout(cfg.run))
    check_hub(cfg)
    return strategies


# -- the config against the scheme and the embedded builders ------------------------------------------------
def check_scheme_options(cfg: ExperimentConfig) -> None:
    """An option the chosen scheme does not read is an error when the user set it (``config.given_keys``:
    given in the YAML file or on the command line; for dataclasses built in Python, differing from its default)."""
    d, given, scheme = cfg.data, given_keys(cfg, "data"), get_scheme(cfg.data.scheme)
    for option, schemes in scheme_options().items():  # option -> the registered schemes that read it
        if option not in given:
            continue
        value = getattr(d, option)
        per_value = option == "num_clients" and scheme.one_client_per_value
        if per_value and builder_takes(d.dataset, "num_clients"):
            continue  # an embedded builder that makes one domain a client (digits-c) takes the client count
        if d.scheme not in schemes:
            hint = (f" ({d.scheme} makes one client per value of data.partition_by, default data.domain_column)"
                    if per_value and scheme.partition_by_default == "domain" else "")
            raise ConfigError(f"data.{option}={value!r} does not apply to data.scheme={d.scheme!r}{hint}; it is "
                              f"used by the schemes {list(schemes)}: remove it or choose one of those schemes")
        if why := scheme.inapplicable(option, vars(d)):
            raise ConfigError(f"data.{option}={value!r} does not apply to data.scheme={d.scheme!r}{why}")


def builder_takes(dataset: str, option: str) -> bool:
    """Whether ``dataset`` is an embedded dataset whose builder takes ``option``."""
    from hf_lpft.data.builtin import BUILTIN_DATASETS

    return dataset in BUILTIN_DATASETS and option in inspect.signature(BUILTIN_DATASETS[dataset]).parameters


def check_sizes(cfg: ExperimentConfig) -> None:
    """Sizes and configurations an embedded dataset cannot provide fail now, not after its builder has started."""
    from hf_lpft.data.builtin import BUILTIN_CLIENTS_MAX, BUILTIN_CONFIGS, BUILTIN_DATASETS, N_PER_DOMAIN_MAX

    d = cfg.data
    if d.dataset not in BUILTIN_DATASETS:
        return
    if d.dataset_config is not None and d.dataset_config not in BUILTIN_CONFIGS.get(d.dataset, ()):
        allowed = list(BUILTIN_CONFIGS.get(d.dataset, ()))
        raise ConfigError(f"data.dataset_config={d.dataset_config!r} is not a configuration of the embedded dataset "
                          f"{d.dataset!r}; " + (f"choose one of {allowed}" if allowed else "it has none: remove it"))
    if get_scheme(d.scheme).one_client_per_value and builder_takes(d.dataset, "num_clients") \
            and "num_clients" in given_keys(cfg, "data"):
        limit, why = BUILTIN_CLIENTS_MAX[d.dataset]
        if not 2 <= d.num_clients <= limit:
            raise ConfigError(f"data.num_clients={d.num_clients!r} is out of range for the embedded dataset "
                              f"{d.dataset!r}: choose 2..{limit} ({why})")
    if "n_per_domain" not in inspect.signature(BUILTIN_DATASETS[d.dataset]).parameters:
        if "n_per_domain" in given_keys(cfg, "data"):
            raise ConfigError(f"data.n_per_domain={d.n_per_domain!r} does not apply to the embedded dataset "
                              f"{d.dataset!r} (its size is fixed); remove it")
        return
    limit, why = N_PER_DOMAIN_MAX[d.dataset]
    if d.n_per_domain > limit:
        raise ConfigError(f"data.n_per_domain={d.n_per_domain!r} exceeds what the embedded dataset {d.dataset!r} "
                          f"can provide: at most {limit} examples a domain ({why}); choose 1..{limit}")


# -- strategies and the backbone ------------------------------------------------------------------------------
def build_strategies(cfg: ExperimentConfig) -> dict[str, Strategy]:
    """Validate and build every requested strategy before any heavy work."""
    budget = Budget(epochs=cfg.pft.epochs, lr=cfg.pft.lr, head_lr=cfg.pft.head_lr)

    def build(name: str, where: str, runs: bool = True) -> Strategy:
        try:
            return build_strategy(name, cfg.pft.strategy_args.get(name), budget=budget, check_phases=runs)
        except ConfigError as err:  # say which config entry holds the bad name or option
            raise ConfigError(str(err) if str(err).startswith(where) else f"{where}: {err}") from err
    for name in cfg.pft.strategy_args:  # options of strategies not run now: names and values (typos), not budget
        build(name, f"pft.strategy_args.{name}", runs=name in cfg.pft.strategies)
    return {name: build(name, "pft.strategies") for name in cfg.pft.strategies}


def check_backbone(cfg: ExperimentConfig) -> None:
    """An unknown timm name, an unloadable transformers config or weights that need an unreachable Hub
    fail now, not after the dataset is federated."""
    import timm

    from hf_lpft.models.backbone import INSTALLED_ALIASES, hf_backbone_config

    spec = cfg.model.spec
    if spec.is_timm and not timm.is_model(spec.name):
        raise ConfigError(f"model.backbone={cfg.model.backbone!r}: {spec.name!r} is not a timm model; choose a name "
                          "from timm.list_models(), e.g. 'timm:test_resnet', 'timm:test_vit', 'timm:resnet18'")
    if spec.is_timm and cfg.model.pretrained and cfg.model.checkpoint is None:
        check_timm_weights(spec)
    if spec.is_transformers:
        if spec.kind == "hf":
            check_hf_model(spec)
        try:
            hf_backbone_config(cfg.model.backbone, image_size=cfg.data.image_size)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"model.backbone={cfg.model.backbone!r} cannot be loaded ({first}); use a local folder "
                              f"with a config.json, an installed model {sorted(INSTALLED_ALIASES)}, or a Hub id "
                              "(needs the network or the HF cache)") from err


def check_strategies(cfg: ExperimentConfig, strategies: dict[str, Strategy]) -> None:
    """Architecture-dependent options (LoRA target modules, surgical presets) fail before any training."""
    from hf_lpft.models.backbone import build_model

    if all(type(s).check_model is Strategy.check_model for s in strategies.values()):
        return
    with torch.random.fork_rng(devices=[]):  # build_model seeds the global generator; leave it as it was
        skeleton = build_model(cfg.model.backbone, num_classes=2, image_size=cfg.data.image_size)
    for strategy in strategies.values():
        strategy.check_model(skeleton)


def check_launch(cfg: ExperimentConfig) -> None:
    """The tracker of ``run.report_to`` is installed; Flower is installed and runs in one process;
    ``fedavg.fl_strategy`` is a registered algorithm that runs on ``fedavg.engine`` with valid options; a given
    global model is not combined with FedBN; fp16 has a GPU."""
    check_precision_before_launch(cfg)
    if cfg.model.global_model is not None and cfg.fedavg.bn == "local":
        raise ConfigError(f"model.global_model={cfg.model.global_model!r} has no per-client BatchNorm; "
                          "fedavg.bn='local' (FedBN) needs FedAvg to run: set fedavg.bn averaged")
    if cfg.run.report_to != "none":
        from accelerate.tracking import get_available_trackers

        if cfg.run.report_to not in {str(t) for t in get_available_trackers()}:
            raise ConfigError(f"run.report_to={cfg.run.report_to!r} needs the {cfg.run.report_to!r} package, which is "
                              f"not installed; pip install {cfg.run.report_to} or choose run.report_to none")
    if cfg.fedavg.engine == "flower":
        if importlib.util.find_spec("flwr") is None:
            raise ConfigError("fedavg.engine='flower' needs Flower, which is not installed; pip install "
                              "'hf-lpft[flower]' or choose fedavg.engine builtin")
        if (n := int(os.environ.get("WORLD_SIZE", "1"))) > 1:
            raise ConfigError(f"fedavg.engine='flower' runs in one process (Flower's simulation runs the clients in "
                              f"parallel itself), not {n}; launch without accelerate/torchrun or choose "
                              "fedavg.engine builtin")
    if cfg.model.global_model is None:  # the general-FL algorithm, its engine and options (the registry's check)
        from hf_lpft.run.general_fl import algorithm_of

        algorithm_of(cfg)


def check_flower_app(cfg: ExperimentConfig) -> None:
    """What a federation of nodes cannot honour (each node holds its own data, the server none), and
    ``fedavg.fl_strategy`` with its options as a Flower strategy; the Flower App's launch checks."""
    if cfg.pft.eval_every:
        raise ConfigError(f"pft.eval_every={cfg.pft.eval_every}: epoch curves score every client's test split during "
                          "training, which a federation keeps on the nodes; use 0 with the Flower App")
    if cfg.pft.batched_probe:
        raise ConfigError("pft.batched_probe=true trains all clients' heads in one process; on a federation each "
                          "node probes its own client: use false")
    k = cfg.run.global_eval_clients
    if k and "global_eval_clients" in given_keys(cfg, "run"):
        raise ConfigError(f"run.global_eval_clients={k}: the Flower App scores every personalized model on every "
                          "node's test split (Global exact at any number of nodes) and cannot sample; leave it unset "
                          "or 0 with the Flower App")
    from hf_lpft.run.flower_engine import check_fl_strategy  # Flower is imported only for the App

    check_fl_strategy(cfg.fedavg.fl_strategy, cfg.fedavg.fl_strategy_args)


def check_precision_before_launch(cfg: ExperimentConfig) -> None:
    """fp16 on a CPU-only run fails here, before the output folder and the partition (not after them, when
    the Accelerator exists): the precision the Accelerator will take, on the device the launch gives."""
    precision = launch_precision(cfg)
    if precision != "fp16":
        return
    from accelerate import PartialState

    check_precision(SimpleNamespace(mixed_precision=precision, device=PartialState(cpu=cpu_only_launch()).device))


# -- the network and the Hub --------------------------------------------------------------------------------------
def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (else as huggingface_hub read it at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return constants.HF_HUB_OFFLINE if value is None else value.strip().upper() in ("1", "ON", "YES", "TRUE")


def unreachable(url: str, timeout: float = PROBE_SECONDS) -> str | None:
    """None when ``url`` answers anything over HTTP within ``timeout`` seconds (proxies from the environment
    apply), else the reason; a thread bounds the time also when name resolution hangs."""
    import httpx

    result: dict = {}

    def probe() -> None:
        try:
            httpx.head(url, timeout=timeout)
            result["ok"] = True
        except Exception as err:  # noqa: BLE001 - any failure means: not reachable
            result["error"] = err
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if result.get("ok"):
        return None
    err = result.get("error")
    return f"{type(err).__name__}: {err}" if err is not None else f"no answer within {timeout:.0f} s"


def looks_like_path(text: str) -> bool:
    """A string meant as a local path (absolute, relative with ./ ../ ~, or more than one '/'), not a Hub id."""
    return text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text)


def require_hub(what: str, *, cached: bool, offline_fixes: str) -> None:
    """Fail with one line when ``what`` needs the Hub (not ``cached``) and the Hub is off or unreachable."""
    from hf_lpft.hub.export import hub_endpoint

    if cached:
        return
    endpoint = hub_endpoint()
    if hub_offline():
        raise ConfigError(f"{what} needs the Hugging Face Hub, but HF_HUB_OFFLINE=1 and it is not in the HF cache; "
                          f"to work offline: {offline_fixes}")
    if (reason := unreachable(endpoint)) is not None:
        raise ConfigError(f"{what} needs the Hugging Face Hub at {endpoint}, which cannot be reached ({reason}); "
                          f"to work offline: {offline_fixes}")


def check_timm_weights(spec: BackboneSpec) -> None:
    """Pretrained timm weights come from the Hub (or a URL) unless cached; no network fails now."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    backbone, name = str(spec), spec.name
    pcfg = get_pretrained_cfg(name)
    fixes = ("give --model.checkpoint <a local weights file>, set HF_HUB_OFFLINE=1 with the weights in the HF "
             "cache, or --model.pretrained false")
    if pcfg is None or not (pcfg.hf_hub_id or pcfg.url):
        raise ConfigError(f"model.pretrained=true but timm has no pretrained weights for {backbone!r}; {fixes}")
    if pcfg.hf_hub_id:
        files = [pcfg.hf_hub_filename] if pcfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        cached = any(isinstance(try_to_load_from_cache(pcfg.hf_hub_id, f), str) for f in files)
        require_hub(f"model.pretrained=true: the weights of {backbone!r} ({pcfg.hf_hub_id})", cached=cached,
                    offline_fixes=fixes)
    elif not (Path(torch.hub.get_dir()) / "checkpoints" / Path(pcfg.url).name).is_file():
        if (reason := unreachable(pcfg.url)) is not None or hub_offline():
            raise ConfigError(f"model.pretrained=true: the weights of {backbone!r} need the network ({pcfg.url}: "
                              f"{reason or 'HF_HUB_OFFLINE=1'}); to work offline: {fixes}")


def check_hf_model(spec: BackboneSpec) -> None:
    """``hf:<Hub id>`` that is neither a local folder nor an installed alias needs the Hub unless cached."""
    from huggingface_hub import try_to_load_from_cache

    from hf_lpft.config import REPO_ID
    from hf_lpft.models.backbone import INSTALLED_ALIASES

    backbone, name = str(spec), spec.name
    if name in INSTALLED_ALIASES or Path(name).exists() or not REPO_ID.match(name):
        return  # a folder, an installed model, or not a Hub id: hf_backbone_config reports what is wrong
    require_hub(f"model.backbone={backbone!r}", cached=isinstance(try_to_load_from_cache(name, "config.json"), str),
                offline_fixes=f"point hf: at a local folder (save_pretrained), use an installed model "
                              f"{sorted(INSTALLED_ALIASES)}, or set HF_HUB_OFFLINE=1 with the model in the HF cache")


def check_hub(cfg: ExperimentConfig) -> None:
    """With ``--push_to_hub``: the Hub is on and reachable, a token is there and accepted, and both repos
    (model, results dataset) are writable or creatable; checked before FedAvg, not after training."""
    if not cfg.hub.push_to_hub:
        return
    from huggingface_hub import HfApi, get_token

    from hf_lpft.hub.export import default_results_repo, hub_endpoint

    endpoint = hub_endpoint()
    if hub_offline():
        raise ConfigError(f"hub.push_to_hub=true needs the Hub at {endpoint}, but HF_HUB_OFFLINE=1; unset it "
                          f"{PUSH_LATER}")
    token = get_token()
    if not token:
        raise ConfigError(f"hub.push_to_hub=true needs a Hub token with write access, and none is set: set HF_TOKEN "
                          f"or run `hf auth login`, {PUSH_LATER}")
    api = HfApi(endpoint=endpoint, token=token)
    namespaces = _writable_namespaces(api, endpoint)
    results = cfg.hub.hub_results_repo_id or default_results_repo(cfg.hub.hub_repo_id)
    for repo_id, kind in ((cfg.hub.hub_repo_id, "model"), (results, "dataset")):
        _check_repo(api, repo_id, kind, namespaces, endpoint)


def _hub_failure(err: Exception, endpoint: str, what: str) -> ConfigError:
    """One line for a failed Hub request: rejected token, server error or no connection."""
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    if status == 401:
        return ConfigError(f"hub.push_to_hub=true: the Hub at {endpoint} rejected the token (HTTP 401 on {what}); "
                           f"set a valid token with write access (HF_TOKEN or `hf auth login`), {PUSH_LATER}")
    if status is not None:
        message = response.headers.get("X-Error-Message") or response.reason_phrase
        return ConfigError(f"hub.push_to_hub=true: the Hub at {endpoint} answered HTTP {status} on {what} ({message}); "
                           f"try again later, {PUSH_LATER}")
    return ConfigError(f"hub.push_to_hub=true: the Hub at {endpoint} cannot be reached ({type(err).__name__}: {err}); "
                       f"check the network and HF_ENDPOINT, {PUSH_LATER}")


def _writable_namespaces(api, endpoint: str) -> list[str]:
    """The user and organisations the token can write to (whoami); a read-only token fails."""
    try:
        info = api.whoami()
    except Exception as err:  # noqa: BLE001 - every failure is reported as one line
        raise _hub_failure(err, endpoint, "whoami") from None
    role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise ConfigError(f"hub.push_to_hub=true: the token of {info.get('name')!r} is read-only; create a token with "
                          f"write access, {PUSH_LATER}")
    return [info.get("name")] + [o.get("name") for o in info.get("orgs") or []]


def _check_repo(api, repo_id: str, kind: str, namespaces: list[str], endpoint: str) -> None:
    """An existing repo must be writable (auth_check write); a missing one must be in a writable namespace."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    flag = "hub.hub_repo_id" if kind == "model" else "hub.hub_results_repo_id"
    try:
        api.auth_check(repo_id, repo_type=kind, write=True)
    except (RepositoryNotFoundError, GatedRepoError) as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status == 403 or isinstance(err, GatedRepoError):
            raise ConfigError(f"{flag}={repo_id!r}: the token cannot write to this {kind} repo; choose a repo in "
                              f"{namespaces}") from None
        if repo_id.split("/")[0] not in namespaces:
            raise ConfigError(f"{flag}={repo_id!r} does not exist and the token cannot create repos in "
                              f"{repo_id.split('/')[0]!r}; namespaces it can write to: {namespaces}") from None
    except Exception as err:  # noqa: BLE001
        raise _hub_failure(err, endpoint, f"auth-check of {repo_id}") from None


# -- the dataset and the federation ----------------------------------------------------------------------------
# datasets' packaged builders that read your own files (data.data_dir / data.data_files), not Hub ids.
PACKAGED_BUILDERS = ("imagefolder", "audiofolder", "csv", "json", "parquet", "text", "arrow")


def load_dataset_checked(cfg: ExperimentConfig) -> datasets.Dataset:
    """The source dataset; one that cannot be found or needs an unreachable Hub fails with a ConfigError
    naming ``data.dataset`` (in one line, within seconds)."""
    from hf_lpft.data.builtin import BUILTIN_DATASETS

    d = cfg.data
    local = (f"a folder written by Dataset.save_to_disk, your own files (imagefolder with data.data_dir; csv, json "
             f"or parquet with data.data_files), or an embedded dataset {sorted(BUILTIN_DATASETS)}")
    own_files = bool(d.data_dir or d.data_files) or d.dataset in PACKAGED_BUILDERS
    if d.dataset not in BUILTIN_DATASETS and not own_files and not Path(d.dataset).exists() \
            and looks_like_path(d.dataset):
        raise ConfigError(f"data.dataset={d.dataset!r} cannot be loaded: no such folder; give {local}, or a Hub "
                          "dataset id")
    hub_id = d.dataset not in BUILTIN_DATASETS and not own_files and not Path(d.dataset).exists()
    if hub_id and not hub_offline():
        require_hub(f"data.dataset={d.dataset!r} (not an embedded dataset or a local folder)", cached=False,
                    offline_fixes=f"set HF_HUB_OFFLINE=1 with the dataset in the HF cache (loaded once online), "
                                  f"or give {local}")
    try:
        return load_from_config(d, builtin_kwargs=builtin_options(d, given=given_keys(cfg, "data")))
    except FederationError as err:  # e.g. a split the dataset does not have
        raise ConfigError(f"data.{err}") from err
    except (OSError, ValueError) as err:
        if d.dataset in BUILTIN_DATASETS:  # building the embedded data failed (e.g. disk full): not a config error
            raise
        if hub_id and hub_offline():
            raise ConfigError(f"data.dataset={d.dataset!r} needs the Hugging Face Hub, but HF_HUB_OFFLINE=1 and it "
                              f"is not in the HF cache ({type(err).__name__}); to work offline: give {local}") from err
        if Path(d.dataset).is_dir() and (damaged := damaged_file(Path(d.dataset))) is not None:
            raise ConfigError(f"data.dataset={d.dataset!r} cannot be loaded: {damaged}; write it again with "
                              "Dataset.save_to_disk (or copy the whole folder again)") from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"data.dataset={d.dataset!r} cannot be loaded ({first}); use an embedded dataset "
                          f"{sorted(BUILTIN_DATASETS)}, a folder written by save_to_disk, or a Hub dataset id "
                          "(needs the network or the HF cache)") from err


def damaged_file(folder: Path) -> str | None:
    """The first file of a ``save_to_disk`` folder that does not read (a JSON file that does not parse, an Arrow
    file whose record batches do not), said as ``the file <path> is damaged or incomplete (<why>)``; only
    looked for after loading failed, so a good folder pays nothing."""
    import json

    import pyarrow as pa

    for f in sorted(p for p in folder.rglob("*") if p.suffix in (".json", ".arrow")):
        try:
            if f.suffix == ".json":
                json.loads(f.read_text(encoding="utf-8"))
            else:
                with pa.memory_map(str(f)) as source:
                    pa.ipc.open_stream(source).read_all()
        except (OSError, ValueError, pa.ArrowException) as err:
            why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return f"the file {str(f)!r} is damaged or incomplete ({why})"
    return None


def check_dataset(cfg: ExperimentConfig, ds: datasets.Dataset, *, for_training: bool = True) -> None:
    """Columns, their types, the labels and the class count against the dataset, before anything is written;
    ``for_training=False`` (``hf-lpft partition``) skips what only training needs (a text backbone)."""
    d = cfg.data
    inputs = ("data.text_column", d.text_column) if d.text_column else ("data.image_column", d.image_column)
    columns = {inputs[0]: inputs[1], "data.label_column": d.label_column}
    if not d.manifest:
        if d.partition_by:
            for k, name in enumerate(d.partition_by.split("+")):
                columns[f"data.partition_by[{k}]" if "+" in d.partition_by else "data.partition_by"] = name
        elif (name := default_partition_by(d.scheme, label_column=d.label_column,
                                           domain_column=d.domain_column)) is not None:
            columns["data.domain_column" if name == d.domain_column else "data.label_column"] = name
    for role, name in columns.items():
        if name not in ds.column_names:
            raise ConfigError(f"{role}={name!r} is not a column of the dataset; columns: {ds.column_names}")
    if d.text_column:
        check_text_inputs(cfg, ds, for_training=for_training)
    elif not isinstance(ds.features[d.image_column], datasets.Image):
        images = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
        raise ConfigError(f"data.image_column={d.image_column!r} is a {type(ds.features[d.image_column]).__name__} "
                          f"column, not an Image column; Image columns: {images}")
    check_labels(cfg, ds)


def check_labels(cfg: ExperimentConfig, ds: datasets.Dataset) -> None:
    """The label column holds class indices: integers (or ClassLabel / bool) in [0, num_classes)."""
    d = cfg.data
    label = ds.features[d.label_column]
    if not (isinstance(label, datasets.ClassLabel) or getattr(label, "dtype", "").startswith(("int", "uint", "bool"))):
        raise ConfigError(f"data.label_column={d.label_column!r} holds {getattr(label, 'dtype', type(label).__name__)} "
                          "values; it must be a ClassLabel, an integer or a bool column")
    values = np.asarray(ds[d.label_column]).astype(np.int64)
    bound = label.num_classes if isinstance(label, datasets.ClassLabel) else d.num_classes
    if len(values) and values.min() < 0:
        row = int(values.argmin())
        raise ConfigError(f"data.label_column={d.label_column!r} holds the negative label {int(values[row])} (row "
                          f"{row}); labels must be class indices 0..num_classes-1 (drop or relabel such rows)")
    if len(values) and bound is not None and values.max() >= bound:
        row = int(values.argmax())
        raise ConfigError(f"data.label_column={d.label_column!r} holds the label {int(values[row])} (row {row}), "
                          f"outside [0, {bound}) ({'its ClassLabel' if d.num_classes is None else 'data.num_classes'})")
    if d.num_classes is not None and (found := num_classes_of(ds, d.label_column)) != d.num_classes:
        raise ConfigError(f"data.num_classes={d.num_classes} but column {d.label_column!r} has {found} classes")


def check_text_inputs(cfg: ExperimentConfig, ds: datasets.Dataset, *, for_training: bool = True) -> None:
    """A text dataset needs a string column and a transformers backbone (whose tokenizer it uses)."""
    feature = ds.features[cfg.data.text_column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        strings = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
        raise ConfigError(f"data.text_column={cfg.data.text_column!r} is not a string column; string columns: "
                          f"{strings}")
    if for_training and cfg.model.spec.kind != "hf":
        raise ConfigError(f"data.text_column={cfg.data.text_column!r} needs a text backbone with a tokenizer, "
                          f"'hf:<model id or path>'; got model.backbone={cfg.model.backbone!r}")


def federation_checked(cfg: ExperimentConfig, *, for_training: bool = True
                       ) -> tuple[datasets.Dataset, Federation, dict[str, float]]:
    """Load and check the dataset and partition it in memory (or rebuild and check ``data.manifest``).

    Returns:
        The dataset to decode clients from (shifted where clients have shifts), the federation and the
        seconds of each step (``data_load``, ``partition``). Writes nothing.

    Raises:
        ConfigError: naming the bad value (dataset, column, label, manifest, infeasible partition).
    """
    d, t = cfg.data, time.perf_counter()
    ds = load_dataset_checked(cfg)
    check_dataset(cfg, ds, for_training=for_training)
    seconds = {"data_load": time.perf_counter() - t}
    try:
        shifted, fed = federate_from_config(ds, d)  # partition (or rebuild the manifest), then client shifts
    except FederationError as err:
        raise ConfigError(f"data: {err}") from err
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        if not d.manifest:
            raise
        raise ConfigError(f"data.manifest={d.manifest!r} is not a manifest written by hf_lpft "
                          f"({type(err).__name__}: {err})") from err
    check_clients(cfg, fed)
    seconds["partition"] = time.perf_counter() - t - seconds["data_load"]
    return shifted, fed, seconds


def check_clients(cfg: ExperimentConfig, fed: Federation) -> None:
    """A federation of one client is refused, naming what made it one client (the manifest, the partition
    column's single value, the client count)."""
    if len(fed.clients) >= 2:
        return
    d, only = cfg.data, fed.clients[0].client_id if fed.clients else None
    if d.manifest:
        cause = f"data.manifest={d.manifest!r} holds the single client {only!r}"
    elif get_scheme(d.scheme).clients_from_values and not builder_takes(d.dataset, "num_clients"):
        column = fed.params.get("partition_by") or d.partition_by or d.domain_column
        role = "data.partition_by" if d.partition_by else "data.domain_column"
        cause = f"{role}={column!r} has a single value in this dataset"
        if d.domain_level is not None and not d.partition_by:
            cause += f" (data.domain_level={d.domain_level}: that folder level below data.data_dir holds one folder)"
        if "clients_per_domain" in get_scheme(d.scheme).options:
            cause += f" and data.clients_per_domain={d.clients_per_domain}"
    else:
        cause = f"data.num_clients={d.num_clients!r} gives the single client {only!r}"
    raise ConfigError(f"{cause}; {ONE_CLIENT}: give data with two or more domains, or another scheme (e.g. "
                      "--data.scheme iid --data.num_clients 4)")
