"""Model and dataset cards rendered from the Jinja templates with ``ModelCard`` / ``DatasetCard.from_template``.

Templates: one copy, inside the package as ``hf_lpft/hub/templates/`` (package data), where they are edited
and from where they are read with ``importlib.resources``, which works in editable (``pip install -e``) and
normal installs alike; the repository's top-level ``model_cards/README.md`` points users to them.

The YAML metadata is built as ``ModelCardData`` / ``DatasetCardData`` (never by concatenating strings):
model-index eval results carry Local and Global accuracy per strategy on the federated dataset.
"""

from __future__ import annotations

import importlib.resources
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml
from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

from hf_lpft.evaluation.metrics import format_markdown, strategy_label, summary_table
from hf_lpft.layout import RunLayout
from hf_lpft.strategies import get_strategy

TEMPLATES = ("global_model.md", "personalized_model.md", "results_dataset.md")
TAGS = ["federated-learning", "personalized-fine-tuning", "lp-ft"]


def template_path(name: str) -> Path:
    """The packaged template ``name`` (one of :data:`TEMPLATES`)."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown card template {name!r}; choose one of {list(TEMPLATES)}")
    return Path(str(importlib.resources.files("hf_lpft.hub") / "templates" / name))


@dataclass
class RunInfo:
    """Everything a card says about a run, read from its output folder."""

    config: dict
    record: dict
    manifest: dict
    results: pd.DataFrame
    experiment: str

    @classmethod
    def read(cls, output_dir: str | Path, experiment: str) -> RunInfo:
        out = RunLayout.without_seeds(output_dir)  # the seeds are in its config.yaml, read here
        needed = (out.config, out.record, out.manifest, out.results)
        missing = [p.relative_to(out.root).as_posix() for p in needed if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{str(out.root)!r} is not a complete run folder: missing {missing}")
        return cls(yaml.safe_load(out.config.read_text()), json.loads(out.record.read_text()),
                   json.loads(out.manifest.read_text()), pd.read_parquet(out.results), experiment)

    @property
    def seeds(self) -> list[int]:
        return list(self.config["run"]["seeds"])

    @property
    def layout(self) -> RunLayout:
        """The paths of model folders for this run's seeds (relative paths also name the Hub folder's)."""
        return RunLayout(Path("."), self.seeds)

    def export_kind(self, strategy: str) -> str:
        """What ``strategy``'s export wrote: from the run record (older records: the registered class)."""
        desc = self.record.get("run_info", {}).get("strategies", {}).get(strategy, {})
        return desc.get("export_kind") or get_strategy(strategy).export_kind

    @property
    def ok(self) -> pd.DataFrame:
        """Result rows of units that did not fail."""
        return self.results[self.results.error.isna()] if "error" in self.results else self.results

    @property
    def dataset_name(self) -> str:
        """The dataset's name without any local folder (a path would leak the user's file system)."""
        name = str(self.config["data"]["dataset"])
        return Path(name).name if Path(name).is_absolute() or name.startswith(".") or Path(name).exists() else name

    @property
    def task(self) -> str:
        """The Hub task of the run's models: text datasets name a ``text_column``."""
        return "text-classification" if self.config["data"].get("text_column") else "image-classification"

    def summary(self) -> pd.DataFrame:
        return summary_table(self.ok)

    def provenance(self) -> dict:
        """Template variables shared by every card."""
        data, meta = self.config["data"], self.record.get("meta_info", {})
        packages = meta.get("packages", {})
        return {"experiment": self.experiment, "dataset": self.dataset_name,
                "dataset_config": data.get("dataset_config"),
                "split": data.get("split"), "scheme": data["scheme"], "partition_by": data.get("partition_by"),
                "alpha": data.get("alpha"), "client_ids": [c["client_id"] for c in self.manifest["clients"]],
                "num_clients": len(self.manifest["clients"]), "num_classes": self.manifest.get("num_classes"),
                "class_names": self.class_names, "classes_text": classes_text(self.class_names),
                "manifest_sha256": self.manifest["indices_sha256"], "seeds": self.seeds,
                "backbone": self.config["model"]["backbone"], "pretrained": self.config["model"]["pretrained"],
                "image_size": data.get("image_size"), "task": self.task, "max_seq_len": data.get("max_seq_len"),
                "fedavg": self.config["fedavg"], "pft": self.config["pft"],
                "git_commit": meta.get("git", {}).get("commit"), "git_dirty": meta.get("git", {}).get("dirty"),
                "packages": ", ".join(f"{k} {v}" for k, v in packages.items() if v),
                "num_test_total": sum(c["n_test"] for c in self.manifest["clients"]),
                "summary_markdown": format_markdown(self.summary()), "global_note": global_estimate_text(self),
                "preprocessing_text": preprocessing_text(self.preprocessing)}

    @property
    def class_names(self) -> list[str]:
        """The name of every class (the manifest's ``class_names``; older or unnamed: the indices as strings)."""
        names = self.manifest.get("class_names")
        return list(names) if names is not None else [str(i) for i in range(int(self.manifest.get("num_classes") or 0))]

    @property
    def preprocessing(self) -> dict:
        """The models' input preprocessing (``run_info.preprocessing``; older runs: the from-scratch default)."""
        from hf_lpft.data.preprocess import Preprocessing

        found = self.record.get("run_info", {}).get("preprocessing")
        return found or Preprocessing(image_size=self.config["data"].get("image_size", 32)).to_dict()

    def card_metadata(self) -> dict:
        """``license`` (``hub.hub_license``) and ``datasets`` (the federated dataset) for the model cards."""
        return {"license": (self.config.get("hub") or {}).get("hub_license") or DEFAULT_LICENSE,
                "datasets": [self.dataset_name]}


