"""The frozen-encoder cache: cached examples equal the encoders' outputs, the same caption and flip
are drawn, each part of the key rebuilds on a change and reuses otherwise, and a cached run trains
exactly like an uncached one."""

from __future__ import annotations

import json
import os
import shutil
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ds_diffusers.data import CaptionedImageDataset, load_train_dataset, prepare_caches
from ds_diffusers.data.cache import INDEX_COLUMNS, build_index, index_path, indexed_latent_cache, latent_key, shard_name
from ds_diffusers.errors import ConfigError
from ds_diffusers.models import load_frozen_components
from tests.helpers import SINGLE, assert_ok, in_memory_dataset, launch, losses, rank_output, run_cfg
from tests.helpers import cache_cfg as make_cfg
from tests.helpers import prepare_caches_in_process as prepare


@pytest.fixture(scope="module")
def frozen(tiny_assets):
    return load_frozen_components(str(tiny_assets.model_dir), torch.device("cpu"), torch.float32, None)


def test_cached_examples_equal_the_encoders_with_the_same_caption_and_flip(tiny_assets, tmp_path, frozen):
    # With caption dropout: the empty prompt is in the text cache and the same samples drop it.
    cfg = make_cfg(tiny_assets.model_dir, tiny_assets.dataset_dir, tmp_path / "cache", "random_flip=true", "caption_dropout=0.3")
    latent_cache, text_cache, _ = prepare(cfg)
    hf_dataset = load_train_dataset(cfg.dataset_dir, imagefolder=False)
    common = dict(hf_dataset=hf_dataset, image_column="image", caption_column="text", tokenizer=frozen.tokenizer,
                  resolution=32, center_crop=True, random_flip=True, seed=7, caption_dropout=0.3)
    plain = CaptionedImageDataset(**common)
    cached = CaptionedImageDataset(**common, latent_cache=latent_cache, text_cache=text_cache)
    hidden_by_caption = {}
    flipped_seen, captions_seen = set(), set()
    for epoch in range(3):
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for index in range(0, len(hf_dataset), 7):
            want, got = plain[index], cached[index]
            assert "pixel_values" not in got and "input_ids" not in got
            with torch.no_grad():
                want_parameters = frozen.vae.encode(want["pixel_values"][None]).latent_dist.parameters[0]
                want_hidden = frozen.text_encoder(want["input_ids"][None], return_dict=False)[0][0]
            torch.testing.assert_close(got["latent_parameters"], want_parameters, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got["encoder_hidden_states"], want_hidden, atol=1e-5, rtol=1e-5)
            unflipped = latent_cache.parameters(index, flipped=False)
            flipped_seen.add(bool(not torch.equal(got["latent_parameters"], unflipped)))
            hidden_by_caption.setdefault(index, set()).add(got["encoder_hidden_states"].sum().item())
            captions_seen.add(tuple(want["input_ids"].tolist()))
    assert flipped_seen == {True, False}, "random_flip must give both orientations from the cache"
    assert any(len(values) > 1 for values in hidden_by_caption.values()), "rows with two captions must not always get the same one"
    empty_ids = tuple(frozen.tokenizer("", max_length=frozen.tokenizer.model_max_length, padding="max_length").input_ids)
    assert empty_ids in captions_seen, "caption dropout must reach the cached path too"


@pytest.mark.parametrize("kind, change", [
    ("latents", "resolution=40"), ("latents", "random_flip=false"), ("latents", "bf16.enabled=true"),
    ("latents", "vae files"), ("latents", "dataset"),
    ("text", "caption_column"), ("text", "bf16.enabled=true"), ("text", "text_encoder files"),
    ("text", "tokenizer files"), ("text", "dataset"),
])
def test_each_key_part_rebuilds_and_an_unchanged_key_is_reused(tiny_assets, tmp_path, kind, change):
    model_dir, dataset_dir = tmp_path / "model", tmp_path / "dataset"
    shutil.copytree(tiny_assets.model_dir, model_dir)
    shutil.copytree(tiny_assets.dataset_dir, dataset_dir)
    first = make_cfg(model_dir, dataset_dir, tmp_path / "cache", f"cache_latents={str(kind == 'latents').lower()}",
                     f"cache_text_embeddings={str(kind == 'text').lower()}")
    _, _, built = prepare(first)
    _, _, reused = prepare(first)
    assert [m.split(":")[1].split()[0] for m in built + reused] == ["encoded", "reusing"], built + reused
    old_folder = next((tmp_path / "cache").glob(f"{kind}-*"))

    caption_column, overrides = "text", []
    if change.endswith(" files"):
        config = model_dir / change.split()[0] / ("tokenizer_config.json" if change.startswith("tokenizer") else "config.json")
        config.write_text(config.read_text() + "\n")
    elif change == "dataset":
        rewrite_one_caption(dataset_dir)
    elif change == "caption_column":
        caption_column = "color"
    else:
        overrides = [change]
    changed = make_cfg(model_dir, dataset_dir, tmp_path / "cache", f"cache_latents={str(kind == 'latents').lower()}",
                       f"cache_text_embeddings={str(kind == 'text').lower()}", *overrides)
    _, _, rebuilt = prepare(changed, caption_column=caption_column)
    assert "encoded" in rebuilt[0], rebuilt
    folders = sorted((tmp_path / "cache").glob(f"{kind}-*"))
    assert len(folders) == 2 and old_folder in folders, "a changed key must add a folder and keep the old one"
    assert json.loads((old_folder / "meta.json").read_text())["num_items"] > 0


