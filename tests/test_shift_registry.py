"""A shift registered at run time runs a whole study with no other edit (issue 24, item 3).

As tests/test_scheme_registry.py does for partition schemes: two classes in this file, registered and
unregistered around the test, switched on from the config by name (``data.shifts``, options in
``data.shift_args``); the config checks, the client specs, the manifest's recorded parameters and histograms,
the rows every model sees and the run record pick them up from the registry.
"""

import json

import datasets
import numpy as np
import pandas as pd
import pytest
from PIL import ImageOps

from hf_lpft.config import ConfigError, load_config
from hf_lpft.data.federate import FederationError, apply_client_shifts, federate
from hf_lpft.data.shifts import SHIFTS, Shift, register_shift, unregister_shift
from hf_lpft.pipeline import run


class _Invert(Shift):
    """The images of every ``every``-th client inverted (255 - x); the others' pass through."""

    name = "throwaway_invert"
    description = "Exists only inside tests/test_shift_registry.py."
    column = "image"
    spec_keys = ("invert",)
    arguments = {"every": 1}

    def assign(self, num_clients, values, *, num_classes, seed):
        return [{"invert": i % self.args(values)["every"] == 0} for i in range(num_clients)]

    def transform(self, value, spec, *, seed):
        return ImageOps.invert(value.convert("RGB")) if spec["invert"] else value


class _Rotate(Shift):
    """Client i's labels rotated by i + 1 (mod the class count): a deterministic per-client relabelling."""

    name = "throwaway_rotate"
    description = "Exists only inside tests/test_shift_registry.py."
    column = "label"
    spec_keys = ("rotate_by", "rotate_classes")

    def assign(self, num_clients, values, *, num_classes, seed):
        return [{"rotate_by": (i + 1) % num_classes, "rotate_classes": num_classes} for i in range(num_clients)]

    def transform(self, value, spec, *, seed):
        return (int(value) + spec["rotate_by"]) % spec["rotate_classes"]


@pytest.fixture()
def throwaway_shifts():
    for cls in (_Invert, _Rotate):
        register_shift(cls)
    try:
        yield
    finally:
        for cls in (_Invert, _Rotate):
            unregister_shift(cls.name)
    assert _Invert.name not in SHIFTS and _Rotate.name not in SHIFTS


def _cfg(out, dataset, **data):
    return load_config(None, {"data": {"dataset": dataset, "num_classes": 4, "scheme": "iid", "num_clients": 3, **data},
                              "fedavg": {"rounds": 1, "batch_size": 16},
                              "pft": {"strategies": ["lp"], "epochs": 1, "batch_size": 16},
                              "run": {"output_dir": str(out), "distortion": False}})


def test_a_shift_registered_at_run_time_runs_a_study_and_is_recorded(throwaway_shifts, tmp_path, tiny_ds,
                                                                     tiny_ds_path):
    result = run(_cfg(tmp_path / "shifted", tiny_ds_path, shifts=["throwaway_rotate", "throwaway_invert"],
                      shift_args={"throwaway_invert": {"every": 2}}))
    out = result.output_dir
    manifest = json.loads((out / "federation" / "manifest.json").read_text())
    assert manifest["params"] == {"partition_by": None, "label_column": "label", "test_fraction": 0.25,
                                  "max_examples_per_client": None, "num_clients": 3,  # the scheme's, then:
                                  "shifts": ["throwaway_invert", "throwaway_rotate"],  # applied in registry order
                                  "shift_args": {"throwaway_invert": {"every": 2}}}
    clients = manifest["clients"]
    assert [c["shift"] for c in clients] == [{"invert": i != 1, "rotate_by": i + 1, "rotate_classes": 4}
                                             for i in range(3)]
    raw = np.asarray(tiny_ds["label"])
    for i, c in enumerate(clients):  # the manifest's histograms count the labels as the client sees them
        assert c["label_hist_test"] == np.roll(np.bincount(raw[c["test_indices"]], minlength=4), i + 1).tolist()
    record = json.loads((out / "run_record.json").read_text())["run_info"]
    assert record["federation"] == {"scheme": "iid", "params": manifest["params"]}
    assert record["manifest_sha256"] == manifest["indices_sha256"]
    assert "- throwaway_invert" in (out / "config.yaml").read_text()
    assert set(result.results.strategy) == {"global_model", "lp"} and result.results.error.isna().all()

    # the rows: the same as a study on the images inverted beforehand (clients 0 and 2), not as one on the raw images
    # (every column: accuracies, training losses, ...)
    inverted = {i for c in clients if c["shift"]["invert"] for i in c["train_indices"] + c["test_indices"]}
    ds = tiny_ds.map(lambda ex, i: {"image": ImageOps.invert(ex["image"].convert("RGB")) if i in inverted
                                    else ex["image"]}, with_indices=True)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "inverted_data"))
    before = run(_cfg(tmp_path / "inverted", str(tmp_path / "inverted_data"), shifts=["throwaway_rotate"]))
    pd.testing.assert_frame_equal(result.results, before.results)
    raw_rows = run(_cfg(tmp_path / "raw", tiny_ds_path, shifts=["throwaway_rotate"])).results
    lp = result.results.strategy == "lp"  # the tiny model's accuracies tie; the probe's training loss does not
    assert not np.allclose(raw_rows.final_train_loss[lp], result.results.final_train_loss[lp])


