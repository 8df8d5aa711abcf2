"""Labelled image grids (validation during training, comparison grids when sampling)."""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

_LABEL_HEIGHT = 14


def image_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str] = (), col_labels: Sequence[str] = ()) -> Image.Image:
    """Rows of equally sized images into one picture; each row (and the column header) is labelled
    with a text band when labels are given."""
    if not rows or not rows[0]:
        raise ValueError("image_grid needs at least one image")
    width, height = rows[0][0].size
    columns = max(len(row) for row in rows)
    band = _LABEL_HEIGHT if row_labels else 0
    header = _LABEL_HEIGHT if col_labels else 0
    grid = Image.new("RGB", (columns * width, header + len(rows) * (band + height)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for col, label in enumerate(col_labels):
        draw.text((col * width + 2, 1), label, fill="black", font=font)
    for r, row in enumerate(rows):
        top = header + r * (band + height)
        if row_labels:
            draw.text((2, top + 1), row_labels[r], fill="black", font=font)
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((width, height)), (c * width, top + band))
    return grid
