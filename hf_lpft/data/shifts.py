"""Per-client shifts behind a registry, and the built-in ones: corruptions, label permutations, spurious colour.

A shift kind is one ``@register_shift`` class (as partition schemes are, ``hf_lpft.data.schemes``): it declares
its name, the ``data.*`` keys it reads (``options``) or its own ``arguments`` (``data.shift_args[<name>]``),
how it is switched on (its ``switch`` option, e.g. ``data.corruption: per_client``, or its name in
``data.shifts``), how it is assigned to clients (each client's spec, recorded in the manifest's ``shift``
entry), what the manifest's ``params`` record of it, and how it transforms one row of its column (image or
label). The config's checks, ``hf_lpft.data.federate``'s assignment, recorded parameters and
``apply_client_shifts`` go through the registry; the built-in entries are ``corruption`` (per_client) and
``label_permutation``.

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

This module sits above ``hf_lpft.config`` (tests/test_layers.py), which checks the shift settings
(``data.shifts``, ``data.shift_args`` and every registered shift's options) through :func:`shift_problem`: it
imports only the base layer (registry, errors), and albumentations / datasets only when a corruption is built
or applied.

Concept shift: (a) a per-client permutation of a subset of the classes (labels swapped on that client
only, seeded); (b) spurious colour (coloured-MNIST style): the digit is drawn in the colour of its class
with a client-specific probability ``strength``, otherwise in the colour of a uniformly chosen other
class, so ``P(colour == colour of label) = strength`` on that client.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import ClassVar

import numpy as np

from hf_lpft.errors import FederationError
from hf_lpft.registry import Registry, check_entry_class

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


# -- the shift registry -------------------------------------------------------------------------------------------
class Shift:
    """A per-client shift. Subclasses set ``name``, ``description``, ``column`` and ``spec_keys`` and implement
    :meth:`assign` and :meth:`transform`; the built-ins also declare their ``data.*`` ``options`` and the
    ``switch`` among them that turns them on.

    A shift is switched on by its ``switch`` option taking any value but ``off`` (``data.corruption: per_client``,
    ``data.label_permutation: 3``) or, with no switch, by its name in ``data.shifts``; a shift listed there
    takes its own ``arguments`` (defaults) from ``data.shift_args[<name>]``.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    column: ClassVar[str]  # "image" (data.image_column) or "label" (data.label_column): what it changes
    spec_keys: ClassVar[tuple[str, ...]]  # the keys it writes in a client's ``shift`` entry of the manifest
    options: ClassVar[tuple[str, ...]] = ()  # data.* keys it reads (among those hf_lpft.data.federate takes)
    arguments: ClassVar[dict] = {}  # its own options and their defaults, given in data.shift_args[name]
    switch: ClassVar[str | None] = None  # the option that switches it on; None = named in data.shifts
    off: ClassVar[object] = None  # the switch's value that leaves it off

    def is_on(self, values: dict) -> bool:
        if self.switch is not None:
            return values[self.switch] != self.off
        return self.name in (values.get("shifts") or ())

    def problem(self, values: dict, *, prefix: str = "") -> str:
        """What is wrong with its option values ("" = nothing), each named ``<prefix><key>=<value>``; checked by
        the config (prefix ``data.``) and by ``federate`` whether the shift is on or not."""
        return ""

    def args(self, values: dict) -> dict:
        """Its arguments: ``arguments`` updated with ``data.shift_args[name]``."""
        return {**self.arguments, **(values.get("shift_args") or {}).get(self.name, {})}

    def assign(self, num_clients: int, values: dict, *, num_classes: int, seed: int) -> list[dict]:
        """The spec of every client (its ``spec_keys`` and their values; recorded in the manifest)."""
        raise NotImplementedError

    def recorded(self, values: dict) -> dict:
        """What the manifest's ``params`` record of it; a shift named in ``data.shifts`` is recorded there (with
        its ``shift_args``) by :func:`recorded_shifts`."""
        return {}

    def transform(self, value, spec: dict, *, seed: int):
        """One row's value of ``column`` (a PIL image, or an int label) under its client's ``spec``; ``seed`` is
        the row's own (:func:`example_seed` of the partition seed and the row index)."""
        raise NotImplementedError


