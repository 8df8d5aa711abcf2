"""Disk cache of the frozen encoders' outputs (`cache_latents`, `cache_text_embeddings`).

The VAE and the text encoder never learn, so encoding every image and caption every epoch repeats
work. `prepare_caches` (all ranks) computes each output once, rank r taking items r, r+W, r+2W, ...
and writing one safetensors shard batch by batch (shard_file.py: memory does not grow with the
dataset), and later runs reuse the folder. The folder is named by a hash of everything the stored
values depend on (encoder file contents, dtype, resolution, crop/flip policy, dataset fingerprint,
column), so any change is a new folder: nothing is recomputed in place or overwritten.

Latents: the VAE posterior's parameters (mean and log-variance), not a sample, so every step still
draws a fresh latent and the RNG stream is the one an uncached run uses. With random_flip the
mirrored image is encoded too. With aspect-ratio buckets each bucket's images have their own
folder (one latent shape per file), nested in a `latents-buckets-<key>` folder whose key also
covers every row's bucket. Text: the outputs per distinct caption (text_prepass.py decides who
encodes them). The latent cache's index (`index-<key>.npy`, INDEX_COLUMNS per dataset row, written by rank 0 and
memory-mapped by every reader) makes the cache read the same way whatever process count wrote it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from ds_diffusers.config.schema import Config
from ds_diffusers.data.buckets import BucketPlan
from ds_diffusers.data.decode import open_image, undecoded
from ds_diffusers.data.file_digests import FileDigests, hash_folder
from ds_diffusers.data.shard_file import ShardWriter
from ds_diffusers.data.transforms import EMPTY_PROMPT, CropRecord, preprocess_image_to_size
from ds_diffusers.distributed import DistInfo, all_ranks_ok, barrier, broadcast_from_main
from ds_diffusers.errors import ConfigError
from ds_diffusers.families import detect_family, family_named
from ds_diffusers.models import FrozenComponents, tokenize, vae_folder

FORMAT_VERSION = 1
META_FILE = "meta.json"
CAPTIONS_FILE = "captions.json"
# The latent index's columns, one int32 row per dataset row.
INDEX_COLUMNS = ("bucket", "shard", "offset", "original_height", "original_width", "resized_width", "crop_top", "crop_left")


@dataclass(frozen=True)
class CacheKey:
    """What a cache's values depend on; its hash names the folder."""

    kind: str  # "latents" or "text"
    parts: dict[str, Any]

    @property
    def digest(self) -> str:
        text = json.dumps({"kind": self.kind, "format": FORMAT_VERSION, **self.parts}, sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def folder(self, cache_dir: str) -> Path:
        return Path(cache_dir) / f"{self.kind}-{self.digest}"


def latent_key(cfg: Config, hf_dataset: datasets.Dataset, image_column: str) -> CacheKey:
    digests = FileDigests(Path(cfg.cache_dir))
    parts = {
        "vae": hash_folder(vae_folder(cfg.pretrained_model_name_or_path, cfg.vae_path), digests),
        "dtype": cfg.weight_dtype_name, "resolution": cfg.resolution, "center_crop": cfg.center_crop,
        "random_flip": cfg.random_flip, "dataset": hf_dataset._fingerprint, "image_column": image_column,
    }
    if detect_family(cfg.pretrained_model_name_or_path).records_crop:
        parts["crop_records"] = True  # SDXL caches also hold each row's original size and crop
    digests.save()
    return CacheKey("latents", parts)


def text_key(cfg: Config, hf_dataset: datasets.Dataset, caption_column: str) -> CacheKey:
    model_dir = Path(cfg.pretrained_model_name_or_path)
    digests = FileDigests(Path(cfg.cache_dir))
    parts = {
        "text_encoder": hash_folder(model_dir / "text_encoder", digests), "tokenizer": hash_folder(model_dir / "tokenizer", digests),
        "dtype": cfg.weight_dtype_name, "dataset": hf_dataset._fingerprint, "caption_column": caption_column,
        "with_empty_prompt": True,
    }
    parts.update({part: hash_folder(model_dir / part, digests) for part in detect_family(model_dir).extra_text_parts})
    digests.save()
    return CacheKey("text", parts)


class ShardedStore:
    """Read side of a cache folder: item i is row i // num_shards of shard i % num_shards.

    Files are opened lazily in each process (DataLoader workers included) and read by slices, so
    only the rows a batch needs come off the disk or page cache.
    """

    def __init__(self, folder: Path, num_shards: int) -> None:
        self.folder = folder
        self.num_shards = num_shards
        self._handles: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # open handles do not cross process boundaries

    def get(self, name: str, item: int) -> torch.Tensor:
        return self.get_at(name, item % self.num_shards, item // self.num_shards)

    def get_at(self, name: str, shard: int, offset: int) -> torch.Tensor:
        """Row `offset` of tensor `name` in shard file `shard`."""
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.folder / shard_name(shard, self.num_shards)), framework="pt")
        return self._handles[shard].get_slice(name)[offset:offset + 1][0]


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}.safetensors"


