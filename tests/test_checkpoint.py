import pytest
import torch
from conftest import BACKBONES

from hf_lpft.models.backbone import SplitModel, build_model


@pytest.mark.parametrize("backbone", BACKBONES)
def test_reloaded_checkpoint_gives_identical_logits(backbone, tmp_path):
    model = build_model(backbone, num_classes=4, image_size=32, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the init: the saved weights must be what is loaded
    model.eval()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    loaded = SplitModel.from_pretrained(tmp_path / "m")
    loaded.eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.backbone_spec == backbone


def test_features_are_head_input():
    model = build_model("timm:test_resnet", num_classes=4, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.features(x)
        assert feats.shape == (2, model.num_features)
        assert torch.allclose(model.head(feats), model(x))


def test_unknown_backbone_fails_clearly():
    with pytest.raises(ValueError, match="not_a_model"):
        SplitModel("timm:not_a_model")
    with pytest.raises(ValueError, match="resnet18"):
        SplitModel("resnet18")


def test_resume_summary_counts_what_a_resumed_run_loads(tmp_path):
    """The one line of a resumed run: FedAvg rounds per seed (from the round checkpoints) and finished units
    per strategy (their records), or that nothing is there; with a given global model no FedAvg is counted."""
    from hf_lpft.checkpoint import Checkpoints, resume_summary
    from hf_lpft.layout import RunLayout

    layout = RunLayout(tmp_path, (0, 1))
    kwargs = {"rounds": 3, "strategies": ["ft", "lp_ft"], "client_ids": ["a", "b"]}
    assert resume_summary(layout, **kwargs) == \
        f"resuming {tmp_path}: nothing finished to reuse, starting from the beginning"
    ckpt = Checkpoints(tmp_path)
    ckpt.save_round(0, {"w": torch.zeros(1)}, [{"round": 1}, {"round": 2}, {"round": 3}])
    ckpt.save_round(1, {"w": torch.zeros(1)}, [{"round": 1}])
    for seed, client in ((0, "a"), (0, "b"), (1, "a")):
        ckpt.save_unit(seed, "ft", client, {"row": {}})
    assert resume_summary(layout, **kwargs) == (
        f"resuming {tmp_path}: reusing 3 of 3 FedAvg rounds (seed 0), 1 of 3 FedAvg rounds (seed 1) and 3 of 8 "
        "finished personalization units (ft 3/4, lp_ft 0/4); the rest runs now")
    assert resume_summary(layout, **(kwargs | {"rounds": None})) == (
        f"resuming {tmp_path}: reusing 3 of 8 finished personalization units (ft 3/4, lp_ft 0/4); the given global "
        "model is loaded again, the rest runs now")


def test_run_layout_needs_its_seeds(tmp_path):
    """``RunLayout(root)`` no longer means the one-seed layout: the seeds are required, and a layout built
    without them (for a folder's run-level files) refuses model folder paths instead of guessing."""
    from hf_lpft.checkpoint import Checkpoints
    from hf_lpft.layout import RunLayout

    with pytest.raises(TypeError):
        RunLayout(tmp_path)  # type: ignore[call-arg]
    assert RunLayout(tmp_path, [3]).global_dir(3) == tmp_path / "global"
    assert RunLayout(tmp_path, (0, 1)).client_dir("ft", "a", 1) == tmp_path / "clients" / "ft" / "a" / "seed_1"
    bare = RunLayout.without_seeds(tmp_path)
    assert bare.record == tmp_path / "run_record.json" and bare.hub_model == tmp_path / "hub" / "model"
    with pytest.raises(ValueError, match="without its seeds"):
        bare.global_dir(0)
    ckpt = RunLayout(tmp_path, (0,)).checkpoints
    assert isinstance(ckpt, Checkpoints) and ckpt.root == tmp_path / "checkpoints"
    assert ckpt.unit_record(0, "ft", "a") == tmp_path / "checkpoints" / "seed_0" / "units" / "ft" / "a.json"


def test_a_round_checkpoint_is_typed_and_keeps_its_files(tmp_path):
    """``load_round`` returns a RoundCheckpoint (state, history, rounds) read from the same two files as before."""
    from hf_lpft.checkpoint import Checkpoints, RoundCheckpoint

    ckpt = Checkpoints(tmp_path)
    assert ckpt.load_round(0) is None
    ckpt.save_round(0, {"w": torch.arange(3.0)}, [{"round": 1}, {"round": 2}])
    saved = ckpt.load_round(0)
    assert isinstance(saved, RoundCheckpoint) and saved.rounds == 2 == ckpt.rounds_done(0)
    assert torch.equal(saved.state["w"], torch.arange(3.0)) and saved.history == [{"round": 1}, {"round": 2}]
    assert sorted(p.name for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()) == \
        ["history.json", "state.safetensors"]


def test_a_folder_written_before_a_setting_existed_resumes(tmp_path):
    """A config.yaml written by an older hf_lpft lacks the settings added since (data.shifts, data.shift_args,
    run.global_eval_clients): resuming it compares those at their defaults, so it resumes; a saved setting that
    differs from the current one is still refused, by name."""
    import yaml

    from hf_lpft.config import ConfigError, load_config
    from hf_lpft.run.settings import check_folder, run_layout

    cfg = load_config(None, {"run": {"output_dir": str(tmp_path / "out"), "resume": True}})
    old = cfg.to_dict()
    del old["data"]["shifts"], old["data"]["shift_args"], old["run"]["global_eval_clients"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.yaml").write_text(yaml.safe_dump(old))
    assert check_folder(cfg, run_layout(cfg.run)) == tmp_path / "out"
    changed = load_config(None, {"run": {"output_dir": str(tmp_path / "out"), "resume": True,
                                         "global_eval_clients": 5}})
    with pytest.raises(ConfigError, match=r"run.global_eval_clients: None -> 5"):
        check_folder(changed, run_layout(changed.run))
    old["fedavg"]["rounds"] += 1
    (tmp_path / "out" / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match=r"fedavg.rounds: \d+ -> \d+"):
        check_folder(cfg, run_layout(cfg.run))