DEFAULT_LICENSE = "apache-2.0"
SOURCE_TEXT = {"scratch": "the backbone was trained from scratch, so pixels are scaled to [-1, 1]",
               "timm_pretrained_cfg": "the pretrained timm backbone's own normalization (its pretrained_cfg)",
               "image_processor": "the pretrained backbone's image processor"}


def classes_text(names: list[str]) -> str:
    """Every class index with its name in backticks (``0 `cat`, 1 `dog```), as ``id2label`` has them."""
    return ", ".join(f"{i} `{name}`" for i, name in enumerate(names))


def preprocessing_text(prep: dict) -> str:
    """One sentence saying how inputs become model inputs (hf_lpft.data.preprocess.Preprocessing as a dict)."""
    if prep.get("kind") == "text":
        return (f"strings are tokenized with the backbone's tokenizer (`{prep.get('tokenizer')}`), at most "
                f"{prep.get('max_length') or 'the tokenizer maximum of'} tokens.")
    size, fmt = prep["image_size"], lambda v: "[" + ", ".join(f"{x:.4g}" for x in v) + "]"
    return (f"images are converted to {prep.get('channel_order', 'RGB')}, resized to {size}x{size} "
            f"({prep['interpolation']}), scaled to [0, 1], then normalized as (x - mean) / std with mean "
            f"{fmt(prep['mean'])} and std {fmt(prep['std'])}: "
            f"{SOURCE_TEXT.get(prep.get('source'), prep.get('source'))}. "
            "The same values are in `preprocessor_config.json` (transformers `AutoImageProcessor`) and in "
            "`config.json` (`preprocessing`).")


def model_args(ref: str, subfolder: str | None, *, is_repo: bool) -> str:
    """Arguments of ``from_pretrained`` for a model in ``subfolder`` of a Hub repo or a local folder."""
    if not subfolder or subfolder == ".":
        return f'"{ref}"'
    return f'"{ref}", subfolder="{subfolder}"' if is_repo else f'"{Path(ref, subfolder).as_posix()}"'


def optimizer_text(pft: dict) -> str:
    """The personalization optimizer as the run used it (``pft.optimizer`` and its settings)."""
    momentum = f", momentum {pft.get('momentum')}" if pft.get("optimizer", "sgd") == "sgd" else ""
    return (f"{pft.get('optimizer', 'sgd')} (lr {pft.get('lr')}, {pft.get('schedule') or 'constant'} schedule"
            f"{momentum}, weight decay {pft.get('weight_decay')}; a new optimizer per phase)")


