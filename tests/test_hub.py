"""Publishing to the Hub against a local Hub-compatible server (tests/hub_server.py): no network.

A tiny run (FT, LP, LoRA) pushes itself at the end of ``pipeline.run`` (``--push_to_hub``); everything
is loaded back with the ordinary library calls and compared with the local run folder.
"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pandas as pd
import pytest
import torch
from hub_server import FakeHub

from hf_lpft.config import ConfigError, load_config, parse_overrides
from hf_lpft.hub.cards import TEMPLATES, template_path

pytestmark = pytest.mark.hub

TOKEN = "hf_TESTtoken_do_not_leak_4b8c1e"
REPO = "tester/tiny-study"
STRATEGIES = ["ft", "lp", "lora"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The server, with huggingface_hub and datasets pointed at it (both read HF_ENDPOINT at import)."""
    import datasets
    import huggingface_hub.hf_api
    from huggingface_hub import constants

    cache = tmp_path_factory.mktemp("hf_cache")
    with FakeHub() as server, pytest.MonkeyPatch.context() as mp:
        for key, value in {"HF_ENDPOINT": server.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
                           "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}.items():
            mp.setenv(key, value)
        for name, value in {"ENDPOINT": server.endpoint, "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": True,
                            "HF_HUB_CACHE": str(cache / "hub"),
                            "HUGGINGFACE_CO_URL_TEMPLATE": server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
                            }.items():
            mp.setattr(constants, name, value)
        mp.setattr(huggingface_hub.hf_api.api, "endpoint", server.endpoint)  # the module-level HfApi()
        mp.setattr(datasets.config, "HF_ENDPOINT", server.endpoint)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        mp.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)
        mp.setattr("hf_lpft.hub.push.BACKOFF_SECONDS", 0.01)
        yield server


@pytest.fixture(scope="module")
def pushed(hub, tmp_path_factory, tiny_ds_path):
    """A tiny run that publishes itself; returns (RunResult, commits of the model repo after the push)."""
    from hf_lpft.pipeline import run

    out = tmp_path_factory.mktemp("runs") / "tiny-exp"
    cfg = load_config(None, {
        "data": {"dataset": tiny_ds_path, "num_classes": 4}, "fedavg": {"rounds": 1, "batch_size": 16},
        "pft": {"epochs": 1, "batch_size": 16, "strategies": STRATEGIES},
        "run": {"output_dir": str(out), "distortion": False, "num_threads": 1},
        "hub": {"push_to_hub": True, "hub_repo_id": REPO}})
    return run(cfg)


def _inputs() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_inputs())


