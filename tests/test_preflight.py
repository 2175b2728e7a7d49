"""Every bad input fails in the preflight layer (hf_lpft.run.preflight): a one-line message naming the value,
exit code 2 from the CLI, no traceback, within seconds, and the file system as it was.

CLI cases run ``hf_lpft.cli.main`` in-process (a subprocess costs ~12 s of imports); Python cases call the
dataclasses, ``pipeline.run`` or ``load_personalized``. Training is replaced by a tripwire (``run_seed``), so a
case that got as far as FedAvg fails loudly. ``PREFLIGHT_SECONDS`` bounds the time of every case after import.
"""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import time
import typing
from pathlib import Path

import datasets
import numpy as np
import pytest
from hub_server import FakeHub

import hf_lpft.pipeline  # noqa: F401 - import cost paid once, not inside the first timed case
from hf_lpft import cli
from hf_lpft.config import (
    SECTIONS,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    FedAvgConfig,
    HubConfig,
    ModelConfig,
    PFTConfig,
    RunConfig,
    load_config,
)
from hf_lpft.data.federate import ClientSplit, Federation, federate_from_config, save_manifest

PREFLIGHT_SECONDS = 5.0
BASE = ["--data.num_classes", "4", "--model.backbone", "timm:test_resnet", "--fedavg.rounds", "1",
        "--fedavg.batch_size", "16", "--pft.strategies", "ft", "--pft.epochs", "1", "--pft.batch_size", "16",
        "--run.num_threads", "1", "--log_level", "WARNING"]


def _save(ds: datasets.Dataset, path: Path) -> str:
    datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    return str(path)


def _rehash(manifest: dict) -> dict:
    """A manifest whose indices were edited, with its hash recomputed (so only the new checks can catch it)."""
    clients = [ClientSplit(c["client_id"], c["train_indices"], c["test_indices"], shift=c.get("shift") or {})
               for c in manifest["clients"]]
    fed = Federation(manifest["scheme"], manifest["params"], manifest["seed"], manifest["num_rows"],
                     manifest["num_classes"], clients)
    return manifest | {"indices_sha256": fed.indices_hash()}


class Ctx:
    """Datasets, manifests, config files and folders the cases refer to (built once per module)."""

    def __init__(self, tmp: Path, tiny_ds: datasets.Dataset, tiny_path: str):
        self.tmp, self.data = tmp, tiny_path
        n = len(tiny_ds)
        labels = np.asarray(tiny_ds["label"])
        plain = tiny_ds.cast_column("label", datasets.Value("int64"))
        self.negative = _save(plain.map(lambda e, i: {"label": -1 if i == 5 else e["label"]}, with_indices=True),
                              tmp / "negative")
        self.too_big = _save(plain.map(lambda e, i: {"label": 7 if i == 9 else e["label"]}, with_indices=True),
                             tmp / "too_big")
        self.float_labels = _save(tiny_ds.cast_column("label", datasets.Value("float32")), tmp / "float_labels")
        self.texts = _save(datasets.Dataset.from_dict({"text": ["a b"] * n, "code": list(range(n)),
                                                       "label": labels.tolist(), "domain": tiny_ds["domain"]}),
                           tmp / "texts")
        self.other_labels = _save(tiny_ds.map(lambda e: {"label": (e["label"] + 1) % 4}), tmp / "other_labels")
        self.other_domains = _save(tiny_ds.map(lambda e: {"domain": e["domain"].upper()}), tmp / "other_domains")
        self._manifests(tiny_ds)
        self._configs()
        self.previous = tmp / "previous"  # an earlier run's folder: overwrite/resume must leave it as it is
        self.previous.mkdir()
        (self.previous / "results.parquet").write_text("old results")
        (self.previous / "config.yaml").write_text(load_config(None, [*BASE[:-2], "--data.dataset", tiny_path,
                                                                      "--run.output_dir", str(self.previous)]).to_yaml())

    def _manifests(self, tiny_ds: datasets.Dataset) -> None:
        data = DataConfig(dataset=self.data, num_classes=4)
        _, fed = federate_from_config(tiny_ds, data)
        self.manifest = save_manifest(fed, self.tmp / "m" / "manifest.json", stats=False)
        good = json.loads(self.manifest.read_text())
        edits = {"index_out_of_range": lambda m: m["clients"][0]["test_indices"].__setitem__(0, m["num_rows"]),
                 "index_negative": lambda m: m["clients"][1]["train_indices"].__setitem__(0, -3),
                 "index_in_both_splits": lambda m: m["clients"][0]["test_indices"].__setitem__(
                     0, m["clients"][0]["train_indices"][0])}
        self.bad_manifest = {}
        for name, edit in edits.items():
            m = json.loads(json.dumps(good))
            edit(m)
            (path := self.tmp / f"{name}.json").write_text(json.dumps(_rehash(m)))
            self.bad_manifest[name] = path
        for name, text in {"no_clients": json.dumps({k: v for k, v in good.items() if k != "clients"}),
                           "version_99": json.dumps(good | {"version": 99}), "a_list": "[1, 2]"}.items():
            (path := self.tmp / f"{name}.json").write_text(text)
            self.bad_manifest[name] = path
        (path := self.tmp / "latin1.json").write_bytes(b'{"version": 1, "scheme": "caf\xe9"}')
        self.bad_manifest["not_utf8"] = path

    def _configs(self) -> None:
        files = {"bad_yaml.yaml": b"fedavg:\n  rounds: 1\n lr: 0.1\n", "tab.yaml": b"fedavg:\n\trounds: 1\n",
                 "latin1.yaml": b"run:\n  output_dir: caf\xe9\n", "list.yaml": b"- fedavg\n- pft\n",
                 "scalar.yaml": b"just a string\n", "section_list.yaml": b"fedavg: [1, 2]\n",
                 "unknown_section.yaml": b"training:\n  lr: 0.1\n", "rounds_word.yaml": b"run:\n  eval_batch_size: many\n",
                 "lr_nan.yaml": b"fedavg:\n  lr: .nan\n", "lr_inf.yaml": b"pft:\n  lr: .inf\n",
                 "natural_clients.yaml": b"data:\n  scheme: natural\n  num_clients: 7\n",
                 "utf16.yaml": "fedavg:\n  rounds: 1\n".encode("utf-16")}
        self.config = {}
        for name, content in files.items():
            (path := self.tmp / "configs" / name).parent.mkdir(exist_ok=True)
            path.write_bytes(content)
            self.config[name.split(".")[0]] = str(path)
        self.config["a_folder"] = str(self.tmp / "configs")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_ds, tiny_ds_path):
    return Ctx(tmp_path_factory.mktemp("preflight"), tiny_ds, tiny_ds_path)


