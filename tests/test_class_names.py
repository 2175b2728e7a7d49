"""Models that name their classes (issue 25): the dataset's class names reach the manifest, every saved model's
``config.json`` (``id2label`` / ``label2id``), the cards, the preview figures and ``hf_lpft.predict(..., top_k=k)``
(a transformers pipeline's ``[{"label", "score"}]``); a text model carries its tokenizer's files, so a published
client classifies in a fresh process with the network off and its backbone's folder gone."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import hf_lpft
from hf_lpft.config import load_config
from hf_lpft.data.federate import FederationError, federate, federate_from_config, load_manifest, save_manifest
from hf_lpft.data.stats import label_heatmap_figure
from hf_lpft.models.backbone import SplitModel, build_model
from hf_lpft.pipeline import run

CLASSES = ("cat", "dog")
DOMAINS = ("clinic_a", "clinic_b", "clinic_c")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def draw(k: int, rng: np.random.Generator, *, height: int = 24, width: int = 24) -> Image.Image:
    """Class k of the toy task: a bright bar in the left (cat) or right (dog) half of a dark noisy image."""
    img = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    half = width // 2
    img[height // 6: height - height // 6, half * k: half * k + half, :] = 255
    return Image.fromarray(img)


def make_named_folder(root, per_class: int = 16):
    """``<root>/<domain>/<cat|dog>/<n>.png``: imagefolder takes the class names from the folders."""
    rng = np.random.default_rng(0)
    for domain in DOMAINS:
        for k, name in enumerate(CLASSES):
            (root / domain / name).mkdir(parents=True)
            for n in range(per_class):
                draw(k, rng).save(root / domain / name / f"{n}.png")
    return root


def run_in_fresh_process(script: str, *args: str, tmp_path) -> dict:
    """``script`` in a new interpreter with the network off and an empty Hub cache; its last line as JSON."""
    env = dict(os.environ, **OFFLINE, HF_HOME=str(tmp_path / "empty_hf_home"))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the federation and the model ---------------------------------------------------------------------

def _named_ds() -> datasets.Dataset:
    rng = np.random.default_rng(1)
    labels = [i % 2 for i in range(24)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES)),
                                  "domain": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": [draw(k, rng) for k in labels], "label": labels,
                                       "domain": [DOMAINS[i % 3] for i in range(24)]}, features=features)


def test_manifest_records_class_names_and_older_manifests_still_load(tmp_path):
    ds = _named_ds()
    fed = federate(ds, scheme="natural", partition_by="domain")
    assert fed.class_names == list(CLASSES) and fed.label_names() == list(CLASSES)
    path = save_manifest(fed, tmp_path / "new" / "manifest.json")
    assert json.loads(path.read_text())["class_names"] == list(CLASSES)
    assert load_manifest(path).class_names == list(CLASSES)
    assert json.loads((tmp_path / "new" / "stats.json").read_text())["summary"]["class_names"] == list(CLASSES)
    old = json.loads(path.read_text())
    del old["class_names"]  # a manifest written before names were recorded
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert load_manifest(tmp_path / "old.json").class_names is None
    cfg = load_config(None, {"data": {"dataset": "x", "manifest": str(tmp_path / "old.json")}})
    _, again = federate_from_config(ds, cfg.data)
    assert again.class_names == list(CLASSES)  # taken from the dataset it is used with
    (tmp_path / "bad.json").write_text(json.dumps(old | {"class_names": ["cat"]}))
    with pytest.raises(FederationError, match="class_names must be a list of 2 strings"):
        load_manifest(tmp_path / "bad.json")


def test_unnamed_labels_fall_back_to_indices_said_once(caplog):
    ds = _named_ds().cast_column("label", datasets.Value("int64")).rename_column("label", "digit")
    with caplog.at_level(logging.INFO, logger="hf_lpft.data.federate"):
        for _ in range(2):
            fed = federate(ds, scheme="iid", num_clients=2, label_column="digit")
    assert fed.class_names is None and fed.label_names() == ["0", "1"]
    assert sum("has no class names" in r.getMessage() for r in caplog.records) == 1
    assert "class_names" not in fed.to_manifest()


def test_heatmap_names_the_classes_and_says_it_counts_train_and_test():
    fed = federate(_named_ds(), scheme="natural", partition_by="domain")
    ax = label_heatmap_figure(fed).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(CLASSES)
    assert "train + test" in ax.get_title()


def test_config_json_holds_id2label_and_predict_answers_like_a_pipeline(tmp_path):
    model = build_model("timm:test_resnet", num_classes=3, image_size=32, class_names=["cat", "dog", "emu"])
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog", "2": "emu"}
    assert config["label2id"] == {"cat": 0, "dog": 1, "emu": 2}
    loaded = SplitModel.from_pretrained(tmp_path / "m")
    assert loaded.id2label == {0: "cat", 1: "dog", 2: "emu"} and loaded.label2id["emu"] == 2
    image = draw(0, np.random.default_rng(2), height=30, width=17)
    answer = hf_lpft.predict(loaded, image, top_k=5)
    logits = hf_lpft.predict(loaded, image)[0]
    probs = logits.softmax(-1)
    assert [a["label"] for a in answer] == [loaded.id2label[int(i)] for i in probs.argsort(descending=True)]
    assert [a["score"] for a in answer] == pytest.approx(sorted(probs.tolist(), reverse=True))
    batch = hf_lpft.predict(loaded, [image, image], top_k=1)  # a list in, one list per input out
    assert [[a["label"] for a in one] for one in batch] == [[answer[0]["label"]]] * 2
    assert batch[1][0]["score"] == pytest.approx(answer[0]["score"])
    with pytest.raises(ValueError, match="top_k=0 must be a positive integer"):
        hf_lpft.predict(loaded, image, top_k=0)
    del config["id2label"], config["label2id"]  # a model saved before labels were recorded
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert SplitModel.from_pretrained(tmp_path / "m").id2label == {0: "0", 1: "1", 2: "2"}
    with pytest.raises(ValueError, match="3 distinct names"):
        build_model("timm:test_resnet", num_classes=3, image_size=32, class_names=["cat", "cat", "emu"])


# --- acceptance: your own images, a published client, a fresh process, the network off ----------------

@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A tiny imagefolder study (cat/dog folders in 3 domains): 4 FedAvg rounds, FT and LP for 2 epochs."""
    root = tmp_path_factory.mktemp("own_images")
    data = make_named_folder(root / "my_images")
    cfg = load_config(None, {
        "data": {"dataset": "imagefolder", "data_dir": str(data), "domain_level": 0, "scheme": "natural"},
        "fedavg": {"rounds": 4, "batch_size": 8, "optimizer": "adam", "lr": 0.003},
        "pft": {"epochs": 2, "batch_size": 8, "optimizer": "adam", "lr": 0.003, "strategies": ["ft", "lp"]},
        "run": {"output_dir": str(root / "my_run"), "distortion": False, "num_threads": 1}})
    return run(cfg)


