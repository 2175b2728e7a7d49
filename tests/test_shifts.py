"""Shifts: CIFAR-10-C corruptions (determinism, strength grows with severity), the corruption schedule,
label-permutation concept shift, spurious colour (colored-digits) and the embedded digits-c."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data as sd
from PIL import Image

from hf_lpft.data import shifts as S
from hf_lpft.data.federate import FederationError, apply_client_shifts, federate
from hf_lpft.data.shift_builtin import build_colored_digits, build_digits_c


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """Two natural RGB photographs bundled with scikit-image, at CIFAR size."""
    return [np.asarray(Image.fromarray(sd.astronaut()).resize((32, 32))),
            np.asarray(Image.fromarray(sd.chelsea()).resize((32, 32)))]


@pytest.mark.parametrize("name", S.CORRUPTIONS)
def test_corruption_is_deterministic_and_grows_with_severity(photos, name):
    img = photos[0]
    a = S.corrupt(img, name, 3, seed=11)
    assert a.shape == img.shape and a.dtype == np.uint8
    assert np.array_equal(a, S.corrupt(Image.fromarray(img), name, 3, seed=11))  # same seed, PIL or array
    assert not np.array_equal(a, img)
    for im in photos:  # PSNR to the clean image falls strictly with severity (mean over 3 seeds)
        p = [np.mean([S.psnr(im, S.corrupt(im, name, s, seed=k)) for k in range(3)]) for s in S.SEVERITIES]
        assert all(np.diff(p) < 0), (name, [round(x, 1) for x in p])


def test_random_corruptions_differ_by_seed(photos):
    for name in ("gaussian_noise", "impulse_noise", "glass_blur", "frost", "fog"):
        assert not np.array_equal(S.corrupt(photos[0], name, 3, seed=1), S.corrupt(photos[0], name, 3, seed=2))


def test_schedule_gives_distinct_pairs_for_the_papers_50_clients():
    pairs = S.corruption_schedule(50)
    assert len(set(pairs)) == 50 and {f for f, _ in pairs} == set(S.CORRUPTIONS)
    assert {s for _, s in pairs} == set(S.SEVERITIES)
    assert len(set(S.corruption_schedule(75))) == 75
    assert S.corruption_schedule(3, families=["fog"], severities=[5]) == [("fog", 5)] * 3
    with pytest.raises(ValueError, match="'rain'"):
        S.corruption_schedule(3, families=["rain"])
    with pytest.raises(ValueError, match="severity=6"):
        S.corruption_schedule(3, severities=[6])


def test_label_permutation_moves_exactly_k_classes():
    m = S.label_permutation(10, 4, seed=3)
    assert sorted(m) == list(range(10))  # a permutation
    assert sum(i != j for i, j in enumerate(m)) == 4  # a k-cycle: every chosen class moves
    assert m == S.label_permutation(10, 4, seed=3) and m != S.label_permutation(10, 4, seed=4)
    with pytest.raises(ValueError, match="label_permutation=11"):
        S.label_permutation(10, 11, seed=0)


def test_client_shifts_are_applied_to_their_rows_only(tiny_ds):
    fed = federate(tiny_ds, scheme="iid", num_clients=3, corruption="per_client", label_permutation=2, seed=5)
    assert len({c.shift["corruption"] for c in fed.clients}) == 3
    shifted = apply_client_shifts(tiny_ds, fed, image_column="image", label_column="label")
    again = apply_client_shifts(tiny_ds, fed, image_column="image", label_column="label")
    raw, new = np.asarray(tiny_ds["label"]), np.asarray(shifted["label"])
    for c in fed.clients:
        rows = c.train_indices + c.test_indices
        assert new[rows].tolist() == [c.shift["label_map"][y] for y in raw[rows]]
        assert np.bincount(new[c.train_indices], minlength=4).tolist() == c.label_hist_train
        i = c.test_indices[0]
        assert not np.array_equal(np.asarray(shifted[i]["image"]), np.asarray(tiny_ds[i]["image"]))
        assert np.array_equal(np.asarray(shifted[i]["image"]), np.asarray(again[i]["image"]))  # deterministic


def test_corrupting_a_non_image_column_fails(tiny_ds):
    fed = federate(tiny_ds, scheme="iid", num_clients=2, corruption="per_client", seed=0)
    with pytest.raises(FederationError, match="image_column='domain'"):
        apply_client_shifts(tiny_ds, fed, image_column="domain", label_column="label")


def test_colored_digits_correlation_matches_configured_strength():
    strengths = (0.9, 0.5, 0.1)
    ds = build_colored_digits(n_per_domain=300, strengths=strengths, seed=0)["train"]
    domains, labels = np.asarray(ds["domain"]), np.asarray(ds["label"])
    measured_colour = np.asarray([S.dominant_colour(im) for im in ds["image"]])  # read back from the pixels
    assert (measured_colour == np.asarray(ds["colour"])).mean() > 0.99
    for k, rho in enumerate(strengths):
        rows = domains == f"{k}_rho{rho:.2f}"
        assert rows.sum() == 300
        # binomial std at n=300 is <= 0.029: 0.09 is three of them
        assert abs((measured_colour[rows] == labels[rows]).mean() - rho) < 0.09


def test_digits_c_one_corruption_a_client():
    ds = build_digits_c(n_per_domain=12, num_clients=15, seed=0)["train"]
    fed = federate(ds, scheme="natural", partition_by="domain", seed=0)
    pairs = S.corruption_schedule(15)
    assert fed.client_ids == [f"{k:02d}_{f}_s{s}" for k, (f, s) in enumerate(pairs)]
    assert set(zip(ds["corruption"], ds["severity"])) == set(pairs)
    again = build_digits_c(n_per_domain=12, num_clients=15, seed=0)["train"]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ds["image"][:20], again["image"][:20]))
