"""Aspect-ratio buckets through DeepSpeed's launcher: two processes under ZeRO-2 train the
SDXL-shaped test model on a mixed-aspect imagefolder, across an epoch boundary, and a run stopped
half-way and resumed gives the straight run's losses (the schedule is a function of seed and epoch).
The stopped and resumed halves train from the latent cache (each bucket's latents at its own shape,
built ahead by `python -m ds_diffusers.cache` on both ranks), which must not change a loss either."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import RESUME_COMMON, assert_ok, launch, launch_module, losses

pytestmark = pytest.mark.multiprocess

# (count, width, height): 2:1, 1:2, square, and two 3:1 images, too few for a global batch of 4.
MIXED_ASPECTS = ((6, 200, 100), (4, 100, 200), (4, 150, 150), (2, 300, 100))


def mixed_aspect_imagefolder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    lines, row = [], 0
    for count, width, height in MIXED_ASPECTS:
        for _ in range(count):
            colour = (row * 37 % 256, row * 91 % 256, 255 - row * 11 % 256)
            image = Image.new("RGB", (width, height), colour)
            image.paste((255 - colour[0], 40, 90), (width // 4, height // 4, width // 2, height // 2))
            image.save(folder / f"{row:03d}.png")
            lines.append(json.dumps({"file_name": f"{row:03d}.png", "text": f"shape {row} {width}x{height}"}))
            row += 1
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def bucket_cfg(model_dir: Path, dataset_dir: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [f"pretrained_model_name_or_path={model_dir}", f"dataset_dir={dataset_dir}", "imagefolder=true",
            f"output_dir={run_dir / 'model'}", f"checkpoint_dir={run_dir / 'checkpoints'}", f"cache_dir={run_dir / 'cache'}",
            "resolution=128", "aspect_ratio_buckets=true", "bucket_step=32", "train_micro_batch_size_per_gpu=2",
            "random_flip=true", "center_crop=true", "zero_optimization.stage=2", "validation_steps=0", "log_every_n_steps=1",
            "optimizer.params.lr=0.001", *RESUME_COMMON, *overrides]


def test_mixed_aspect_buckets_train_and_resume_exactly(sdxl_model, tmp_path):
    dataset = mixed_aspect_imagefolder(tmp_path / "images")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # 4 global batches an epoch (192x96: 6 + the 2 merged 3:1 images; 96x192: 4; 128x128: 4; 4 per batch):
    # 6 steps cross into the second epoch, and so does the resumed half (steps 4 to 6).
    result = launch(bucket_cfg(sdxl_model, dataset, straight, "max_train_steps=6"), procs=2)
    assert_ok(result)
    output = result.stdout + result.stderr
    assert "buckets: 16 images in 3 bucket(s)" in output and "192x96: 8" in output and "128x128: 4" in output
    assert "96x192: 4" in output and "(2) into 192x96" in output
    # The cache command builds the bucketed latent cache ahead (both ranks); both halves reuse it.
    built = launch_module("ds_diffusers.cache", ["--cfg", "cfg/default.json", "--set",
                                                 *bucket_cfg(sdxl_model, dataset, resumed, "cache_latents=true")], procs=2)
    assert_ok(built)
    assert "latents cache: encoded 3 of 3 bucket(s)" in built.stdout + built.stderr
    assert not (resumed / "model").exists() and not (resumed / "checkpoints").exists()
    result = launch(bucket_cfg(sdxl_model, dataset, resumed, "max_train_steps=3", "cache_latents=true"), procs=2)
    assert_ok(result)
    assert "latents cache: reusing 3 bucket(s)" in result.stdout + result.stderr
    result = launch(bucket_cfg(sdxl_model, dataset, resumed, "max_train_steps=6", "resume_from_checkpoint=latest",
                               "cache_latents=true"), procs=2)
    assert_ok(result)
    assert "latents cache: reusing 3 bucket(s)" in result.stdout + result.stderr
    assert f"resumed from {resumed / 'checkpoints' / 'step_3'}" in result.stdout + result.stderr
    epochs = [json.loads(line)["epoch"] for line in (straight / "model" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0] * 4 + [1] * 2
    assert len(losses(straight / "model")) == 6 and len(losses(resumed / "model")) == 6
    assert losses(straight / "model") == pytest.approx(losses(resumed / "model"), abs=1e-6)