CLASSIFY_IMAGES = """
    import json, sys
    import hf_lpft
    from PIL import Image

    folder, client, strategies, images = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4:]
    answers = {}
    for strategy in strategies:
        model = hf_lpft.load_personalized(folder, client_id=client, strategy=strategy)
        answers[strategy] = [hf_lpft.predict(model, Image.open(p), top_k=1)[0]["label"] for p in images]
    print(json.dumps(answers))
"""


def test_imagefolder_client_from_its_hub_folder_names_the_class_offline(image_run, tmp_path):
    out = image_run.output_dir
    hub = out / "hub" / "model"
    assert json.loads((out / "federation" / "manifest.json").read_text())["class_names"] == list(CLASSES)
    for folder in (out / "global", out / "clients" / "ft" / "clinic_b", hub, hub / "clients" / "ft" / "clinic_b",
                   hub / "clients" / "lp" / "clinic_b"):
        config = json.loads((folder / "config.json").read_text())
        assert config["id2label"] == {"0": "cat", "1": "dog"} and config["label2id"] == {"cat": 0, "dog": 1}, folder
    assert json.loads((hub / "clients" / "lp" / "clinic_b" / "personalization.json").read_text())["format"] == "head"
    assert (hub / "preprocessor_config.json").is_file() and (hub / "clients/ft/clinic_b/preprocessor_config.json").is_file()
    for card in (hub / "clients" / "ft" / "clinic_b" / "README.md", out / "clients" / "lp" / "clinic_b" / "README.md",
                 hub / "README.md"):
        assert "0 `cat`, 1 `dog`" in card.read_text(), card
    rng = np.random.default_rng(7)
    images = []
    for k, name in enumerate(CLASSES):  # new images of another size and mode than the training ones
        images.append(tmp_path / f"new_{name}.png")
        draw(k, rng, height=40, width=30).convert("RGBA").save(images[-1])
    answers = run_in_fresh_process(CLASSIFY_IMAGES, str(hub), "clinic_b", "ft,lp", *map(str, images),
                                   tmp_path=tmp_path)
    assert answers == {"ft": list(CLASSES), "lp": list(CLASSES)}