@pytest.fixture()
def tripwire(monkeypatch):
    """FedAvg and personalization never start in a case: the pipeline's per-seed work raises."""
    def boom(*args, **kwargs):
        raise AssertionError("heavy work started before the bad input was rejected")
    monkeypatch.setattr("hf_lpft.pipeline.run_seed", boom)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()} if root.is_dir() else {}


def closed_endpoint() -> str:
    """A local URL nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def float_fields() -> list[str]:
    """Every float field of every section (fields added later are included automatically)."""
    out = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        out += [f"{section}.{f.name}" for f in dataclasses.fields(cls)
                if float in (typing.get_args(hints[f.name]) or (hints[f.name],))]
    return out


# (class, id, arguments of `hf-lpft run` (a function of Ctx), substrings of the message)
CLI_CASES = [
    # the config file
    ("config_file", "invalid_yaml", lambda c: ["--config", c.config["bad_yaml"]],
     ["bad_yaml.yaml", "is not valid YAML", "line 3, column 2"]),
    ("config_file", "tab_in_yaml", lambda c: ["--config", c.config["tab"]],
     ["tab.yaml", "is not valid YAML", "line 2"]),
    ("config_file", "not_utf8", lambda c: ["--config", c.config["latin1"]],
     ["latin1.yaml", "is not UTF-8 text", "byte 0xe9"]),
    ("config_file", "utf16", lambda c: ["--config", c.config["utf16"]], ["utf16.yaml", "is not UTF-8 text"]),
    ("config_file", "a_list", lambda c: ["--config", c.config["list"]],
     ["list.yaml", "must hold a mapping", "not a list"]),
    ("config_file", "a_scalar", lambda c: ["--config", c.config["scalar"]], ["scalar.yaml", "not a str"]),
    ("config_file", "a_folder", lambda c: ["--config", c.config["a_folder"]], ["configs", "is not a file"]),
    ("config_file", "section_not_mapping", lambda c: ["--config", c.config["section_list"]],
     ["section 'fedavg' must be a mapping", "[1, 2]"]),
    ("config_file", "unknown_section", lambda c: ["--config", c.config["unknown_section"]],
     ["unknown section 'training'", "'fedavg'"]),
    ("config_file", "value_wrong_type", lambda c: ["--config", c.config["rounds_word"]],
     ["run.eval_batch_size='many'", "must be an integer"]),
    ("config_file", "value_nan", lambda c: ["--config", c.config["lr_nan"]], ["fedavg.lr=nan", "finite"]),
    ("config_file", "value_inf", lambda c: ["--config", c.config["lr_inf"]], ["pft.lr=inf", "finite"]),
    # options that do not apply to the scheme (set explicitly: YAML or CLI)
    ("scheme_option", "natural_num_clients", lambda c: ["--data.num_clients", "15"],
     ["data.num_clients=15 does not apply to data.scheme='natural'", "one client per value", "'iid'"]),
    ("scheme_option", "natural_num_clients_yaml", lambda c: ["--config", c.config["natural_clients"]],
     ["data.num_clients=7 does not apply to data.scheme='natural'"]),
    ("scheme_option", "natural_alpha", lambda c: ["--data.alpha", "0.1"],
     ["data.alpha=0.1 does not apply to data.scheme='natural'", "'dirichlet'"]),
    ("scheme_option", "natural_classes_per_client", lambda c: ["--data.classes_per_client", "3"],
     ["data.classes_per_client=3 does not apply", "['pathological']"]),
    ("scheme_option", "iid_alpha", lambda c: ["--data.scheme", "iid", "--data.alpha", "0.3"],
     ["data.alpha=0.3 does not apply to data.scheme='iid'"]),
    ("scheme_option", "iid_clients_per_domain", lambda c: ["--data.scheme", "iid", "--data.clients_per_domain", "3"],
     ["data.clients_per_domain=3 does not apply to data.scheme='iid'", "['natural+dirichlet']"]),
    ("scheme_option", "dirichlet_quantity_mode", lambda c: ["--data.scheme", "dirichlet", "--data.quantity_mode", "linear"],
     ["data.quantity_mode='linear' does not apply to data.scheme='dirichlet'"]),
    ("scheme_option", "pathological_min_partition_size",
     lambda c: ["--data.scheme", "pathological", "--data.min_partition_size", "3"],
     ["data.min_partition_size=3 does not apply to data.scheme='pathological'"]),
    ("scheme_option", "quantity_linear_alpha",
     lambda c: ["--data.scheme", "quantity", "--data.quantity_mode", "linear", "--data.alpha", "2"],
     ["data.alpha=2.0 does not apply to data.scheme='quantity' with data.quantity_mode='linear'"]),
    ("scheme_option", "natural_dirichlet_num_clients",
     lambda c: ["--data.scheme", "natural+dirichlet", "--data.num_clients", "4"],
     ["data.num_clients=4 does not apply to data.scheme='natural+dirichlet'"]),
    # sizes that cannot be provided
    ("size", "digits5_n_per_domain", lambda c: ["--data.dataset", "digits5", "--data.num_classes", "10",
                                                 "--data.n_per_domain", "1300"],
     ["data.n_per_domain=1300 exceeds what the embedded dataset 'digits5' can provide", "at most 1250"]),
    ("size", "digits_c_n_per_domain", lambda c: ["--data.dataset", "digits-c", "--data.n_per_domain", "6000"],
     ["data.n_per_domain=6000", "'digits-c'", "at most 5000"]),
    ("size", "colored_digits_n_per_domain", lambda c: ["--data.dataset", "colored-digits", "--data.n_per_domain", "9999"],
     ["data.n_per_domain=9999", "'colored-digits'", "at most 5000"]),
    ("size", "topics_n_per_domain", lambda c: ["--data.dataset", "topics", "--data.n_per_domain", "10"],
     ["data.n_per_domain=10 does not apply to the embedded dataset 'topics'"]),
    ("size", "classes_per_client_over_classes",
     lambda c: ["--data.scheme", "pathological", "--data.num_clients", "2", "--data.classes_per_client", "9"],
     ["classes_per_client=9 exceeds the 4 distinct values of 'label'"]),
    ("size", "label_permutation_over_classes",
     lambda c: ["--data.scheme", "iid", "--data.num_clients", "2", "--data.label_permutation", "6"],
     ["label_permutation=6 exceeds the 4 classes"]),
    ("size", "quantity_min_size_over_rows",
     lambda c: ["--data.scheme", "quantity", "--data.num_clients", "3", "--data.min_partition_size", "30"],
     ["num_clients=3 x min_partition_size=30 exceeds the dataset's 72 examples"]),
    ("size", "iid_more_clients_than_rows", lambda c: ["--data.scheme", "iid", "--data.num_clients", "500"],
     ["num_clients=500 exceeds the dataset's 72 examples"]),
    # labels and columns of the dataset
    ("dataset", "negative_label", lambda c: ["--data.dataset", c.negative],
     ["data.label_column='label' holds the negative label -1 (row 5)"]),
    ("dataset", "label_over_num_classes", lambda c: ["--data.dataset", c.too_big],
     ["data.label_column='label' holds the label 7 (row 9), outside [0, 4)", "data.num_classes"]),
    ("dataset", "float_labels", lambda c: ["--data.dataset", c.float_labels],
     ["data.label_column='label' holds float32 values", "ClassLabel, an integer or a bool"]),
    ("dataset", "text_column_of_ints", lambda c: ["--data.dataset", c.texts, "--data.text_column", "code",
                                                  "--model.backbone", "hf:all-MiniLM-L6-v2"],
     ["data.text_column='code' is not a string column", "['text', 'domain']"]),
    ("dataset", "text_with_timm_backbone", lambda c: ["--data.dataset", c.texts, "--data.text_column", "text"],
     ["data.text_column='text' needs a text backbone", "model.backbone='timm:test_resnet'"]),
    ("dataset", "missing_text_column", lambda c: ["--data.dataset", c.texts, "--data.text_column", "body"],
     ["data.text_column='body' is not a column", "'text'"]),
    ("dataset", "text_data_as_images", lambda c: ["--data.dataset", c.texts, "--data.image_column", "text"],
     ["data.image_column='text' is a Value column, not an Image column"]),
    ("dataset", "relative_missing_folder", lambda c: ["--data.dataset", "./no/such/folder"],
     ["data.dataset='./no/such/folder' cannot be loaded: no such folder"]),
    # saved manifests
    ("manifest", "other_dataset_same_size", lambda c: ["--data.dataset", c.other_labels, "--data.manifest", str(c.manifest)],
     ["manifest.json", "was made for dataset", "72 rows", "other_labels", "has other values in ['label', 'domain']"]),
    ("manifest", "other_domains_same_labels",
     lambda c: ["--data.dataset", c.other_domains, "--data.manifest", str(c.manifest)],
     ["was made for dataset", "other_domains", "has other values"]),
    ("manifest", "index_out_of_range", lambda c: ["--data.manifest", str(c.bad_manifest["index_out_of_range"])],
     ["index_out_of_range.json", "test index 72 outside the dataset's rows [0, 72)"]),
    ("manifest", "index_negative", lambda c: ["--data.manifest", str(c.bad_manifest["index_negative"])],
     ["index_negative.json", "train index -3 outside"]),
    ("manifest", "index_in_both_splits", lambda c: ["--data.manifest", str(c.bad_manifest["index_in_both_splits"])],
     ["index_in_both_splits.json", "in both its train and test split"]),
    ("manifest", "no_clients_key", lambda c: ["--data.manifest", str(c.bad_manifest["no_clients"])],
     ["no_clients.json", "is not a manifest written by hf_lpft", "KeyError"]),
    ("manifest", "version_99", lambda c: ["--data.manifest", str(c.bad_manifest["version_99"])],
     ["version_99.json", "has version 99; expected 1"]),
    ("manifest", "json_list", lambda c: ["--data.manifest", str(c.bad_manifest["a_list"])],
     ["a_list.json", "has version None"]),
    ("manifest", "not_utf8", lambda c: ["--data.manifest", str(c.bad_manifest["not_utf8"])],
     ["latin1.json", "is not a manifest written by hf_lpft", "UnicodeDecodeError"]),
    # strategies: the LP-FT split and non-finite options
    ("strategy", "lp_ft_over_budget", lambda c: ["--pft.strategies", "ft,lp,lp_ft", "--pft.epochs", "2"],
     ["lp_ft.lp_epochs=5 exceeds the budget pft.epochs=2", "--pft.strategy_args '{lp_ft: {lp_epochs: 1}}'",
      "--pft.epochs to at least 5"]),
    ("strategy", "lp_lora_over_budget", lambda c: ["--pft.strategies", "lp_lora", "--pft.epochs", "3"],
     ["lp_lora.lp_epochs=", "exceeds the budget pft.epochs=3", "--pft.strategy_args '{lp_lora: {lp_epochs: 1}}'"]),
    ("strategy", "option_inf", lambda c: ["--pft.strategy_args", "{proximal_ft: {mu: .inf}}"],
     ["pft.strategy_args.proximal_ft", "mu=inf", "finite"]),
    ("strategy", "option_nan", lambda c: ["--pft.strategy_args", "{ft: {flood: .nan}}"],
     ["pft.strategy_args.ft", "flood=nan", "finite"]),
    ("strategy", "option_list_for_int", lambda c: ["--pft.strategy_args", "{lp_ft: {lp_epochs: [1]}}"],
     ["lp_ft.lp_epochs=[1]", "must be an integer"]),
    # output folders that exist: rejected runs change nothing in them
    ("output_dir", "overwrite_then_bad_labels", lambda c: ["--run.output_dir", str(c.previous), "--run.overwrite",
                                                           "true", "--data.dataset", c.negative],
     ["negative label -1"]),
    ("output_dir", "overwrite_then_bad_manifest", lambda c: ["--run.output_dir", str(c.previous), "--run.overwrite",
                                                             "true", "--data.manifest", str(c.bad_manifest["index_negative"])],
     ["train index -3 outside"]),
    ("output_dir", "output_dir_under_a_file", lambda c: ["--run.output_dir", str(Path(c.config["lr_inf"]) / "out")],
     ["run.output_dir=", "is not writable"]),
    # the model
    ("model", "pretrained_without_weights", lambda c: ["--model.backbone", "timm:resnetblur18", "--model.pretrained", "true"],
     ["timm has no pretrained weights for 'timm:resnetblur18'", "--model.checkpoint"]),
    # this turn's flags: optimizers, schedules, LP-FT's FT-stage lr, the converged probe, given models, the cache
    ("new_flags", "pft_optimizer_rmsprop", lambda c: ["--pft.optimizer", "rmsprop"],
     ["pft.optimizer='rmsprop'", "['sgd', 'adam', 'adamw']"]),
    ("new_flags", "pft_schedule_linear", lambda c: ["--pft.schedule", "linear"],
     ["pft.schedule='linear'", "['constant', 'cosine']"]),
    ("new_flags", "fedavg_schedule_step", lambda c: ["--fedavg.schedule", "step"],
     ["fedavg.schedule='step'", "['constant', 'cosine']"]),
    ("new_flags", "ft_lr_factor_zero", lambda c: ["--pft.strategy_args", "{lp_ft: {ft_lr_factor: 0}}"],
     ["ft_lr_factor=0", "> 0"]),
    ("new_flags", "ft_lr_factor_inf", lambda c: ["--pft.strategy_args", "{lp_ft: {ft_lr_factor: .inf}}"],
     ["ft_lr_factor=inf"]),
    ("new_flags", "probe_solver_unknown", lambda c: ["--pft.strategy_args", "{lp: {probe: newton}}"],
     ["probe='newton'", "['sgd', 'logreg']"]),
    ("new_flags", "logreg_probe_bn_train", lambda c: ["--pft.strategy_args", "{lp_ft: {probe: logreg, lp_bn: train}}"],
     ["probe='logreg'", "frozen or reestimate", "'train'"]),
    ("new_flags", "probe_l2_negative", lambda c: ["--pft.strategy_args", "{lp: {probe: logreg, probe_l2: [-1.0]}}"],
     ["probe_l2=[-1.0]", "> 0"]),
    ("new_flags", "probe_l2_empty", lambda c: ["--pft.strategy_args", "{lp: {probe: logreg, probe_l2: []}}"],
     ["probe_l2=[]", "non-empty"]),
    ("new_flags", "global_model_missing", lambda c: ["--model.global_model", "/nonexistent/global"],
     ["model.global_model=", "/nonexistent/global"]),
    # refusals that used to come after the output folder (and the partition) was made (issue 25)
    ("launch", "fp16_on_cpu", lambda c: ["--run.mixed_precision", "fp16"],
     ["mixed precision fp16 needs a GPU", "use bf16"]),
    ("launch", "given_model_with_fedbn", lambda c: ["--model.global_model", "me/global", "--fedavg.bn", "local"],
     ["model.global_model='me/global' has no per-client BatchNorm", "set fedavg.bn averaged"]),
    ("launch", "flower_unknown_option", lambda c: ["--fedavg.engine", "flower", "--fedavg.fl_strategy", "fedprox",
                                                   "--fedavg.fl_strategy_args", "{mu: 0.1}"],
     ["fedavg.fl_strategy_args: unknown option(s) ['mu'] for 'fedprox'", "proximal_mu"]),
    ("non_finite", "pft_lr_word_inf", lambda c: ["--pft.lr", "inf"], ["pft.lr=inf", "finite"]),
    ("non_finite", "fedavg_lr_minus_infinity", lambda c: ["--fedavg.lr", "-Infinity"], ["fedavg.lr=-inf", "finite"]),
] + [  # every float field rejects inf and nan (fields added later are covered automatically)
    ("non_finite", f"{name}_{label}", lambda c, name=name, value=value: [f"--{name}", value],
     [f"{name}={shown}", "finite"])
    for name in float_fields() for label, value, shown in (("inf", ".inf", "inf"), ("nan", ".nan", "nan"))
]


@pytest.mark.parametrize(("extra", "expected"), [c[2:] for c in CLI_CASES], ids=[f"{c[0]}-{c[1]}" for c in CLI_CASES])
def test_cli_bad_input(ctx, tripwire, capsys, tmp_path, extra, expected):
    out = tmp_path / "out"  # does not exist: a rejected run must not create it
    args = extra(ctx)
    before = {p: snapshot(p) for p in (ctx.previous,)}
    start = time.perf_counter()
    code = cli.main(["run", "--data.dataset", ctx.data, "--run.output_dir", str(out), *BASE, *args])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("hf-lpft: configuration error: ") and err.count("\n") == 1, err  # one line
    assert "Traceback" not in err
    for text in expected:
        assert text in err, f"{text!r} not in the message: {err}"
    assert elapsed < PREFLIGHT_SECONDS, f"took {elapsed:.1f} s"
    assert not out.exists(), "a rejected run created its output folder"
    assert {p: snapshot(p) for p in before} == before, "a rejected run changed an existing folder"


@pytest.mark.parametrize(("extra", "expected"), [c[2:] for c in CLI_CASES if c[0] == "launch"],
                         ids=[c[1] for c in CLI_CASES if c[0] == "launch"])
def test_launch_refusals_come_before_the_partition(ctx, tripwire, monkeypatch, capsys, tmp_path, extra, expected):
    """fp16 on CPU, FedBN with a given model, unknown Flower options: refused before the dataset is partitioned
    (they used to be refused after it, and after the output folder was created)."""
    def boom(*args, **kwargs):
        raise AssertionError("the dataset was partitioned before the refusal")
    monkeypatch.setattr("hf_lpft.pipeline.federation_checked", boom)
    out = tmp_path / "out"
    assert cli.main(["run", "--data.dataset", ctx.data, "--run.output_dir", str(out), *BASE, *extra(ctx)]) == 2
    assert expected[0] in capsys.readouterr().err and not out.exists()


DIGITS5 = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "digits5.yaml"


@pytest.mark.parametrize(("options", "expected"), [
    ("{lp_ft: {lp_epochz: 1}}", "pft.strategy_args.lp_ft: unknown option(s) ['lp_epochz'] for strategy 'lp_ft'"),
    ("{lp_ft: {lp_epochs: many}}", "pft.strategy_args.lp_ft.lp_epochs='many' must be an integer"),
    ("{lp_ft: {lp_epochs: -1}}", "lp_epochs=-1"),
])
def test_options_of_strategies_not_run_are_checked_but_do_not_bind_the_budget(tmp_path, options, expected):
    """digits5.yaml sets lp_ft.lp_epochs 5: running only FT on a budget of 1 epoch is fine (LP-FT does not run);
    a typo or a bad value in LP-FT's options is still an error, and so is the budget when LP-FT runs."""
    from hf_lpft.run.preflight import preflight

    run = ["--pft.epochs", "1", "--run.output_dir", str(tmp_path / "out")]
    assert list(preflight(load_config(DIGITS5, ["--pft.strategies", "ft", *run]))) == ["ft"]
    with pytest.raises(ConfigError, match="lp_ft.lp_epochs=5 exceeds the budget pft.epochs=1"):
        preflight(load_config(DIGITS5, ["--pft.strategies", "ft,lp_ft", *run]))
    with pytest.raises(ConfigError) as err:
        preflight(load_config(DIGITS5, ["--pft.strategies", "ft", "--pft.strategy_args", options, *run]))
    assert expected in str(err.value)