def card_strategy(desc: dict, pft: dict) -> dict:
    """A strategy's description as cards show it: a phase's ``solver: sgd`` means "the run's optimizer"
    (:class:`hf_lpft.train.phase.Phase`), so it names the optimizer actually used (``pft.optimizer``)."""
    phases = [p | {"solver": pft.get("optimizer", "sgd")} if p.get("solver") == "sgd" else p
              for p in desc.get("phases", [])]
    return desc | {"phases": phases} if "phases" in desc else desc


def _pct(x: float) -> str:
    return "n/a" if pd.isna(x) else f"{100 * x:.2f}"


def _dataset_args(info: RunInfo) -> dict:
    d = info.config["data"]
    return {"scheme": d["scheme"], "partition_by": d.get("partition_by"), "num_clients": len(info.manifest["clients"]),
            "manifest_sha256": info.manifest["indices_sha256"]}


def global_estimate_text(info: RunInfo) -> str:
    """'' when Global is exact; else what it is estimated on (the run record's ``global_eval``)."""
    found = info.record.get("run_info", {}).get("global_eval")
    if not found:
        return ""
    return f"estimate on {found['clients_scored_per_model']} of the {found['other_clients']} other clients"


def _global_cell(row, estimate: str) -> str:
    """A row's Global in %, with its standard error when it is an estimate."""
    return f"{_pct(row.global_acc)} ± {_pct(row.global_acc_se)}" if estimate else _pct(row.global_acc)


def eval_results(info: RunInfo, rows: pd.DataFrame, *, label: str) -> list[EvalResult]:
    """Local and Global accuracy (fractions, mean over clients and seeds) of every strategy in ``rows``; the
    Global metric's name says when it is an estimate on a sample of the other clients."""
    out, estimate = [], global_estimate_text(info)
    for strategy, group in rows.groupby("strategy", sort=False):
        for metric, column in (("Local", "local_acc"), ("Global", "global_acc")):
            note = f", {estimate}" if estimate and metric == "Global" else ""
            out.append(EvalResult(
                task_type=info.task, dataset_type=info.dataset_name,
                dataset_name=f"{info.dataset_name} federated ({info.config['data']['scheme']})",
                dataset_config=info.config["data"].get("dataset_config"), dataset_split="test",
                dataset_args=_dataset_args(info), metric_type="accuracy",
                metric_name=f"{metric} accuracy{note} ({strategy}{label})",
                metric_config=f"{strategy}/{metric.lower()}",
                metric_value=round(float(group[column].mean()), 6)))
    return out


def _folder_cell(row, client_folders: dict, *, layout: RunLayout) -> str:
    """Where a result row's weights are: the root / ``global/seed_<s>``, a client folder, or none (failed unit)."""
    if row.strategy == "global_model":
        return f"`{layout.global_rel(row.seed).as_posix()}`" if layout.seed_part(row.seed) else "root"
    folder = client_folders.get((row.strategy, row.client_id, row.seed))
    return f"`{folder}`" if folder else "none (the unit failed)"


def global_card(info: RunInfo, *, repo_id: str | None, results_repo_id: str | None, endpoint: str,
                client_folders: dict[tuple[str, str, int], str], repo_ref: str, base: str = ".") -> ModelCard:
    """The root card: the global model, every strategy's results, provenance and usage.

    ``repo_ref``: what the snippets load from (the repo id, or the local folder); ``base``: the global
    model's folder inside it (``.`` at the root of a Hub repo, ``global`` in a run folder).
    """
    ok = info.ok
    strategies = [s for s in dict.fromkeys(ok.strategy) if s != "global_model"]
    data = ModelCardData(model_name=repo_id or info.experiment, library_name="hf_lpft", pipeline_tag=info.task,
                         tags=TAGS + [info.task] + strategies, eval_results=eval_results(info, ok, label=""),
                         **info.card_metadata())
    rows = [{"strategy": r.strategy, "client_id": r.client_id, "seed": r.seed, "n_train": r.n_train, "n_test": r.n_test,
             "local": _pct(r.local_acc), "global_": _global_cell(r, global_estimate_text(info)),
             "folder": _folder_cell(r, client_folders, layout=info.layout)}
            for r in info.results.itertuples()]
    lora = next((f for (s, _, _), f in client_folders.items() if info.export_kind(s) == "adapter"), None)
    first = next(iter(client_folders), (next(iter(strategies), "ft"), info.provenance()["client_ids"][0], 0))
    strategies_yaml = yaml.safe_dump({n: card_strategy(d, info.config["pft"]) for n, d in
                                      info.record["run_info"].get("strategies", {}).items()}, sort_keys=False)
    return ModelCard.from_template(
        data, template_path=str(template_path("global_model.md")), title=f"{info.experiment}: FedAvg global model + "
        f"personalized clients", repo_ref=repo_ref, results_repo_id=results_repo_id,
        results_url=f"{endpoint}/datasets/{results_repo_id}", client_rows=rows, example_strategy=first[0],
        example_client=first[1], lora_example=lora if len(info.seeds) == 1 else None,
        base_args=model_args(repo_ref, base, is_repo=repo_id is not None),
        lora_args=model_args(repo_ref, lora, is_repo=repo_id is not None),
        strategies_yaml=strategies_yaml, **info.provenance())