CLASSIFY_TEXT = """
    import json, sys
    import hf_lpft

    folder, client, strategies, texts = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4:]
    answers = {}
    for strategy in strategies:
        model = hf_lpft.load_personalized(folder, client_id=client, strategy=strategy)
        answers[strategy] = [a[0]["label"] for a in hf_lpft.predict(model, texts, top_k=1)]
    print(json.dumps(answers))
"""


def test_text_client_tokenizes_from_its_own_folder_offline(tmp_path):
    """FT (full weights) and LoRA (a peft adapter) clients of a tiny BERT whose folder is deleted after the run:
    the tokenizer can only come from the client's own folder."""
    from conftest import TOPICS, make_text_dataset, save_tiny_bert

    backbone = save_tiny_bert(tmp_path / "tiny_bert")
    datasets.DatasetDict({"train": make_text_dataset(192)}).save_to_disk(str(tmp_path / "topics"))
    cfg = load_config(None, {
        "data": {"dataset": str(tmp_path / "topics"), "text_column": "text", "max_seq_len": 16, "scheme": "iid",
                 "num_clients": 2},
        "model": {"backbone": f"hf:{backbone}", "pretrained": True},
        "fedavg": {"rounds": 4, "batch_size": 16, "optimizer": "adam", "lr": 0.003},
        "pft": {"epochs": 2, "batch_size": 8, "optimizer": "adam", "lr": 0.003, "strategies": ["ft", "lora"]},
        "run": {"output_dir": str(tmp_path / "run"), "distortion": False, "num_threads": 1}})
    out = run(cfg).output_dir
    shutil.rmtree(backbone)
    hub = out / "hub" / "model"
    for folder in (out / "global", out / "clients" / "ft" / "client_00", out / "clients" / "lora" / "client_00",
                   hub, hub / "clients" / "ft" / "client_00", hub / "clients" / "lora" / "client_00"):
        assert (folder / "tokenizer_config.json").is_file(), folder
    assert json.loads((hub / "config.json").read_text())["id2label"] == {str(i): n for i, n in enumerate(TOPICS)}
    texts = ["apple banana cherry", "football tennis goal", "rain storm wind today", "guitar song piano"]
    answers = run_in_fresh_process(CLASSIFY_TEXT, str(hub), "client_00", "ft,lora", *texts, tmp_path=tmp_path)
    assert answers == {"ft": list(TOPICS), "lora": list(TOPICS)}
    assert "0 `fruit`, 1 `sport`, 2 `weather`, 3 `music`" in (hub / "clients/lora/client_00/README.md").read_text()


def test_a_loaded_text_model_uses_the_tokenizer_saved_beside_it(tmp_path):
    from conftest import save_tiny_bert

    source = save_tiny_bert(tmp_path / "bert")
    model = build_model(f"hf:{source}", num_classes=4, image_size=32, pretrained=True)
    model.save_pretrained(tmp_path / "saved")
    shutil.rmtree(source)
    loaded = SplitModel.from_pretrained(tmp_path / "saved")
    assert loaded.tokenizer_source == str(tmp_path / "saved")
    x = loaded.preprocess(["apple and a banana"])
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


FROM_HUB = """
    import json, sys
    from huggingface_hub import HfApi
    from hf_lpft.models.backbone import SplitModel

    folder, repo = sys.argv[1], "tester/text-model"
    api = HfApi()
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=folder)
    model = SplitModel.from_pretrained(repo)
    print(json.dumps({"source": model.tokenizer_source, "ids": model.preprocess("apple banana")["input_ids"].tolist()}))
"""


@pytest.mark.hub
def test_a_text_model_from_a_hub_repo_tokenizes_with_the_repo_files(tmp_path):
    """``SplitModel.from_pretrained("<repo id>")`` (the cards' peft snippet) fetches the tokenizer saved in the repo;
    the backbone's folder is gone."""
    from conftest import save_tiny_bert
    from hub_server import FakeHub

    source = save_tiny_bert(tmp_path / "bert")
    model = build_model(f"hf:{source}", num_classes=4, image_size=32, pretrained=True)
    model.save_pretrained(tmp_path / "saved")
    expected = model.preprocess("apple banana")["input_ids"].tolist()
    shutil.rmtree(source)
    with FakeHub() as server:
        env = dict(os.environ, HF_ENDPOINT=server.endpoint, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
                   HF_TOKEN="hf_test", HF_HOME=str(tmp_path / "hf_home"))
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(FROM_HUB), str(tmp_path / "saved")], env=env,
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer == {"source": "tester/text-model", "ids": expected}
