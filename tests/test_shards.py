"""WebDataset shards (`dataset_format: webdataset`): the order, what each process reads, resume on the
same and on another process count, and the one-line errors for bad shard folders. Shards are written
with webdataset's own TarWriter; samples carry only a number, the stub decoder returns it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from webdataset import TarWriter

from ds_diffusers.config import validate_dict
from ds_diffusers.config.checks import check_environment
from ds_diffusers.data import shard_dataset, tar_shards
from ds_diffusers.data.shard_dataset import ShardStream, check_shards, shard_loader
from ds_diffusers.data.tar_shards import build_plan
from ds_diffusers.errors import ConfigError
from tests.helpers import environment_cfg, error_of, with_changes

SHARD_SIZES = (5, 7, 6, 6, 8, 5, 6, 7)  # uneven, as real shards are


def write_numbered_shards(folder: Path, sizes=SHARD_SIZES, extra: dict | None = None) -> None:
    """Shard i holds samples numbered 100 * i + j; `extra` adds files to every sample."""
    folder.mkdir(parents=True, exist_ok=True)
    for shard, size in enumerate(sizes):
        with TarWriter(str(folder / f"part-{shard:03d}.tar")) as writer:
            for row in range(size):
                writer.write({"__key__": f"s{shard:03d}_{row:04d}", "cls": str(100 * shard + row), **(extra or {})})


class NumberDecoder:
    """Stands in for ShardSampleDecoder: the sample's number and its global position."""

    def __call__(self, sample, epoch, position):
        return {"index": position, "number": torch.tensor(int(sample["cls"]))}


def stream(folder: Path, rank: int, world_size: int, partitions: int = 4, batch: int = 2) -> ShardStream:
    return ShardStream(build_plan(str(folder), partitions, seed=3), NumberDecoder(), rank, world_size, batch)


def numbers(source: ShardStream, epoch: int = 0, start: int = 0, num_workers: int = 0) -> list[list[int]]:
    source.set_epoch(epoch)
    source.set_start(start)
    loader = DataLoader(source, batch_size=None, num_workers=num_workers)
    return [batch["number"].tolist() for batch in loader]


def interleave(per_rank: list[list[list[int]]]) -> list[int]:
    """The global sequence: micro-batch k of every rank, rank by rank, sample by sample position."""
    sequence = []
    for batches in zip(*per_rank):
        width = len(batches[0])
        for offset in range(width):
            sequence.extend(batch[offset] for batch in batches)
    return sequence


def test_an_epoch_reads_each_sample_at_most_once_in_a_seeded_order(tmp_path):
    write_numbered_shards(tmp_path)
    plan = build_plan(str(tmp_path), 4, seed=3)
    assert plan.counts == SHARD_SIZES
    # Partition p holds shards p and p + 4: 13, 13, 12, 14 samples; an epoch takes 12 of each.
    assert plan.partition_length == 12 and plan.epoch_samples == 48
    epoch0 = [n for batch in numbers(stream(tmp_path, 0, 1)) for n in batch]
    assert len(epoch0) == 48 == len(set(epoch0))
    epoch1 = [n for batch in numbers(stream(tmp_path, 0, 1), epoch=1) for n in batch]
    assert epoch1 != epoch0 and len(set(epoch1)) == 48


def test_the_sample_sequence_does_not_depend_on_process_or_worker_count(tmp_path):
    write_numbered_shards(tmp_path)
    one = [n for batch in numbers(stream(tmp_path, 0, 1, batch=2)) for n in batch]
    two = interleave([numbers(stream(tmp_path, rank, 2, batch=1)) for rank in range(2)])
    four = interleave([numbers(stream(tmp_path, rank, 4, batch=1)) for rank in range(4)])
    assert one == two == four
    assert numbers(stream(tmp_path, 1, 2), num_workers=2) == numbers(stream(tmp_path, 1, 2), num_workers=0)


