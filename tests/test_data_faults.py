"""Image faults: missing and truncated files named by row and file (also through DataLoader workers),
skip_bad_images, 16-bit PNGs scaled rather than clipped, JPEGs decoded at reduced size."""

from __future__ import annotations

import json
import os

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from ds_diffusers.data import (build_train_dataloader, check_image_files, load_train_dataset, open_image, preprocess_image,
                               select_train_samples)
from ds_diffusers.data.dataset import CaptionedImageDataset
from ds_diffusers.errors import ConfigError
from tests.helpers import COLOURS, launch, rank_output, run_cfg


def imagefolder(tmp_path, truncate_row=None, missing_row=None, rows=6):
    folder = tmp_path / "images"
    folder.mkdir()
    names = []
    for row in range(rows):
        name = f"{row}.png"
        if row != missing_row:
            Image.new("RGB", (20, 16), COLOURS[row % len(COLOURS)]).save(folder / name)
        if row == truncate_row:
            data = (folder / name).read_bytes()
            (folder / name).write_bytes(data[: len(data) // 2])
        names.append(name)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": f"colour {i}"}) + "\n" for i, n in enumerate(names)))
    return folder, load_train_dataset(str(folder), imagefolder=True, cache_dir=str(tmp_path / "cache"))


def make_dataset(hf_dataset, tokenizer, **kwargs):
    return CaptionedImageDataset(hf_dataset, "image", "text", tokenizer, 16, True, False, seed=0, **kwargs)


def test_missing_file_is_found_up_front_naming_row_and_file(tmp_path):
    folder, hf_dataset = imagefolder(tmp_path, missing_row=3)
    with pytest.raises(ConfigError) as info:
        check_image_files(hf_dataset, "image", skip_bad_images=False)
    assert info.value.field == "image[row 3]" and info.value.value == str(folder / "3.png")
    assert "no such file" in info.value.fix and "skip_bad_images" in info.value.fix and "\n" not in str(info.value)
    assert check_image_files(hf_dataset, "image", skip_bad_images=True) == [3]


def test_file_check_reads_paths_not_the_embedded_image_bytes(tmp_path):
    """A save_to_disk dataset of embedded images (memory-mapped, four Arrow files) plus two rows naming
    missing files, shuffled and subsampled as max_train_samples does: the check finds those rows by
    their new numbers while Arrow allocates a small fraction of the bytes column (it used to copy all
    of it, on every rank)."""
    image_bytes, rows = 256 * 1024, 64
    blob = os.urandom(image_bytes)
    records = [{"bytes": None, "path": str(tmp_path / f"gone-{row}.png")} if row in (5, 40) else
               {"bytes": blob, "path": f"{row}.png"} for row in range(rows)]
    # Saved as plain records and typed after loading: save_to_disk stats every image path it sizes.
    record = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    features = datasets.Features({"image": record, "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": records, "text": ["a"] * rows}, features=features).save_to_disk(
        str(tmp_path / "saved"), num_shards=4)
    loaded = load_train_dataset(str(tmp_path / "saved"), imagefolder=False).cast_column("image", datasets.Image())
    hf_dataset = select_train_samples(loaded, 48, seed=3)
    expected = [row for row, path in enumerate(hf_dataset.data.column("image").take(hf_dataset._indices.column(0))
                                                .combine_chunks().field("path").to_pylist()) if "gone" in path]
    assert expected, "the subsample must keep at least one missing row for this test to mean anything"
    meter = pa.proxy_memory_pool(pa.default_memory_pool())
    default = pa.default_memory_pool()
    pa.set_memory_pool(meter)
    try:
        found = check_image_files(hf_dataset, "image", skip_bad_images=True)
        with pytest.raises(ConfigError) as info:
            check_image_files(hf_dataset, "image", skip_bad_images=False)
    finally:
        pa.set_memory_pool(default)
    assert found == expected
    assert info.value.field == f"image[row {expected[0]}]" and info.value.value.endswith(".png") and "gone" in info.value.value
    if len(expected) > 1:
        assert f"({len(expected)} rows in all)" in info.value.fix
    assert meter.max_memory() < image_bytes, f"{meter.max_memory()} bytes allocated for {rows * image_bytes} bytes of images"


@pytest.mark.multiprocess
def test_missing_file_stops_both_ranks_with_one_message_and_creates_nothing(tmp_path, tiny_assets):
    """Rank 0 checks the files (the other rank waits); its refusal reaches rank 1, so both print the
    same line and the job exits 2, with no folder created and no rank left waiting."""
    folder, _ = imagefolder(tmp_path, missing_row=3)
    result = launch([*run_cfg(tiny_assets, tmp_path / "run"), f"dataset_dir={folder}", "imagefolder=true", "max_train_steps=1",
                     "train_micro_batch_size_per_gpu=2"],
                    procs=2, timeout=300, rank_logs=tmp_path / "ranks")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    expected = f"ds-diffusers: config error: image[row 3]='{folder / '3.png'}': no such file"
    for rank in (0, 1):
        lines = [line for line in rank_output(tmp_path / "ranks", rank).splitlines() if line.startswith("ds-diffusers: config")]
        assert len(lines) == 1 and lines[0].startswith(expected), (rank, lines)
    assert not (tmp_path / "run").exists()


def test_truncated_png_names_row_and_file_in_the_main_process_and_from_workers(tmp_path, tokenizer):
    folder, hf_dataset = imagefolder(tmp_path, truncate_row=1)
    assert check_image_files(hf_dataset, "image", skip_bad_images=False) == []  # it exists; decoding finds it
    with pytest.raises(ConfigError) as info:
        make_dataset(hf_dataset, tokenizer)[1]
    assert info.value.field == "image[row 1]" and info.value.value == str(folder / "1.png") and "truncated" in info.value.fix
    loader, sampler, _ = build_train_dataloader(hf_dataset, "image", "text", tokenizer, resolution=16, center_crop=True,
                                                random_flip=False, seed=0, micro_batch_size=6, num_workers=1, rank=0, world_size=1)
    with pytest.raises(ConfigError) as info:  # DataLoader re-raises a worker's error from its traceback text
        next(iter(loader))
    assert str(info.value).startswith(f"image[row 1]='{folder / '1.png'}': cannot decode the image")
    assert "\n" not in str(info.value)


def test_skip_bad_images_replaces_the_row_and_reports_it_once(tmp_path, tokenizer, capsys):
    folder, hf_dataset = imagefolder(tmp_path, truncate_row=1, missing_row=4)
    known = check_image_files(hf_dataset, "image", skip_bad_images=True)
    dataset = make_dataset(hf_dataset, tokenizer, skip_bad_images=True, known_bad_rows=known)
    replaced = dataset[1]
    assert torch.equal(replaced["pixel_values"], dataset[2]["pixel_values"])  # the next readable row stands in
    assert tokenizer.decode(replaced["input_ids"], skip_special_tokens=True).replace(" ", "") == "colour2"
    assert torch.equal(dataset[4]["pixel_values"], dataset[5]["pixel_values"])
    dataset[1]
    assert capsys.readouterr().err.count("skipping image[row 1]") == 1
    assert dataset.bad_rows() == [1, 4]


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    levels = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(levels).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")  # PIL keeps 16 bits: this is the case that used to clip
    image = open_image({"path": str(tmp_path / "deep.png"), "bytes": None}, row=0, image_column="image")
    pixels = np.asarray(image)
    assert image.mode == "RGB" and np.abs(pixels[..., 0].astype(float) - levels / 257.0).max() <= 0.5
    assert (pixels == 255).mean() < 0.01  # it was 98 % white before
    tensor = preprocess_image(Image.open(tmp_path / "deep.png"), 64, True, False, torch.Generator())
    assert -1.0 <= tensor.min() < -0.95 and 0.95 < tensor.max() <= 1.0 and abs(float(tensor.mean())) < 0.02


def test_large_jpeg_is_decoded_at_reduced_size_and_stays_close(tmp_path):
    height, width = 768, 1024
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=95)
    record = {"path": str(tmp_path / "big.jpg"), "bytes": None}
    drafted = open_image(record, row=0, image_column="image", resolution=128)
    assert drafted.size == (512, 384)  # libjpeg's 1/2 scale: the shorter side stays >= 2 x 128
    assert open_image(record, row=0, image_column="image", resolution=512).size == (width, height)  # not far enough below
    full = preprocess_image(Image.open(tmp_path / "big.jpg"), 128, True, False, torch.Generator())
    fast = preprocess_image(drafted, 128, True, False, torch.Generator())
    assert fast.shape == full.shape == (3, 128, 128)
    assert float((fast - full).abs().mean()) < 0.01  # under 1.3 grey levels of 255 on average
