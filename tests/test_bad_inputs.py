"""Bad inputs fail early with the message a user needs; failed and finished runs leave no temporary files.

Every case runs the real CLI entry (``hf-lpft run ...``) in-process and checks what the user reads on
stderr: the bad value and what is allowed. FedAvg is replaced by a tripwire, so a case that got as far
as training fails loudly instead of passing late.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import datasets
import pandas as pd
import pytest
from test_own_data import make_image_folder

from hf_lpft import cli
from hf_lpft.config import load_config
from hf_lpft.data.federate import federate, save_manifest

RUN = ["--data.num_classes", "4", "--model.backbone", "timm:test_resnet", "--fedavg.rounds", "1",
       "--fedavg.batch_size", "16", "--pft.strategies", "ft", "--pft.epochs", "1", "--pft.batch_size", "16",
       "--run.num_threads", "1", "--log_level", "WARNING"]


class Ctx:
    """Paths the cases refer to, built once per module."""

    def __init__(self, tmp: Path, data: str, tiny_ds):
        self.tmp, self.data = tmp, data
        fed = federate(tiny_ds, scheme="natural", partition_by="domain", seed=0)
        manifest = json.loads(save_manifest(fed, tmp / "manifest.json").read_text())
        self.corrupt = tmp / "corrupt.json"  # one test index moved to another row: the hash no longer matches
        bad = json.loads(json.dumps(manifest))
        bad["clients"][0]["test_indices"][0] += 1
        self.corrupt.write_text(json.dumps(bad))
        self.other_size = tmp / "other_size.json"  # intact, but made for a dataset of another size
        self.other_size.write_text(json.dumps(manifest | {"num_rows": 100}))
        self.not_json = tmp / "not_json.json"
        self.not_json.write_text("{clients: [")
        self.a_file = tmp / "a_file.txt"
        self.a_file.write_text("not a folder")
        self.non_empty = tmp / "non_empty"
        self.non_empty.mkdir()
        (self.non_empty / "notes.txt").write_text("someone's notes")
        self.resumable = tmp / "resumable"  # a run folder whose saved config has fedavg.rounds = 1
        self.resumable.mkdir()
        saved = load_config(None, [*RUN[:-2], "--data.dataset", data, "--run.output_dir", str(self.resumable)])
        (self.resumable / "config.yaml").write_text(saved.to_yaml())
        self.damaged_data(tiny_ds)
        self.model_folders()

    def damaged_data(self, tiny_ds) -> None:
        """Your own data with one damaged file, a federation of one client."""
        self.images = make_image_folder(self.tmp / "images", per_class=4)
        self.bad_png = self.images / "clinic_b" / "dog" / "2.png"
        self.bad_png.write_bytes(self.bad_png.read_bytes()[:100])  # truncated inside the image data
        self.one_domain = make_image_folder(self.tmp / "one_domain", domains=("clinic_a",), per_class=4)
        self.bad_arrow = self.tmp / "bad_arrow"
        datasets.DatasetDict({"train": tiny_ds}).save_to_disk(str(self.bad_arrow))
        arrow = next((self.bad_arrow / "train").glob("*.arrow"))
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
        self.bad_row = self.tmp / "bad_row"  # row 5 holds bytes that are no image
        rows = tiny_ds.cast_column("image", datasets.Image(decode=False)).to_dict()
        rows["image"][5] = {"bytes": b"no image here", "path": "scan_5.png"}
        datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=tiny_ds.features)}).save_to_disk(
            str(self.bad_row))
        self.one_value = self.tmp / "one_value"  # the domain column holds one value
        datasets.DatasetDict({"train": tiny_ds.filter(lambda d: d == "a", input_columns="domain")}).save_to_disk(
            str(self.one_value))

    def model_folders(self) -> None:
        """Global model folders: damaged copies of a good one, one for other classes, and a LoRA client's export."""
        from hf_lpft.models.backbone import build_model

        self.good_model = self.tmp / "models" / "good"
        build_model("timm:test_resnet", num_classes=4, image_size=32).save_pretrained(self.good_model)
        build_model("timm:test_resnet", num_classes=3, image_size=32).save_pretrained(self.tmp / "models" / "three")
        for name in ("no_config", "bad_json", "no_weights", "cut_weights"):
            shutil.copytree(self.good_model, self.tmp / "models" / name)
        (self.tmp / "models" / "no_config" / "config.json").unlink()
        (self.tmp / "models" / "bad_json" / "config.json").write_text('{"backbone": "timm:test_resnet",')
        (self.tmp / "models" / "no_weights" / "model.safetensors").unlink()
        cut = self.tmp / "models" / "cut_weights" / "model.safetensors"
        cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
        self.adapter = self.tmp / "models" / "clients" / "lora" / "a"  # what the lora strategy exports
        self.adapter.mkdir(parents=True)
        (self.adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA",
                                                                      "base_model_name_or_path": str(self.good_model)}))
        (self.adapter / "adapter_model.safetensors").write_bytes(b"")

    def model(self, name: str) -> str:
        return str(self.tmp / "models" / name)