def test_numbers_in_exponent_notation_are_numbers():
    """YAML 1.1 reads ``1e-3`` as a string; the CLI takes it as the number it is (the control of the cases above)."""
    cfg = load_config(None, ["--pft.lr", "1e-3", "--fedavg.rounds", "1e1"])
    assert cfg.pft.lr == 0.001 and cfg.fedavg.rounds == 10


def test_case_tables_name_each_case_once_and_expect_text():
    """pytest silently suffixes duplicate ids, so a case copied without renaming would run unnoticed under a
    changed id; a case expecting no text would pass on any error. Every id is unique, every case expects text."""
    tables = {"CLI": [(f"{c[0]}-{c[1]}", c[3]) for c in CLI_CASES], "PY": [(c[0], [c[2]]) for c in PY_CASES],
              "HUB": [(c[0], c[3]) for c in HUB_CASES], "NETWORK": [(c[0], c[3]) for c in NETWORK_CASES],
              "PARTITION": [(c[0], c[2]) for c in PARTITION_CASES]}
    for table, cases in tables.items():
        ids = [i for i, _ in cases]
        assert len(set(ids)) == len(ids), f"{table}: duplicate ids {sorted({i for i in ids if ids.count(i) > 1})}"
        assert all(expected and all(isinstance(t, str) and t for t in expected) for _, expected in cases), table


