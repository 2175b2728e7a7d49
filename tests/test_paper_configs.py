"""The paper's experiments (recipes/configs/paper/): every config runs end to end through the ordinary pipeline,
offline, with only the data and the weights swapped for stand-ins.

Each stand-in is a ``save_to_disk`` folder with the column names and feature types of the Hub dataset the config
names (as its dataset card lists them, recorded in CARDS); the overrides are ordinary command-line overrides:
the dataset path, ``timm:test_resnet`` without pretrained weights, 32 px, one FedAvg round, 3 PFT epochs (LSS
needs 3: one each for its two added vertices and vertex 0), LP-FT probing 1 of them, one seed, fewer clients
and examples. Every other key (columns, scheme, shift, optimizers, batch sizes, strategies) is the config's own.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from dataset_cards import CELEBA_ATTRS
from PIL import Image

from hf_lpft.config import load_config
from hf_lpft.data.federate import load_manifest
from hf_lpft.pipeline import run

PAPER = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "paper"
PAPER_METHODS = ["ft", "lp", "lp_ft", "proximal_ft", "sparse_ft", "soup_ft", "lss_ft"]  # Table 2's PFT methods

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DOMAINNET_DOMAINS = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]  # order unverified

# What each config's Hub dataset holds, as its card lists it (the config headers cite the cards): the stand-in is
# built from this, and the config must name these columns.
CARDS = {
    "cifar10_c": {"dataset": "uoft-cs/cifar10",
                  "features": {"img": datasets.Image(), "label": datasets.ClassLabel(names=CIFAR10_NAMES)}},
    "cifar100_c": {"dataset": "uoft-cs/cifar100",
                   "features": {"img": datasets.Image(), "fine_label": datasets.ClassLabel(num_classes=100),
                                "coarse_label": datasets.ClassLabel(num_classes=20)}},
    "domainnet": {"dataset": "wltjr1007/DomainNet",  # the domain ClassLabel is unverified on the card
                  "features": {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=345),
                               "domain": datasets.ClassLabel(names=DOMAINNET_DOMAINS)}},
    "celeba": {"dataset": "flwrlabs/celeba", "dataset_config": "img_align+identity+attr",
               "features": {"image": datasets.Image(), "celeb_id": datasets.Value("int64")}
               | {a: datasets.Value("bool") for a in CELEBA_ATTRS}},
}

# Stand-in size and the overrides that shrink the federation (everything else stays the config's).
SHRINK = {
    "cifar10_c": (120, ["--data.num_clients", "4"]),
    "cifar100_c": (120, ["--data.num_clients", "4"]),
    "domainnet": (150, ["--data.max_examples_per_client", "20"]),
    "celeba": (240, ["--data.num_clients", "4", "--data.min_partition_size", "20",
                     "--data.max_examples_per_client", "40"]),
}
COMMON = ["--model.backbone", "timm:test_resnet", "--model.pretrained", "false", "--data.image_size", "32",
          "--fedavg.rounds", "1", "--pft.epochs", "3", "--pft.strategy_args", "{lp_ft: {lp_epochs: 1}}",
          "--run.seeds", "0"]


def _stand_in(features: dict, n: int, seed: int = 0) -> datasets.Dataset:
    """``n`` rows with ``features``: random 16 px images, labels from a few classes, domains in turn."""
    rng = np.random.default_rng(seed)
    cols = {}
    for name, feat in features.items():
        if isinstance(feat, datasets.Image):
            cols[name] = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]
        elif isinstance(feat, datasets.ClassLabel) and name == "domain":
            cols[name] = [i % feat.num_classes for i in range(n)]
        elif isinstance(feat, datasets.ClassLabel):
            cols[name] = rng.integers(0, min(feat.num_classes, 5), n).tolist()
        elif feat.dtype == "bool":
            cols[name] = (rng.random(n) < 0.4).tolist()
        else:
            cols[name] = rng.integers(1, 50, n).tolist()
    return datasets.Dataset.from_dict(cols, features=datasets.Features(features))


def test_one_config_per_table2_row_with_a_hub_copy():
    # Digit5 (no Hub copy with all five domains in one dataset) and CheXpert (licence-gated) have none.
    assert sorted(p.stem for p in PAPER.glob("*.yaml")) == sorted(CARDS)


@pytest.mark.parametrize("name", list(CARDS))
def test_config_is_the_papers_setup_on_the_cards_columns(name):
    cfg, card = load_config(PAPER / f"{name}.yaml"), CARDS[name]
    d, feats = cfg.data, card["features"]
    assert d.dataset == card["dataset"] and d.dataset_config == card.get("dataset_config")
    assert d.split == "train" and isinstance(feats[d.image_column], datasets.Image)
    label = feats[d.label_column]
    assert (label.num_classes if isinstance(label, datasets.ClassLabel) else 2) == d.num_classes
    for column in (d.partition_by or "").split("+"):
        assert not column or column in feats
    if d.scheme == "natural":
        assert d.domain_column in feats
    assert cfg.model.backbone.startswith("timm:resnet18") and cfg.model.pretrained
    assert cfg.pft.strategies == PAPER_METHODS + ["bn_adapt"]
    assert (cfg.pft.optimizer, cfg.pft.lr, cfg.pft.batch_size, cfg.pft.epochs) == ("adam", 5e-4, 128, 15)
    assert cfg.pft.strategy_args == {"lp_ft": {"lp_epochs": 5}}
    assert (cfg.fedavg.optimizer, cfg.fedavg.lr, cfg.fedavg.batch_size) == ("adam", 5e-4, 128)
    assert cfg.run.seeds == [0, 1, 2]
    expected = {"cifar10_c": ("iid", 50, 32), "cifar100_c": ("iid", 50, 32), "domainnet": ("natural", None, 224),
                "celeba": ("dirichlet", 20, 128)}[name]
    assert (d.scheme, d.num_clients if d.scheme != "natural" else None, d.image_size) == expected
    if name.startswith("cifar"):
        assert d.corruption == "per_client"


@pytest.mark.parametrize("name", list(CARDS))
def test_config_runs_end_to_end_on_a_stand_in(name, tmp_path, accelerator):
    card = CARDS[name]
    n_rows, shrink = SHRINK[name]
    path = tmp_path / "data"
    datasets.DatasetDict({"train": _stand_in(card["features"], n_rows)}).save_to_disk(str(path))
    cfg = load_config(PAPER / f"{name}.yaml", ["--data.dataset", str(path), *COMMON, *shrink,
                                              "--run.output_dir", str(tmp_path / "out")])
    result = run(cfg, accelerator=accelerator)

    out = result.output_dir
    fed = load_manifest(out / "federation" / "manifest.json")
    clients = [c.client_id for c in fed.clients]
    df = pd.read_parquet(out / "results.parquet")
    assert df.error.isna().all(), df[df.error.notna()][["strategy", "client_id", "error"]]
    assert sorted(df.strategy.unique()) == sorted(cfg.pft.strategies + ["global_model"])
    for strategy, group in df.groupby("strategy"):  # one row per strategy and client
        assert sorted(group.client_id) == sorted(clients), strategy
    assert len(df) == (len(cfg.pft.strategies) + 1) * len(clients)
    assert df.local_acc.between(0, 1).all() and df.global_acc.between(0, 1).all()
    # the wiring the real data will meet: columns, scheme and shift as configured
    params = fed.params
    assert params["label_column"] == cfg.data.label_column
    if name == "domainnet":  # one client per domain; ids are the ClassLabel's indices
        assert sorted(clients) == [str(i) for i in range(len(DOMAINNET_DOMAINS))]
        assert params["partition_by"] == "domain"
    elif name == "celeba":
        assert params["partition_by"] == "Blond_Hair+Male" and fed.num_classes == 2
    else:
        assert len(clients) == 4 and len({(c.shift["corruption"], c.shift["severity"]) for c in fed.clients}) == 4
        assert fed.num_classes == {"cifar10_c": 10, "cifar100_c": 100}[name]
