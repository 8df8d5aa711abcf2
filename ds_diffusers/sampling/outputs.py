"""What a sampling run leaves on disk: one PNG per image (written by the rank that drew it), then on
rank 0 the comparison grid (rows prompts, columns weight x image, read back from the PNG files) and
`manifest.json` with every setting and file."""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ds_diffusers.images import image_grid
from ds_diffusers.sampling.plan import SamplePlan
from ds_diffusers.sampling.weights import WeightSource


@dataclass(frozen=True)
class ImageRecord:
    weight: str
    prompt_index: int
    image_index: int
    prompt: str
    file: str  # relative to the sample output_dir (the manifest's folder)
    sha256: str
    rank: int  # the process that drew and wrote it


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # PIL writes no time stamp: same pixels, same bytes
    return buffer.getvalue()


def _write_atomically(path: Path, data: bytes) -> None:
    """A reader (rank 0 building the grid, a user) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_bytes(data)
    os.replace(partial, path)


def write_image(image: Image.Image, plan: SamplePlan, weight: str, prompt_index: int, image_index: int,
                rank: int) -> ImageRecord:
    """Called by the rank that drew the image, and only by it."""
    path = plan.image_path(weight, prompt_index, image_index)
    data = _png_bytes(image)
    _write_atomically(path, data)
    return ImageRecord(weight=weight, prompt_index=prompt_index, image_index=image_index, prompt=plan.prompts[prompt_index],
                       file=path.relative_to(plan.output_dir).as_posix(), sha256=hashlib.sha256(data).hexdigest(), rank=rank)


def gather_records(records: list[ImageRecord]) -> list[ImageRecord]:
    """All ranks must call this. Returns every rank's records on every rank."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        per_rank: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(per_rank, [asdict(record) for record in records])
        records = [ImageRecord(**fields) for rank_records in per_rank for fields in rank_records]
    return records


def check_complete(records: list[ImageRecord], plan: SamplePlan) -> None:
    """Every planned image exactly once: a sharding bug must not pass as a finished run."""
    keys = [(record.weight, record.prompt_index, record.image_index) for record in records]
    expected = {(weight, p, i) for weight in plan.weights for p in range(len(plan.prompts))
                for i in range(plan.num_images_per_prompt)}
    if len(keys) != len(set(keys)) or set(keys) != expected:
        duplicated = sorted({key for key in keys if keys.count(key) > 1})
        missing = sorted(expected - set(keys))
        raise RuntimeError(f"sampling produced a wrong image set: duplicated {duplicated[:5]}, missing {missing[:5]}")


def write_grid(records: list[ImageRecord], plan: SamplePlan) -> Path:
    """Rank 0 only, after every rank has written its PNGs (a barrier)."""
    by_key = {(record.weight, record.prompt_index, record.image_index): record.file for record in records}
    columns = [(weight, index) for weight in plan.weights for index in range(plan.num_images_per_prompt)]
    rows = []
    for prompt_index in range(len(plan.prompts)):
        row = []
        for weight, image_index in columns:
            with Image.open(Path(plan.output_dir) / by_key[(weight, prompt_index, image_index)]) as image:
                row.append(image.convert("RGB"))
        rows.append(row)
    col_labels = [weight if plan.num_images_per_prompt == 1 else f"{weight} {index}" for weight, index in columns]
    grid = image_grid(rows, row_labels=list(plan.prompts), col_labels=col_labels)
    _write_atomically(plan.grid_path, _png_bytes(grid))
    return plan.grid_path


def write_manifest(plan: SamplePlan, sources: list[WeightSource], records: list[ImageRecord], run: dict[str, Any]) -> Path:
    """Rank 0 only. `run` holds what is not a setting (cfg path, overrides, device, dtype, versions, time).
    File names in it are relative to the manifest's folder."""
    order = {weight: index for index, weight in enumerate(plan.weights)}
    ordered = sorted(records, key=lambda record: (order[record.weight], record.prompt_index, record.image_index))
    manifest = {
        **run,
        "settings": plan.to_dict(),
        "weights": [asdict(source) for source in sources],
        "seed_of_image": "torch CPU generator seeded from (settings.seed, prompt_index, image_index) "
                         "by ds_diffusers.data.seeding.seeded_generator",
        "grid": plan.grid_path.name,
        "images": [asdict(record) for record in ordered],
    }
    _write_atomically(plan.manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    return plan.manifest_path