def _local_model(out: Path, strategy: str, client: str):
    """The model as the run itself saved it (not the Hub-ready copy)."""
    from peft import PeftModel

    from hf_lpft.models.backbone import SplitModel

    folder = out / "clients" / strategy / client
    if (folder / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(SplitModel.from_pretrained(out / "global"), str(folder))
    return SplitModel.from_pretrained(folder)


def test_templates_have_one_copy_that_model_cards_points_to():
    """The packaged templates are the only copy; the top-level model_cards/ folder only links to each of them."""
    root = Path(__file__).resolve().parents[1]
    assert sorted(p.name for p in (root / "model_cards").iterdir()) == ["README.md"]
    readme = (root / "model_cards" / "README.md").read_text()
    for name in TEMPLATES:
        assert template_path(name).is_file() and "{{ card_data }}" in template_path(name).read_text()
        assert f"](../hf_lpft/hub/templates/{name})" in readme, f"model_cards/README.md does not link {name}"
        assert (root / "model_cards" / f"../hf_lpft/hub/templates/{name}").resolve() == template_path(name).resolve()


def test_cli_flags_parse_and_validate():
    assert parse_overrides(["--push_to_hub", "--hub_repo_id", "me/x", "--hub_private"])["hub"] == {
        "push_to_hub": "true", "hub_repo_id": "me/x", "hub_private": "true"}
    cfg = load_config(None, ["--push_to_hub", "--hub_repo_id", "me/x"])
    assert cfg.hub.push_to_hub and cfg.hub.hub_repo_id == "me/x" and not cfg.hub.hub_private
    with pytest.raises(ConfigError, match="needs hub.hub_repo_id"):
        load_config(None, ["--push_to_hub"])
    with pytest.raises(ConfigError, match="namespace/name"):
        load_config(None, ["--hub_repo_id", "no slash"])


def test_hub_ready_folder_layout_and_formats(pushed):
    folder = pushed.output_dir / "hub" / "model"
    for rel in ["README.md", "config.json", "model.safetensors", "config.yaml", "run_record.json",
                "federation/manifest.json", "summary.md"]:
        assert (folder / rel).is_file(), rel
    assert (folder / "clients/ft/a/model.safetensors").is_file()
    assert (folder / "clients/lp/a/head.safetensors").is_file() and not (folder / "clients/lp/a/model.safetensors").exists()
    assert (folder / "clients/lora/a/adapter_model.safetensors").is_file()
    assert not list(pushed.output_dir.rglob("*.tmp"))


def test_local_folders_load_with_ordinary_calls(pushed):
    import datasets

    import hf_lpft

    out = pushed.output_dir
    for strategy in STRATEGIES:
        expected = _logits(_local_model(out, strategy, "b"))
        assert torch.equal(_logits(hf_lpft.load_personalized(out, "b", strategy)), expected)
        assert torch.equal(_logits(hf_lpft.load_personalized(out / "hub" / "model", "b", strategy)), expected)
    rows = datasets.load_dataset(str(out / "hub" / "results"), "tiny-exp", split="clients")
    assert len(rows) == len(pushed.results)


def test_push_makes_one_model_commit_and_everything_loads_back(pushed, hub, tmp_path):
    import datasets
    from huggingface_hub import DatasetCard, ModelCard, hf_hub_download
    from peft import PeftModel

    import hf_lpft
    from hf_lpft.models.backbone import SplitModel

    out = pushed.output_dir
    commits = hub.repos[("model", REPO)].commits
    assert len(commits) == 2, "repo creation + exactly one commit for the push"
    local_files = {p.relative_to(out / "hub" / "model").as_posix() for p in (out / "hub" / "model").rglob("*") if p.is_file()}
    assert set(commits[-1].files) == local_files | {".gitattributes"}

    # the card's model-index parses into eval results matching results.parquet
    card = ModelCard.load(REPO)
    found = {r.metric_config: r.metric_value for r in card.data.eval_results}
    for strategy, group in pushed.results.groupby("strategy"):
        assert found[f"{strategy}/local"] == pytest.approx(group.local_acc.mean(), abs=1e-6)
        assert found[f"{strategy}/global"] == pytest.approx(group.global_acc.mean(), abs=1e-6)
    manifest = json.loads((out / "federation" / "manifest.json").read_text())
    assert card.data.eval_results[0].dataset_args["manifest_sha256"] == manifest["indices_sha256"]

    assert Path(hf_hub_download(REPO, "config.yaml")).read_bytes() == (out / "config.yaml").read_bytes()

    # LoRA client through plain peft; every strategy through load_personalized: identical logits
    base = SplitModel.from_pretrained(REPO)
    lora = PeftModel.from_pretrained(base, REPO, subfolder="clients/lora/a")
    assert torch.equal(_logits(lora), _logits(_local_model(out, "lora", "a")))
    for strategy in STRATEGIES:
        assert torch.equal(_logits(hf_lpft.load_personalized(REPO, "c", strategy)),
                           _logits(_local_model(out, strategy, "c")))

    # the results dataset: per-client rows and summary, one config each, with the card
    rows = datasets.load_dataset(f"{REPO}-results", "tiny-exp", split="clients", cache_dir=str(tmp_path))
    got = rows.to_pandas().sort_values(["strategy", "client_id"]).reset_index(drop=True)
    want = pushed.results.sort_values(["strategy", "client_id"]).reset_index(drop=True)
    pd.testing.assert_series_equal(got.local_acc, want.local_acc)
    summary = datasets.load_dataset(f"{REPO}-results", "tiny-exp-summary", split="summary", cache_dir=str(tmp_path))
    assert set(summary["strategy"]) == {"global_model", *STRATEGIES}
    dcard = DatasetCard.load(f"{REPO}-results", repo_type="dataset")
    assert {c["config_name"] for c in dcard.data.configs} == {"tiny-exp", "tiny-exp-summary"}
    assert "Latest experiment: `tiny-exp`" in dcard.text


def test_token_is_sent_but_never_written_or_logged(pushed, hub, caplog, capfd):
    from hf_lpft.hub.push import push_run

    assert f"Bearer {TOKEN}" in hub.auth_headers  # it really was used
    with caplog.at_level(logging.DEBUG):
        push_run(pushed.output_dir, REPO, experiment="tiny-exp")  # again, now with every log captured
    captured = capfd.readouterr()
    assert TOKEN not in caplog.text and TOKEN not in captured.out and TOKEN not in captured.err
    for path in pushed.output_dir.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    for repo in hub.repos.values():
        for commit in repo.commits:
            assert not any(TOKEN.encode() in data for data in commit.files.values())


def test_transient_server_error_is_retried(pushed, hub):
    from hf_lpft.hub.push import push_run

    repo = "tester/retry"
    hub.fail_next_commits = 1
    push_run(pushed.output_dir, repo, private=True, results_repo_id="tester/retry-results")
    assert hub.fail_next_commits == 0
    assert len(hub.repos[("model", repo)].commits) == 2  # creation + one commit
    assert hub.repos[("model", repo)].private and hub.repos[("dataset", "tester/retry-results")].private


def test_server_error_mid_push_is_clear_and_publishes_nothing(pushed, hub):
    from hf_lpft.hub import HubPushError
    from hf_lpft.hub.push import push_run

    repo = "tester/broken"
    hub.fail_next_commits = 100
    try:
        with pytest.raises(HubPushError, match="HTTP 500.*nothing was published"):
            push_run(pushed.output_dir, repo, results_repo_id="tester/broken-results")
    finally:
        hub.fail_next_commits = 0
    commits = hub.repos[("model", repo)].commits
    assert len(commits) == 1 and set(commits[0].files) == {".gitattributes"}  # only the empty repo
    assert ("dataset", "tester/broken-results") not in hub.repos


def test_cli_push_command(pushed, hub):
    from hf_lpft.cli import main

    assert main(["push", str(pushed.output_dir), "--hub_repo_id", "tester/from-cli", "--hub_experiment", "cli"]) == 0
    assert len(hub.repos[("model", "tester/from-cli")].commits) == 2
    assert "cli/clients-00000-of-00001.parquet" in hub.repos[("dataset", "tester/from-cli-results")].commits[-1].files
    assert main(["push", str(pushed.output_dir / "missing"), "--hub_repo_id", "tester/x"]) == 2


def config_labels(out: Path) -> dict[int, str]:
    """The global model's ``id2label`` as saved in ``config.json``."""
    return {int(k): v for k, v in json.loads((out / "global" / "config.json").read_text())["id2label"].items()}


def _snippet(card_text: str) -> str:
    """The first python block of a card."""
    import re

    return re.search(r"```python\n(.*?)```", card_text, re.S).group(1)


@pytest.mark.parametrize("strategy", ["ft", "lora"])
def test_card_snippet_classifies_a_pil_image_in_a_fresh_process(pushed, hub, tmp_path, strategy):
    """The published card's snippet, run as written in a new interpreter on a PIL image of another mode and
    size, gives the class and logits the run's own data pipeline and model give for that image."""
    import os
    import subprocess
    import sys

    import datasets
    import numpy as np
    from huggingface_hub import hf_hub_download
    from PIL import Image

    from hf_lpft.data.load import images_to_tensor
    from hf_lpft.data.preprocess import preprocessing_for
    from hf_lpft.train.loop import predict

    image_path = tmp_path / "digit.png"
    Image.fromarray(np.random.RandomState(3).randint(0, 256, (45, 37), dtype=np.uint8), mode="L").save(image_path)
    card = Path(hf_hub_download(REPO, f"clients/{strategy}/a/README.md")).read_text()
    snippet = _snippet(card)
    assert f'"{REPO}"' in snippet and "<output_dir>" not in card and "example.png" in snippet
    script = snippet.replace("example.png",
                             str(image_path)) + "\nimport json\nprint('LOGITS', json.dumps(logits.tolist()))\n"
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "fresh_cache"), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    theirs = torch.tensor(json.loads(lines[-1].split(" ", 1)[1]))
    cfg = load_config(str(pushed.output_dir / "config.yaml"), {})
    ds = datasets.Dataset.from_dict({"image": [str(image_path)]}).cast_column("image", datasets.Image())
    x = images_to_tensor(ds, [0], image_column="image", image_size=cfg.data.image_size,
                         preprocessing=preprocessing_for(cfg))  # the run's own decoding
    ours = predict(_local_model(pushed.output_dir, strategy, "a"), x)
    assert int(lines[-2]) == int(ours.argmax(-1)) == int(theirs.argmax(-1))
    named = ast.literal_eval(lines[-3])  # the snippet's top_k line: class names (here the indices) and scores
    assert named[0]["label"] == config_labels(pushed.output_dir)[int(ours.argmax(-1))]
    assert named[0]["score"] == pytest.approx(float(ours.softmax(-1).max()), abs=1e-5)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_run_folder_cards_adapters_and_metadata(pushed):
    """Run-folder cards come from the templates (no placeholders), carry license and datasets; every LoRA
    adapter names a loadable base model."""
    from huggingface_hub import ModelCard
    from peft import PeftModel

    from hf_lpft.models.backbone import SplitModel

    out = pushed.output_dir
    cards = [out / "global" / "README.md", *sorted((out / "clients").glob("*/*/README.md")),
             *sorted((out / "hub" / "model").rglob("README.md"))]
    assert len(cards) == 2 + 2 * 3 * len(STRATEGIES)
    for path in cards:
        text = path.read_text()
        assert "[More Information Needed]" not in text and "<output_dir>" not in text, path
        card = ModelCard(text)
        assert card.data.license == "apache-2.0" and card.data.datasets == ["tiny"], path
        assert "hf_lpft.predict(model" in text and "mean [0.5, 0.5, 0.5]" in text, path
    for folder in (out / "clients" / "lora" / "b", out / "hub" / "model" / "clients" / "lora" / "b"):
        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(SplitModel.from_pretrained(base), str(folder))
        assert torch.equal(_logits(model), _logits(_local_model(out, "lora", "b")))
    hub_base = json.loads((out / "hub/model/clients/lora/b/adapter_config.json").read_text())["base_model_name_or_path"]
    assert hub_base in (REPO, "tester/from-cli")  # the repo the folder was last exported for (test order)
    assert json.loads((out / "global" / "preprocessor_config.json").read_text())["image_mean"] == [0.5, 0.5, 0.5]


