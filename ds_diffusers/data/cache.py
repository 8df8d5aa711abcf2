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
covers every row's bucket. Text: one hidden-state tensor per distinct caption; the caption is
still drawn per sample, so rows with several captions stay random.
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
        shard = item % self.num_shards
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.folder / shard_name(shard, self.num_shards)), framework="pt")
        row = item // self.num_shards
        return self._handles[shard].get_slice(name)[row:row + 1][0]


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}.safetensors"


class LatentCache:
    """Per dataset row: the VAE posterior parameters [2C, h, w], mirrored too when random_flip; for
    SDXL also the original size and the crop's top-left (both ways round)."""

    def __init__(self, store: ShardedStore, crop_width: int = 0) -> None:
        self.store = store
        self.crop_width = crop_width

    def parameters(self, row: int, flipped: bool) -> torch.Tensor:
        return self.store.get("flipped" if flipped else "parameters", row)

    def crop(self, row: int, flipped: bool) -> CropRecord:
        height, width, resized_width = (int(v) for v in self.store.get("original_size_resized_width", row))
        top, left = (int(v) for v in self.store.get("crop_top_left", row))
        record = CropRecord((height, width), (top, left), resized_width, self.crop_width)
        return record.mirrored() if flipped else record


class BucketLatentCache:
    """`LatentCache` by dataset row with aspect-ratio buckets: bucket b's cache holds its rows in
    ascending order."""

    def __init__(self, caches: list[LatentCache], plan: BucketPlan) -> None:
        self.caches = caches
        self.plan = plan
        self.position = np.zeros(len(plan.bucket_of_row), dtype=np.int64)
        for bucket in range(len(plan.buckets)):
            rows = np.flatnonzero(plan.bucket_of_row == bucket)
            self.position[rows] = np.arange(len(rows))

    def parameters(self, row: int, flipped: bool) -> torch.Tensor:
        return self.caches[int(self.plan.bucket_of_row[row])].parameters(int(self.position[row]), flipped)

    def crop(self, row: int, flipped: bool) -> CropRecord:
        return self.caches[int(self.plan.bucket_of_row[row])].crop(int(self.position[row]), flipped)


class TextCache:
    """Per distinct caption: the text encoder's last hidden state [tokens, width]; for SDXL both
    encoders' penultimate states side by side and the pooled "text_embeds" [projection]."""

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
        batch = {"parameters": vae.encode(pixels).latent_dist.parameters.cpu()}
        if cfg.random_flip:  # mirroring the normalised tensor equals mirroring the cropped image
            batch["flipped"] = vae.encode(torch.flip(pixels, dims=[-1])).latent_dist.parameters.cpu()
        if family_named(frozen.family).records_crop:
            batch["original_size_resized_width"] = torch.tensor([[*c.original_size, c.resized_width] for _, c in processed])
            batch["crop_top_left"] = torch.tensor([c.crop_top_left for _, c in processed])
        yield batch


@torch.no_grad()
def encode_captions(frozen: FrozenComponents, captions: list[str], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """The text encoders' outputs for `captions`, on the host, one batch at a time."""
    for start in range(0, len(captions), batch_size):
        yield {name: tensor.cpu() for name, tensor in
               frozen.encode_text(tokenize(frozen.tokenizers, captions[start:start + batch_size])).items()}


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
        return key, _load_meta(key.folder(cfg.cache_dir)) is not None

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
                                 dist: DistInfo, plan: BucketPlan, log: Callable[[str], None] = print) -> BucketLatentCache:
    """All ranks must call this. One latent cache per bucket, nested in a folder named by the usual
    key plus every row's bucket, each built on a miss, else reused."""
    started = time.perf_counter()
    base = broadcast_from_main(latent_key(cfg, hf_dataset, image_column) if dist.is_main else None)
    shapes = [[bucket.height, bucket.width] for bucket in plan.buckets]
    assignment = hashlib.blake2b(plan.bucket_of_row.tobytes() + json.dumps(shapes).encode(), digest_size=8).hexdigest()
    root = CacheKey("latents-buckets", {**base.parts, "assignment": assignment}).folder(cfg.cache_dir)
    nested = cfg.model_copy(update={"cache_dir": str(root)})
    caches, encoded = [], []
    for bucket, shape in enumerate(plan.buckets):
        rows = np.flatnonzero(plan.bucket_of_row == bucket).tolist()
        key = CacheKey("latents", {**base.parts, "bucket": [shape.height, shape.width], "assignment": assignment})
        folder, meta = build_or_reuse(lambda key=key: key, nested, dist, len(rows),
                                      lambda items, rows=rows: encode_latent_parameters(frozen, hf_dataset, image_column,
                                                                                        [rows[i] for i in items], cfg, plan),
                                      log=lambda line: encoded.append("encoded" in line))
        caches.append(LatentCache(ShardedStore(folder, meta["num_shards"]), shape.width))
    if dist.is_main:
        what = f"encoded {sum(encoded)} of {len(plan.buckets)} bucket(s) in {time.perf_counter() - started:.1f} s" if any(encoded) \
            else f"reusing {len(plan.buckets)} bucket(s)"
        log(f"latents cache: {what} in {root}")
    return BucketLatentCache(caches, plan)


def prepare_caches(cfg: Config, hf_dataset: datasets.Dataset, image_column: str, caption_column: str,
                   frozen: FrozenComponents, dist: DistInfo, log: Callable[[str], None] = print,
                   buckets: BucketPlan | None = None) -> tuple[LatentCache | BucketLatentCache | None, TextCache | None]:
    """All ranks must call this. The caches the config asks for, built on a miss, else reused."""
    latent_cache = text_cache = None
    if cfg.cache_latents and buckets is not None:
        latent_cache = prepare_bucket_latent_caches(cfg, hf_dataset, image_column, frozen, dist, buckets, log)
    elif cfg.cache_latents:
        folder, meta = build_or_reuse(
            lambda: latent_key(cfg, hf_dataset, image_column), cfg, dist, len(hf_dataset),
            lambda rows: encode_latent_parameters(frozen, hf_dataset, image_column, rows, cfg), log=log)
        latent_cache = LatentCache(ShardedStore(folder, meta["num_shards"]), cfg.resolution)
    if cfg.cache_text_embeddings:
        captions = distinct_captions(hf_dataset, caption_column)
        folder, meta = build_or_reuse(
            lambda: text_key(cfg, hf_dataset, caption_column), cfg, dist, len(captions),
            lambda items: encode_captions(frozen, [captions[i] for i in items], cfg.train_micro_batch_size_per_gpu),
            extra_files={CAPTIONS_FILE: json.dumps(captions)}, log=log)
        names = family_named(frozen.family).text_outputs
        text_cache = TextCache(ShardedStore(folder, meta["num_shards"]), json.loads((folder / CAPTIONS_FILE).read_text()), names)
    return latent_cache, text_cache
