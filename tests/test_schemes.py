"""Partition schemes, their statistics, the manifest round trip, the partition CLI and the real-dataset configs
(run offline on locally built datasets with the same features as the Hub datasets)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from dataset_cards import CELEBA_ATTRS
from PIL import Image

from hf_lpft.cli import main
from hf_lpft.config import ConfigError, DataConfig
from hf_lpft.data.federate import FederationError, federate, federate_from_config, load_manifest, save_manifest
from hf_lpft.data.stats import federation_stats, label_tv

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"


@pytest.fixture(scope="module")
def labels_ds() -> datasets.Dataset:
    """2,000 rows, 10 balanced-ish classes, 3 domains; no images (partitioning only reads these columns)."""
    rng = np.random.default_rng(0)
    feats = datasets.Features({"label": datasets.ClassLabel(num_classes=10), "domain": datasets.Value("string")})
    return datasets.Dataset.from_dict({"label": rng.integers(0, 10, 2000).tolist(),
                                       "domain": rng.choice(["a", "b", "c"], 2000).tolist()}, features=feats)


def _rows(fed):
    return [i for c in fed.clients for i in c.train_indices + c.test_indices]


SCHEME_ARGS = {
    "iid": dict(num_clients=8),
    "dirichlet": dict(num_clients=8, alpha=0.5, min_partition_size=20),
    "pathological": dict(num_clients=8, classes_per_client=3),
    "natural": dict(),
    "quantity": dict(num_clients=8, alpha=1.0, min_partition_size=20),
    "natural+dirichlet": dict(clients_per_domain=3, alpha=0.5, min_partition_size=10),
}


@pytest.mark.parametrize("scheme", list(SCHEME_ARGS))
def test_scheme_is_deterministic_disjoint_and_covering(labels_ds, scheme):
    a = federate(labels_ds, scheme=scheme, seed=1, **SCHEME_ARGS[scheme])
    b = federate(labels_ds, scheme=scheme, seed=1, **SCHEME_ARGS[scheme])
    c = federate(labels_ds, scheme=scheme, seed=2, **SCHEME_ARGS[scheme])
    assert a.indices_hash() == b.indices_hash() != c.indices_hash()
    rows = _rows(a)
    assert len(rows) == len(set(rows)) == len(labels_ds)  # disjoint, and every row is some client's
    for cl in a.clients:
        assert not set(cl.train_indices) & set(cl.test_indices)


def test_iid_sizes_balanced(labels_ds):
    fed = federate(labels_ds, scheme="iid", num_clients=7, seed=0)
    sizes = [len(c.train_indices) + len(c.test_indices) for c in fed.clients]
    assert max(sizes) - min(sizes) <= 1


def test_pathological_k_classes_a_client(labels_ds):
    for k in (1, 2, 4):
        fed = federate(labels_ds, scheme="pathological", num_clients=10, classes_per_client=k, seed=0)
        assert [int((np.add(c.label_hist_train, c.label_hist_test) > 0).sum()) for c in fed.clients] == [k] * 10
    used = set().union(*({i for i, v in enumerate(c.label_hist_train) if v} for c in fed.clients))
    assert used == set(range(10))  # first-deterministic: every class is used when clients >= classes


def test_dirichlet_skew_grows_as_alpha_falls_and_large_alpha_is_iid(labels_ds):
    tv = {a: np.mean(label_tv(federate(labels_ds, scheme="dirichlet", num_clients=8, alpha=a, min_partition_size=5,
                                       seed=0))) for a in (0.1, 1.0, 10.0, 1000.0)}
    assert tv[0.1] > tv[1.0] > tv[10.0] > tv[1000.0]
    iid = np.mean(label_tv(federate(labels_ds, scheme="iid", num_clients=8, seed=0)))
    # The stated statistic: mean total-variation distance of client label mixes from the pooled one.
    # At alpha=1000 it is no larger than an iid split's own sampling noise.
    assert tv[1000.0] <= iid


def test_natural_one_client_per_value(labels_ds):
    fed = federate(labels_ds, scheme="natural", partition_by="domain", seed=0)
    assert fed.client_ids == ["a", "b", "c"]
    dom = labels_ds["domain"]
    assert all({dom[i] for i in c.train_indices + c.test_indices} == {c.client_id} for c in fed.clients)


def test_natural_dirichlet_splits_inside_each_domain(labels_ds):
    fed = federate(labels_ds, scheme="natural+dirichlet", clients_per_domain=3, alpha=0.3, min_partition_size=10,
                   seed=0)
    assert fed.client_ids == [f"{d}_{j}" for d in "abc" for j in range(3)]
    dom = labels_ds["domain"]
    assert all({dom[i] for i in c.train_indices + c.test_indices} == {c.client_id[0]} for c in fed.clients)
    assert np.mean(label_tv(fed)) > 0.2  # label skew inside domains


def test_quantity_skews_sizes_not_labels(labels_ds):
    fed = federate(labels_ds, scheme="quantity", num_clients=8, alpha=0.5, min_partition_size=20, seed=0)
    s = federation_stats(fed)["summary"]
    assert s["size_cv"] > 0.3 and s["size_min"] >= 20 and s["label_tv_mean"] < 0.2
    lin = federate(labels_ds, scheme="quantity", quantity_mode="linear", num_clients=4, seed=0)
    sizes = [len(c.train_indices) + len(c.test_indices) for c in lin.clients]
    assert sizes == sorted(sizes) and sizes[-1] > 3 * sizes[0]


def test_joint_partition_columns(labels_ds):
    fed = federate(labels_ds, scheme="dirichlet", partition_by="label+domain", num_clients=4, alpha=0.3,
                   min_partition_size=10, seed=0)
    assert fed.params["partition_by"] == "label+domain" and len(_rows(fed)) == len(labels_ds)


def test_infeasible_minimum_size_fails_after_bounded_retries(labels_ds):
    with pytest.raises(FederationError, match=r"min_partition_size=190.*10 Dirichlet draws|10 Dirichlet draws.*"):
        federate(labels_ds, scheme="dirichlet", num_clients=10, alpha=0.05, min_partition_size=190, seed=0)
    with pytest.raises(FederationError, match="min_partition_size=150"):
        federate(labels_ds, scheme="quantity", num_clients=10, alpha=0.05, min_partition_size=150, seed=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(scheme="dirichlet", alpha=0.0), "alpha=0.0"),
    (dict(scheme="dirichlet", alpha=-1.0), "alpha=-1.0"),
    (dict(scheme="natural", partition_by="region"), "'region'"),
    (dict(scheme="natural", domain_column="site"), "'site'"),
    (dict(scheme="iid", label_column="y"), "'y'"),
    (dict(scheme="iid", num_clients=5000), "num_clients=5000"),
    (dict(scheme="pathological", num_clients=4, classes_per_client=11), "classes_per_client=11"),
    (dict(scheme="quantity", quantity_mode="zipf"), "'zipf'"),
    (dict(scheme="stratified"), "'stratified'"),
    (dict(scheme="iid", corruption="per_client", corruption_families=["rain"]), "'rain'"),
    (dict(scheme="iid", label_permutation=12), "label_permutation=12"),
])
def test_bad_inputs_name_the_value(labels_ds, kwargs, match):
    with pytest.raises(FederationError, match=match):
        federate(labels_ds, **kwargs)


def test_image_column_that_is_not_an_image_fails(tiny_ds):
    with pytest.raises(FederationError, match="image_column='domain'.*not an Image"):
        federate_from_config(tiny_ds, DataConfig(image_column="domain"))


@pytest.mark.parametrize("override, match", [
    ({"scheme": "shards"}, "data.scheme='shards'"), ({"alpha": 0}, "data.alpha=0"),
    ({"quantity_mode": "zipf"}, "data.quantity_mode='zipf'"), ({"corruption": "all"}, "data.corruption='all'"),
    ({"corruption_severities": [0, 6]}, r"data.corruption_severities=\[0, 6\]"),
    ({"label_permutation": 1}, "data.label_permutation=1"), ({"classes_per_client": 0}, "data.classes_per_client=0"),
])
def test_config_validates_scheme_fields(override, match):
    with pytest.raises(ConfigError, match=match):
        DataConfig(**override)


def test_manifest_round_trip_with_shifts_and_stats(tiny_ds, tmp_path):
    fed = federate(tiny_ds, scheme="iid", num_clients=3, corruption="per_client", label_permutation=2, seed=4)
    path = save_manifest(fed, tmp_path / "federation" / "manifest.json")
    back = load_manifest(path, num_rows=len(tiny_ds))
    assert [(c.client_id, c.train_indices, c.test_indices, c.shift) for c in back.clients] == \
           [(c.client_id, c.train_indices, c.test_indices, c.shift) for c in fed.clients]
    assert back.indices_hash() == fed.indices_hash()
    stats = json.loads((tmp_path / "federation" / "stats.json").read_text())
    assert [c["n_train"] + c["n_test"] for c in stats["clients"]] == [len(c.train_indices) + len(c.test_indices)
                                                                      for c in fed.clients]
    assert sum(stats["clients"][0]["label_hist_train"]) == len(fed.clients[0].train_indices)
    assert (tmp_path / "federation" / "label_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(path.read_text())  # the hash covers the shift: a changed corruption is detected
    data["clients"][0]["shift"]["severity"] = 5 if data["clients"][0]["shift"]["severity"] != 5 else 1
    path.write_text(json.dumps(data))
    with pytest.raises(FederationError, match="corrupt"):
        load_manifest(path)


def test_partition_cli_writes_its_files(tiny_ds_path, tmp_path, capsys):
    code = main(["partition", "--output_dir", str(tmp_path / "p"), "--data.dataset", tiny_ds_path,
                 "--data.scheme", "dirichlet", "--data.num_clients", "3", "--data.min_partition_size", "5"])
    assert code == 0
    out = capsys.readouterr().out
    assert "client_00" in out and "3 clients" in out
    folder = tmp_path / "p" / "federation"
    assert {p.name for p in folder.iterdir()} == {"manifest.json", "stats.json", "label_heatmap.png",
                                                   "client_samples.png"}
    assert len(load_manifest(folder / "manifest.json").clients) == 3
    assert out.rstrip().endswith("(client_samples.png, label_heatmap.png, manifest.json, stats.json)")  # all 4
    assert main(["partition", "--output_dir", str(tmp_path / "q"), "--data.dataset", tiny_ds_path,
                 "--data.partition_by", "site"]) == 2
    assert "'site'" in capsys.readouterr().err


# ---- real-dataset configs, offline: local datasets with the Hub datasets' features -------------------------



def _images(n: int, size: int, rng) -> list:
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _local_like(name: str, rng) -> datasets.Dataset:
    """A small dataset with the column names and feature types of the Hub dataset ``name``."""
    if name == "cifar10_c":
        return datasets.Dataset.from_dict({"img": _images(200, 32, rng), "label": rng.integers(0, 10, 200).tolist()},
                                          features=datasets.Features({"img": datasets.Image(),
                                                                      "label": datasets.ClassLabel(num_classes=10)}))
    if name == "cifar100_c":
        return datasets.Dataset.from_dict(
            {"img": _images(200, 32, rng), "fine_label": rng.integers(0, 100, 200).tolist(),
             "coarse_label": rng.integers(0, 20, 200).tolist()},
            features=datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(num_classes=100),
                                        "coarse_label": datasets.ClassLabel(num_classes=20)}))
    if name in ("pacs", "office_home"):
        domains, k = ((["art_painting", "cartoon", "photo", "sketch"], 7) if name == "pacs"
                      else (["Art", "Clipart", "Product", "Real World"], 65))
        return datasets.Dataset.from_dict(
            {"image": _images(160, 16, rng), "domain": [domains[i % 4] for i in range(160)],
             "label": rng.integers(0, k, 160).tolist()},
            features=datasets.Features({"image": datasets.Image(), "domain": datasets.Value("string"),
                                        "label": datasets.ClassLabel(num_classes=k)}))
    cols = {"image": _images(400, 16, rng), "celeb_id": rng.integers(1, 50, 400).tolist()}
    cols |= {a: (rng.random(400) < 0.4).tolist() for a in CELEBA_ATTRS}
    feats = {"image": datasets.Image(),
             "celeb_id": datasets.Value("int64")} | {a: datasets.Value("bool") for a in CELEBA_ATTRS}
    return datasets.Dataset.from_dict(cols, features=datasets.Features(feats))


REAL = {"cifar10_c": ["--data.num_clients", "20"], "cifar100_c": ["--data.num_clients", "10"], "pacs": [],
        "office_home": [], "celeba": ["--data.num_clients", "4", "--data.min_partition_size", "20",
                                      "--data.max_examples_per_client", "100"]}


@pytest.mark.parametrize("name", list(REAL))
def test_real_config_offline(name, tmp_path, capsys):
    path = tmp_path / name
    datasets.DatasetDict({"train": _local_like(name, np.random.default_rng(0))}).save_to_disk(str(path))
    out = tmp_path / "out"
    code = main(["partition", "--config", str(CONFIGS / f"{name}.yaml"), "--output_dir", str(out),
                 "--data.dataset", str(path), *REAL[name]])
    assert code == 0, capsys.readouterr().err
    fed = load_manifest(out / "federation" / "manifest.json")
    if name in ("pacs", "office_home"):
        assert len(fed.clients) == 4  # one client per domain
    if name.startswith("cifar"):  # one distinct (corruption, severity) pair a client
        pairs = [(c.shift["corruption"], c.shift["severity"]) for c in fed.clients]
        assert len(set(pairs)) == len(pairs) == int(REAL[name][1])
    if name == "celeba":
        assert fed.num_classes == 2 and fed.params["partition_by"] == "Blond_Hair+Male"


def test_sample_grid_spreads_each_row_over_the_clients_classes(tiny_ds):
    """client_samples.png: each client's row takes one image of each class it holds before any second one."""
    from hf_lpft.data.stats import spread_samples

    assert spread_samples([10, 11, 12, 13, 14, 15], [0, 0, 0, 0, 1, 2], 4) == [10, 14, 15, 11]
    assert spread_samples([10, 11], [0, 0], 4) == [10, 11]
    fed = federate(tiny_ds, scheme="dirichlet", num_clients=3, alpha=1.0, min_partition_size=5, seed=0)
    labels = list(tiny_ds["label"])
    for c in fed.clients:
        train = list(c.train_indices)
        held = {labels[i] for i in train}
        shown = [labels[i] for i in spread_samples(train, [labels[i] for i in train], 8)]
        assert len(set(shown)) == min(len(held), 8) and len(held) > 1, c.client_id  # not the first images' class