def unwritable_output_dir(tmp: Path) -> Path:
    """A folder that cannot be created: under a read-only folder, or (root ignores permission bits) in sysfs."""
    if os.geteuid() != 0:
        locked = tmp / "locked"
        locked.mkdir(exist_ok=True)
        locked.chmod(0o500)
        return locked / "out"
    candidate = Path("/sys/hf_lpft_cannot_write_here")
    try:
        candidate.mkdir()
    except OSError:
        return candidate
    candidate.rmdir()
    pytest.skip("no location here that root cannot write to")


# (id, extra CLI arguments (a function of Ctx), substrings of the message)
CASES = [
    # values out of range or of the wrong type
    ("negative_rounds", lambda c: ["--fedavg.rounds", "-1"], ["fedavg.rounds=-1", "must be >= 0"]),
    ("alpha_zero", lambda c: ["--data.scheme", "dirichlet", "--data.alpha", "0"], ["data.alpha=0.0", "must be > 0"]),
    ("alpha_negative", lambda c: ["--data.alpha", "-0.5"], ["data.alpha=-0.5", "must be > 0"]),
    ("test_fraction_zero", lambda c: ["--data.test_fraction", "0"], ["data.test_fraction=0.0", "must be in (0, 1)"]),
    ("test_fraction_one", lambda c: ["--data.test_fraction", "1"], ["data.test_fraction=1.0", "must be in (0, 1)"]),
    ("client_fraction", lambda c: ["--fedavg.client_fraction", "1.5"], ["fedavg.client_fraction=1.5", "(0, 1]"]),
    ("negative_lr", lambda c: ["--pft.lr", "-0.1"], ["pft.lr=-0.1", "must be > 0"]),
    ("rounds_word", lambda c: ["--fedavg.rounds", "two"], ["fedavg.rounds='two'", "must be an integer"]),
    ("rounds_fraction", lambda c: ["--fedavg.rounds", "2.5"], ["fedavg.rounds=2.5", "must be an integer"]),
    ("bool_word", lambda c: ["--run.resume", "maybe"], ["run.resume='maybe'", "must be true or false"]),
    ("unknown_scheme", lambda c: ["--data.scheme", "random"],
     ["data.scheme='random'", "choose one of [", "'natural'", "'dirichlet'"]),
    ("unknown_optimizer", lambda c: ["--fedavg.optimizer", "rmsprop"],
     ["fedavg.optimizer='rmsprop'", "['sgd', 'adam', 'adamw']"]),
    ("unknown_on_error", lambda c: ["--run.on_error", "ignore"], ["run.on_error='ignore'", "['continue', 'raise']"]),
    ("negative_seed", lambda c: ["--run.seeds", "-1"], ["run.seeds=[-1]", "non-negative integers"]),
    ("duplicate_seeds", lambda c: ["--run.seeds", "0,0"], ["run.seeds=[0, 0]", "duplicates"]),
    ("max_examples_one", lambda c: ["--data.max_examples_per_client", "1"],
     ["data.max_examples_per_client=1", "must be >= 2"]),
    # unknown keys and override syntax
    ("unknown_key", lambda c: ["--fedavg.roundz", "3"], ["unknown key(s) ['roundz'] in section 'fedavg'", "'rounds'"]),
    ("unknown_section", lambda c: ["--train.lr", "0.1"], ["unknown section 'train'", "'fedavg'", "'pft'"]),
    ("ambiguous_key", lambda c: ["--lr", "0.1"], ["'--lr' is ambiguous", "'--fedavg.lr'", "'--pft.lr'"]),
    ("bare_seed", lambda c: ["--run.seeds", "0", "--seed", "1"],
     ["option '--seed' is ambiguous", "--data.seed (the partition", "--run.seeds (the training seeds"]),
    ("bare_seed_equals", lambda c: ["--seed=1"], ["option '--seed=1' is ambiguous", "--data.seed"]),
    ("no_dashes", lambda c: ["fedavg.rounds=3"], ["unexpected argument 'fedavg.rounds=3'", "--section.key value"]),
    ("missing_value_at_end", lambda c: ["--fedavg.rounds"], ["override '--fedavg.rounds' has no value"]),
    ("missing_value_before_next", lambda c: ["--fedavg.rounds", "--pft.epochs", "1"],
     ["override '--fedavg.rounds' has no value", "--section.key=value"]),
    ("missing_config_file", lambda c: ["--config", str(c.tmp / "nope.yaml")],
     ["config file", "nope.yaml", "does not exist"]),
    # strategies and their options
    ("unknown_strategy", lambda c: ["--pft.strategies", "ft,nope"],
     ["pft.strategies: unknown strategy 'nope'", "registered strategies:", "'lp_ft'"]),
    ("no_strategy", lambda c: ["--pft.strategies", ""], ["pft.strategies is empty"]),
    ("unknown_strategy_option", lambda c: ["--pft.strategy_args", "{lp_ft: {bogus: 1}}"],
     ["pft.strategy_args.lp_ft: unknown option(s) ['bogus'] for strategy 'lp_ft'", "'lp_epochs'"]),
    ("option_over_budget", lambda c: ["--pft.strategies", "ft,lp_ft", "--pft.strategy_args", "{lp_ft: {lp_epochs: 5}}"],
     ["lp_ft.lp_epochs=5 exceeds the budget pft.epochs=1"]),
    ("option_negative", lambda c: ["--pft.strategy_args", "{ft: {flood: -1}}"],
     ["pft.strategy_args.ft: flood=-1.0 must be >= 0"]),
    ("option_wrong_type", lambda c: ["--pft.strategy_args", "{lp_ft: {lp_epochs: many}}"],
     ["pft.strategy_args.lp_ft.lp_epochs='many'", "must be an integer"]),
    ("options_not_mapping", lambda c: ["--pft.strategy_args", "{ft: 3}"],
     ["pft.strategy_args['ft']=3 must be a mapping"]),
    ("options_of_unknown_strategy", lambda c: ["--pft.strategy_args", "{nope: {}}"],
     ["pft.strategy_args.nope: unknown strategy 'nope'"]),
    # the model
    ("backbone_without_prefix", lambda c: ["--model.backbone", "resnet18"],
     ["model.backbone='resnet18'", "'timm:<model name>'"]),
    ("unknown_backbone", lambda c: ["--model.backbone", "timm:not_a_model"],
     ["model.backbone='timm:not_a_model'", "not a timm model", "timm.list_models()"]),
    ("unloadable_hf_backbone", lambda c: ["--model.backbone", f"hf:{c.tmp / 'no_model'}"],
     ["model.backbone='hf:", "no_model", "cannot be loaded", "a local folder with a config.json"]),
    ("hf_backbone_not_installed_offline", lambda c: ["--model.backbone", "hf:no-such-model"],
     ["model.backbone='hf:no-such-model' cannot be loaded (", "); use a local folder with a config.json"]),
    ("missing_checkpoint", lambda c: ["--model.checkpoint", str(c.tmp / "none.safetensors")],
     ["model.checkpoint=", "none.safetensors", "is not a file"]),
    # the dataset, its columns and labels
    ("missing_dataset_path", lambda c: ["--data.dataset", str(c.tmp / "no_such_dataset")],
     ["data.dataset=", "no_such_dataset", "cannot be loaded", "'digits5'", "save_to_disk"]),
    ("missing_split", lambda c: ["--data.split", "test"], ["data.split='test' is not in dataset", "splits: ['train']"]),
    ("missing_label_column", lambda c: ["--data.label_column", "lbl"],
     ["data.label_column='lbl' is not a column", "['image', 'label', 'domain']"]),
    ("missing_image_column", lambda c: ["--data.image_column", "img"],
     ["data.image_column='img' is not a column", "['image', 'label', 'domain']"]),
    ("image_column_not_images", lambda c: ["--data.image_column", "label"],
     ["data.image_column='label' is a ClassLabel column, not an Image column", "Image columns: ['image']"]),
    ("label_column_of_strings", lambda c: ["--data.label_column", "domain"],
     ["data.label_column='domain' holds string values", "it must be a ClassLabel, an integer"]),
    ("missing_domain_column", lambda c: ["--data.domain_column", "site"],
     ["data.domain_column='site' is not a column"]),
    ("missing_partition_column", lambda c: ["--data.partition_by", "site"],
     ["data.partition_by='site' is not a column"]),
    ("label_count_mismatch", lambda c: ["--data.num_classes", "10"],
     ["data.num_classes=10 but column 'label' has 4 classes"]),
    ("more_clients_than_rows", lambda c: ["--data.scheme", "dirichlet", "--data.num_clients", "1000"],
     ["num_clients=1000 exceeds the dataset's 72 examples"]),
    # saved federation manifests
    ("missing_manifest", lambda c: ["--data.manifest", str(c.tmp / "none.json")], ["data.manifest=", "is not a file"]),
    ("corrupt_manifest", lambda c: ["--data.manifest", str(c.corrupt)],
     ["corrupt.json", "is corrupt", "do not match its hash"]),
    ("manifest_of_other_dataset", lambda c: ["--data.manifest", str(c.other_size)],
     ["other_size.json", "was made for 100 rows; this dataset has 72"]),
    ("manifest_not_json", lambda c: ["--data.manifest", str(c.not_json)],
     ["data.manifest=", "not_json.json", "is not a manifest written by hf_lpft", "JSONDecodeError"]),
    # your own data: a damaged file, a federation of one client
    ("imagefolder_truncated_png", lambda c: [*own_images(c.images)],
     ["data.dataset='imagefolder': the image file", "clinic_b/dog/2.png", "cannot be read as an image",
      "image file is truncated", "replace or remove the file"]),
    ("saved_dataset_truncated_arrow", lambda c: ["--data.dataset", str(c.bad_arrow)],
     ["data.dataset=", "cannot be loaded: the file", "bad_arrow/train/data-00000-of-00001.arrow",
      "is damaged or incomplete", "save_to_disk"]),
    ("saved_dataset_row_not_an_image", lambda c: ["--data.dataset", str(c.bad_row)],
     ["the image in row 5 of column 'image' (stored from 'scan_5.png') cannot be read as an image",
      "not an image format PIL knows", "drop or replace that row"]),
    ("imagefolder_of_one_domain", lambda c: [*own_images(c.one_domain)],
     ["data.domain_column='domain' has a single value", "data.domain_level=0",
      "a federation needs at least 2 clients", "--data.scheme iid"]),
    ("partition_column_of_one_value", lambda c: ["--data.dataset", str(c.one_value), "--data.partition_by", "domain"],
     ["data.partition_by='domain' has a single value in this dataset", "a federation needs at least 2 clients"]),
    ("one_client", lambda c: ["--data.scheme", "iid", "--data.num_clients", "1"],
     ["data.num_clients=1 must be >= 2", "a federation needs at least 2 clients"]),
    # a given global model: malformed, not a full model, not fitting the config
    ("global_model_without_config", lambda c: ["--model.global_model", c.model("no_config")],
     ["model.global_model=", "no_config", "has no config.json", "a run's global/ folder"]),
    ("global_model_config_not_json", lambda c: ["--model.global_model", c.model("bad_json")],
     ["model.global_model=", "bad_json", "its config.json is not valid JSON", "copy or save it again"]),
    ("global_model_without_weights", lambda c: ["--model.global_model", c.model("no_weights")],
     ["model.global_model=", "no_weights", "has no weights file (model.safetensors or pytorch_model.bin)"]),
    ("global_model_truncated_weights", lambda c: ["--model.global_model", c.model("cut_weights")],
     ["model.global_model=", "cut_weights", "model.safetensors is damaged or incomplete"]),
    ("global_model_is_a_lora_adapter", lambda c: ["--model.global_model", str(c.adapter)],
     ["model.global_model=", "clients/lora/a", "is a peft adapter folder", "not a full model",
      "pass its base model --model.global_model", "models/good", "hf_lpft.load_personalized("]),
    ("global_model_other_backbone", lambda c: ["--model.global_model", c.model("good"), "--model.backbone",
                                               "timm:test_vit"],
     ["has backbone 'timm:test_resnet' but model.backbone='timm:test_vit'"]),
    ("global_model_other_classes", lambda c: ["--model.global_model", c.model("three")],
     ["has a head for 3 classes but the federation has 4"]),
    # the output folder
    ("output_dir_is_a_file", lambda c: ["--run.output_dir", str(c.a_file)],
     ["run.output_dir=", "a_file.txt", "exists and is not a folder"]),
    ("output_dir_not_empty", lambda c: ["--run.output_dir", str(c.non_empty)],
     ["non_empty", "is not empty", "--run.resume true", "--run.overwrite true"]),
    ("resume_with_changed_config", lambda c: ["--run.output_dir", str(c.resumable), "--run.resume", "true",
                                              "--fedavg.rounds", "3"],
     ["cannot resume", "the config differs from the saved one", "fedavg.rounds: 1 -> 3"]),
    ("output_dir_unwritable", lambda c: ["--run.output_dir", str(unwritable_output_dir(c.tmp))],
     ["run.output_dir=", "is not writable", "choose a folder you can create and write files in"]),
]


