"""Bad configurations fail before any training, with a message naming the value."""

from pathlib import Path

import pytest

from hf_lpft.config import ConfigError, load_config
from hf_lpft.pipeline import run


def _tiny(tmp_path, path, **extra):
    base = {"data": {"dataset": path, "n_per_domain": 10}, "fedavg": {"rounds": 1},
            "pft": {"epochs": 2, "strategy_args": {"lp_ft": {"lp_epochs": 1}}},
            "run": {"output_dir": str(tmp_path / "out")}}
    for section, values in extra.items():
        base.setdefault(section, {}).update(values)
    return base


@pytest.mark.parametrize("overrides,needle", [
    (["--fedavg.bogus", "1"], "bogus"),
    (["--nonsense", "1"], "--nonsense"),
    (["--pft.lr", "-0.1"], "pft.lr=-0.1"),
    (["--fedavg.lr", "0"], "fedavg.lr=0"),
    (["--pft.strategies", "ft,nope"], "nope"),
    (["--data.scheme", "random"], "random"),
    (["--pft.epochs", "1.5"], "1.5"),
    (["--lr", "0.1"], "ambiguous"),
    (["--model.backbone", "resnet"], "resnet"),
    (["--data.test_fraction", "1.0"], "test_fraction=1.0"),
])
def test_bad_config_fails_with_message(overrides, needle, tmp_path):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("-", r"\-")):
        cfg = load_config(None, overrides)
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("fedavg:\n  roundz: 3\n")
    with pytest.raises(ConfigError, match="roundz"):
        load_config(p)


def test_unknown_strategy_fails_before_training(tmp_path, tiny_ds_path):
    cfg = load_config(None, _tiny(tmp_path, tiny_ds_path, pft={"strategies": ["ft", "magic"]}))
    with pytest.raises(ConfigError, match="magic"):
        run(cfg)
    assert not (tmp_path / "out").exists()  # nothing was written


def test_unknown_strategy_option(tmp_path, tiny_ds_path):
    cfg = load_config(None, _tiny(tmp_path, tiny_ds_path, pft={"strategy_args": {"lp_ft": {"lp_epochz": 1}}}))
    with pytest.raises(ConfigError, match="lp_epochz"):
        run(cfg)


def test_label_count_mismatch_fails_before_training(tmp_path, tiny_ds_path):
    cfg = load_config(None, _tiny(tmp_path, tiny_ds_path, data={"num_classes": 10}))
    with pytest.raises(ConfigError, match="num_classes=10"):
        run(cfg)
    assert not (Path(tmp_path) / "out" / "global").exists()


def test_cli_overrides_are_typed():
    cfg = load_config(None, ["--fedavg.rounds", "7", "--run.seeds", "0,1,2", "--pft.strategies=lp_ft,ft",
                             "--data.manifest", "none"])
    assert cfg.fedavg.rounds == 7 and cfg.run.seeds == [0, 1, 2] and cfg.pft.strategies == ["lp_ft", "ft"]
    assert cfg.data.manifest is None


def test_backbone_spec_is_parsed_in_one_place():
    """model.backbone is parsed by BackboneSpec alone: its parts, its string form, and the config's own spec."""
    from hf_lpft.spec import BackboneSpec

    spec = BackboneSpec.parse("hf:org/model:v2")  # only the first ':' separates the kind
    assert (spec.kind, spec.name, str(spec)) == ("hf", "org/model:v2", "hf:org/model:v2")
    assert BackboneSpec.parse(spec) is spec and spec.is_transformers and not spec.is_timm
    assert BackboneSpec.parse("timm:test_resnet").is_timm
    for bad in ("resnet18", "torch:resnet18", "hf:", "", None):
        assert not BackboneSpec.is_spec(bad)
        with pytest.raises(ValueError, match="must look like 'timm:<model name>'"):
            BackboneSpec.parse(bad)
    cfg = load_config(None, ["--model.backbone", "hf-config:vit-test"])
    assert cfg.model.spec == BackboneSpec("hf-config", "vit-test")


def test_every_vocabulary_config_checks_is_its_owners():
    """The value vocabularies config checks: derived from their owner where the owner sits above config (schemes,
    shifts), else written twice and guarded here (optimizers, schedules, pooling, engines: owners below config)."""
    import hf_lpft.config as C
    from hf_lpft.algorithms.base import ENGINES
    from hf_lpft.data import federate, schemes, shifts
    from hf_lpft.models.backbone import POOLINGS
    from hf_lpft.train import optim

    assert C.SCHEMES is schemes.SCHEMES is federate.SCHEMES
    assert C.QUANTITY_MODES is schemes.QUANTITY_MODES is federate.QUANTITY_MODES
    assert C.CORRUPTION_MODES is shifts.CORRUPTION_MODES is federate.CORRUPTION_MODES
    assert C.SEVERITIES is shifts.SEVERITIES
    assert (C.OPTIMIZERS, C.SCHEDULES) == (optim.OPTIMIZERS, optim.SCHEDULES)
    assert C.POOLINGS == POOLINGS and C.FEDAVG_ENGINES == ENGINES
    with pytest.raises(ConfigError, match=r"data\.corruption_severities=\[6\] must be a non-empty list of values in 1\.\.5"):
        load_config(None, {"data": {"corruption_severities": [6]}})
