"""Build the encoder caches of a cfg file ahead of training: `python -m ds_diffusers.cache --cfg X`.

It loads and checks the dataset and the frozen encoders exactly as `ds_diffusers.train` does and
builds (or finds) the caches the cfg asks for (`cache_latents`, `cache_text_embeddings`) in
`cache_dir`, then exits; training with the same cfg reuses them at any process count. Every process
encodes its share in parallel (rows r, r+W, ...) with memory that does not grow with the dataset
(data/cache.py), so a big dataset is cached by one multi-node job (`scripts/prepare_cache.slurm`) or
locally (`scripts/prepare_cache.sh`, one process per visible GPU), and the GPUs of the training job
are not spent on it. No UNet is loaded and no output or checkpoint folder is written.
"""

from __future__ import annotations

import sys
import time

from ds_diffusers.config import Config, check_environment, load_config, parse_cfg_args
from ds_diffusers.config.hub import resolve_hub_ids
from ds_diffusers.data import prepare_caches, prepare_train_data
from ds_diffusers.data.text_prepass import TextSources, prepare_text
from ds_diffusers.distributed import StoppedOnEveryRank, all_gather, init_distributed, shutdown_distributed
from ds_diffusers.errors import ConfigError
from ds_diffusers.metrics import peak_memory_mb
from ds_diffusers.models import DTYPES, load_frozen_components
from ds_diffusers.quiet import quiet_known_notices


def check_something_to_cache(cfg: Config) -> None:
    if not (cfg.cache_latents or cfg.cache_text_embeddings):
        raise ConfigError("cache_latents", False, "this cfg caches nothing (cache_latents and cache_text_embeddings are both "
                          "false), so its training would read no cache; set them, e.g. --set cache_latents=true "
                          "cache_text_embeddings=true, here and in the training run")


def build_caches(cfg: Config) -> None:
    """All ranks: the dataset and encoders as training loads them, then the caches; one summary line."""
    started = time.perf_counter()
    dist = init_distributed()
    train_data = prepare_train_data(cfg, dist)
    checks = train_data.checks
    frozen = load_frozen_components(cfg.pretrained_model_name_or_path, dist.device, DTYPES[cfg.weight_dtype_name],
                                    cfg.prediction_type, cfg.vae_path, cfg.variant, with_text_encoders=False)
    text = prepare_text(cfg, TextSources(train_data.dataset, checks.caption_column, train_data.held_out), frozen, dist)
    if dist.is_main:
        print(f"ds-diffusers: {text.line}", flush=True)
    latent_cache, text_cache = prepare_caches(cfg, train_data.dataset, checks.image_column, checks.caption_column, frozen, dist,
                                             buckets=checks.buckets, text_cache=text.text_cache)
    # The largest resident set of any rank: what a node's memory must hold per process.
    peak = max(all_gather(peak_memory_mb()["peak_rss_mb"]))
    if dist.is_main:
        built = [name for name, cache in (("latents", latent_cache), ("text embeddings", text_cache)) if cache is not None]
        print(f"ds-diffusers: {' and '.join(built)} of {len(train_data.dataset)} rows ready in {cfg.cache_dir} after "
              f"{time.perf_counter() - started:.1f} s on {dist.world_size} process(es), peak RSS {peak:.0f} MiB "
              "(the largest process); train with the same cfg to use them", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_cfg_args(argv, prog="python -m ds_diffusers.cache", description=__doc__.splitlines()[0],
                          cfg_help="the JSON config file of the training run whose caches to build",
                          set_example="cache_latents=true cache_text_embeddings=true")
    quiet_known_notices()
    together = False
    try:
        cfg = resolve_hub_ids(load_config(args.cfg, args.overrides))
        check_something_to_cache(cfg)
        check_environment(cfg)
        build_caches(cfg)
        together = True
        return 0
    except ConfigError as err:
        print(f"ds-diffusers: config error: {err}", file=sys.stderr)
        together = isinstance(err, StoppedOnEveryRank)
        return 2
    finally:
        if together:
            shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