def own_images(folder: Path) -> list[str]:
    """The README's "Your own data" options for an image folder of domains (2 classes: cat, dog)."""
    return ["--data.dataset", "imagefolder", "--data.data_dir", str(folder), "--data.domain_level", "0",
            "--data.num_classes", "2"]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_ds_path, tiny_ds):
    return Ctx(tmp_path_factory.mktemp("bad_inputs"), tiny_ds_path, tiny_ds)


@pytest.fixture()
def tripwire(monkeypatch):
    """Any FedAvg round or personalization that starts makes the case fail."""
    def boom(*args, **kwargs):
        raise AssertionError("heavy work started before the bad input was rejected")
    monkeypatch.setattr("hf_lpft.run.pretrain.run_fedavg", boom)
    monkeypatch.setattr("hf_lpft.run.units.personalize", boom)


PROGRESS_BAR = re.compile(r"^.*\r.*(it/s|examples/s|files/s)\]$")  # tqdm's, when a bad input is found after reading


def without_progress_bars(err: str) -> str:
    """stderr without the progress bars of reading your own files and partitioning them (datasets, flwr-datasets)."""
    return "".join(f"{line}\n" for line in err.split("\n")[:-1] if not PROGRESS_BAR.match(line)) + err.split("\n")[-1]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()} if root.is_dir() else {}


