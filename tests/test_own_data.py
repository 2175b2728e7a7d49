"""Preprocessing that travels with the model, your own data (imagefolder), mixed precision (bf16 on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from hf_lpft.data.preprocess import Preprocessing, resolve_preprocessing
from hf_lpft.data.tensors import to_float
from hf_lpft.models.backbone import SplitModel, build_model

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_scratch_model_keeps_the_old_normalization_bit_for_bit():
    model = build_model("timm:test_resnet", num_classes=3, image_size=32).eval()
    assert model.preprocessing == Preprocessing(image_size=32) and model.preprocessing.source == "scratch"
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(model.preprocessing.normalize(x), to_float(x))
    with torch.no_grad():
        assert torch.equal(model(x), model(to_float(x)))  # uint8 in = normalized by the model itself


def test_preprocess_accepts_any_pil_mode_and_size_and_matches_transformers(tmp_path):
    from transformers import AutoImageProcessor

    model = build_model("timm:test_resnet", num_classes=3, image_size=32)
    model.save_pretrained(tmp_path)
    yy, xx = np.mgrid[0:41, 0:29]
    image = Image.fromarray((yy * 5 + xx * 3).astype(np.uint8), mode="L")  # smooth: resampling rounding only
    loaded = SplitModel.from_pretrained(tmp_path)
    ours = loaded.preprocess([image, image.convert("RGBA")])
    assert ours.shape == (2, 3, 32, 32) and ours.dtype == torch.float32 and torch.equal(ours[0], ours[1])
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert (tuple(processor.image_mean), tuple(processor.image_std)) == (loaded.preprocessing.mean,
            loaded.preprocessing.std)
    assert processor.size == {"height": 32, "width": 32} and processor.resample == 3
    theirs = processor(image, return_tensors="pt")["pixel_values"]
    assert (ours[:1] - theirs).abs().mean() < 0.01  # transformers resizes in its own way: rounding differs


def _timm_checkpoint(tmp_path) -> str:
    """A 'pretrained' file as a user would have it: a timm model's state dict saved to disk."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(5)
    path = tmp_path / "test_efficientnet_ln.safetensors"
    save_file(timm.create_model("test_efficientnet_ln").state_dict(), str(path))
    return str(path)


def test_local_pretrained_timm_model_trains_with_its_own_normalization(tmp_path, tiny_ds_path):
    from hf_lpft.config import load_config
    from hf_lpft.pipeline import run

    ckpt = _timm_checkpoint(tmp_path)
    out = tmp_path / "run"
    cfg = load_config(None, {
        "data": {"dataset": tiny_ds_path, "num_classes": 4},
        "model": {"backbone": "timm:test_efficientnet_ln", "checkpoint": ckpt},
        "fedavg": {"rounds": 1, "batch_size": 16}, "pft": {"epochs": 1, "batch_size": 16, "strategies": ["ft"]},
        "run": {"output_dir": str(out), "distortion": False, "num_threads": 1}})
    seen = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: seen.append(float(args[0].min())) if type(m).__name__ == "EfficientNet" else None)
    try:
        run(cfg)
    finally:
        handle.remove()
    record = json.loads((out / "run_record.json").read_text())["run_info"]["preprocessing"]
    assert record["source"] == "timm_pretrained_cfg" and record["mean"] == pytest.approx(IMAGENET_MEAN)
    saved = json.loads((out / "global" / "preprocessor_config.json").read_text())
    assert saved["image_mean"] == pytest.approx(IMAGENET_MEAN) and saved["image_std"] == pytest.approx(IMAGENET_STD)
    assert saved["resample"] == 3  # bicubic, from the pretrained_cfg
    for folder in (out / "global", out / "clients" / "ft" / "a"):
        assert SplitModel.from_pretrained(folder).preprocessing.mean == pytest.approx(IMAGENET_MEAN)
    # the backbone really saw ImageNet-normalized pixels: dark pixels (< 60) fall far below -1
    assert seen and min(seen) < -1.5


def test_resolve_preprocessing_rules():
    assert resolve_preprocessing("timm:test_efficientnet_ln", image_size=32).source == "scratch"
    pre = resolve_preprocessing("timm:test_efficientnet_ln", image_size=32, pretrained=True)
    assert pre.mean == pytest.approx(IMAGENET_MEAN) and pre.image_size == 32
    with pytest.raises(ValueError, match="interpolation='cubic' is not allowed"):
        Preprocessing(interpolation="cubic")


