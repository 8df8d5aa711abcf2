"""Data room: the three local layouts, column checks, transforms, sampling, and the DataLoader."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ds_diffusers.data import (
    ShardedEpochSampler,
    build_train_dataloader,
    check_dataset_size,
    choose_caption,
    load_train_dataset,
    num_batches_per_epoch,
    preprocess_image,
    resize_shorter_side,
    resolve_columns,
    seeded_generator,
)
from ds_diffusers.data.dataset import CaptionedImageDataset
from ds_diffusers.errors import ConfigError
from tests.helpers import COLOURS, RESOLUTION, captions_for, in_memory_dataset, solid_images

datasets.disable_progress_bars()


def gradient_image(width: int, height: int) -> Image.Image:
    """Red channel = column, green channel = row: a crop's top-left pixel tells its offset."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = np.arange(width)[None, :]
    pixels[..., 1] = np.arange(height)[:, None]
    return Image.fromarray(pixels)


def crop_offset(pixel_values: torch.Tensor) -> tuple[int, int]:
    """(top, left) read back from a gradient image's crop."""
    pixels = torch.round((pixel_values + 1.0) * 127.5)
    return int(pixels[1, 0, 0]), int(pixels[0, 0, 0])


# ---- loading: three layouts ----

@pytest.mark.parametrize("as_dict", [False, True])
def test_save_to_disk_folder_loads_train_split(tmp_path, as_dict):
    dataset = in_memory_dataset()
    if as_dict:
        datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(tmp_path / "saved")
    else:
        dataset.save_to_disk(tmp_path / "saved")
    loaded = load_train_dataset(str(tmp_path / "saved"), imagefolder=False)
    assert isinstance(loaded, datasets.Dataset) and loaded.column_names == ["image", "text"]
    assert len(loaded) == 6 and loaded[4]["text"] == captions_for(4)
    assert loaded[1]["image"].getpixel((0, 0)) == COLOURS[1]


def test_save_to_disk_dict_without_train_split_is_config_error(tmp_path):
    datasets.DatasetDict({"validation": in_memory_dataset()}).save_to_disk(tmp_path / "saved")
    with pytest.raises(ConfigError) as caught:
        load_train_dataset(str(tmp_path / "saved"), imagefolder=False)
    assert caught.value.field == "dataset_dir" and "validation" in caught.value.fix


def test_hub_parquet_folder_loads(tmp_path):
    folder = tmp_path / "hub"
    (folder / "data").mkdir(parents=True)
    in_memory_dataset().to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# tiny captioned shapes\n")
    loaded = load_train_dataset(str(folder), imagefolder=False, cache_dir=str(tmp_path / "cache"))
    assert loaded.column_names == ["image", "text"] and len(loaded) == 6
    assert isinstance(loaded.features["image"], datasets.Image)
    assert loaded[2]["image"].getpixel((0, 0)) == COLOURS[2] and loaded[2]["text"] == captions_for(2)