def test_strategies_listing_says_what_the_hub_folder_holds(pushed, capsys):
    """`hf-lpft strategies` and the Hub export agree: LP's folder holds the head only, FT's the full model."""
    from hf_lpft.cli import list_strategies
    from hf_lpft.strategies import get_strategy

    list_strategies()
    listing = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()
               if line.strip() and not line.startswith(" ")}
    for strategy in STRATEGIES:
        written = json.loads((pushed.output_dir / f"hub/model/clients/{strategy}/a/personalization.json").read_text())
        assert written["format"] == get_strategy(strategy)().hub_format(), strategy
    assert "Hub folder: head only" in listing["lp"] and "Hub folder: full model" in listing["ft"]
    assert "peft adapter" in listing["lora"]


def test_cards_of_an_adam_run_name_adam_and_absolute_folders(tmp_path, tiny_ds_path, monkeypatch):
    """Client cards state the optimizer the run used (not the Phase vocabulary's `solver: sgd`), and the
    local cards' paths load from any working directory."""
    from hf_lpft.pipeline import run

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, {
        "data": {"dataset": tiny_ds_path, "num_classes": 4}, "fedavg": {"rounds": 1, "batch_size": 16},
        "pft": {"epochs": 1, "batch_size": 16, "strategies": ["ft"], "optimizer": "adam", "lr": 0.001},
        "run": {"output_dir": "rel-run", "distortion": False, "num_threads": 1}})
    out = run(cfg).output_dir
    for card in (tmp_path / "rel-run/clients/ft/a/README.md", tmp_path / "rel-run/hub/model/clients/ft/a/README.md"):
        text = card.read_text()
        assert "solver: adam" in text and "solver: sgd" not in text and "| optimizer | adam (lr 0.001" in text
        assert f'load_personalized("{(tmp_path / "rel-run").resolve()}' in text or \
            f'load_personalized("{(tmp_path / "rel-run/hub/model").resolve()}' in text, card
    assert "solver: adam" in (Path(out) / "global/README.md").read_text()


def test_root_card_and_results_card_carry_the_table_legend(pushed):
    for card in (pushed.output_dir / "hub/model/README.md", pushed.output_dir / "hub/results/README.md"):
        text = card.read_text()
        assert "- **Global < global model**: " in text and "- **Avg (L+G+W_matrix)/3**: " in text, card
        assert "(0.00)" not in text and "1 seed" in text, card
