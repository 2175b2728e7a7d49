"""Reading stored images, below every other data module (federate, load and stats all decode images): a file
or row that is not a readable image is a :class:`FederationError` (``hf_lpft.data.schemes``) naming it."""

from __future__ import annotations

import datasets

from hf_lpft.data.schemes import FederationError  # noqa: F401 - defined with the schemes (above config)


def decode_image(feature: datasets.Image, stored: dict, *, row: int, column: str):
    """One stored image (``{"path", "bytes"}``) as a loaded PIL image; a file or row that is not a readable image
    (not an image, truncated, missing) is a FederationError naming it, not a PIL traceback."""
    from PIL import Image

    image = None
    try:
        image = feature.decode_example(stored)
        image.load()
        return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        _close_images(err, image)  # PIL keeps a file it failed to read open (a ResourceWarning otherwise)
        path = stored.get("path")
        reason = "not an image format PIL knows" if isinstance(err, Image.UnidentifiedImageError) else \
            f"{type(err).__name__}: {err}"
        if stored.get("bytes") is None and path:
            where, fix = f"the image file {path!r}", "replace or remove the file"
        else:
            where = f"the image in row {row} of column {column!r}" + (f" (stored from {path!r})" if path else "")
            fix = "drop or replace that row (Dataset.filter) and save the dataset again"
        raise FederationError(f"{where} cannot be read as an image ({reason}); {fix}") from None


def _close_images(err: BaseException, image) -> None:
    """Close the PIL images a failed decode left open: ours, and the one ``decode_example`` opened before it
    raised (found in its traceback's frames; PIL closes a file it opened itself only once loading succeeds)."""
    from PIL import Image

    found, tb = [image] if image is not None else [], err.__traceback__
    while tb is not None:
        found += [v for v in tb.tb_frame.f_locals.values() if isinstance(v, Image.Image)]
        tb = tb.tb_next
    for im in found:
        im.close()