def rewrite_one_caption(dataset_dir: Path) -> None:
    """Edit the parquet file in place, as a user fixing a caption would."""
    import pyarrow.parquet as pq

    path = next(dataset_dir.rglob("*.parquet"))
    table = pq.read_table(path)
    texts = table.column("text").to_pylist()
    texts[0] = ["a corrected caption"]
    table = table.set_column(table.schema.get_field_index("text"), "text", [texts])
    pq.write_table(table, path)


class LiveTensorMeter(TorchDispatchMode):
    """The peak of the bytes held by live CPU tensors that torch ops made while it was on: each
    storage is counted once, until the last tensor seen on it is gone."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, list[int]] = {}  # data pointer -> [bytes, tensors seen on it]
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and tensor.untyped_storage().data_ptr():
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        entry = self.storages.setdefault(storage.data_ptr(), [storage.nbytes(), 0])
        if entry[1] == 0:
            self.live += entry[0]
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(tensor, self._release, storage.data_ptr())

    def _release(self, pointer: int) -> None:
        entry = self.storages[pointer]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.storages[pointer]


def test_latent_cache_build_memory_does_not_grow_with_the_dataset(tiny_assets, tmp_path):
    """A stand-in VAE whose posterior is large (48 KiB per image) and cheap: the build's peak of live
    tensors for 64 images stays within one batch of the peak for 16 (it held every posterior of the
    rank's share, then a concatenated copy, so 48 more images cost about 9 MiB more)."""
    def encode(pixels):
        return SimpleNamespace(latent_dist=SimpleNamespace(parameters=pixels.repeat(1, 4, 1, 1)))

    frozen = SimpleNamespace(family="sd", vae=SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, encode=encode))
    cfg = make_cfg(tiny_assets.model_dir, tmp_path, tmp_path / "cache", "cache_text_embeddings=false", "random_flip=true")
    peaks = {}
    for rows in (16, 64):
        hf_dataset = in_memory_dataset(rows)
        with LiveTensorMeter() as meter:
            latent_cache, _ = prepare_caches(cfg, hf_dataset, "image", "text", frozen, SINGLE, log=lambda _: None)
        peaks[rows] = meter.peak
        assert latent_cache.parameters(rows - 1, flipped=True).shape == (12, 32, 32)
    image_bytes = 2 * 12 * 32 * 32 * 4  # posterior and mirrored posterior of one image
    batch_bytes = cfg.train_micro_batch_size_per_gpu * image_bytes
    assert peaks[64] - peaks[16] < batch_bytes, f"peak live tensors {peaks}: grows with the dataset"


def test_cache_key_reads_each_encoder_file_once_per_version(tiny_assets, tmp_path):
    """The second key reads no encoder file again (it read a 32 MiB weight file on every start); a
    change of content with the size and mtime kept, or of size, changes the key; a touch re-reads the
    file and keeps the key (it hashes contents)."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_assets.model_dir, model_dir)
    weights = model_dir / "vae" / "extra-weights.bin"
    weights.write_bytes(os.urandom(32 << 20))
    cfg = make_cfg(model_dir, tiny_assets.dataset_dir, tmp_path / "cache", "cache_text_embeddings=false")
    hf_dataset = in_memory_dataset(6)

    def key_and_bytes_read() -> tuple[str, int]:
        def read_bytes() -> int:
            return int(next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar")).split()[1])
        before = read_bytes()
        digest = latent_key(cfg, hf_dataset, "image").digest
        return digest, read_bytes() - before

    first, read_first = key_and_bytes_read()
    again, read_again = key_and_bytes_read()
    assert read_first > 32 << 20 and read_again < 1 << 20, (read_first, read_again)
    assert again == first
    stat = weights.stat()
    with open(weights, "r+b") as handle:  # same size, and the mtime put back: only the ctime tells
        handle.seek(20 << 20)
        handle.write(b"changed")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed, read_changed = key_and_bytes_read()
    assert changed != first and read_changed > 32 << 20
    with open(weights, "ab") as handle:
        handle.write(b"more")
    grown, _ = key_and_bytes_read()
    assert grown not in (first, changed)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched, read_touched = key_and_bytes_read()
    assert touched == grown and read_touched > 32 << 20


def test_cache_latents_with_random_crop_is_refused(tiny_assets, tmp_path):
    with pytest.raises(ConfigError) as error:
        make_cfg(tiny_assets.model_dir, tiny_assets.dataset_dir, tmp_path, "center_crop=false")
    assert error.value.field == "cache_latents" and "center_crop: true" in str(error.value)


# Put on PYTHONPATH, it records every datasets.load_dataset call of a run's ranks.
LOAD_SPY = """import json, os, time
from pathlib import Path

