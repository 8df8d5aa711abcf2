"""Image and caption transforms (PIL + numpy + torch); all randomness comes from a passed generator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from ds_diffusers.data.decode import to_rgb8
from ds_diffusers.errors import ConfigError


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Bilinear resize so the shorter side is `size`, like torchvision `Resize(size)` on PIL images."""
    return resize_to_cover(image, size, size)


def resize_to_cover(image: Image.Image, height: int, width: int) -> Image.Image:
    """Bilinear resize, keeping the aspect ratio, to the smallest size that covers height×width: one side
    fits exactly and the other overhangs by what the aspect ratios differ. For a square target this is
    `resize_shorter_side` (torchvision's rounding of the long side)."""
    image_width, image_height = image.size
    if image_width * height <= image_height * width:  # relatively taller: the width fits
        new_width, new_height = width, max(height, int(width * image_height / image_width))
    else:
        new_width, new_height = max(width, int(height * image_width / image_height)), height
    return image.resize((new_width, new_height), Image.Resampling.BILINEAR)


def crop_offsets(width: int, height: int, crop_height: int, crop_width: int, center_crop: bool,
                 generator: torch.Generator) -> tuple[int, int]:
    """(top, left) of a crop_height×crop_width window: the centre (torchvision's rounding) or uniform."""
    if center_crop:
        return int(round((height - crop_height) / 2.0)), int(round((width - crop_width) / 2.0))
    top = int(torch.randint(0, height - crop_height + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - crop_width + 1, (1,), generator=generator))
    return top, left


def to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 HWC RGB -> float32 [3,H,W] in [-1, 1] (ToTensor then Normalize([0.5], [0.5]))."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return (pixels.permute(2, 0, 1) / 127.5 - 1.0).contiguous()


def preprocess_image(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
                     generator: torch.Generator) -> torch.Tensor:
    """8-bit RGB, resize shorter side, crop to resolution², maybe flip, normalise: FloatTensor [3,R,R]."""
    return preprocess_image_with_crop(image, resolution, center_crop, random_flip, generator)[0]


@dataclass(frozen=True)
class CropRecord:
    """Where a training image came from, as SDXL is conditioned on it (its `add_time_ids`)."""

    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # in the resized image as shown (mirrored when flipped)
    resized_width: int
    crop_width: int

    def mirrored(self) -> "CropRecord":
        top, left = self.crop_top_left
        return replace(self, crop_top_left=(top, self.resized_width - left - self.crop_width))


def preprocess_image_with_crop(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
                               generator: torch.Generator) -> tuple[torch.Tensor, CropRecord]:
    """`preprocess_image`, plus the record of the original size and the crop window."""
    return preprocess_image_to_size(image, (resolution, resolution), center_crop, random_flip, generator)


def preprocess_image_to_size(image: Image.Image, size: tuple[int, int], center_crop: bool, random_flip: bool,
                             generator: torch.Generator) -> tuple[torch.Tensor, CropRecord]:
    """8-bit RGB, resize to cover `size` (height, width), crop to it, maybe flip, normalise:
    FloatTensor [3,H,W] and the record of the original size and the crop window."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    height, width = size
    original_size = (image.height, image.width)
    image = resize_to_cover(to_rgb8(image), height, width)
    top, left = crop_offsets(image.width, image.height, height, width, center_crop, generator)
    record = CropRecord(original_size, (top, left), image.width, width)
    image = image.crop((left, top, left + width, top + height))
    if random_flip and float(torch.rand(1, generator=generator)) < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        record = record.mirrored()
    return to_normalized_tensor(image), record


# The unconditional prompt: what caption dropout trains on and what classifier-free guidance (and
# the pipelines' default negative prompt) encodes.
EMPTY_PROMPT = ""


def choose_caption(captions: str | Sequence[str], generator: torch.Generator, row: int | None = None) -> str:
    """A plain string as is; one caption drawn uniformly from a list (several captions per image)."""
    if isinstance(captions, str):
        return captions
    where = "a row" if row is None else f"row {row}"
    if not isinstance(captions, Sequence) or not all(isinstance(caption, str) for caption in captions):
        raise ConfigError("caption_column", captions,
                          f"{where} holds {type(captions).__name__}, not a caption; captions must be strings or lists of strings")
    if len(captions) == 0:
        raise ConfigError("caption_column", captions,
                          f"{where} has an empty caption list; give every image at least one caption or drop the row")
    return captions[int(torch.randint(0, len(captions), (1,), generator=generator))]
