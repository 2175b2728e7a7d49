"""Shared fixtures: a tiny image dataset and a tiny BERT with toy sentences, built locally (no downloads); an
in-process CPU Accelerator."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The test models are tiny: one intra-op thread is faster than several fighting over shared cores, and
# subprocesses the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from hf_lpft.data.federate import federate  # noqa: E402
from hf_lpft.data.load import client_tensors, client_text_tensors  # noqa: E402
from hf_lpft.models.backbone import load_tokenizer  # noqa: E402

torch.set_num_threads(1)

BACKBONES = ["timm:test_resnet", "timm:test_vit"]


def make_image_dataset(n_per_domain: int = 24, domains=("a", "b", "c"), num_classes: int = 4, seed: int = 0,
                       size: int = 32) -> datasets.Dataset:
    """Learnable toy images: class k is a bright square at a class-specific place; domains tint the colour."""
    rng = np.random.default_rng(seed)
    images, labels, doms = [], [], []
    for d, domain in enumerate(domains):
        for j in range(n_per_domain):
            k = j % num_classes
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            r, c = divmod(k, 2)
            img[r * size // 2: r * size // 2 + size // 3, c * size // 2: c * size // 2 + size // 3, d % 3] = 255
            images.append(Image.fromarray(img))
            labels.append(k)
            doms.append(domain)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=num_classes),
                                  "domain": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "label": labels, "domain": doms}, features=features)


@pytest.fixture(scope="session")
def tiny_ds() -> datasets.Dataset:
    return make_image_dataset()


@pytest.fixture(scope="session")
def tiny_ds_path(tmp_path_factory, tiny_ds) -> str:
    path = tmp_path_factory.mktemp("data") / "tiny"
    datasets.DatasetDict({"train": tiny_ds}).save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_clients(tiny_ds):
    fed = federate(tiny_ds, scheme="natural", partition_by="domain", seed=0)
    return client_tensors(tiny_ds, fed, image_column="image", label_column="label", image_size=32)


# -- text: toy sentences and a tiny BERT (test_text, the strategy matrix) ------------------------------------
TOPICS = {  # class -> words; a sentence mixes words of its class with shared filler words
    "fruit": ["apple", "banana", "cherry", "mango", "pear", "grape"],
    "sport": ["football", "tennis", "goal", "match", "team", "score"],
    "weather": ["rain", "sunny", "cloud", "storm", "wind", "snow"],
    "music": ["guitar", "song", "piano", "melody", "drum", "concert"],
}
FILLER = ["the", "a", "is", "very", "today", "i", "like", "my", "we", "see"]


def make_text_dataset(n: int = 96, seed: int = 0) -> datasets.Dataset:
    """Learnable toy sentences of 3-12 words: the topic's words decide the label."""
    rng = np.random.default_rng(seed)
    names = list(TOPICS)
    texts, labels = [], []
    for i in range(n):
        k = i % len(names)
        words = list(rng.choice(TOPICS[names[k]], size=rng.integers(2, 5))) + list(rng.choice(FILLER, size=rng.integers(1, 8)))
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(k)
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)


def save_tiny_bert(folder, *, seed: int = 0) -> str:
    """A 2-layer, 32-wide BERT and a WordPiece tokenizer trained on the toy vocabulary, saved like a Hub model."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    corpus = [" ".join(w) for w in TOPICS.values()] + [" ".join(FILLER)]
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=200, special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(seed)
    # initializer_range 0.2 (BERT: 0.02) gives peaked attention, as in a trained model: with near-uniform
    # attention the query projections get gradients near float precision and LoRA's query adapters, whose
    # A matrices only move once B is non-zero, would not visibly change in a few steps.
    config = BertConfig(vocab_size=fast.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, initializer_range=0.2)
    BertModel(config).save_pretrained(str(folder))
    fast.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """``hf:<folder>`` of the tiny BERT."""
    return "hf:" + save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def text_ds() -> datasets.Dataset:
    return make_text_dataset()


@pytest.fixture(scope="session")
def text_clients(text_ds, tiny_bert):
    fed = federate(text_ds, scheme="dirichlet", num_clients=3, alpha=1.0, min_partition_size=10, seed=0)
    return client_text_tensors(text_ds, fed, text_column="text", label_column="label",
                               tokenizer=load_tokenizer(tiny_bert), max_length=16)



@pytest.fixture()
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
