"""Reading stored images, below every other data module (federate, load and stats all decode images): a file
or row that is not a readable image is a :class:`FederationError` (``hf_lpft.errors``) naming it."""

from __future__ import annotations

import datasets

from hf_lpft.errors import FederationError  # noqa: F401 - data's error, defined in the bottom layer


def decode_image(feature: datasets.Image, stored: dict, *, row: int, column: str):
    """One stored image (``{"path", "bytes"}``) as a loaded PIL image; a file or row that is not a readable image
    (not an image, truncated, missing) is a FederationError naming it, not a PIL traceback."""
    from PIL import Image

    try:
        return feature.decode_example(_in_memory(stored))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        path = stored.get("path")
        reason = "not an image format PIL knows" if isinstance(err, Image.UnidentifiedImageError) else \
            f"{type(err).__name__}: {err}"
        if stored.get("bytes") is None and path:
            where, fix = f"the image file {path!r}", "replace or remove the file"
        else:
            where = f"the image in row {row} of column {column!r}" + (f" (stored from {path!r})" if path else "")
            fix = "drop or replace that row (Dataset.filter) and save the dataset again"
        raise FederationError(f"{where} cannot be read as an image ({reason}); {fix}") from None


def _in_memory(stored: dict) -> dict:
    """``stored`` with a local file's bytes read in: PIL then decodes from memory, so a file it fails to decode is
    never left open (given a path, PIL closes the file it opened only once loading succeeds). Remote paths and
    stored bytes are decoded from memory by ``datasets`` already."""
    path = stored.get("path")
    if stored.get("bytes") is not None or not path or "://" in path or "::" in path:
        return stored
    with open(path, "rb") as f:
        return {"path": path, "bytes": f.read()}