def temp_leftovers(root: Path) -> list[str]:
    """Names a writer uses while writing (ours: ``.<name>.<random>.tmp``) or hidden files of any kind."""
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_at_least_25_cases():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("extra", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_before_heavy_work(ctx, tripwire, capsys, request, extra, expected):
    fresh = ctx.tmp / f"out_{request.node.callspec.id}"
    args = extra(ctx)
    before = {p: snapshot(p) for p in (ctx.non_empty, ctx.resumable)}
    code = cli.main(["run", "--data.dataset", ctx.data, "--run.output_dir", str(fresh), *RUN, *args])
    err = without_progress_bars(capsys.readouterr().err)
    assert code == 2, err
    assert err.startswith("hf-lpft: configuration error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err, f"{text!r} not in the message: {err}"
    assert not fresh.exists(), "a rejected run created its output folder"
    assert {p: snapshot(p) for p in before} == before, "a rejected run changed an existing folder"
    assert not temp_leftovers(ctx.tmp)


PERSONALIZE = [("bad_json", lambda c: c.model("bad_json"), ["its config.json is not valid JSON"]),
               ("cut_weights", lambda c: c.model("cut_weights"), ["model.safetensors is damaged or incomplete"]),
               ("lora_adapter", lambda c: str(c.adapter), ["is a peft adapter folder", "models/good"])]


@pytest.mark.parametrize(("model", "expected"), [c[1:] for c in PERSONALIZE], ids=[c[0] for c in PERSONALIZE])
def test_personalize_refuses_a_malformed_or_adapter_global_model(ctx, tripwire, capsys, request, model, expected):
    """``hf-lpft personalize --global_model X``: the same one line, exit 2 and no output folder."""
    fresh = ctx.tmp / f"out_personalize_{request.node.callspec.id}"
    code = cli.main(["personalize", "--global_model", model(ctx), "--data.dataset", ctx.data, "--run.output_dir",
                     str(fresh), *RUN[2:]])
    err = without_progress_bars(capsys.readouterr().err)
    assert code == 2 and err.startswith("hf-lpft: configuration error: model.global_model=") and \
        err.count("\n") == 1, err
    assert all(text in err for text in expected), err
    assert not fresh.exists()


def test_partition_preview_refuses_a_damaged_sample_image_before_writing(ctx, tmp_path, capsys):
    """The preview decodes only its sample images (a run decodes all of them before its output folder exists);
    one of them damaged: one line naming the file, and no half-written federation/ folder."""
    images = make_image_folder(tmp_path / "images", per_class=4)
    for f in (images / "clinic_a" / "cat").iterdir():  # every cat of clinic_a: one of them is in the sample
        f.write_bytes(f.read_bytes()[:100])
    out = tmp_path / "preview"
    code = cli.main(["partition", *own_images(images), "--output_dir", str(out), "--log_level", "WARNING"])
    err = without_progress_bars(capsys.readouterr().err)
    assert code == 2 and err.count("\n") == 1, err
    assert "hf-lpft: configuration error: the image file" in err and "clinic_a/cat/" in err, err
    assert not out.exists()


def test_adapter_folder_where_a_run_or_a_full_model_is_expected(ctx):
    """load_personalized wants the run folder, SplitModel.from_pretrained a full model: each says what to call."""
    import hf_lpft
    from hf_lpft.models.backbone import SplitModel

    (ctx.tmp / "models" / "run_record.json").write_text("{}")  # models/ plays the run folder of the adapter
    try:
        with pytest.raises(FileNotFoundError, match=r"is a peft adapter folder \(a LoRA client\), not a run folder.*"
                           r"call load_personalized\('.*models', client_id='a', strategy='lora'\)"):
            hf_lpft.load_personalized(ctx.adapter, "a", "lora")
    finally:
        (ctx.tmp / "models" / "run_record.json").unlink()
    with pytest.raises(FileNotFoundError, match="is a model folder, not a run folder.*SplitModel.from_pretrained"):
        hf_lpft.load_personalized(ctx.good_model, "a", "lora")
    with pytest.raises(FileNotFoundError, match="is a peft adapter folder .*, not a full model; load it with "
                                                r"PeftModel.from_pretrained\(SplitModel.from_pretrained"):
        SplitModel.from_pretrained(ctx.adapter)


def test_unwritable_existing_output_dir(tmp_path, tiny_ds_path, tripwire, capsys):
    """A folder that exists but cannot be written (permission bits; only meaningful for non-root users)."""
    if os.geteuid() == 0:
        pytest.skip("root ignores permission bits; test_bad_input_is_rejected_before_heavy_work covers root via sysfs")
    out = tmp_path / "read_only"
    out.mkdir()
    out.chmod(0o500)
    try:
        code = cli.main(["run", "--data.dataset", tiny_ds_path, "--run.output_dir", str(out), *RUN])
    finally:
        out.chmod(0o700)
    err = capsys.readouterr().err
    assert code == 2 and "is not writable (Permission denied)" in err, err
    assert not list(out.iterdir())


def test_disk_full_mid_run_gives_a_clear_message_and_no_partial_files(tmp_path, tiny_ds_path, monkeypatch, capsys):
    """ENOSPC while writing the round-2 checkpoint: exit 3, a message that says what to do, nothing half-written;
    the rerun with --run.resume true then finishes from the round-1 checkpoint."""
    import hf_lpft.checkpoint as checkpoint

    real_save, calls = checkpoint.save_file, []

    def save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            real_save(tensors, filename, *args, **kwargs)  # a real half-written file, then the device is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    out = tmp_path / "out"
    args = ["run", "--data.dataset", tiny_ds_path, "--run.output_dir", str(out), *RUN, "--fedavg.rounds", "2"]
    assert cli.main(args) == 3
    err = capsys.readouterr().err
    assert "hf-lpft: cannot write" in err and "No space left on device" in err and "--run.resume true" in err, err
    assert not temp_leftovers(out), temp_leftovers(out)
    assert not (out / "results.parquet").exists()
    history = json.loads((out / "checkpoints" / "seed_0" / "fedavg" / "history.json").read_text())
    assert [row["round"] for row in history] == [1]  # the last complete round survived

    monkeypatch.setattr(checkpoint, "save_file", real_save)
    assert cli.main([*args, "--run.resume", "true"]) == 0
    assert len(pd.read_parquet(out / "results.parquet")) == 2 * 3
    assert not temp_leftovers(out)


def test_builtin_cache_and_outputs_clean_after_failed_and_finished_runs(tmp_path, monkeypatch, capsys):
    """The embedded dataset is built into the cache atomically; neither a failed nor a finished run leaves temp names."""
    monkeypatch.setenv("HF_LPFT_CACHE", str(tmp_path / "cache"))
    base = ["run", "--data.dataset", "digits5", "--data.n_per_domain", "8", "--data.image_size", "16", *RUN[2:]]
    failed = tmp_path / "failed"
    assert cli.main([*base, "--data.num_classes", "3", "--run.output_dir", str(failed)]) == 2
    assert "data.num_classes=3 but column 'label' has 10 classes" in capsys.readouterr().err
    cache = tmp_path / "cache" / "builtin"
    assert [p.name.split("-")[0] for p in cache.iterdir()] == ["digits5"]  # built once, kept in the cache
    assert not temp_leftovers(cache) and not temp_leftovers(failed)
    done = tmp_path / "done"
    assert cli.main([*base, "--data.num_classes", "10", "--run.output_dir", str(done)]) == 0
    assert (done / "results.parquet").is_file()
    assert not temp_leftovers(cache) and not temp_leftovers(done), temp_leftovers(done)


UNSAFE = [(r"torch\.load\((?![^)]*weights_only=True)", "torch.load without weights_only=True"),
          (r"trust_remote_code\s*=\s*True", "trust_remote_code=True")]


@pytest.mark.parametrize(("pattern", "what"), UNSAFE, ids=["torch_load", "trust_remote_code"])
def test_no_unsafe_loading_in_the_package(pattern, what):
    root = Path(__file__).resolve().parents[1]
    sources = [*(root / "hf_lpft").rglob("*.py"), *(root / "recipes").rglob("*.py")]
    hits = [f"{p.relative_to(root)}:{text.count(chr(10), 0, m.start()) + 1}"
            for p in sources for text in [p.read_text()] for m in re.finditer(pattern, text)]
    assert not hits, f"{what} at {hits}"


def test_a_last_batch_of_one_example_under_batchnorm_is_one_line(ctx, capsys):
    """Two examples a client leave one to train on: BatchNorm cannot normalise a batch of one. The run has
    started (its folder stays, resumable), but it ends with one line naming the client, not a traceback."""
    out = ctx.tmp / "out_batch_of_one"
    code = cli.main(["run", "--data.dataset", ctx.data, "--run.output_dir", str(out), *RUN,
                     "--data.max_examples_per_client", "2"])
    err = without_progress_bars(capsys.readouterr().err)
    assert code == 2, err
    assert err.startswith("hf-lpft: configuration error: client ") and err.count("\n") == 1, err
    assert "leave a last batch of 1 example, which cannot train the model's BatchNorm" in err, err
