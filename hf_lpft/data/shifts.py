"""Per-client shifts: input-level covariate shift (corruptions) and concept shift (labels, spurious colour).

Covariate shift, input level (CIFAR-10-C, Hendrycks & Dietterich 2019): each client sees one corruption
family at one severity (1-5). The 15 families are built from albumentations transforms (no hand-written
filters); severity parameters follow the CIFAR-10-C tables where albumentations exposes the same knob,
and are otherwise chosen so that distortion grows with severity (checked by a test: PSNR falls).
Pixel-sized parameters (blur kernels, elastic displacement) are set for 32-px images and scaled with the
image side. Known approximations, said plainly:

- ``frost``: CIFAR-10-C blends photographs of frost (image files we do not ship); here an icy
  albumentations ``Spatter`` (mud mode, pale blue-white) layer over a brightened, lower-contrast image.
- ``fog``: like CIFAR-10-C a smooth plasma fractal, through albumentations ``PlasmaBrightnessContrast``
  (brightness lifted and contrast lowered by the fractal) rather than CIFAR-10-C's additive formula.
- ``snow``: albumentations ``RandomSnow`` in its bleach mode (no falling-flake layer as in CIFAR-10-C).
- ``motion_blur``/``zoom_blur``/``elastic_transform``/``defocus_blur``: albumentations' own
  implementations with severity-scaled parameters (CIFAR-10-C used ImageMagick/Wand for motion blur).

Every corruption is deterministic: the random state is seeded from (seed, row index), so the same row
gives the same corrupted image whatever the order or batching.

This module sits above ``hf_lpft.config`` (tests/test_layers.py), which checks ``data.corruption`` and
``data.corruption_severities`` against :data:`CORRUPTION_MODES` and :data:`SEVERITIES`: it imports no hf_lpft
module, and albumentations / datasets only when a corruption is built or applied.

Concept shift: (a) a per-client permutation of a subset of the classes (labels swapped on that client
only, seeded); (b) spurious colour (coloured-MNIST style): the digit is drawn in the colour of its class
with a client-specific probability ``strength``, otherwise in the colour of a uniformly chosen other
class, so ``P(colour == colour of label) = strength`` on that client.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)
CORRUPTION_MODES = ("none", "per_client")  # data.corruption: none, or one (family, severity) pair a client

# One colour per class (RGB, 0-255): the spurious feature of coloured digits.
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))


def check_corruption(name: str, severity: int) -> None:
    """Fail naming the value when the family or the severity is unknown."""
    if name not in CORRUPTIONS:
        raise ValueError(f"corruption={name!r} is not allowed; choose one of {list(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity={severity!r} must be one of {list(SEVERITIES)}")


def _odd(k: float) -> int:
    k = max(3, int(round(k)))
    return k if k % 2 else k + 1


def _build(name: str, s: int, side: int):
    """The albumentations transform of one (family, severity) at image side ``side`` (p=1)."""
    import albumentations as A
    import cv2

    i, px = s - 1, side / 32.0
    if name == "gaussian_noise":
        std = (0.04, 0.06, 0.08, 0.09, 0.10)[i]
        return A.GaussNoise(std_range=(std, std), p=1.0)
    if name == "shot_noise":  # CIFAR-10-C: Poisson with 500..50 photons per unit intensity
        scale = 1.0 / (500, 250, 100, 75, 50)[i]
        return A.ShotNoise(scale_range=(scale, scale), p=1.0)
    if name == "impulse_noise":
        amount = (0.01, 0.02, 0.03, 0.05, 0.07)[i]
        return A.SaltAndPepper(amount=(amount, amount), p=1.0)
    if name == "defocus_blur":
        radius, alias = ((1, 0.1), (1, 0.5), (2, 0.1), (2, 0.5), (3, 0.3))[i]
        r = max(1, int(round(radius * px)))
        return A.Defocus(radius=(r, r), alias_blur=(alias, alias), p=1.0)
    if name == "glass_blur":  # (sigma, max_delta, iterations); CIFAR-10-C's table is not monotone in PSNR here
        sigma, delta, iters = ((0.7, 1, 1), (0.9, 1, 2), (1.0, 2, 1), (1.1, 2, 2), (1.5, 3, 2))[i]
        return A.GlassBlur(sigma=sigma * px ** 0.5, max_delta=max(1, int(round(delta * px))), iterations=iters, p=1.0)
    if name == "motion_blur":
        k = _odd((3, 5, 7, 9, 11)[i] * px)
        return A.MotionBlur(blur_limit=(k, k), allow_shifted=False, p=1.0)
    if name == "zoom_blur":
        top, step = ((1.06, 0.01), (1.11, 0.01), (1.16, 0.02), (1.21, 0.02), (1.31, 0.02))[i]
        return A.ZoomBlur(max_factor=(top, top), step_factor=(step, step), p=1.0)
    if name == "snow":  # albumentations' bleach snow (its texture mode tints small images green)
        point, bright = ((0.1, 1.3), (0.15, 1.5), (0.2, 1.7), (0.25, 1.9), (0.3, 2.1))[i]
        return A.RandomSnow(snow_point_range=(point, point), brightness_coeff=bright, method="bleach", p=1.0)
    if name == "frost":  # approximation: CIFAR-10-C blends frost photographs we do not ship
        b, c, ice, cut = ((0.05, 0.1, 0.15, 0.6), (0.08, 0.15, 0.2, 0.58), (0.1, 0.2, 0.25, 0.56),
                          (0.12, 0.25, 0.3, 0.54), (0.15, 0.3, 0.35, 0.52))[i]
        return A.Compose([
            A.RandomBrightnessContrast(brightness_limit=(b, b), contrast_limit=(-c, -c), p=1.0),
            A.Spatter(mode="mud", color=(200, 225, 255), intensity=(ice, ice), cutout_threshold=(cut, cut),
                      gauss_sigma=(1.0, 1.0), p=1.0)])
    if name == "fog":  # a smooth plasma fractal (roughness < 1), as CIFAR-10-C's fog, lifting brightness
        c = (0.15, 0.25, 0.35, 0.45, 0.6)[i]
        return A.PlasmaBrightnessContrast(brightness_range=(c, c), contrast_range=(-c, -c), roughness=0.5, p=1.0)
    if name == "brightness":
        c = (0.1, 0.2, 0.3, 0.4, 0.5)[i]
        return A.RandomBrightnessContrast(brightness_limit=(c, c), contrast_limit=(0.0, 0.0), p=1.0)
    if name == "contrast":  # x -> mean + c (x - mean): alpha = c, beta = (1 - c) * mean
        c = (0.75, 0.5, 0.4, 0.3, 0.15)[i]
        return A.RandomBrightnessContrast(brightness_limit=(1 - c, 1 - c), contrast_limit=(c - 1, c - 1),
                                          brightness_by_max=False, p=1.0)
    if name == "elastic_transform":
        alpha, sigma = ((1.0, 2.0), (2.0, 2.5), (3.0, 3.0), (4.0, 3.0), (5.5, 3.5))[i]
        return A.ElasticTransform(alpha=alpha * px * 4, sigma=sigma * px, border_mode=cv2.BORDER_REFLECT_101, p=1.0)
    if name == "pixelate":  # box (area) down- and up-sampling; nearest up-sampling aliases non-monotonically
        c = (0.75, 0.5, 0.33, 0.25, 0.2)[i]
        return A.Downscale(scale_range=(c, c), interpolation_pair={"downscale": cv2.INTER_AREA,
                                                                   "upscale": cv2.INTER_AREA}, p=1.0)
    if name == "jpeg_compression":
        q = (80, 65, 58, 50, 40)[i]
        return A.ImageCompression(compression_type="jpeg", quality_range=(q, q), p=1.0)
    raise AssertionError(name)


@lru_cache(maxsize=256)
def corruption_transform(name: str, severity: int, side: int = 32):
    """A cached albumentations transform for one (family, severity, image side); reseed before each use."""
    import albumentations as A

    check_corruption(name, severity)
    return A.Compose([_build(name, severity, side)], p=1.0, seed=0)


def example_seed(seed: int, row: int) -> int:
    """A 32-bit seed for one example, from the run seed and the row index (order-independent)."""
    return int(np.random.SeedSequence([int(seed), int(row)]).generate_state(1)[0])


def corrupt(image, name: str, severity: int, *, seed: int) -> np.ndarray:
    """Corrupt one RGB image (PIL or HxWx3 uint8) deterministically; returns HxWx3 uint8."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image of shape {arr.shape} is not HxWx3 RGB")
    t = corruption_transform(name, severity, int(min(arr.shape[:2])))
    t.set_random_seed(int(seed))
    return np.ascontiguousarray(t(image=arr)["image"], dtype=np.uint8)