def test_resume_on_fewer_processes_continues_the_same_global_sequence(tmp_path):
    """2 processes train 3 micro-batches of 2; 1 process resumes at the saved samples_in_epoch."""
    write_numbered_shards(tmp_path)
    straight = [n for batch in numbers(stream(tmp_path, 0, 1, batch=2)) for n in batch]
    before = interleave([numbers(stream(tmp_path, rank, 2, batch=2))[:3] for rank in range(2)])
    samples_in_epoch = 3 * 2 * 2  # what the train state saves: over all ranks
    after = [n for batch in numbers(stream(tmp_path, 0, 1, batch=2), start=samples_in_epoch) for n in batch]
    assert before + after == straight
    # Same topology: the tail of this rank's own sequence (8 samples over both ranks = 2 batches of 2 each).
    assert numbers(stream(tmp_path, 1, 2), start=8) == numbers(stream(tmp_path, 1, 2))[2:]


def test_a_new_epoch_or_resume_leaves_the_global_rng_alone(tmp_path):
    """The loop's noise comes from the global torch RNG, restored on resume; starting the loader must not draw from it."""
    write_numbered_shards(tmp_path)
    source = stream(tmp_path, 0, 1)
    source.set_start(4)
    before = torch.get_rng_state()
    assert len(list(shard_loader(source, num_workers=0, pin_memory=False, seed=3))) == 22
    assert torch.equal(torch.get_rng_state(), before)


def test_each_process_opens_only_its_own_partitions_shards(tmp_path, monkeypatch):
    write_numbered_shards(tmp_path)
    opened: dict[int, set[str]] = {0: set(), 1: set()}
    real_read_rows = tar_shards.read_rows
    for rank in (0, 1):
        monkeypatch.setattr(tar_shards, "read_rows", lambda path, rows, rank=rank: (opened[rank].add(Path(path).name),
                                                                                    real_read_rows(path, rows))[1])
        numbers(stream(tmp_path, rank, 2))
    # Partitions 0 and 2 (shards 0, 2, 4, 6) are rank 0's; 1 and 3 rank 1's.
    assert opened[0] == {f"part-{s:03d}.tar" for s in (0, 2, 4, 6)}
    assert opened[1] == {f"part-{s:03d}.tar" for s in (1, 3, 5, 7)}


def shard_cfg(tmp_path: Path, folder: Path, **changes):
    raw = with_changes(pretrained_model_name_or_path=str(tmp_path), dataset_dir=str(folder), dataset_format="webdataset",
                       resolution=16, train_micro_batch_size_per_gpu=2, use_fp16={"enabled": False}, **changes)
    return validate_dict(raw)


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 16), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_raw_shard_columns_and_pre_encoded_checks(tmp_path):
    raw = tmp_path / "raw"
    write_numbered_shards(raw, sizes=(3, 3), extra={"png": png_bytes(), "txt": "a red box\na box"})
    data = check_shards(shard_cfg(tmp_path, raw, shard_partitions=2), world_size=2)
    assert (data.columns.image, data.columns.caption, data.num_rows) == ("png", "txt", 6)
    (tmp_path / "vae").mkdir()  # the VAE's downsampling comes from its config: 8 here
    (tmp_path / "vae" / "config.json").write_text('{"block_out_channels": [8, 8, 8, 8]}')
    encoded = tmp_path / "encoded"
    latents = shard_dataset.LATENTS
    write_numbered_shards(encoded, sizes=(3, 3), extra={latents: torch.zeros(8, 4, 4), "txt": "a red box"})
    with pytest.raises(ConfigError) as info:  # latents of 32 px images, a 16 px config
        check_shards(shard_cfg(tmp_path, encoded, shard_partitions=2, center_crop=True, random_flip=False), 1)
    assert (info.value.field, info.value.fix) == ("resolution", f"the pre-encoded latents of {encoded / 'part-000.tar'} "
                                                  "are of 32 px images; set resolution: 32")
    with pytest.raises(ConfigError) as info:
        check_shards(shard_cfg(tmp_path, encoded, shard_partitions=2, center_crop=True, random_flip=True), 1)
    assert info.value.field == "random_flip" and shard_dataset.FLIPPED in info.value.fix