def make_image_folder(root, domains=("clinic_a", "clinic_b", "clinic_c"), classes=("cat", "dog"), per_class=8):
    """``<root>/<domain>/<class>/<n>.png``: class = where a bright square is, domain = its colour."""
    rng = np.random.default_rng(0)
    for d, domain in enumerate(domains):
        for k, name in enumerate(classes):
            folder = root / domain / name
            folder.mkdir(parents=True)
            for n in range(per_class):
                img = rng.integers(0, 60, (20 + d, 24, 3), dtype=np.uint8)  # sizes differ by domain
                img[2:10, 12 * k: 12 * k + 8, d] = 255
                Image.fromarray(img).save(folder / f"{n}.png")
    return root


def test_imagefolder_of_three_domains_runs_end_to_end_with_the_readme_commands(tmp_path, capsys):
    """The README's "Your own data" commands on a tiny folder: partition preview, then a run."""
    from hf_lpft.cli import main

    data = make_image_folder(tmp_path / "my_images")
    common = ["--data.dataset", "imagefolder", "--data.data_dir", str(data), "--data.domain_level", "0",
              "--data.scheme", "natural"]
    assert main(["partition", *common, "--output_dir", str(tmp_path / "preview")]) == 0
    table = capsys.readouterr().out
    assert all(d in table for d in ("clinic_a", "clinic_b", "clinic_c"))
    manifest = json.loads((tmp_path / "preview" / "federation" / "manifest.json").read_text())
    assert [c["client_id"] for c in manifest["clients"]] == ["clinic_a", "clinic_b", "clinic_c"]
    out = tmp_path / "my_run"
    assert main(["run", *common, "--fedavg.rounds", "2", "--pft.epochs", "2", "--pft.strategies", "ft,lp",
                 "--run.output_dir", str(out), "--run.num_threads", "1"]) == 0
    import pandas as pd

    results = pd.read_parquet(out / "results.parquet")
    assert set(results.client_id) == {"clinic_a", "clinic_b", "clinic_c"}
    assert set(results.strategy) == {"global_model", "ft", "lp"} and results.error.isna().all()
    assert results.local_acc.notna().all()


def test_domain_level_deeper_than_the_files_is_a_clear_error(tmp_path):
    from hf_lpft.config import load_config
    from hf_lpft.data.federate import FederationError
    from hf_lpft.data.load import load_from_config

    data = make_image_folder(tmp_path / "imgs", per_class=2)
    cfg = load_config(None, {"data": {"dataset": "imagefolder", "data_dir": str(data), "domain_level": 2}})
    with pytest.raises(FederationError, match="domain_level=2 but .* lies only 2 folder level"):
        load_from_config(cfg.data)


BF16_SCRIPT = textwrap.dedent("""
    import json, torch
    from accelerate import Accelerator
    from hf_lpft.data.tensors import ClientData
    from hf_lpft.models.backbone import build_model
    from hf_lpft.train.loop import OptimSettings, train_phase
    from hf_lpft.train.phase import Phase

    acc = Accelerator(cpu=True)  # mixed precision from ACCELERATE_MIXED_PRECISION, as accelerate launch sets it
    model = build_model("timm:test_resnet", num_classes=2, image_size=32)
    dtypes = set()
    model.backbone.conv1.register_forward_hook(lambda m, i, o: dtypes.add(str(o.dtype)))
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    data = ClientData("a", x, torch.arange(16) % 2, x[:4], torch.zeros(4, dtype=torch.long))
    rec = train_phase(model, Phase("ft", "all", 2, 0.01), data, settings=OptimSettings(batch_size=8),
                      accelerator=acc, seed=0)
    print(json.dumps({"precision": acc.mixed_precision, "dtypes": sorted(dtypes), "loss": rec["epoch_loss"],
                      "param_dtype": str(next(model.parameters()).dtype)}))
""")


@pytest.mark.slow  # a fresh interpreter (the accelerate state is per process): ~50 s on a loaded machine
@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_accelerate_mixed_precision_is_honoured_on_cpu(precision):
    env = dict(os.environ, ACCELERATE_MIXED_PRECISION=precision)
    done = subprocess.run([sys.executable, "-c", BF16_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["precision"] == precision and got["param_dtype"] == "torch.float32"  # weights stay fp32
    assert got["dtypes"] == (["torch.bfloat16"] if precision == "bf16" else ["torch.float32"])
    assert all(np.isfinite(got["loss"]))


def test_fp16_on_cpu_is_refused():
    """fp16 needs a GPU: on CPU accelerate would silently train in float32, so the run refuses it."""
    from types import SimpleNamespace

    from hf_lpft.config import ConfigError
    from hf_lpft.run.tracking import check_precision

    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        check_precision(SimpleNamespace(mixed_precision="fp16", device=torch.device("cpu")))
    check_precision(SimpleNamespace(mixed_precision="bf16", device=torch.device("cpu")))  # allowed
