"""spurious-digits (federated binary Colored MNIST): the design measured on the built data, its configurations,
and the embedded builders' client count reachable through ``data.num_clients`` (digits-c at the paper's 50)."""

from __future__ import annotations

import numpy as np
import pytest

from hf_lpft.config import ConfigError, load_config
from hf_lpft.data.shift_builtin import (
    SPURIOUS_AGREEMENT,
    SPURIOUS_LABEL_NOISE,
    build_spurious_digits,
    spurious_design,
)


@pytest.fixture(scope="module")
def built():
    """The default design at its default size (10 clients x 500 digits), as the table's concept block uses it."""
    ds = build_spurious_digits()["train"]
    return ds, ds.remove_columns("image").to_pandas()


def _tolerance(p: float, n: int) -> float:
    """Four binomial standard errors: a correct builder fails this about once in 15,000 checks."""
    return 4 * np.sqrt(p * (1 - p) / n)


def test_design_function_hits_its_rates():
    rng = np.random.default_rng(0)
    shape = rng.integers(0, 2, 200_000)
    labels, colours = spurious_design(shape, 0.85, 0.25, rng)
    assert abs((labels != shape).mean() - 0.25) < _tolerance(0.25, len(shape))
    assert abs((colours == labels).mean() - 0.85) < _tolerance(0.85, len(shape))
    with pytest.raises(ValueError, match="agreement=1.5"):
        spurious_design(shape, 1.5, 0.25, rng)
    with pytest.raises(ValueError, match="label_noise=0.5"):
        spurious_design(shape, 0.9, 0.5, rng)


def test_each_client_has_the_configured_correlation_sign_and_label_noise(built):
    _, df = built
    shape = (df.digit >= 5).astype(int)
    clients = list(dict.fromkeys(df.domain))
    assert len(clients) == len(SPURIOUS_AGREEMENT)
    for k, (client, p) in enumerate(zip(clients, SPURIOUS_AGREEMENT)):
        rows = (df.domain == client).to_numpy()
        n = int(rows.sum())
        assert n == 500
        side = "aligned" if p > 0.5 else "reversed"
        assert client == f"{k}_{side}_p{p:.2f}"
        noise = float((df.label[rows] != shape[rows]).mean())
        agree = float((df.colour[rows] == df.label[rows]).mean())
        assert abs(noise - SPURIOUS_LABEL_NOISE) < _tolerance(SPURIOUS_LABEL_NOISE, n), (client, noise)
        assert abs(agree - p) < _tolerance(p, n), (client, agree)
        assert (agree > 0.5) == (p > 0.5)  # the sign of the correlation 2 * agree - 1
    # pooled over the federation the colour beats the shape: the shortcut is worth learning
    assert (df.colour == df.label).mean() > (df.label == shape).mean()


def test_the_pixels_carry_the_colour_and_shape_only_carries_none(built):
    ds, df = built
    for image, colour in zip(ds.select(range(0, 5000, 97))["image"], df.colour[::97]):
        arr = np.asarray(image, dtype=float)
        assert arr[..., 2].max() == 0  # red or green ink on black
        assert int(arr[..., 1].sum() > arr[..., 0].sum()) == colour
    grey = build_spurious_digits(n_per_domain=30, config="shape_only")["train"]
    coloured = build_spurious_digits(n_per_domain=30)["train"]
    assert grey["label"] == coloured["label"] and grey["digit"] == coloured["digit"]
    for image in grey.select(range(0, 300, 37))["image"]:
        arr = np.asarray(image)
        assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
    with pytest.raises(ValueError, match="config='grey'"):
        build_spurious_digits(n_per_domain=5, config="grey")


def test_dataset_config_is_checked_before_building():
    from hf_lpft.run.preflight import check_sizes

    check_sizes(load_config(None, ["--data.dataset", "spurious-digits", "--data.dataset_config", "shape_only"]))
    with pytest.raises(ConfigError, match=r"data.dataset_config='grey'.*\['coloured', 'shape_only'\]"):
        check_sizes(load_config(None, ["--data.dataset", "spurious-digits", "--data.dataset_config", "grey"]))
    with pytest.raises(ConfigError, match="data.dataset_config='x'.*it has none"):
        check_sizes(load_config(None, ["--data.dataset", "digits5", "--data.dataset_config", "x"]))


def test_digits_c_client_count_is_reachable():
    """--data.num_clients reaches the digits-c builder under the natural scheme (the paper's 50 clients)."""
    from hf_lpft.run.preflight import check_scheme_options, check_sizes, federation_checked

    args = ["--data.dataset", "digits-c", "--data.scheme", "natural", "--data.num_clients", "20",
            "--data.n_per_domain", "4"]
    cfg = load_config(None, args)
    check_scheme_options(cfg)
    check_sizes(cfg)
    _, fed, _ = federation_checked(cfg)
    assert len(fed.client_ids) == 20 and fed.client_ids[-1].startswith("19_")
    with pytest.raises(ConfigError, match="data.num_clients=76 is out of range.*2..75"):
        check_sizes(load_config(None, [*args[:5], "76"]))
    with pytest.raises(ConfigError, match="data.num_clients=20 does not apply to data.scheme='natural'"):
        check_scheme_options(load_config(None, ["--data.dataset", "digits5", "--data.num_clients", "20"]))
