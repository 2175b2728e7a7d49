"""The embedded digits5 dataset: schema, determinism, disjoint sources, cache."""

import numpy as np
import pytest

from hf_lpft.data.builtin import DIGITS5_DOMAINS, build_digits5, load_builtin


@pytest.fixture(scope="module")
def small():
    return build_digits5(n_per_domain=20, seed=3)["train"]


def test_schema_and_counts(small):
    assert small.features["image"].__class__.__name__ == "Image"
    assert small.features["label"].names == [str(i) for i in range(10)]
    assert sorted(set(small["domain"])) == sorted(DIGITS5_DOMAINS)
    assert all(small["domain"].count(d) == 20 for d in DIGITS5_DOMAINS)
    img = small[0]["image"]
    assert img.mode == "RGB" and img.size == (32, 32)


def test_same_seed_same_images_other_seed_differs(small):
    again = build_digits5(n_per_domain=20, seed=3)["train"]
    other = build_digits5(n_per_domain=20, seed=4)["train"]
    a = np.stack([np.asarray(small[i]["image"]) for i in range(0, 100, 7)])
    b = np.stack([np.asarray(again[i]["image"]) for i in range(0, 100, 7)])
    c = np.stack([np.asarray(other[i]["image"]) for i in range(0, 100, 7)])
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_domains_look_different(small):
    """Mean brightness separates the domains (synth_like is inverted, mnist is dark)."""
    means = {d: np.mean([np.asarray(small[i]["image"], dtype=float).mean()
                         for i in range(len(small)) if small[i]["domain"] == d]) for d in DIGITS5_DOMAINS}
    assert means["synth_like"] > 150 > means["mnist"]
    assert means["mnistm"] > means["mnist"] + 20


def test_image_size_and_bad_size():
    assert build_digits5(n_per_domain=2, image_size=16)["train"][0]["image"].size == (16, 16)
    with pytest.raises(ValueError, match="n_per_domain=5000"):
        build_digits5(n_per_domain=5000)


def test_cache_is_written_once_and_reused(tmp_path):
    first = load_builtin("digits5", cache_dir=tmp_path, n_per_domain=4, image_size=32)
    entries = list(tmp_path.iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")
    second = load_builtin("digits5", cache_dir=tmp_path, n_per_domain=4, image_size=32)
    assert second["train"].cache_files and first["train"]["label"] == second["train"]["label"]
    with pytest.raises(ValueError, match="unknown embedded dataset 'digit5'"):
        load_builtin("digit5", cache_dir=tmp_path)