@pytest.mark.parametrize("case, field, fix_part", [
    ("no image", "image_column", "hold ['cls', 'txt'], no image"),
    ("no caption", "caption_column", "hold ['cls', 'png'], no caption"),
    ("world", "shard_partitions", "must be a multiple of the 3 processes"),
    ("too few shards", "shard_partitions", "holds 2 shard(s), fewer than the partitions"),
    ("no shards", "dataset_dir", "holds no .tar shards"),
    ("not a tar", "dataset_dir", "cannot read this shard as a tar file"),
])
def test_bad_shard_folders_stop_with_one_line(tmp_path, case, field, fix_part):
    folder = tmp_path / "shards"
    extra = {"no image": {"txt": "x"}, "no caption": {"png": png_bytes()}}.get(case, {"png": png_bytes(), "txt": "x"})
    write_numbered_shards(folder, sizes=(3, 3), extra=extra)
    partitions, world = {"world": (2, 3), "too few shards": (4, 1)}.get(case, (2, 1))
    if case == "no shards":
        for shard in folder.glob("*.tar"):
            shard.rename(shard.with_suffix(".tgz"))
    if case == "not a tar":
        (folder / "part-000.tar").write_bytes(b"not a tar file" * 100)
    with pytest.raises(ConfigError) as info:
        check_shards(shard_cfg(tmp_path, folder, shard_partitions=partitions), world)
    assert info.value.field == field and fix_part in info.value.fix, str(info.value)
    assert "\n" not in str(info.value)


def test_missing_shard_folder_and_options_shards_do_not_take(tmp_path):
    cfg = environment_cfg(tmp_path, dataset_format="webdataset", dataset_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError) as info:
        check_environment(cfg)
    assert info.value.field == "dataset_dir" and "folder of WebDataset .tar shards" in info.value.fix
    for field, value in (("cache_latents", True), ("skip_bad_images", True), ("max_train_samples", 10),
                         ("validation_split", 0.1), ("validation_dataset_dir", str(tmp_path)), ("aspect_ratio_buckets", True)):
        error = error_of(with_changes(dataset_format="webdataset", **{field: value}))
        assert error.field == field and "not with dataset_format: webdataset" in error.fix
    assert error_of(with_changes(dataset_format="tfrecord")).field == "dataset_format"


def test_the_order_key_names_the_shard_list_and_partitions(tmp_path):
    write_numbered_shards(tmp_path / "a")
    key = build_plan(str(tmp_path / "a"), 4, seed=3).order_key
    assert key.startswith(f"{len(SHARD_SIZES)} shards of {sum(SHARD_SIZES)} samples (list ") and key.endswith("in 4 partitions")
    assert build_plan(str(tmp_path / "a"), 2, seed=3).order_key != key
    write_numbered_shards(tmp_path / "b", sizes=[*SHARD_SIZES[:-1], SHARD_SIZES[-1] + 1])
    assert build_plan(str(tmp_path / "b"), 4, seed=3).order_key != key


@pytest.mark.parametrize("model", ["sdxl_model", "flux_model", "sd3_model", "qwen_image_model"])
def test_pre_encoded_shards_of_another_family_are_refused_before_anything_is_written(model, request, tiny_assets, tmp_path):
    """--encode writes SD 1.x/2.x shards; the others' text outputs do not fit them. The refusal names the
    family and leaves no folder (an empty first shard would block the corrected run)."""
    from ds_diffusers.config import load_config
    from ds_diffusers.data.write_shards import write_shards
    from ds_diffusers.families import detect_family
    from tests.helpers import REPO

    model_dir = request.getfixturevalue(model)
    cfg = load_config(REPO / "cfg/default.json", [f"pretrained_model_name_or_path={model_dir}",
                                                  f"dataset_dir={tiny_assets.dataset_dir}", "resolution=64"])
    with pytest.raises(ConfigError, match=f"this is a {detect_family(model_dir).title} model") as info:
        write_shards(cfg, tmp_path / "out", samples_per_shard=4, encode=True)
    assert "write raw shards (without --encode)" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