FORMATS = {"full": "full model weights (`model.safetensors` + `config.json`, a `SplitModel`)",
           "head": "the classifier head only (`head.safetensors`); the backbone is the global model's, unchanged",
           "peft_adapter": "a peft LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`) holding the "
                           "adapters "
                           "and the head; load it onto the global model"}


def client_card(info: RunInfo, row, *, strategy_desc: dict, fmt: str, folder: str, base: str, repo_id: str | None,
                endpoint: str, repo_ref: str) -> ModelCard:
    """The card of one (strategy, client, seed) folder; ``repo_ref`` is the repo id or local folder it is in."""
    rows = pd.DataFrame([row._asdict()])
    data = ModelCardData(model_name=f"{repo_id or info.experiment}/{folder}",
                         library_name="peft" if fmt == "peft_adapter" else "hf_lpft", base_model=repo_id,
                         tags=TAGS + [info.task, row.strategy],
                         eval_results=eval_results(info, rows, label=f", client {row.client_id}"),
                         **info.card_metadata())
    return ModelCard.from_template(
        data, template_path=str(template_path("personalized_model.md")),
        title=f"{info.experiment}: client {row.client_id}, {strategy_label(row.strategy)}", client_id=row.client_id,
        strategy=row.strategy, seed=row.seed, multi_seed=len(info.seeds) > 1, local=_pct(row.local_acc),
        global_=_global_cell(row, global_estimate_text(info)), global_note=global_estimate_text(info),
        n_train=row.n_train, n_test=row.n_test, format=fmt,
        format_description=FORMATS[fmt], folder=folder, base=base, repo_id=repo_id, repo_url=f"{endpoint}/{repo_id}",
        repo_ref=repo_ref, strategy_yaml=yaml.safe_dump(card_strategy(strategy_desc, info.config["pft"]),
                                                        sort_keys=False), base_is_repo=repo_id is not None,
        optimizer=optimizer_text(info.config["pft"]),
        base_args=model_args(repo_ref, base, is_repo=repo_id is not None),
        adapter_args=model_args(repo_ref, folder, is_repo=repo_id is not None),
        preprocessing_text=preprocessing_text(info.preprocessing), task=info.task,
        class_names=info.class_names, classes_text=classes_text(info.class_names),
        example_label=info.class_names[0] if info.class_names else "0")


def results_card(info: RunInfo, *, repo_id: str | None, model_repo_id: str | None, endpoint: str,
                 metadata: dict | None = None, repo_ref: str | None = None) -> DatasetCard:
    """The results dataset's card; ``metadata`` (e.g. the ``configs`` already on the Hub) is kept."""
    metadata = {"pretty_name": f"hf_lpft results ({info.experiment})", "task_categories": [info.task],
                **(metadata or {})}
    metadata["tags"] = sorted(set(metadata.get("tags") or []) | set(TAGS))
    data = DatasetCardData(**metadata)
    names = [c.get("config_name") for c in metadata.get("configs", []) if isinstance(c, dict)]
    return DatasetCard.from_template(
        data, template_path=str(template_path("results_dataset.md")), title=f"hf_lpft results: {info.experiment}",
        repo_ref=repo_id or repo_ref or "hub/results", model_repo_id=model_repo_id,
        model_url=f"{endpoint}/{model_repo_id}", config_names=names, **info.provenance())
