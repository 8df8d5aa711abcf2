"""`python -m ds_diffusers.embedded --out data/embedded`: build (or reuse) the embedded assets."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ds_diffusers.embedded.cache import ensure_embedded_assets
from ds_diffusers.embedded.recipe import DEFAULT_NUM_IMAGES, DEFAULT_VAE_TRAIN_STEPS
from ds_diffusers.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_diffusers.embedded", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("data/embedded"))
    parser.add_argument("--num-images", type=int, default=DEFAULT_NUM_IMAGES)
    parser.add_argument("--vae-train-steps", type=int, default=DEFAULT_VAE_TRAIN_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        assets = ensure_embedded_assets(args.out, args.num_images, args.vae_train_steps, args.seed)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(assets.model_dir)
    print(assets.dataset_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