def check_shift_class(cls: type) -> None:
    """A registrable shift: a Shift subclass that names and describes itself, changes a known column and names
    the keys it writes in a client's spec."""
    check_entry_class(cls, Shift, kind="shift", own=("name", "description"))
    if getattr(cls, "column", None) not in ("image", "label"):
        raise ValueError(f"shift {cls.name!r}: column={getattr(cls, 'column', None)!r} must be 'image' or 'label'")
    for attr in ("spec_keys", "options"):
        value = getattr(cls, attr, None)
        if not isinstance(value, tuple) or not all(isinstance(o, str) for o in value):
            raise TypeError(f"shift {cls.name!r}: {attr}={value!r} must be a tuple of names")
    if not cls.spec_keys:
        raise TypeError(f"shift {cls.name!r}: spec_keys is empty; name the keys it writes in a client's spec")
    if cls.switch is not None and cls.switch not in cls.options:
        raise ValueError(f"shift {cls.name!r}: switch={cls.switch!r} must be one of its options {cls.options}")
    taken = {k: n for n, c in SHIFTS.items() for k in c.spec_keys}
    if clash := [k for k in cls.spec_keys if k in taken and taken[k] != cls.name]:
        raise ValueError(f"shift {cls.name!r}: spec key(s) {clash} are written by {sorted({taken[k] for k in clash})}")


SHIFTS: Registry[type[Shift]] = Registry(
    "shift", check=check_shift_class,
    unknown=lambda name, names: FederationError(f"shift {name!r} is not registered; choose one of {names}"))


register_shift = SHIFTS.register  # class decorator: add a shift under ``cls.name`` (after check_shift_class)
unregister_shift = SHIFTS.unregister  # remove a shift by name (e.g. one a test registered); returns its class


def listed_shifts() -> list[str]:
    """The registered shifts that ``data.shifts`` switches on (those with no switch option of their own)."""
    return [n for n, cls in SHIFTS.items() if cls.switch is None]


def shift_problem(values: dict, *, prefix: str = "") -> str:
    """The first problem of the shift settings in ``values`` ("" = none): ``shifts`` names listable shifts once,
    ``shift_args`` only options of listed shifts, then every registered shift's own :meth:`Shift.problem`."""
    listed, given = list(values.get("shifts") or []), values.get("shift_args") or {}
    for name in listed:
        if name not in SHIFTS:
            return f"{prefix}shifts names {name!r}, which is not a registered shift; choose one of {listed_shifts()}"
        if SHIFTS[name].switch is not None:
            return f"{prefix}shifts names {name!r}, which {prefix}{SHIFTS[name].switch} switches on; set that instead"
    if len(set(listed)) != len(listed):
        return f"{prefix}shifts={listed!r} has duplicates"
    for name, args in given.items():
        if name not in listed:
            return f"{prefix}shift_args[{name!r}] is given but {prefix}shifts={listed!r} does not name it"
        if not isinstance(args, dict):
            return f"{prefix}shift_args[{name!r}] must be a mapping of options"
        if unknown := sorted(set(args) - set(SHIFTS[name].arguments)):
            return (f"{prefix}shift_args[{name!r}] has unknown option(s) {unknown}; {name!r} takes "
                    f"{sorted(SHIFTS[name].arguments)}")
    return next((p for cls in SHIFTS.values() if (p := cls().problem(values, prefix=prefix))), "")


def shifts_on(values: dict) -> list[Shift]:
    """The registered shifts ``values`` switch on, in registration order (the order they are applied in)."""
    return [shift for shift in (cls() for cls in SHIFTS.values()) if shift.is_on(values)]


def client_shifts(num_clients: int, values: dict, *, num_classes: int, seed: int) -> list[dict]:
    """Every client's spec: the specs of the shifts switched on, merged in registration order.

    Raises:
        FederationError: a shift cannot be assigned (e.g. more permuted classes than classes), named by value.
    """
    out: list[dict] = [{} for _ in range(num_clients)]
    for shift in shifts_on(values):
        if missing := [o for o in shift.options if o not in values]:
            raise FederationError(f"shift {shift.name!r} reads data.{missing[0]}, which federate does not take")
        try:
            specs = shift.assign(num_clients, values, num_classes=num_classes, seed=seed)
        except FederationError:
            raise
        except ValueError as err:
            raise FederationError(str(err)) from err
        for spec, own in zip(out, specs, strict=True):
            spec.update(own)
    return out


def recorded_shifts(values: dict) -> dict:
    """What the manifest's ``params`` record of the shifts switched on: each one's :meth:`Shift.recorded`, then
    the names ``data.shifts`` switched on and the arguments of those that take any."""
    params, listed = {}, []
    for shift in shifts_on(values):
        params.update(shift.recorded(values))
        listed += [shift] if shift.switch is None else []
    if listed:
        params["shifts"] = [s.name for s in listed]
        if args := {s.name: s.args(values) for s in listed if s.args(values)}:
            params["shift_args"] = args
    return params


def owners(spec: dict) -> list[Shift]:
    """The registered shifts a client's spec names (by the keys they write), in registration order."""
    found = [cls() for cls in SHIFTS.values() if any(k in spec for k in cls.spec_keys)]
    if unknown := sorted(set(spec) - {k for shift in found for k in shift.spec_keys}):
        raise FederationError(f"client shift {sorted(spec)} has key(s) {unknown} that no registered shift writes "
                              f"(registered: {list(SHIFTS)}); register the shift that wrote it")
    return found