# -- Python API: the dataclasses check types and finiteness of every field -------------------------------------
PY_CASES = [
    ("num_clients_word", lambda: DataConfig(num_clients="abc"), "data.num_clients='abc' must be an integer"),
    ("strategies_string", lambda: PFTConfig(strategies="ft"), "pft.strategies='ft' must be a list of strings"),
    ("rounds_fraction", lambda: FedAvgConfig(rounds=2.5), "fedavg.rounds=2.5 must be an integer"),
    ("lr_nan", lambda: FedAvgConfig(lr=float("nan")), "fedavg.lr=nan must be a finite number"),
    ("head_lr_inf", lambda: PFTConfig(head_lr=math.inf), "pft.head_lr=inf must be a finite number"),
    ("alpha_minus_inf", lambda: DataConfig(alpha=-math.inf), "data.alpha=-inf must be a finite number"),
    ("seeds_string", lambda: RunConfig(seeds="0"), "run.seeds='0' must be a list of integers"),
    ("seeds_bool", lambda: RunConfig(seeds=[True]), "run.seeds=[True] must be a list of integers"),
    ("num_threads_fraction", lambda: RunConfig(num_threads=1.5), "run.num_threads=1.5 must be an integer or None"),
    ("push_string", lambda: HubConfig(push_to_hub="yes"), "hub.push_to_hub='yes' must be true or false"),
    ("pretrained_int", lambda: ModelConfig(pretrained=1), "model.pretrained=1 must be true or false"),
    ("backbone_none", lambda: ModelConfig(backbone=None), "model.backbone=None must be a string"),
    ("families_string", lambda: DataConfig(corruption_families="blur"),
     "data.corruption_families='blur' must be a list"),
    ("strategy_args_list", lambda: PFTConfig(strategy_args=[]), "pft.strategy_args=[] must be a mapping"),
    ("num_classes_bool", lambda: DataConfig(num_classes=True), "data.num_classes=True must be an integer or None"),
    ("seed_negative", lambda: DataConfig(seed=-1), "data.seed=-1 must be in [0, 2**31)"),
    ("lp_ft_option_string", lambda: __import__("hf_lpft.strategies.lp_ft", fromlist=["x"]).LPFTConfig(lp_epochs="5"),
     "LPFTConfig.lp_epochs='5' must be an integer"),
    ("proximal_mu_inf", lambda: __import__("hf_lpft.strategies.proximal", fromlist=["x"]).ProximalConfig(mu=math.inf),
     "ProximalConfig.mu=inf must be a finite number"),
] + [  # every field of every section rejects a value of no type it allows
    (f"{section}.{f.name}_wrong_type", lambda cls=cls, f=f: cls(**{f.name: object()}), f"{section}.{f.name}=<object")
    for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
]