class LatentCache:
    """Per dataset row, looked up in the cache's index: the VAE posterior parameters [2C, h, w]
    (mirrored too when random_flip) from its bucket's shard, and for SDXL the original size and the
    crop's top-left (both ways round) from the index itself."""

    def __init__(self, stores: list[ShardedStore], index_path: Path, crop_widths: list[int]) -> None:
        self.stores = stores
        self.index_path = index_path
        self.crop_widths = crop_widths
        self._index: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_index": None}  # each process maps the file itself

    @property
    def index(self) -> np.ndarray:
        if self._index is None:
            self._index = np.load(self.index_path, mmap_mode="r")
        return self._index

    def parameters(self, row: int, flipped: bool) -> torch.Tensor:
        bucket, shard, offset = (int(value) for value in self.index[row, :3])
        return self.stores[bucket].get_at("flipped" if flipped else "parameters", shard, offset)

    def crop(self, row: int, flipped: bool) -> CropRecord:
        bucket, _, _, height, width, resized_width, top, left = (int(value) for value in self.index[row])
        if height < 0:
            raise ValueError(f"the latent cache {self.index_path.parent} holds no crop records (its family records none)")
        record = CropRecord((height, width), (top, left), resized_width, self.crop_widths[bucket])
        return record.mirrored() if flipped else record


def build_index(parts: list[tuple[Path, dict[str, Any]]], rows_of_part: list[np.ndarray], num_rows: int) -> np.ndarray:
    """The index of INDEX_COLUMNS for `num_rows` dataset rows, from published cache folders: part p
    holds `rows_of_part[p]` in that order, item i in shard i mod (its shard count) at row i // it.
    Reads only the small crop-record tensors of each shard."""
    index = np.full((num_rows, len(INDEX_COLUMNS)), -1, dtype=np.int32)
    for part, ((folder, meta), rows) in enumerate(zip(parts, rows_of_part)):
        num_shards, items = meta["num_shards"], np.arange(len(rows))
        index[rows, 0], index[rows, 1], index[rows, 2] = part, items % num_shards, items // num_shards
        for shard in range(num_shards):
            with safe_open(str(folder / shard_name(shard, num_shards)), framework="pt") as handle:
                if "crop_top_left" not in handle.keys():
                    break
                mine = rows[shard::num_shards]
                index[mine, 3:6] = handle.get_tensor("original_size_resized_width").numpy()
                index[mine, 6:8] = handle.get_tensor("crop_top_left").numpy()
    return index


def index_path(root: Path, parts: list[tuple[Path, dict[str, Any]]], num_rows: int) -> Path:
    """Named by what the index is derived from (each part's folder and shard count), so a part
    rebuilt by another process count gets a new index rather than a stale one."""
    layout = json.dumps([num_rows, [[folder.name, meta["num_shards"]] for folder, meta in parts]])
    return root / f"index-{hashlib.blake2b(layout.encode(), digest_size=8).hexdigest()}.npy"