def shifted_labels(labels: np.ndarray, rows: Sequence[int], spec: dict, *, seed: int) -> np.ndarray:
    """The labels of ``rows`` as a client with ``spec`` sees them (its label shifts applied; manifest histograms)."""
    y = labels[list(rows)]
    for shift in (s for s in owners(spec) if s.column == "label"):
        y = np.asarray([shift.transform(v, spec, seed=example_seed(seed, r)) for v, r in zip(y, rows)], dtype=np.int64)
    return y


def shift_dataset(ds, shifts: dict[int, dict], *, image_column: str, label_column: str, seed: int):
    """Apply per-row shifts to a ``datasets.Dataset`` (a ``map`` with indices); rows not listed pass through.

    Args:
        shifts: row index -> its client's spec, e.g. ``{"corruption": name, "severity": s, "label_map": [...]}``;
            each registered shift whose keys it holds transforms its column, in registration order.
    """
    import datasets

    found = {id(s): owners(s) for s in shifts.values()}  # a client's rows share its spec
    changed = {shift.name: shift.column for specs in found.values() for shift in specs}
    if "image" in changed.values() and not isinstance(ds.features[image_column], datasets.Image):
        on_images = sorted(n for n, c in changed.items() if c == "image")
        raise ValueError(f"image_column={image_column!r} is a {type(ds.features[image_column]).__name__} "
                         f"column, not an Image column; the shift(s) {on_images} change images")
    names = {"image": image_column, "label": label_column}
    columns = [names[c] for c in ("image", "label") if c in changed.values()]

    def fn(batch, rows):
        out = {c: list(batch[c]) for c in columns}
        for j, row in enumerate(rows):
            if spec := shifts.get(row):
                row_seed = example_seed(seed, row)
                for shift in found[id(spec)]:
                    out[names[shift.column]][j] = shift.transform(out[names[shift.column]][j], spec, seed=row_seed)
        return out

    return ds.map(fn, with_indices=True, batched=True, batch_size=256, input_columns=None,
                  desc="apply client shifts", load_from_cache_file=False) if shifts else ds


# -- the built-in shifts ------------------------------------------------------------------------------------------
@register_shift
class Corruption(Shift):
    name = "corruption"
    description = ("input-level covariate shift: client i gets the i-th (CIFAR-10-C family, severity) pair of "
                   "corruption_schedule over corruption_families x corruption_severities")
    column = "image"
    spec_keys = ("corruption", "severity")
    options = ("corruption", "corruption_families", "corruption_severities")
    switch, off = "corruption", "none"

    def problem(self, values, *, prefix=""):
        mode, families, severities = (values[o] for o in self.options)
        if mode not in CORRUPTION_MODES:
            return f"{prefix}corruption={mode!r} is not allowed; choose one of {list(CORRUPTION_MODES)}"
        if families is not None and len(families) == 0:
            return f"{prefix}corruption_families is empty; give at least one family or leave it unset"
        if severities == [] or any(s not in SEVERITIES for s in severities or []):
            return (f"{prefix}corruption_severities={severities!r} must be a non-empty list of values in "
                    f"{SEVERITIES[0]}..{SEVERITIES[-1]}")
        return ""

    def assign(self, num_clients, values, *, num_classes, seed):
        pairs = corruption_schedule(num_clients, families=tuple(values["corruption_families"] or CORRUPTIONS),
                                    severities=tuple(values["corruption_severities"] or SEVERITIES))
        return [{"corruption": family, "severity": severity} for family, severity in pairs]

    def recorded(self, values):
        return {"corruption": values["corruption"],
                "corruption_families": list(values["corruption_families"] or []) or None,
                "corruption_severities": list(values["corruption_severities"] or []) or None}

    def transform(self, value, spec, *, seed):
        from PIL import Image

        return Image.fromarray(corrupt(value, spec["corruption"], spec["severity"], seed=seed))


@register_shift
class LabelPermutation(Shift):
    name = "label_permutation"
    description = "concept shift: a seeded per-client cycle of label_permutation classes (label_map)"
    column = "label"
    spec_keys = ("label_map",)
    options = ("label_permutation",)
    switch, off = "label_permutation", 0

    def problem(self, values, *, prefix=""):
        k = values["label_permutation"]
        return "" if k == 0 or k >= 2 else f"{prefix}label_permutation={k!r} must be 0 (off) or >= 2 classes"

    def assign(self, num_clients, values, *, num_classes, seed):
        k = values["label_permutation"]
        if k > num_classes:
            raise FederationError(f"label_permutation={k} exceeds the {num_classes} classes")
        return [{"label_map": label_permutation(num_classes, k, seed=example_seed(seed, i))}
                for i in range(num_clients)]

    def recorded(self, values):
        return {"label_permutation": values["label_permutation"]}

    def transform(self, value, spec, *, seed):
        return spec["label_map"][int(value)]
