"""Shared fixtures: a tiny image dataset built locally (no downloads), an in-process CPU Accelerator."""

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
from hf_lpft.data.load import client_tensors  # noqa: E402

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


@pytest.fixture()
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
