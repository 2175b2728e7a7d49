"""A partition scheme registered at run time runs a whole study with no other edit (issue 24, item 3).

As tests/test_strategy_registry.py does for PFT strategies and tests/test_general_fl.py for general-FL
algorithms: one class in this file, registered and unregistered around the test; the config, the preflight's
scheme options, the manifest's recorded parameters, the run record and the cards pick it up from the registry.
"""

import json

import numpy as np
import pytest

from hf_lpft.config import ConfigError, load_config
from hf_lpft.data.federate import federate
from hf_lpft.data.schemes import (
    SCHEMES,
    FederationError,
    PartitionScheme,
    register_scheme,
    scheme_options,
    unregister_scheme,
)
from hf_lpft.pipeline import run


class _RoundRobin(PartitionScheme):
    """Row i goes to client i mod num_clients (a scheme flwr-datasets does not ship)."""

    name = "throwaway_round_robin"
    description = "Exists only inside tests/test_scheme_registry.py."
    options = ("num_clients",)

    def partition(self, view, args):
        rows = np.arange(len(view))
        return [(f"rr_{i}", rows[i::args.num_clients]) for i in range(args.num_clients)]


@pytest.fixture()
def round_robin():
    register_scheme(_RoundRobin)
    try:
        yield _RoundRobin
    finally:
        unregister_scheme(_RoundRobin.name)
    assert _RoundRobin.name not in SCHEMES


def _cfg(tmp_path, tiny_ds_path, **data):
    return load_config(None, {"data": {"dataset": tiny_ds_path, "num_classes": 4, **data},
                              "fedavg": {"rounds": 1, "batch_size": 16},
                              "pft": {"strategies": ["lp"], "epochs": 1, "batch_size": 16},
                              "run": {"output_dir": str(tmp_path / "out"), "distortion": False}})


def test_a_scheme_registered_at_run_time_runs_a_study_and_is_recorded(round_robin, tmp_path, tiny_ds_path):
    assert scheme_options()["num_clients"][-1] == "throwaway_round_robin"  # preflight's vocabulary, derived
    result = run(_cfg(tmp_path, tiny_ds_path, scheme="throwaway_round_robin", num_clients=3))
    out = result.output_dir
    manifest = json.loads((out / "federation" / "manifest.json").read_text())
    assert manifest["scheme"] == "throwaway_round_robin"
    assert manifest["params"] == {"partition_by": None, "label_column": "label", "test_fraction": 0.25,
                                  "max_examples_per_client": None, "num_clients": 3}  # common keys + its options
    assert [c["client_id"] for c in manifest["clients"]] == ["rr_0", "rr_1", "rr_2"]
    assert sorted(i for c in manifest["clients"] for i in c["train_indices"] + c["test_indices"]) == list(range(72))
    record = json.loads((out / "run_record.json").read_text())["run_info"]  # names the scheme, and the manifest by its hash
    assert record["manifest_sha256"] == manifest["indices_sha256"] and record["clients"] == ["rr_0", "rr_1", "rr_2"]
    assert record["federation"] == {"scheme": "throwaway_round_robin", "params": manifest["params"]}
    assert "scheme: throwaway_round_robin" in (out / "config.yaml").read_text()
    card = (out / "hub" / "model" / "README.md").read_text()
    assert "scheme `throwaway_round_robin`" in card and "rr_0, rr_1, rr_2" in card
    assert set(result.results.strategy) == {"global_model", "lp"} and result.results.error.isna().all()


def test_an_option_the_registered_scheme_does_not_read_fails_before_anything_is_written(round_robin, tmp_path,
                                                                                     tiny_ds_path):
    cfg = _cfg(tmp_path, tiny_ds_path, scheme="throwaway_round_robin", num_clients=3, alpha=0.1)
    with pytest.raises(ConfigError, match=r"data\.alpha=0\.1 does not apply to data\.scheme='throwaway_round_robin'; "
                                          r"it is used by the schemes \['dirichlet', 'quantity', 'natural\+dirichlet'\]"):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_a_scheme_that_declares_a_key_the_config_lacks_fails_at_config_time(tmp_path, tiny_ds_path):
    class _Bad(_RoundRobin):
        name = "throwaway_bad_option"
        description = "Declares an option that is no data.* key."
        options = ("num_clients", "rounds_per_client")

    register_scheme(_Bad)
    try:
        with pytest.raises(ConfigError, match=r"data\.scheme='throwaway_bad_option' declares option\(s\) "
                                              r"\['rounds_per_client'\] that are not data\.\* keys"):
            _cfg(tmp_path, tiny_ds_path, scheme="throwaway_bad_option")
    finally:
        unregister_scheme(_Bad.name)
    assert not (tmp_path / "out").exists()


def test_unknown_and_unregistered_schemes_name_the_registered_ones(tiny_ds, tmp_path, tiny_ds_path):
    with pytest.raises(ConfigError, match=r"data\.scheme='throwaway_round_robin' is not allowed; choose one of "
                                          r"\['iid', 'dirichlet', 'pathological', 'natural', 'quantity', "
                                          r"'natural\+dirichlet'\]"):
        _cfg(tmp_path, tiny_ds_path, scheme="throwaway_round_robin")
    with pytest.raises(FederationError, match="scheme='throwaway_round_robin' is not allowed"):
        federate(tiny_ds, scheme="throwaway_round_robin")
    with pytest.raises(FederationError, match="is not allowed"):
        unregister_scheme("throwaway_round_robin")


def test_registering_checks_the_class_and_refuses_a_name_twice():
    with pytest.raises(TypeError, match="PartitionScheme subclass"):
        register_scheme(object)

    class _NoDescription(PartitionScheme):
        name = "throwaway_nodesc"

    with pytest.raises(TypeError, match="'description'"):
        register_scheme(_NoDescription)

    class _Again(PartitionScheme):
        name = "iid"
        description = "A second iid."

    with pytest.raises(ValueError, match="partition scheme 'iid' is registered twice"):
        register_scheme(_Again)
    assert SCHEMES["iid"].__name__ == "Iid"
