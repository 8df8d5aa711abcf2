"""`python -m ds_diffusers.data.write_shards --cfg CFG --out DIR [--encode]`: write the config's dataset
as WebDataset tar shards for `dataset_format: webdataset`.

Raw shards hold each row's image file as it is (`jpg`, `png`, ...) and its captions (`txt`, one a line). With
`--encode` they hold what the frozen encoders make of them instead (the MLPerf Flux pattern: encode
once, train many times): `latent_parameters.pth` (the VAE posterior of the centre crop at the config's
`resolution`, `flipped.pth` of its mirror image with `random_flip`) and `encoder_hidden_states.pth` (stacked, one per caption, for rows with several).
Rows are written in a `seed`-shuffled order, `--samples-per-shard` to a shard, with webdataset's
`ShardWriter`. One process; SD 1.x/2.x models for `--encode` (`check_encodable`).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image

from ds_diffusers.config import load_config
from ds_diffusers.config.hub import resolve_hub_ids
from ds_diffusers.config.schema import Config
from ds_diffusers.data.cache import encode_captions, encode_latent_parameters
from ds_diffusers.data.decode import undecoded
from ds_diffusers.data.loading import load_train_dataset, resolve_columns
from ds_diffusers.data.shard_dataset import FLIPPED, LATENTS, TEXT
from ds_diffusers.errors import ConfigError
from ds_diffusers.families import detect_family

_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensor.clone(), buffer)  # a clone: saving a view of a batch would store the whole batch
    return buffer.getvalue()


def image_file(value: dict[str, Any], row: int) -> tuple[str, bytes]:
    """(extension, bytes) of a row's image, its file unchanged when the format is one shards take."""
    data = value.get("bytes") or Path(value["path"]).read_bytes()
    image = Image.open(io.BytesIO(data))
    if image.format in _EXTENSIONS:
        return _EXTENSIONS[image.format], data
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # any other format: stored losslessly as PNG
    return "png", buffer.getvalue()


def caption_list(value: str | list[str]) -> list[str]:
    """A row's captions; one to a line in a shard's `txt`, so none may span lines."""
    captions = [value] if isinstance(value, str) else list(value)
    if any("\n" in caption for caption in captions):
        raise ConfigError("caption_column", captions[0][:60], "a caption spans several lines; a shard's txt holds one "
                          "caption per line, so join its lines first")
    return captions


def raw_samples(rows: Any, order: list[int], image_column: str, caption_column: str) -> Iterator[dict[str, Any]]:
    for row in order:
        record = rows[row]
        extension, data = image_file(record[image_column], row)
        yield {"__key__": f"{row:09d}", extension: data, "txt": "\n".join(caption_list(record[caption_column]))}


def check_encodable(cfg: Config) -> None:
    """Pre-encoded shards hold one text output per caption (SD 1.x/2.x); refused before anything is written."""
    family = detect_family(cfg.pretrained_model_name_or_path)
    if family.text_outputs != ("encoder_hidden_states",):  # SDXL's pooled embeds, the flow families' too
        raise ConfigError("pretrained_model_name_or_path", cfg.pretrained_model_name_or_path,
                          f"--encode writes SD 1.x/2.x shards only, and this is a {family.title} model (text outputs "
                          f"{', '.join(family.text_outputs)}); write raw shards (without --encode)")


def encoded_samples(cfg: Config, dataset: Any, order: list[int], image_column: str,
                    caption_column: str) -> Iterator[dict[str, Any]]:
    from ds_diffusers.models import DTYPES, load_frozen_components

    frozen = load_frozen_components(cfg.pretrained_model_name_or_path, torch.device("cpu"), DTYPES[cfg.weight_dtype_name],
                                    cfg.prediction_type, cfg.vae_path, cfg.variant)
    batch = cfg.train_micro_batch_size_per_gpu
    captions = dataset.select_columns([caption_column])
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        latents = next(encode_latent_parameters(frozen, dataset, image_column, rows, cfg))
        for offset, row in enumerate(rows):
            # Every caption of the row, [captions, tokens, width]; training draws one per epoch.
            texts = caption_list(captions[row][caption_column])
            text = next(encode_captions(frozen, texts, len(texts)))["encoder_hidden_states"]
            sample = {"__key__": f"{row:09d}", LATENTS: tensor_bytes(latents["parameters"][offset]),
                      TEXT: tensor_bytes(text if len(texts) > 1 else text[0])}
            if "flipped" in latents:
                sample[FLIPPED] = tensor_bytes(latents["flipped"][offset])
            yield sample


def write_shards(cfg: Config, out: Path, samples_per_shard: int, encode: bool) -> int:
    """Writes the shards; returns how many."""
    from webdataset import ShardWriter

    if encode:
        check_encodable(cfg)

    dataset = load_train_dataset(cfg.dataset_dir, cfg.imagefolder)
    image_column, caption_column = resolve_columns(dataset, cfg.image_column, cfg.caption_column)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):
        raise ConfigError("--out", str(out), "already holds .tar shards; choose an empty folder")
    if encode:
        samples = encoded_samples(cfg, dataset, order, image_column, caption_column)
    else:
        samples = raw_samples(undecoded(dataset, image_column), order, image_column, caption_column)
    with ShardWriter(str(out / "shard-%06d.tar"), maxcount=samples_per_shard, verbose=0) as writer:
        for sample in samples:
            writer.write(sample)
        return writer.shard


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_diffusers.data.write_shards", description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", required=True, help="training config naming the dataset (and the model, for --encode)")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", help="key=value overrides of the config")
    parser.add_argument("--out", required=True, type=Path, help="folder for the .tar shards (empty or new)")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples in each shard (default 1000)")
    parser.add_argument("--encode", action="store_true", help="store the frozen encoders' outputs, not images and captions")
    args = parser.parse_args(argv)
    try:
        cfg = resolve_hub_ids(load_config(args.cfg, args.overrides))
        count = write_shards(cfg, args.out, args.samples_per_shard, args.encode)
    except ConfigError as err:
        print(f"ds-diffusers: config error: {err}", file=sys.stderr)
        return 2
    print(f"ds-diffusers: wrote {count} shard(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