def corruption_schedule(num_clients: int, *, families: Sequence[str] = CORRUPTIONS,
                        severities: Sequence[int] = SEVERITIES) -> list[tuple[str, int]]:
    """(family, severity) of each client: client i gets family i mod F and a severity that rotates.

    Severity index is (i + i // F) mod S, so the first F clients take severities 1,2,3,... across
    families, and each later round of F clients shifts them by one: with the 15 families and 5
    severities the first 75 clients get 75 distinct pairs (the paper's 50 clients all differ).
    """
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients!r} must be >= 1")
    if not families or not severities:
        raise ValueError(f"corruption families={list(families)!r} and severities={list(severities)!r} must be "
                         "non-empty")
    for f in families:
        check_corruption(f, 1)
    for s in severities:
        check_corruption(CORRUPTIONS[0], s)
    F, S = len(families), len(severities)
    return [(families[i % F], int(severities[(i + i // F) % S])) for i in range(num_clients)]


def label_permutation(num_classes: int, k: int, *, seed: int) -> list[int]:
    """A seeded mapping old label -> new label that cycles ``k`` randomly chosen classes (no fixed points among
    them)."""
    if not 2 <= k <= num_classes:
        raise ValueError(f"label_permutation={k!r} classes must be between 2 and num_classes={num_classes}")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(num_classes, size=k, replace=False)
    mapping = list(range(num_classes))
    for a, b in zip(chosen, np.roll(chosen, -1)):
        mapping[int(a)] = int(b)
    return mapping


def spurious_colours(labels: np.ndarray, strength: float, *, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Colour index per example: the label's own with probability ``strength``, else another class's, uniformly."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"spurious strength={strength!r} must be in [0, 1]")
    labels = np.asarray(labels, dtype=np.int64)
    match = rng.random(len(labels)) < strength
    other = (labels + rng.integers(1, num_classes, size=len(labels))) % num_classes
    return np.where(match, labels, other)


def colorize(gray: np.ndarray, colour: Sequence[int]) -> np.ndarray:
    """Grey digit (HxW, float in [0, 1]) drawn in ``colour`` on black: HxWx3 float in [0, 1]."""
    return gray[..., None] * (np.asarray(colour, dtype=np.float32) / 255.0)


def dominant_colour(image) -> int:
    """Index in PALETTE closest to the mean colour of the image's bright pixels (to measure correlation)."""
    arr = np.asarray(image, dtype=np.float32)
    lum = arr.max(axis=2)
    mask = lum > 0.5 * lum.max()
    mean = arr[mask].mean(axis=0)
    mean = mean / max(mean.max(), 1e-6)
    pal = np.asarray(PALETTE, dtype=np.float32)
    pal = pal / pal.max(axis=1, keepdims=True)
    return int(np.argmin(((pal - mean) ** 2).sum(axis=1)))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 images (inf when equal)."""
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


def shift_dataset(ds, shifts: dict[int, dict], *, image_column: str, label_column: str, seed: int):
    """Apply per-row shifts to a ``datasets.Dataset`` (a ``map`` with indices); rows not listed pass through.

    Args:
        shifts: row index -> ``{"corruption": name, "severity": s}`` and/or ``{"label_map": [...]}``.
    """
    import datasets

    corrupting = any("corruption" in s for s in shifts.values())
    if corrupting and not isinstance(ds.features[image_column], datasets.Image):
        raise ValueError(f"image_column={image_column!r} is a {type(ds.features[image_column]).__name__} "
                         "column, not an Image column; corruptions need images")
    columns = [c for c, used in ((image_column, corrupting), (label_column, True)) if used]

    def fn(batch, rows):
        out = {c: list(batch[c]) for c in columns}
        for j, row in enumerate(rows):
            s = shifts.get(row)
            if not s:
                continue
            if "corruption" in s:
                from PIL import Image

                arr = corrupt(batch[image_column][j], s["corruption"], s["severity"], seed=example_seed(seed, row))
                out[image_column][j] = Image.fromarray(arr)
            if "label_map" in s:
                out[label_column][j] = s["label_map"][int(batch[label_column][j])]
        return out

    return ds.map(fn, with_indices=True, batched=True, batch_size=256, input_columns=None,
                  desc="apply client shifts", load_from_cache_file=False) if shifts else ds