@pytest.mark.parametrize(("build", "expected"), [c[1:] for c in PY_CASES], ids=[c[0] for c in PY_CASES])
def test_python_dataclass_rejects(build, expected):
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        build()
    assert expected in str(info.value), str(info.value)
    assert "\n" not in str(info.value) and time.perf_counter() - start < 1.0


def test_python_run_rejects_scheme_option_and_writes_nothing(tiny_ds_path, tmp_path, tripwire):
    """Built in Python there is no record of what was given: a value other than the default counts as set."""
    from hf_lpft.pipeline import run

    cfg = ExperimentConfig(data=DataConfig(dataset=tiny_ds_path, num_clients=15, num_classes=4),
                           run=RunConfig(output_dir=str(tmp_path / "out")))
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"data.num_clients=15 does not apply to data.scheme='natural'"):
        run(cfg)
    assert time.perf_counter() - start < PREFLIGHT_SECONDS and not (tmp_path / "out").exists()


def test_defaults_from_a_recipe_do_not_count_as_given(tiny_ds_path, tmp_path):
    """``defaults`` (a recipe's own) are not the user's choice; the same key in YAML/CLI is."""
    from hf_lpft.run.preflight import check_scheme_options

    cfg = load_config(None, ["--data.dataset", tiny_ds_path], defaults={"data": {"num_clients": 7}})
    check_scheme_options(cfg)  # natural, num_clients only from the recipe's defaults: accepted
    with pytest.raises(ConfigError, match="data.num_clients=7 does not apply"):
        check_scheme_options(load_config(None, ["--data.num_clients", "7"]))