def indexed_latent_cache(root: Path, parts: list[tuple[Path, dict[str, Any]]], rows_of_part: list[np.ndarray],
                         num_rows: int, crop_widths: list[int], dist: DistInfo, cfg: Config) -> LatentCache:
    """All ranks must call this. Rank 0 writes the index when there is none yet (a private file
    renamed into place); every rank then maps it."""
    path = index_path(root, parts, num_rows)
    if dist.is_main and not path.is_file():
        partial = root / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
        with open(partial, "wb") as file:
            np.save(file, build_index(parts, rows_of_part, num_rows))
        os.chmod(partial, 0o644)
        os.replace(partial, path)
    barrier()
    if not all_ranks_ok(path.is_file(), dist.device):
        raise ConfigError("cache_dir", cfg.cache_dir, f"rank {dist.rank} cannot read {path} that rank 0 wrote; put "
                          "cache_dir on a filesystem every node shares")
    return LatentCache([ShardedStore(folder, meta["num_shards"]) for folder, meta in parts], path, crop_widths)


class TextCache:
    """Per distinct caption: the family's `text_outputs` ([tokens, width], pooled [width], ...)."""

    def __init__(self, store: ShardedStore, captions: list[str], names: tuple[str, ...] = ("encoder_hidden_states",)) -> None:
        self.store = store
        self.names = names
        self.index = {caption: position for position, caption in enumerate(captions)}

    def embeddings(self, caption: str) -> dict[str, torch.Tensor]:
        return {name: self.store.get(name, self.index[caption]) for name in self.names}


def distinct_captions(hf_dataset: datasets.Dataset, caption_column: str) -> list[str]:
    """Every caption of the column once, plus the empty prompt that caption dropout trains on."""
    values = hf_dataset.select_columns([caption_column]).with_format("arrow")[:][caption_column].to_pylist()
    flat = (caption for value in values for caption in ([value] if isinstance(value, str) else value))
    return sorted({*flat, EMPTY_PROMPT})


@torch.no_grad()
def encode_latent_parameters(frozen: FrozenComponents, hf_dataset: datasets.Dataset, image_column: str,
                             rows: list[int], cfg: Config, plan: BucketPlan | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Posterior parameters of `rows` (and of their mirror images when random_flip), on the host,
    one micro-batch at a time; for SDXL also each row's crop record. With `plan` (aspect-ratio
    buckets) `rows` are of one bucket, cropped to its shape, with their header's original size."""
    size = plan.size_of(rows[0]) if plan is not None and rows else (cfg.resolution, cfg.resolution)
    draft = max(cfg.bucket_resolutions or [cfg.resolution]) if plan is not None else cfg.resolution
    images = undecoded(hf_dataset.select_columns([image_column]), image_column)
    vae = frozen.vae
    for start in range(0, len(rows), cfg.train_micro_batch_size_per_gpu):
        chunk = rows[start:start + cfg.train_micro_batch_size_per_gpu]
        # A centre crop without flip draws nothing from the generator; the flip is applied below.
        processed = [preprocess_image_to_size(open_image(images[row][image_column], row=row, image_column=image_column,
                                                          resolution=draft), size, True, False, torch.Generator())
                     for row in chunk]
        if plan is not None:  # a JPEG decoded at reduced size still reports its real size
            processed = [(tensor, replace(crop, original_size=plan.original_size(row)))
                         for (tensor, crop), row in zip(processed, chunk)]
        pixels = torch.stack([tensor for tensor, _ in processed]).to(vae.device, vae.dtype)
        family = family_named(frozen.family)
        batch = {"parameters": family.latent_distribution(vae, pixels).parameters.cpu()}
        if cfg.random_flip:  # mirroring the normalised tensor equals mirroring the cropped image
            batch["flipped"] = family.latent_distribution(vae, torch.flip(pixels, dims=[-1])).parameters.cpu()
        if family.records_crop:
            batch["original_size_resized_width"] = torch.tensor([[*c.original_size, c.resized_width] for _, c in processed])
            batch["crop_top_left"] = torch.tensor([c.crop_top_left for _, c in processed])
        yield batch