if os.environ.get("DSD_LOAD_SPY"):
    import datasets

    load = datasets.load_dataset

    def spied(*args, **kwargs):
        import torch.distributed

        record = {"rank": int(os.environ.get("RANK", "-1")), "group": torch.distributed.is_initialized(),
                  "arrow_files_before": len(list(Path(kwargs.get("cache_dir") or os.environ["HF_DATASETS_CACHE"]).rglob("*.arrow"))),
                  "start": time.time()}
        try:
            return load(*args, **kwargs)
        finally:
            record["end"] = time.time()
            with open(os.environ["DSD_LOAD_SPY"], "a") as out:
                out.write(json.dumps(record) + "\\n")

    datasets.load_dataset = spied
"""


@pytest.mark.multiprocess
def test_cached_and_uncached_two_process_runs_have_the_same_losses(tiny_assets, tmp_path):
    """Also: with an empty datasets cache, rank 0 alone loads (building the Arrow cache) and checks the
    dataset once the process group exists, and rank 1 loads it after, from that cache (every rank
    used to load and check before the group existed, racing to build the cache)."""
    steps = 6
    common = [*run_cfg(tiny_assets, tmp_path), f"max_train_steps={steps}", "random_flip=true"]
    assert_ok(launch([*common, f"output_dir={tmp_path / 'plain'}"], procs=2))
    (tmp_path / "spy").mkdir()
    (tmp_path / "spy" / "sitecustomize.py").write_text(LOAD_SPY)
    spy_env = {"DSD_LOAD_SPY": str(tmp_path / "loads.jsonl"), "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "spy"), os.environ.get("PYTHONPATH")]))}
    cached = launch([*common, f"output_dir={tmp_path / 'cached'}", f"checkpoint_dir={tmp_path / 'cached_ckpt'}",
                     "cache_latents=true", "cache_text_embeddings=true", f"cache_dir={tmp_path / 'cache'}"], procs=2,
                    env=spy_env, rank_logs=tmp_path / "ranks")
    assert_ok(cached)
    meta = json.loads(next((tmp_path / "cache").glob("latents-*/meta.json")).read_text())
    assert meta["num_shards"] == 2, "each of the two ranks encodes its share"
    plain_losses, cached_losses = losses(tmp_path / "plain"), losses(tmp_path / "cached")
    assert len(cached_losses) == steps
    assert cached_losses == pytest.approx(plain_losses, rel=1e-4, abs=1e-5)

    loads = sorted((json.loads(line) for line in (tmp_path / "loads.jsonl").read_text().splitlines()), key=lambda r: r["rank"])
    assert [load["rank"] for load in loads] == [0, 1] and all(load["group"] for load in loads), loads
    assert loads[0]["arrow_files_before"] == 0 and loads[1]["arrow_files_before"] > 0, "rank 1 reuses rank 0's Arrow cache"
    assert loads[1]["start"] >= loads[0]["end"], loads
    assert "loaded and checked on rank 0" in rank_output(tmp_path / "ranks", 0)
    assert "loaded and checked" not in rank_output(tmp_path / "ranks", 1)


@pytest.mark.multiprocess
def test_caches_built_ahead_by_two_processes_are_reused_by_one(tiny_assets, tmp_path):
    """`python -m ds_diffusers.cache` on 2 processes builds both caches (a shard per rank) and writes
    no output or checkpoint folder; a 1-process training run with the same cfg reuses them."""
    from tests.helpers import launch_module

    common = [*run_cfg(tiny_assets, tmp_path), "max_train_steps=2", "cache_latents=true", "cache_text_embeddings=true",
              f"cache_dir={tmp_path / 'cache'}"]
    built = launch_module("ds_diffusers.cache", ["--cfg", "cfg/default.json", "--set", *common], procs=2)
    assert_ok(built)
    assert f"latents and text embeddings of 96 rows ready in {tmp_path / 'cache'}" in built.stdout + built.stderr
    # latents, the validation prompts' cache of the text pre-pass, text
    assert [json.loads(meta.read_text())["num_shards"] for meta in sorted((tmp_path / "cache").glob("*/meta.json"))] == [2, 2, 2]
    assert not (tmp_path / "model").exists() and not (tmp_path / "checkpoints").exists()
    trained = launch(common, procs=1)
    assert_ok(trained)
    output = trained.stdout + trained.stderr
    assert "latents cache: reusing" in output and "text cache: reusing" in output and "caching" not in output
    assert len(losses(tmp_path / "model")) == 2


def test_the_cache_command_refuses_a_cfg_that_caches_nothing(tiny_assets, tmp_path, capsys):
    from ds_diffusers.cache import main

    assert main(["--cfg", "cfg/default.json", "--set", *run_cfg(tiny_assets, tmp_path)]) == 2
    assert "config error: cache_latents=False: this cfg caches nothing" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_channels_last_latents_get_the_same_noise_as_contiguous_ones():
    # A mid-attention VAE returns channels-last posteriors at batch >= 2 while the cache holds them
    # contiguous; the noise drawn for a batch must not depend on that layout.
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from ds_diffusers.objective import diffusion_loss

    frozen = SimpleNamespace(noise_scheduler=DDPMScheduler())
    latents = torch.randn(2, 4, 8, 8)
    seen = []

    def unet_forward(noisy_latents, timesteps, encoder_hidden_states):
        seen.append(noisy_latents.contiguous())
        return torch.zeros_like(noisy_latents)

    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        diffusion_loss(unet_forward, frozen, latents.contiguous(memory_format=layout), torch.zeros(2, 3, 8),
                       compute_dtype=torch.float32, input_perturbation=0.1)
    assert torch.equal(seen[0], seen[1])


def test_the_latent_index_names_each_rows_bucket_shard_offset_and_conditioning(tmp_path):
    """Two buckets written by 2 and 1 processes: every dataset row is found through the index, its
    crop record comes from the index, and a part rebuilt with another shard count gets a new index."""
    parts, rows_of_part = [], [np.array([4, 0, 3]), np.array([1, 2])]
    for part, (rows, num_shards) in enumerate(zip(rows_of_part, (2, 1))):
        folder = tmp_path / f"bucket-{part}"
        folder.mkdir()
        for shard in range(num_shards):
            mine = rows[shard::num_shards]  # item i of the part is in shard i mod num_shards
            save_file({"parameters": torch.tensor(mine, dtype=torch.float32)[:, None].repeat(1, 3),
                       "original_size_resized_width": torch.tensor([[100 + r, 200 + r, 300 + r] for r in mine]),
                       "crop_top_left": torch.tensor([[r, 2 * r] for r in mine])}, str(folder / shard_name(shard, num_shards)))
        parts.append((folder, {"num_shards": num_shards}))
    index = build_index(parts, rows_of_part, 5)
    assert index.shape == (5, len(INDEX_COLUMNS)) and index.dtype == np.int32
    assert index[:, :3].tolist() == [[0, 1, 0], [1, 0, 0], [1, 0, 1], [0, 0, 1], [0, 0, 0]]
    assert index[3, 3:].tolist() == [103, 203, 303, 3, 6]
    cache = indexed_latent_cache(tmp_path, parts, rows_of_part, 5, [64, 32], SINGLE, SimpleNamespace(cache_dir=str(tmp_path)))
    assert cache.index_path == index_path(tmp_path, parts, 5) and np.array_equal(np.load(cache.index_path), index)
    assert [int(cache.parameters(row, flipped=False)[0]) for row in range(5)] == [0, 1, 2, 3, 4]
    record = cache.crop(2, flipped=False)
    assert record.original_size == (102, 202) and record.crop_top_left == (2, 4) and record.crop_width == 32
    assert index_path(tmp_path, [parts[0], (parts[1][0], {"num_shards": 2})], 5) != cache.index_path
    plain = tmp_path / "sd"  # a family that records no crop: -1, and asking for one is an error
    plain.mkdir()
    save_file({"parameters": torch.zeros(2, 3)}, str(plain / shard_name(0, 1)))
    cache = indexed_latent_cache(plain, [(plain, {"num_shards": 1})], [np.array([1, 0])], 2, [64], SINGLE,
                                 SimpleNamespace(cache_dir=str(tmp_path)))
    assert cache.index[:, :3].tolist() == [[0, 0, 1], [0, 0, 0]] and (cache.index[:, 3:] == -1).all()
    with pytest.raises(ValueError, match="holds no crop records"):
        cache.crop(0, flipped=False)