def test_the_registered_shifts_transform_their_clients_rows(throwaway_shifts, tiny_ds):
    fed = federate(tiny_ds, scheme="iid", num_clients=2, shifts=["throwaway_rotate"], seed=1)
    shifted = apply_client_shifts(tiny_ds, fed, image_column="image", label_column="label")
    raw, new = np.asarray(tiny_ds["label"]), np.asarray(shifted["label"])
    for i, c in enumerate(fed.clients):
        rows = c.train_indices + c.test_indices
        assert new[rows].tolist() == ((raw[rows] + i + 1) % 4).tolist()
        assert np.bincount(new[c.train_indices], minlength=4).tolist() == c.label_hist_train
    assert shifted[0]["image"].tobytes() == tiny_ds[0]["image"].tobytes()  # only the label shift is on
    assert "shift_args" not in fed.params and fed.params["shifts"] == ["throwaway_rotate"]


@pytest.mark.parametrize("data, match", [
    ({"shifts": ["throwaway_nothing"]}, r"data\.shifts names 'throwaway_nothing', which is not a registered shift; "
                                        r"choose one of \['throwaway_invert', 'throwaway_rotate'\]"),
    ({"shifts": ["label_permutation"]}, r"data\.shifts names 'label_permutation', which data\.label_permutation "
                                        "switches on; set that instead"),
    ({"shifts": ["throwaway_invert", "throwaway_invert"]}, r"data\.shifts=.* has duplicates"),
    ({"shift_args": {"throwaway_invert": {"every": 1}}}, r"data\.shift_args\['throwaway_invert'\] is given but "
                                                        r"data\.shifts=\[\] does not name it"),
    ({"shifts": ["throwaway_invert"], "shift_args": {"throwaway_invert": {"grey": 1}}},
     r"data\.shift_args\['throwaway_invert'\] has unknown option\(s\) \['grey'\]; 'throwaway_invert' takes \['every'\]"),
])
def test_bad_shift_settings_fail_at_config_time_naming_the_value(throwaway_shifts, data, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, {"data": data})


def test_shifts_are_switched_on_from_the_command_line_and_vanish_when_unregistered(tiny_ds):
    register_shift(_Invert)
    try:
        cfg = load_config(None, ["--data.shifts", "throwaway_invert",
                                 "--data.shift_args", "{throwaway_invert: {every: 9}}"])
        assert (cfg.data.shifts, cfg.data.shift_args) == (["throwaway_invert"], {"throwaway_invert": {"every": 9}})
    finally:
        unregister_shift(_Invert.name)
    with pytest.raises(ConfigError, match="data.shifts names 'throwaway_invert', which is not a registered shift"):
        load_config(None, ["--data.shifts", "throwaway_invert"])
    with pytest.raises(FederationError, match="shifts names 'throwaway_invert'"):
        federate(tiny_ds, scheme="iid", num_clients=2, shifts=["throwaway_invert"])
    with pytest.raises(FederationError, match="shift 'throwaway_invert' is not registered"):
        unregister_shift("throwaway_invert")


def test_a_manifest_entry_no_registered_shift_wrote_is_refused(tiny_ds):
    fed = federate(tiny_ds, scheme="iid", num_clients=2, seed=0)
    fed.clients[0].shift = {"inverted": True}  # e.g. written while a shift was registered that is not now
    with pytest.raises(FederationError, match=r"has key\(s\) \['inverted'\] that no registered shift writes"):
        apply_client_shifts(tiny_ds, fed, image_column="image", label_column="label")


@pytest.mark.parametrize("attrs, error, match", [
    (None, TypeError, "register_shift takes a Shift subclass"),
    ({"name": "throwaway_nocolumn", "column": None}, ValueError, "column=None must be 'image' or 'label'"),
    ({"name": "throwaway_same_key", "spec_keys": ("label_map",)}, ValueError,
     r"spec key\(s\) \['label_map'\] are written by \['label_permutation'\]"),
    ({"name": "corruption", "spec_keys": ("again",)}, ValueError, "shift 'corruption' is registered twice"),
])
def test_registering_checks_the_class_and_refuses_a_name_or_a_key_twice(attrs, error, match):
    cls = object if attrs is None else type("_Bad", (_Invert,), {"description": "A bad shift.", **attrs})
    with pytest.raises(error, match=match):
        register_shift(cls)
    assert list(SHIFTS) == ["corruption", "label_permutation"]


def test_a_shift_that_declares_a_key_the_config_lacks_fails_at_config_time():
    class _BadOption(_Invert):
        name = "throwaway_bad_option"
        description = "Declares an option that is no data.* key."
        spec_keys = ("bad",)
        options = ("rounds_per_client",)

    register_shift(_BadOption)
    try:
        with pytest.raises(ConfigError, match=r"shift 'throwaway_bad_option' declares option\(s\) "
                                              r"\['rounds_per_client'\] that are not data\.\* keys"):
            load_config(None, {})
    finally:
        unregister_shift(_BadOption.name)