# -- the Hub: --push_to_hub is checked before FedAvg ------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    with FakeHub() as hub:
        yield hub


@pytest.fixture()
def hub_env(server, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_preflight_token")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token_file"))
    server.fail_all, server.tokens = None, None
    yield server
    server.fail_all, server.tokens = None, None


def _no_token(mp, hub):
    mp.delenv("HF_TOKEN")


def _rejected(mp, hub):
    hub.tokens = {"some_other_token"}


def _server_error(mp, hub):
    hub.fail_all = 500


def _offline(mp, hub):
    mp.setenv("HF_HUB_OFFLINE", "1")


def _closed(mp, hub):
    mp.setenv("HF_ENDPOINT", closed_endpoint())


HUB_CASES = [
    ("no_token", _no_token, "me/study",
     ["needs a Hub token with write access, and none is set", "HF_TOKEN", "hf-lpft push"]),
    ("token_401", _rejected, "me/study", ["rejected the token (HTTP 401 on whoami)", "HF_TOKEN"]),
    ("server_500", _server_error, "me/study", ["answered HTTP 500 on whoami", "try again later", "hf-lpft push"]),
    ("offline", _offline, "me/study", ["hub.push_to_hub=true needs the Hub", "HF_HUB_OFFLINE=1"]),
    ("unreachable", _closed, "me/study", ["cannot be reached", "ConnectError", "HF_ENDPOINT"]),
    ("foreign_namespace", lambda mp, hub: None, "someone-else/study",
     ["hub.hub_repo_id='someone-else/study' does not exist", "cannot create repos in 'someone-else'", "['tester']"]),
]