@torch.no_grad()
def encode_captions(frozen: FrozenComponents, captions: list[str], batch_size: int,
                    pad_to: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The text encoders' outputs for `captions`, on the host, one batch at a time; then, up to `pad_to`
    batches, forwards of "" whose output is dropped (partitioned encoders gather collectively)."""
    starts = range(0, len(captions), batch_size)
    for start in starts:
        yield {name: tensor.cpu() for name, tensor in
               frozen.encode_text(tokenize(frozen.tokenizers, captions[start:start + batch_size])).items()}
    for _ in range(len(starts), pad_to or 0):
        frozen.encode_text(tokenize(frozen.tokenizers, [EMPTY_PROMPT]))


def is_built(key: CacheKey, cache_dir: str) -> bool:
    """Whether the complete cache folder of `key` exists (rank 0 asks; see build_or_reuse)."""
    return _load_meta(key.folder(cache_dir)) is not None


def build_text_cache(cfg: Config, dist: DistInfo, frozen: FrozenComponents, make_key: Callable[[], CacheKey],
                     captions: list[str], pad: bool = False, log: Callable[[str], None] = print) -> TextCache:
    """All ranks must call this. The cache of `captions` (sorted, distinct) under the key, built on a miss
    (rank r encodes captions r, r+W, ...; `pad`: every rank runs as many batches), else reused."""
    batch_size = cfg.train_micro_batch_size_per_gpu
    pad_to = -(-len(captions) // (dist.world_size * batch_size)) if pad else None  # ⌈⌈n / W⌉ / b⌉
    folder, meta = build_or_reuse(make_key, cfg, dist, len(captions),
                                  lambda items: encode_captions(frozen, [captions[i] for i in items], batch_size, pad_to),
                                  extra_files={CAPTIONS_FILE: json.dumps(captions)}, log=log)
    stored = json.loads((folder / CAPTIONS_FILE).read_text())
    return TextCache(ShardedStore(folder, meta["num_shards"]), stored, family_named(frozen.family).text_outputs)


def _load_meta(folder: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("format") == FORMAT_VERSION else None


def build_or_reuse(make_key: Callable[[], CacheKey], cfg: Config, dist: DistInfo, num_items: int,
                   encode: Callable[[list[int]], Iterator[dict[str, torch.Tensor]]],
                   extra_files: dict[str, str] | None = None, log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """All ranks must call this. Returns the complete cache folder for the key and its metadata.

    Only rank 0 runs `make_key`, which hashes the encoder files it has not hashed before (file_digests.py);
    the others receive the key.

    On a miss the ranks write into a private partial folder that rank 0 renames into place once every
    shard is there; `meta.json` is written last, so an interrupted build is never mistaken for a cache.
    """
    def decide() -> tuple[CacheKey, bool]:
        key = make_key()
        return key, is_built(key, cfg.cache_dir)

    key, hit = broadcast_from_main(decide() if dist.is_main else None)
    folder = key.folder(cfg.cache_dir)
    if not hit:
        started = time.perf_counter()
        partial = Path(cfg.cache_dir) / f".{folder.name}.partial-{broadcast_from_main(uuid.uuid4().hex[:8])}"
        if dist.is_main:
            partial.mkdir(parents=True)
        barrier()
        items = list(range(dist.rank, num_items, dist.world_size))
        shard = partial / shard_name(dist.rank, dist.world_size)
        # Rank 0's bar stands for all ranks: each encodes about the same share.
        with (tqdm(total=num_items, desc=f"caching {key.kind}", disable=not dist.is_main, mininterval=5.0) as bar,
              ShardWriter(shard, len(items)) as writer):
            for batch in encode(items):
                writer.write(batch)
                bar.update(next(iter(batch.values())).shape[0] * dist.world_size)
        os.chmod(shard, 0o644)  # a shared cache must be readable by the team's other jobs, whatever the umask
        barrier()
        if dist.is_main:
            _publish(partial, folder, key, num_items, dist.world_size, extra_files or {})
            log(f"{key.kind} cache: encoded {num_items} items in {time.perf_counter() - started:.1f} s into {folder}")
        barrier()
    elif dist.is_main:
        log(f"{key.kind} cache: reusing {folder}")
    meta = _load_meta(folder)
    if not all_ranks_ok(meta is not None, dist.device):
        raise ConfigError("cache_dir", cfg.cache_dir, f"rank {dist.rank} cannot read {folder / META_FILE} that rank 0 "
                          "wrote; put cache_dir on a filesystem every node shares")
    return folder, meta


def _publish(partial: Path, folder: Path, key: CacheKey, num_items: int, num_shards: int, extra_files: dict[str, str]) -> None:
    missing = [shard_name(s, num_shards) for s in range(num_shards) if not (partial / shard_name(s, num_shards)).is_file()]
    if missing:
        shutil.rmtree(partial, ignore_errors=True)
        raise ConfigError("cache_dir", str(partial.parent), f"rank 0 does not see {missing[0]} written by another rank; "
                          "put cache_dir on a filesystem every node shares")
    for name, text in extra_files.items():
        (partial / name).write_text(text)
    meta = {"format": FORMAT_VERSION, "kind": key.kind, "key": key.parts, "num_items": num_items, "num_shards": num_shards}
    (partial / META_FILE).write_text(json.dumps(meta, indent=2))
    try:
        os.rename(partial, folder)
    except OSError:
        if _load_meta(folder) is None:  # not another job's identical cache: a real failure
            raise
        shutil.rmtree(partial, ignore_errors=True)


def prepare_bucket_latent_caches(cfg: Config, hf_dataset: datasets.Dataset, image_column: str, frozen: FrozenComponents,
                                 dist: DistInfo, plan: BucketPlan, log: Callable[[str], None] = print) -> LatentCache:
    """All ranks must call this. One latent cache per bucket, nested in a folder named by the usual
    key plus every row's bucket, each built on a miss, else reused."""
    started = time.perf_counter()
    base = broadcast_from_main(latent_key(cfg, hf_dataset, image_column) if dist.is_main else None)
    assignment = plan.assignment_digest
    root = CacheKey("latents-buckets", {**base.parts, "assignment": assignment}).folder(cfg.cache_dir)
    nested = cfg.model_copy(update={"cache_dir": str(root)})
    parts, rows_of_part, encoded = [], [], []
    for bucket, shape in enumerate(plan.buckets):
        rows = np.flatnonzero(plan.bucket_of_row == bucket).tolist()
        key = CacheKey("latents", {**base.parts, "bucket": [shape.height, shape.width], "assignment": assignment})
        folder, meta = build_or_reuse(lambda key=key: key, nested, dist, len(rows),
                                      lambda items, rows=rows: encode_latent_parameters(frozen, hf_dataset, image_column,
                                                                                        [rows[i] for i in items], cfg, plan),
                                      log=lambda line: encoded.append("encoded" in line))
        parts.append((folder, meta))
        rows_of_part.append(np.asarray(rows, dtype=np.int64))
    latent_cache = indexed_latent_cache(root, parts, rows_of_part, len(plan.bucket_of_row),
                                        [shape.width for shape in plan.buckets], dist, cfg)
    if dist.is_main:
        what = f"encoded {sum(encoded)} of {len(plan.buckets)} bucket(s) in {time.perf_counter() - started:.1f} s" if any(encoded) \
            else f"reusing {len(plan.buckets)} bucket(s)"
        log(f"latents cache: {what} in {root}")
    return latent_cache


def prepare_caches(cfg: Config, hf_dataset: datasets.Dataset, image_column: str, caption_column: str,
                   frozen: FrozenComponents, dist: DistInfo, log: Callable[[str], None] = print,
                   buckets: BucketPlan | None = None,
                   text_cache: TextCache | None = None) -> tuple[LatentCache | None, TextCache | None]:
    """All ranks must call this. The caches the config asks for, built on a miss, else reused;
    `text_cache`: the one the text pre-pass already prepared (data/text_prepass.py)."""
    latent_cache = None
    if cfg.cache_latents and buckets is not None:
        latent_cache = prepare_bucket_latent_caches(cfg, hf_dataset, image_column, frozen, dist, buckets, log)
    elif cfg.cache_latents:
        folder, meta = build_or_reuse(
            lambda: latent_key(cfg, hf_dataset, image_column), cfg, dist, len(hf_dataset),
            lambda rows: encode_latent_parameters(frozen, hf_dataset, image_column, rows, cfg), log=log)
        latent_cache = indexed_latent_cache(folder, [(folder, meta)], [np.arange(len(hf_dataset))], len(hf_dataset),
                                            [cfg.resolution], dist, cfg)
    if cfg.cache_text_embeddings and text_cache is None:
        text_cache = build_text_cache(cfg, dist, frozen, lambda: text_key(cfg, hf_dataset, caption_column),
                                      distinct_captions(hf_dataset, caption_column), log=log)
    return latent_cache, text_cache
