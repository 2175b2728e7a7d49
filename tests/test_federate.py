import json

import pytest

from hf_lpft.data.federate import FederationError, federate, load_manifest, save_manifest


def _all_rows(fed):
    return [i for c in fed.clients for i in c.train_indices + c.test_indices]


def test_natural_one_client_per_domain_disjoint_and_covering(tiny_ds):
    fed = federate(tiny_ds, scheme="natural", partition_by="domain", seed=0)
    assert fed.client_ids == ["a", "b", "c"]
    rows = _all_rows(fed)
    assert len(rows) == len(set(rows)) == len(tiny_ds)
    domains = tiny_ds["domain"]
    for c in fed.clients:
        assert {domains[i] for i in c.train_indices + c.test_indices} == {c.client_id}
        assert not set(c.train_indices) & set(c.test_indices)
        assert sum(c.label_hist_test) == len(c.test_indices)


def test_split_is_stratified(tiny_ds):
    fed = federate(tiny_ds, scheme="natural", partition_by="domain", test_fraction=0.25, seed=0)
    for c in fed.clients:  # 24 examples, 4 balanced classes -> 6 test = 1 or 2 of each class
        assert max(c.label_hist_test) - min(c.label_hist_test) <= 1


def test_partition_is_deterministic(tiny_ds):
    a = federate(tiny_ds, scheme="dirichlet", num_clients=3, alpha=0.5, min_partition_size=5, seed=1)
    b = federate(tiny_ds, scheme="dirichlet", num_clients=3, alpha=0.5, min_partition_size=5, seed=1)
    c = federate(tiny_ds, scheme="dirichlet", num_clients=3, alpha=0.5, min_partition_size=5, seed=2)
    assert a.indices_hash() == b.indices_hash()
    assert a.indices_hash() != c.indices_hash()
    assert len(_all_rows(a)) == len(set(_all_rows(a))) == len(tiny_ds)


def test_manifest_round_trip(tiny_ds, tmp_path):
    fed = federate(tiny_ds, scheme="dirichlet", num_clients=3, alpha=1.0, min_partition_size=5, seed=3)
    path = save_manifest(fed, tmp_path / "m" / "manifest.json")
    back = load_manifest(path, num_rows=len(tiny_ds))
    assert [(c.client_id, c.train_indices, c.test_indices) for c in back.clients] == \
           [(c.client_id, c.train_indices, c.test_indices) for c in fed.clients]
    assert back.indices_hash() == fed.indices_hash()
    assert not list(tmp_path.rglob("*.tmp"))


def test_corrupt_or_mismatched_manifest_fails(tiny_ds, tmp_path):
    path = save_manifest(federate(tiny_ds, seed=0), tmp_path / "manifest.json")
    with pytest.raises(FederationError, match="rows"):
        load_manifest(path, num_rows=len(tiny_ds) + 1)
    data = json.loads(path.read_text())
    data["clients"][0]["train_indices"][0] += 1
    path.write_text(json.dumps(data))
    with pytest.raises(FederationError, match="corrupt"):
        load_manifest(path)


def test_bad_inputs_name_the_value(tiny_ds):
    with pytest.raises(FederationError, match="'region'"):
        federate(tiny_ds, scheme="natural", partition_by="region")
    with pytest.raises(FederationError, match="shuffled"):
        federate(tiny_ds, scheme="shuffled")
    with pytest.raises(FederationError, match="num_clients=1000"):
        federate(tiny_ds, scheme="dirichlet", num_clients=1000)
