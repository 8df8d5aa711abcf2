"""Score a generated shapes image: which colour and which shape does it show?

A hand-written classifier, not a network: the foreground is every pixel clearly off the white
background; its mean colour picks the nearest palette entry, and how much of its bounding box it
fills tells the shape (square ~1.0, circle pi/4 ~0.79, upward triangle ~0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ds_diffusers.embedded.shapes import PALETTE

# Distance from white (0-255 RGB, Euclidean) above which a pixel counts as foreground. Yellow,
# the palest colour, sits ~240 away, so anti-aliased edges and faint VAE haze stay background.
_FOREGROUND_DISTANCE = 90.0
_MIN_FOREGROUND_PIXELS = 20
_FILL_RATIO = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}


@dataclass(frozen=True)
class Verdict:
    color: str  # a palette name, or "none" when nothing stands out from the background
    shape: str  # a shape name, or "none"
    fill_ratio: float


def judge(image: Image.Image) -> Verdict:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    distance_from_white = np.linalg.norm(255.0 - pixels, axis=-1)
    foreground = distance_from_white > _FOREGROUND_DISTANCE
    if foreground.sum() < _MIN_FOREGROUND_PIXELS:
        return Verdict("none", "none", 0.0)

    mean_rgb = pixels[foreground].mean(axis=0)
    color = min(PALETTE, key=lambda name: float(np.linalg.norm(mean_rgb - np.array(PALETTE[name]))))

    # Bounding box from rows/columns holding at least two foreground pixels: a few stray pixels
    # must not inflate the box and turn a square into a "triangle".
    rows = np.nonzero(foreground.sum(axis=1) >= 2)[0]
    cols = np.nonzero(foreground.sum(axis=0) >= 2)[0]
    if len(rows) == 0 or len(cols) == 0:
        return Verdict(color, "none", 0.0)
    box_area = float((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1))
    fill_ratio = float(foreground.sum() / box_area)
    shape = min(_FILL_RATIO, key=lambda name: abs(_FILL_RATIO[name] - fill_ratio))
    return Verdict(color, shape, fill_ratio)