@pytest.mark.parametrize("metadata", ["jsonl", "csv"])
def test_imagefolder_with_metadata_loads(tmp_path, metadata):
    folder = tmp_path / "images"
    folder.mkdir()
    for row, image in enumerate(solid_images()):
        image.save(folder / f"{row}.png")
    if metadata == "jsonl":
        lines = [json.dumps({"file_name": f"{row}.png", "text": captions_for(row)}) for row in range(6)]
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    else:
        lines = ["file_name,caption"] + [f"{row}.png,colour {row}" for row in range(6)]
        (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    loaded = load_train_dataset(str(folder), imagefolder=True, cache_dir=str(tmp_path / "cache"))
    caption_name = "text" if metadata == "jsonl" else "caption"
    assert sorted(loaded.column_names) == sorted(["image", caption_name]) and len(loaded) == 6
    assert resolve_columns(loaded, None, None) == ("image", caption_name)
    for row in loaded:  # each image stays paired with its own caption
        caption = row[caption_name][0] if metadata == "jsonl" else row[caption_name]
        assert row["image"].getpixel((0, 0)) == COLOURS[int(caption.split()[1])]


def test_imagefolder_without_metadata_is_config_error(tmp_path):
    solid_images()[0].save(tmp_path / "0.png")
    with pytest.raises(ConfigError) as caught:
        load_train_dataset(str(tmp_path), imagefolder=True)
    assert caught.value.field == "dataset_dir" and "metadata.jsonl" in caught.value.fix


@pytest.mark.parametrize("content, line, words", [
    (b"", 1, "no rows"),  # datasets: IndexError traceback
    (b"\n  \n", 1, "no rows"),
    ('{"file_name": "0.png", "text": "red"}\n{"file_name": "1.png", "text": "caf\u00e9"}\n'.encode("latin1"), 2,
     "not UTF-8"),  # datasets: DatasetGenerationError naming no file or line
    (b'{"file_name": "0.png", "text": "red"}\n{"file_name": "1.png", "text": "green"\n', 2, "not JSON"),
])
def test_bad_metadata_jsonl_is_one_line_naming_file_line_and_fix(tmp_path, content, line, words):
    folder = tmp_path / "images"
    folder.mkdir()
    for row, image in enumerate(solid_images()[:2]):
        image.save(folder / f"{row}.png")
    (folder / "metadata.jsonl").write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_train_dataset(str(folder), imagefolder=True, cache_dir=str(tmp_path / "cache"))
    message = str(caught.value)
    assert caught.value.field == "dataset_dir" and "\n" not in message
    assert f"{folder / 'metadata.jsonl'} line {line}:" in message and words in message
    assert "UTF-8" in message if words == "not UTF-8" else "one JSON object per line" in message


def test_metadata_jsonl_with_a_bom_and_blank_lines_still_loads(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for row, image in enumerate(solid_images()[:2]):
        image.save(folder / f"{row}.png")
    lines = [json.dumps({"file_name": f"{row}.png", "text": captions_for(row)}) for row in range(2)]
    (folder / "metadata.jsonl").write_text("\ufeff" + "\n".join(lines) + "\n\n", encoding="utf-8")
    loaded = load_train_dataset(str(folder), imagefolder=True, cache_dir=str(tmp_path / "cache"))
    assert len(loaded) == 2


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt"])
def test_unusable_dataset_dir_is_config_error(tmp_path, case):
    folder = tmp_path / "data"
    if case != "missing":
        folder.mkdir()
    if case == "corrupt":
        (folder / "train.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(ConfigError) as caught:
        load_train_dataset(str(folder), imagefolder=False, cache_dir=str(tmp_path / "cache"))
    assert caught.value.field == "dataset_dir" and caught.value.value == str(folder)


def test_prepare_train_data_checks_once_and_a_refusal_stops_every_rank(tmp_path):
    """One process (no group): the checks' findings come back with the rows; a refusal is the
    every-rank kind, which lets the entrypoint tear the process group down after it."""
    from ds_diffusers.config import validate_dict
    from ds_diffusers.data import prepare_train_data
    from ds_diffusers.distributed import StoppedOnEveryRank
    from tests.helpers import SINGLE, with_changes

    in_memory_dataset(6).save_to_disk(str(tmp_path / "saved"))
    raw = with_changes(dataset_dir=str(tmp_path / "saved"), train_micro_batch_size_per_gpu=2)
    prepared = prepare_train_data(validate_dict(raw), SINGLE)
    assert len(prepared.dataset) == 6 and prepared.checks.image_column == "image" and prepared.checks.caption_column == "text"
    assert prepared.checks.missing_images == []
    with pytest.raises(StoppedOnEveryRank) as caught:
        prepare_train_data(validate_dict({**raw, "caption_column": "nope"}), SINGLE)
    assert caught.value.field == "caption_column" and caught.value.value == "nope"


def test_arrow_cache_is_under_cache_dir_and_a_refused_run_leaves_no_cache_anywhere(tmp_path, monkeypatch, capsys):
    """Issue 21: every run reaching the dataset wrote into ~/.cache/huggingface/datasets, refused or not."""
    from ds_diffusers.config import validate_dict
    from ds_diffusers.data import prepare_train_data
    from ds_diffusers.distributed import StoppedOnEveryRank
    from tests.helpers import SINGLE, with_changes

    hf_home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(hf_home / "datasets"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(hf_home / "datasets"))  # read at import
    folder = tmp_path / "images"
    folder.mkdir()
    for row, image in enumerate(solid_images()):
        image.save(folder / f"{row}.png")
    lines = [json.dumps({"file_name": f"{row}.png", "text": captions_for(row)}) for row in range(6)]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    raw = with_changes(dataset_dir=str(folder), imagefolder=True, train_micro_batch_size_per_gpu=2,
                       cache_dir=str(tmp_path / "cache"))
    with pytest.raises(StoppedOnEveryRank):
        prepare_train_data(validate_dict({**raw, "caption_column": "nope"}), SINGLE)
    assert not hf_home.exists() and not (tmp_path / "cache").exists()

    prepared = prepare_train_data(validate_dict(raw), SINGLE)
    assert len(prepared.dataset) == 6 and not hf_home.exists()
    arrow_files = list((tmp_path / "cache" / "datasets").rglob("*.arrow"))
    assert arrow_files and all(path.stat().st_size for path in arrow_files)
    assert f"its Arrow cache {tmp_path / 'cache' / 'datasets'} holds " in capsys.readouterr().out

    with pytest.raises(StoppedOnEveryRank):  # a refusal after a good run keeps that run's cache
        prepare_train_data(validate_dict({**raw, "caption_column": "nope"}), SINGLE)
    assert sorted((tmp_path / "cache" / "datasets").rglob("*.arrow")) == sorted(arrow_files)


# ---- columns ----

def test_resolve_columns_auto_detects_image_feature_and_caption_name():
    dataset = datasets.Dataset.from_dict(
        {"id": [0, 1], "picture": solid_images()[:2], "prompt": ["a", "b"]},
        features=datasets.Features({"id": datasets.Value("int64"), "picture": datasets.Image(),
                                    "prompt": datasets.Value("string")}))
    assert resolve_columns(dataset, None, None) == ("picture", "prompt")
    assert resolve_columns(dataset, "picture", "prompt") == ("picture", "prompt")


@pytest.mark.parametrize("field, columns", [("image_column", ("photo", None)), ("caption_column", (None, "alt"))])
def test_missing_named_column_is_config_error_listing_columns(field, columns):
    with pytest.raises(ConfigError) as caught:
        resolve_columns(in_memory_dataset(), *columns)
    assert caught.value.field == field and "['image', 'text']" in caught.value.fix


def test_no_caption_candidate_is_config_error():
    dataset = in_memory_dataset().rename_column("text", "description")
    with pytest.raises(ConfigError) as caught:
        resolve_columns(dataset, None, None)
    assert caught.value.field == "caption_column" and "description" in caught.value.fix


def test_columns_of_the_wrong_kind_are_config_errors():
    dataset = in_memory_dataset().add_column("score", list(range(6)))
    with pytest.raises(ConfigError) as caught:
        resolve_columns(dataset, "text", "score")
    assert caught.value.field == "image_column"
    with pytest.raises(ConfigError) as caught:
        resolve_columns(dataset, "image", "score")
    assert caught.value.field == "caption_column" and "not text" in caught.value.fix


@pytest.mark.parametrize("bad_captions", [[], None, ["fine", None]])
def test_row_without_caption_is_config_error_naming_row(bad_captions):
    captions = [captions_for(row) for row in range(6)]
    captions[3] = bad_captions
    dataset = in_memory_dataset().remove_columns("text").add_column(
        "text", captions, feature=datasets.List(datasets.Value("string")))
    with pytest.raises(ConfigError) as caught:
        resolve_columns(dataset, None, None)
    assert caught.value.field == "caption_column" and "row 3" in caught.value.fix


# ---- captions ----

def test_choose_caption_covers_every_caption_and_repeats_per_seed():
    captions = ["one", "two", "three", "four"]
    drawn = [choose_caption(captions, seeded_generator(7, 0, draw)) for draw in range(200)]
    assert set(drawn) == set(captions)
    assert drawn == [choose_caption(captions, seeded_generator(7, 0, draw)) for draw in range(200)]
    assert choose_caption("only", seeded_generator(0)) == "only"
    with pytest.raises(ConfigError, match="row 5"):
        choose_caption([], seeded_generator(0), row=5)


def test_dataset_caption_depends_only_on_seed_epoch_index(tokenizer):
    def sample(seed, epoch, index):
        dataset = CaptionedImageDataset(in_memory_dataset(), "image", "text", tokenizer, RESOLUTION,
                                        center_crop=False, random_flip=True, seed=seed, epoch=epoch)
        return dataset[index]

    first, again = sample(3, 2, 4), sample(3, 2, 4)
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(first["pixel_values"], again["pixel_values"])
    dataset = CaptionedImageDataset(in_memory_dataset(), "image", "text", tokenizer, RESOLUTION,
                                    center_crop=True, random_flip=False, seed=3)
    seen = set()
    for epoch in range(40):
        dataset.set_epoch(epoch)
        seen.add(tuple(dataset[4]["input_ids"].tolist()))
    expected = {tuple(tokenizer(c, max_length=12, padding="max_length", truncation=True).input_ids)
                for c in captions_for(4)}
    assert seen == expected


@pytest.mark.parametrize("dropout", [0.0, 0.2, 1.0])
def test_caption_dropout_empties_that_fraction_and_leaves_the_other_choices_alone(tokenizer, dropout):
    """Drawn from the per-(seed, epoch, index) generator after the caption choice, so a resumed or
    cached run drops exactly the same samples, and kept samples keep the caption they had without dropout."""
    def dataset(p):
        return CaptionedImageDataset(in_memory_dataset(), "image", "text", tokenizer, RESOLUTION,
                                     center_crop=True, random_flip=False, seed=3, caption_dropout=p)

    empty = tuple(tokenizer("", max_length=12, padding="max_length", truncation=True).input_ids)
    with_dropout, without = dataset(dropout), dataset(0.0)
    dropped = total = 0
    epochs = 250 if 0 < dropout < 1 else 20  # p = 0 and 1 are exact; only 0.2 needs many draws
    for epoch in range(epochs):
        with_dropout.set_epoch(epoch)
        without.set_epoch(epoch)
        for index in range(6):
            got = tuple(with_dropout[index]["input_ids"].tolist())
            total += 1
            if got == empty:
                dropped += 1
            else:
                assert got == tuple(without[index]["input_ids"].tolist())
    # 1,500 draws: 4 standard deviations of a binomial at p = 0.2 is 0.041.
    assert abs(dropped / total - dropout) < 0.045, (dropped, total)
    again = dataset(dropout)
    again.set_epoch(epochs - 1)
    assert torch.equal(again[5]["input_ids"], with_dropout[5]["input_ids"])


# ---- transforms ----

def test_preprocess_image_shape_dtype_range_and_colour():
    pixel_values = preprocess_image(Image.new("RGB", (20, 24), (255, 0, 128)), RESOLUTION, True, True,
                                    seeded_generator(0))
    assert pixel_values.shape == (3, RESOLUTION, RESOLUTION) and pixel_values.dtype == torch.float32
    assert pixel_values.min() >= -1.0 and pixel_values.max() <= 1.0
    assert torch.allclose(pixel_values[:, 5, 5], torch.tensor([1.0, -1.0, 128 / 127.5 - 1.0]), atol=1e-6)
    grey = preprocess_image(Image.new("L", (16, 16), 255), RESOLUTION, True, False, seeded_generator(0))
    rgba = preprocess_image(Image.new("RGBA", (16, 16), (0, 0, 255, 10)), RESOLUTION, True, False, seeded_generator(0))
    assert grey.shape == rgba.shape == (3, RESOLUTION, RESOLUTION) and torch.all(grey == 1.0)


def test_center_crop_takes_the_centre():
    # Already RESOLUTION tall, so no resize: the crop must start 5 columns in ((26 - 16) / 2).
    pixel_values = preprocess_image(gradient_image(26, RESOLUTION), RESOLUTION, True, False, seeded_generator(0))
    assert crop_offset(pixel_values) == (0, 5)
    assert crop_offset(preprocess_image(gradient_image(RESOLUTION, 30), RESOLUTION, True, False,
                                        seeded_generator(0))) == (7, 0)


def test_random_crop_varies_with_seed_and_repeats_with_same_seed():
    image = gradient_image(RESOLUTION + 10, RESOLUTION)
    offsets = [crop_offset(preprocess_image(image, RESOLUTION, False, False, seeded_generator(seed)))
               for seed in range(30)]
    assert len({left for _, left in offsets}) >= 5
    assert all(top == 0 and 0 <= left <= 10 for top, left in offsets)
    assert offsets == [crop_offset(preprocess_image(image, RESOLUTION, False, False, seeded_generator(seed)))
                       for seed in range(30)]


def test_random_flip_mirrors_exactly_about_half_the_time():
    image = gradient_image(RESOLUTION, RESOLUTION)
    plain = preprocess_image(image, RESOLUTION, True, False, seeded_generator(0))
    flipped = 0
    for seed in range(40):
        pixel_values = preprocess_image(image, RESOLUTION, True, True, seeded_generator(seed))
        if torch.equal(pixel_values, plain.flip(-1)):
            flipped += 1
        else:
            assert torch.equal(pixel_values, plain)
    assert 8 <= flipped <= 32


def test_small_and_non_square_images_are_resized_up_by_shorter_side():
    assert resize_shorter_side(Image.new("RGB", (4, 8)), RESOLUTION).size == (16, 32)
    assert resize_shorter_side(Image.new("RGB", (30, 10)), 8).size == (24, 8)
    image = gradient_image(4, 8).resize((4, 8))
    pixel_values = preprocess_image(image, RESOLUTION, True, False, seeded_generator(0))
    expected = image.resize((16, 32), Image.Resampling.BILINEAR).crop((0, 8, 16, 24))
    expected_values = torch.from_numpy(np.asarray(expected, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    assert pixel_values.shape == (3, RESOLUTION, RESOLUTION) and torch.allclose(pixel_values, expected_values)


def test_transforms_never_touch_the_global_rng():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    preprocess_image(gradient_image(30, 20), RESOLUTION, False, True, seeded_generator(1))
    choose_caption(["a", "b"], seeded_generator(1))
    assert torch.equal(state, torch.get_rng_state())


# ---- sampler ----

def test_two_ranks_get_disjoint_equal_shards_of_the_truncated_permutation():
    samplers = [ShardedEpochSampler(11, rank, 2, seed=5) for rank in range(2)]
    shards = [list(sampler) for sampler in samplers]
    assert len(shards[0]) == len(shards[1]) == len(samplers[0]) == 5
    assert not set(shards[0]) & set(shards[1])
    permutation = samplers[0].epoch_indices()
    assert sorted(shards[0] + shards[1]) == sorted(permutation) and len(permutation) == 10
    assert permutation != sorted(permutation)
    assert shards[0] == list(ShardedEpochSampler(11, 0, 2, seed=5))


def test_epochs_and_seeds_change_the_order():
    sampler = ShardedEpochSampler(50, 0, 2, seed=1)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert len({tuple(order) for order in orders}) == 3
    other_seed = ShardedEpochSampler(50, 0, 2, seed=2)
    other_seed.set_epoch(2)
    assert list(other_seed) != orders[2]


def test_set_start_skips_exactly_the_consumed_samples():
    sampler = ShardedEpochSampler(20, 1, 2, seed=3)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_start(14)  # the cursor counts the samples of both ranks: 7 of this rank's
    assert list(sampler) == full[7:] and len(sampler) == 3
    sampler.set_epoch(5)
    assert len(list(sampler)) == 10
    sampler.set_start(25)  # past the epoch's end: nothing left
    assert list(sampler) == [] and len(sampler) == 0
    with pytest.raises(ValueError):
        sampler.set_start(-1)


@pytest.mark.parametrize("saved_world, resumed_world", [(2, 1), (1, 2), (2, 3), (4, 2)])
def test_resume_on_another_world_size_reads_every_sample_once(saved_world, resumed_world):
    """Sample ids of an epoch split by a resume at a cursor on another world size: each sample of the
    epoch's order is read once, none twice, none skipped but the tail every epoch drops."""
    dataset_len, micro_batch, steps_before = 48, 4, 2
    order = ShardedEpochSampler(dataset_len, 0, 1, seed=7)
    order.set_epoch(3)
    epoch_order = order.epoch_indices()
    cursor = steps_before * micro_batch * saved_world  # whole optimizer steps of the saved run
    before = []
    for rank in range(saved_world):
        sampler = ShardedEpochSampler(dataset_len, rank, saved_world, seed=7)
        sampler.set_epoch(3)
        before += list(sampler)[: cursor // saved_world]
    after = []
    for rank in range(resumed_world):
        sampler = ShardedEpochSampler(dataset_len, rank, resumed_world, seed=7)
        sampler.set_epoch(3)
        sampler.set_start(cursor)
        after += list(sampler)
    assert sorted(before) == sorted(epoch_order[:cursor])
    seen = before + after
    assert len(seen) == len(set(seen))  # none twice
    # none skipped: all positions up to the last full row of `resumed_world` (a tail of fewer samples
    # than ranks is dropped, as at the end of every epoch)
    end = cursor + (dataset_len - cursor) // resumed_world * resumed_world
    assert sorted(seen) == sorted(epoch_order[:end]) and dataset_len - end < resumed_world


def test_no_drop_last_pads_and_no_shuffle_is_in_order():
    shards = [list(ShardedEpochSampler(5, rank, 2, seed=0, drop_last=False, shuffle=False)) for rank in range(2)]
    assert shards == [[0, 2, 4], [1, 3, 0]]


def test_batch_arithmetic_and_too_small_dataset():
    assert num_batches_per_epoch(100, 4, 3) == 8
    check_dataset_size(8, 4, 2)
    with pytest.raises(ConfigError) as caught:
        check_dataset_size(7, 4, 2)
    assert caught.value.field == "train_micro_batch_size_per_gpu" and caught.value.value == 4


# ---- dataloader ----

def test_dataloader_batches_come_from_this_ranks_shard(tokenizer):
    loader, sampler, _ = build_train_dataloader(
        in_memory_dataset(12), "image", "text", tokenizer, resolution=RESOLUTION, center_crop=False,
        random_flip=True, seed=0, micro_batch_size=2, num_workers=0, rank=1, world_size=2)
    batches = list(loader)
    assert len(batches) == num_batches_per_epoch(12, 2, 2) == 3
    assert batches[0]["pixel_values"].shape == (2, 3, RESOLUTION, RESOLUTION)
    assert batches[0]["input_ids"].shape == (2, 12) and batches[0]["input_ids"].dtype == torch.long
    assert torch.cat([batch["index"] for batch in batches]).tolist() == sampler.shard_indices()


def test_persistent_workers_follow_set_epoch(tokenizer):
    def epoch_samples(num_workers):
        loader, sampler, dataset = build_train_dataloader(
            in_memory_dataset(8), "image", "text", tokenizer, resolution=RESOLUTION, center_crop=False,
            random_flip=True, seed=0, micro_batch_size=2, num_workers=num_workers, rank=0, world_size=1)
        per_epoch = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            per_epoch.append([(batch["pixel_values"], batch["input_ids"], batch["index"]) for batch in loader])
        return per_epoch

    with_workers, in_process = epoch_samples(2), epoch_samples(0)
    for workers_epoch, reference_epoch in zip(with_workers, in_process):
        for workers_batch, reference_batch in zip(workers_epoch, reference_epoch, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(workers_batch, reference_batch))
    # Captions differ between epochs, so a worker stuck on epoch 0 would have failed above.
    first, second = ({int(i): ids for batch in epoch for ids, i in zip(batch[1], batch[2])} for epoch in in_process)
    assert any(not torch.equal(first[index], second[index]) for index in first)
