"""Reading training images: file existence checked up front, decode errors named by file and row,
16-bit images scaled (not clipped) to 8 bits, and JPEGs decoded at reduced size when they are much
larger than the training resolution.

The dataset's image column is read undecoded (`{"bytes", "path"}`) so that a failure knows which
file it was; `datasets` would otherwise decode inside its row access and name nothing.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any, Optional

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from PIL import Image

from ds_diffusers.errors import ConfigError

# A JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, Image.draft) only while its
# shorter side stays at least this many times the training resolution, so the bilinear resize that
# follows still averages several source pixels per output pixel.
DRAFT_MARGIN = 2
# What PIL raises for unreadable image data: truncated or corrupt files (OSError), unknown formats
# (UnidentifiedImageError is an OSError), broken headers (SyntaxError, ValueError), absurd sizes.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# Rows whose paths check_image_files holds at a time.
CHECK_ROWS = 8192


def undecoded(dataset: datasets.Dataset, image_column: str) -> datasets.Dataset:
    """The same rows with the image column as `{"bytes", "path"}` records (already-decoded PIL
    columns of other feature types are left as they are)."""
    if isinstance(dataset.features[image_column], datasets.Image):
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def _bad_image_error(image_column: str, row: int, where: str, reason: str) -> ConfigError:
    return ConfigError(f"{image_column}[row {row}]", where, f"{reason}; replace or remove that image, or set "
                       "skip_bad_images: true to skip unreadable images (they are counted and reported)")


def check_image_files(dataset: datasets.Dataset, image_column: str, skip_bad_images: bool) -> list[int]:
    """Rows whose image is neither stored in the dataset nor an existing file (e.g. a metadata.jsonl
    naming a missing file). Raises on the first unless `skip_bad_images`; one stat per file.

    Reads each row's path and whether it has bytes, `CHECK_ROWS` rows at a time, from the dataset's
    (memory-mapped) Arrow table: the embedded image bytes are never copied, so a 100 GB dataset of
    embedded images costs this check its paths, not its images."""
    if not isinstance(dataset.features[image_column], datasets.Image):
        return []
    images = dataset.data.column(image_column)
    # Child views of the struct (no copy of the bytes buffer) and a validity bitmap.
    stored, paths = pc.is_valid(pc.struct_field(images, "bytes")), pc.struct_field(images, "path")
    indices = dataset._indices.column(0) if dataset._indices is not None else None  # a select/shuffle's row mapping
    missing, first_path = [], None
    for start in range(0, len(dataset), CHECK_ROWS):
        if indices is None:
            chunk_stored, chunk_paths = stored.slice(start, CHECK_ROWS), paths.slice(start, CHECK_ROWS)
        else:
            rows = indices.slice(start, CHECK_ROWS)
            chunk_stored, chunk_paths = stored.take(rows), paths.take(rows)
        for offset, (has_bytes, path) in enumerate(zip(chunk_stored.to_pylist(), chunk_paths.to_pylist())):
            if not has_bytes and not (path and os.path.isfile(path)):
                if not missing:
                    first_path = path
                missing.append(start + offset)
    if missing and not skip_bad_images:
        more = f" ({len(missing)} rows in all)" if len(missing) > 1 else ""
        raise _bad_image_error(image_column, missing[0], first_path or "(no path, no bytes)", f"no such file{more}")
    return missing


def to_rgb8(image: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel. 16-bit greyscale (mode I;16*, or I holding 16-bit values) is
    scaled by 255/65535; PIL's own convert would clip every value above 255 to white."""
    if image.mode.startswith("I;16") or (image.mode in ("I", "F") and image.getextrema()[1] > 255):
        pixels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(pixels * (255.0 / 65535.0)), 0, 255).astype(np.uint8), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


def open_image(value: Any, *, row: int, image_column: str, resolution: Optional[int] = None) -> Image.Image:
    """A decoded 8-bit RGB image from a `{"bytes", "path"}` record (or a PIL image); ConfigError
    naming the row and the file when it cannot be decoded."""
    if isinstance(value, Image.Image):
        return to_rgb8(value)
    if not isinstance(value, dict) or (value.get("bytes") is None and not value.get("path")):
        raise _bad_image_error(image_column, row, repr(value)[:80], "holds no image")
    path = value.get("path")
    where = path or f"(image bytes of row {row})"
    try:
        image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") is not None else path)
        if resolution is not None and image.format == "JPEG":
            scale = min(image.size) // (DRAFT_MARGIN * resolution)
            if scale >= 2:
                image.draft(None, (image.width // scale, image.height // scale))
        image.load()  # decode now, so a truncated file fails here and not inside a transform
    except FileNotFoundError:
        raise _bad_image_error(image_column, row, where, "no such file") from None
    except _DECODE_ERRORS as err:
        raise _bad_image_error(image_column, row, where, f"cannot decode the image ({err})") from None
    return to_rgb8(image)


class BadImageLog:
    """Which rows turned out unreadable, shared with DataLoader workers (shared memory, as the
    dataset's epoch), so the main process can report them; each row is announced once."""

    def __init__(self, num_rows: int, known_bad: list[int]) -> None:
        self.flags = torch.zeros(num_rows, dtype=torch.bool).share_memory_()
        if known_bad:
            self.flags[torch.tensor(known_bad)] = True

    def record(self, row: int, error: ConfigError) -> None:
        if not bool(self.flags[row]):
            self.flags[row] = True
            reason = error.fix.split(";")[0]
            print(f"ds-diffusers: skipping {error.field}={error.value!r}: {reason} (skip_bad_images)", file=sys.stderr, flush=True)

    def rows(self) -> list[int]:
        return self.flags.nonzero().flatten().tolist()


def first_readable(rows: datasets.Dataset, image_column: str, index: int, resolution: int,
                   bad_log: Optional[BadImageLog]) -> tuple[int, dict[str, Any], Image.Image]:
    """(row, its record, its decoded image) for row `index`; with a `bad_log` (skip_bad_images) an unreadable row is recorded
    and the next readable row (wrapping around) takes its place, so batches keep their size and a
    resumed run sees the same substitutes."""
    for offset in range(len(rows)):
        row = (index + offset) % len(rows)
        if bad_log is not None and bool(bad_log.flags[row]):
            continue
        record = rows[row]
        try:
            return row, record, open_image(record[image_column], row=row, image_column=image_column, resolution=resolution)
        except ConfigError as err:
            if bad_log is None:
                raise
            bad_log.record(row, err)
    raise ConfigError("dataset_dir", len(rows), "no image of the dataset can be read; check the files")