@pytest.mark.parametrize(("setup", "repo", "expected"), [c[1:] for c in HUB_CASES], ids=[c[0] for c in HUB_CASES])
def test_push_to_hub_preflight(ctx, tripwire, hub_env, monkeypatch, capsys, tmp_path, setup, repo, expected):
    setup(monkeypatch, hub_env)
    out = tmp_path / "out"
    start = time.perf_counter()
    code = cli.main(["run", "--data.dataset", ctx.data, "--run.output_dir", str(out), *BASE, "--push_to_hub",
                     "--hub_repo_id", repo])
    elapsed, err = time.perf_counter() - start, capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    for text in expected:
        assert text in err, f"{text!r} not in the message: {err}"
    assert elapsed < PREFLIGHT_SECONDS and not out.exists()
    assert "hf_preflight_token" not in err


def test_push_to_hub_preflight_passes_with_a_good_token(ctx, tripwire, hub_env, tmp_path):
    """The control: token accepted, repo creatable -> the run goes on to FedAvg (the tripwire)."""
    with pytest.raises(AssertionError, match="heavy work started"):
        cli.main(["run", "--data.dataset", ctx.data, "--run.output_dir", str(tmp_path / "out"), *BASE,
                  "--push_to_hub", "--hub_repo_id", "tester/study"])


# -- the network: a Hub dataset id and pretrained weights, offline or with the Hub unreachable ------------------
def _offline_env(mp):
    mp.setenv("HF_HUB_OFFLINE", "1")


def _closed_env(mp):
    mp.setenv("HF_HUB_OFFLINE", "0")
    mp.setenv("HF_ENDPOINT", closed_endpoint())


NETWORK_CASES = [
    (f"{what}_{mode}", env, args, expected + [mode_text])
    for mode, env, mode_text in (("offline", _offline_env, "HF_HUB_OFFLINE=1"),
                                 ("closed_port", _closed_env, "cannot be reached"))
    for what, args, expected in (
        ("hub_dataset", ["--data.dataset", "someone/some-dataset"],
         ["data.dataset='someone/some-dataset'", "needs the Hugging Face Hub", "save_to_disk"]),
        ("timm_pretrained", ["--model.pretrained", "true"],
         ["model.pretrained=true: the weights of 'timm:test_resnet' (timm/test_resnet.r160_in1k)",
          "--model.checkpoint", "HF_HUB_OFFLINE=1"]),
        ("hf_model_id", ["--model.backbone", "hf:someone/tiny-bert"],
         ["model.backbone='hf:someone/tiny-bert' needs the Hugging Face Hub", "local folder"]))
]


@pytest.mark.parametrize(("env", "args", "expected"), [c[1:] for c in NETWORK_CASES], ids=[c[0] for c in NETWORK_CASES])
def test_network_failure_is_one_line_within_seconds(ctx, tripwire, monkeypatch, capsys, tmp_path, env, args, expected):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # nothing cached
    env(monkeypatch)
    out = tmp_path / "out"
    start = time.perf_counter()
    code = cli.main(["run", "--data.dataset", ctx.data, "--run.output_dir", str(out), *BASE, *args])
    elapsed, err = time.perf_counter() - start, capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    for text in expected:
        assert text in err, f"{text!r} not in the message: {err}"
    assert elapsed <= PREFLIGHT_SECONDS and not out.exists()


# -- hf-lpft partition: the same checks, federation/ never written ----------------------------------------------
PARTITION_CASES = [
    ("scheme_option", lambda c: ["--data.num_clients", "15"], ["data.num_clients=15 does not apply"]),
    ("size", lambda c: ["--data.dataset", "digits5", "--data.n_per_domain", "1251"], ["data.n_per_domain=1251"]),
    ("negative_label", lambda c: ["--data.dataset", c.negative], ["negative label -1 (row 5)"]),
    ("manifest_other_dataset", lambda c: ["--data.dataset", c.other_labels, "--data.manifest", str(c.manifest)],
     ["was made for dataset"]),
    ("manifest_index_out_of_range", lambda c: ["--data.manifest", str(c.bad_manifest["index_out_of_range"])],
     ["test index 72 outside"]),
]


@pytest.mark.parametrize(("extra", "expected"), [c[1:] for c in PARTITION_CASES], ids=[c[0] for c in PARTITION_CASES])
def test_partition_bad_input(ctx, capsys, tmp_path, extra, expected):
    start = time.perf_counter()
    code = cli.main(["partition", "--data.dataset", ctx.data, "--output_dir", str(tmp_path / "out"),
                     "--log_level", "WARNING", *extra(ctx)])
    elapsed, err = time.perf_counter() - start, capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    for text in expected:
        assert text in err, f"{text!r} not in the message: {err}"
    assert elapsed < PREFLIGHT_SECONDS and not (tmp_path / "out").exists()


# -- load_personalized: a path that does not exist is reported as such ------------------------------------------
@pytest.mark.parametrize(("source", "error", "expected"), [
    ("/nonexistent/dir", FileNotFoundError, "no such folder: '/nonexistent/dir'"),
    ("./runs/missing", FileNotFoundError, "no such folder: './runs/missing'"),
    (Path("missing"), FileNotFoundError, "no such folder: 'missing'"),
], ids=["absolute", "relative", "path_object"])
def test_load_personalized_missing_folder(source, error, expected):
    from hf_lpft import load_personalized

    start = time.perf_counter()
    with pytest.raises(error, match=expected.replace(".", r"\.")):
        load_personalized(source, "client", "ft")
    assert time.perf_counter() - start < 1.0


def test_load_personalized_file_is_not_a_folder(tmp_path):
    from hf_lpft import load_personalized

    (path := tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        load_personalized(path, "client", "ft")


# -- a failure after training started keeps what was completed and says how to resume ---------------------------
def test_failure_after_training_keeps_completed_work_and_says_resume(tiny_ds_path, tmp_path, capsys):
    """LP (lr 0.01) completes its clients; FT at lr 1e12 diverges and, with run.on_error raise, stops the run:
    exit 4, one message that says --run.resume true, and the completed units and FedAvg round stay on disk."""
    out = tmp_path / "out"
    args = ["run", "--data.dataset", tiny_ds_path, "--run.output_dir", str(out), *BASE, "--pft.strategies", "lp,ft",
            "--pft.strategy_args", "{ft: {}}", "--run.on_error", "raise", "--run.distortion", "false"]
    code = cli.main([*args, "--pft.lr", "1e12", "--pft.head_lr", "0.01"])
    err = capsys.readouterr().err
    assert code == 4 and "Traceback" not in err and "--run.resume true" in err, err
    assert (out / "global" / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "clients" / "lp").iterdir()) == ["a", "b", "c"]
    assert not (out / "results.parquet").exists()


def test_manifest_fits_its_dataset_and_a_copy_of_it(ctx, tiny_ds, tmp_path):
    """The control of the manifest cases: the same data (also copied to another folder) is accepted."""
    from hf_lpft.run.preflight import federation_checked

    manifest = json.loads(ctx.manifest.read_text())
    assert manifest["dataset"]["num_rows"] == 72 and manifest["dataset"]["columns"] == ["label", "domain"]
    copy = _save(tiny_ds, tmp_path / "copy")
    for dataset in (ctx.data, copy):
        _, fed, _ = federation_checked(load_config(None, ["--data.dataset", dataset, "--data.manifest",
                                                          str(ctx.manifest)]))
        assert fed.indices_hash() == manifest["indices_sha256"]


@pytest.mark.parametrize("name", ["digits5", "digits-c", "colored-digits"])
def test_builder_limits_match_the_builders(name):
    """N_PER_DOMAIN_MAX (checked before building) is the builders' own limit."""
    from hf_lpft.data.builtin import BUILTIN_DATASETS, N_PER_DOMAIN_MAX

    with pytest.raises(ValueError, match=f"n_per_domain={N_PER_DOMAIN_MAX[name][0] + 1}"):
        BUILTIN_DATASETS[name](n_per_domain=N_PER_DOMAIN_MAX[name][0] + 1)
