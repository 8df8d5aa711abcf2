"""Build-once cache of the embedded model and dataset, safe across interrupts and ranks.

Each asset is built in a temporary sibling folder, stamped with BUILD_INFO.json (the recipe), and
only then renamed into place, so a folder with a matching BUILD_INFO.json is always complete.
An exclusive `flock` on `root/.lock` serialises concurrent callers (e.g. several ranks).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ds_diffusers.embedded.recipe import DEFAULT_NUM_IMAGES, DEFAULT_VAE_TRAIN_STEPS, RECIPE_VERSION

BUILD_INFO = "BUILD_INFO.json"
# The builders (torch, diffusers, PIL) are imported only when something must be built: the launch
# scripts check the assets before every run, and a reuse should cost milliseconds, not imports.


@dataclass(frozen=True)
class EmbeddedAssets:
    model_dir: Path
    dataset_dir: Path


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _recorded_recipe(target: Path) -> dict | None:
    try:
        return json.loads((target / BUILD_INFO).read_text())["recipe"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def _build_atomically(target: Path, recipe: dict, build: Callable[[Path], None]) -> None:
    """Reuse `target` if its BUILD_INFO matches `recipe`, else build it aside and swap it in.

    Must be called with the lock held: leftovers of interrupted builds are then known to be stale.
    """
    if _recorded_recipe(target) == recipe:
        return
    parent = target.parent
    for stale in parent.glob(f".{target.name}.*"):
        shutil.rmtree(stale)
    staging = parent / f".{target.name}.building-{os.getpid()}"
    started = time.perf_counter()
    build(staging)
    build_info = {"recipe": recipe, "build_seconds": round(time.perf_counter() - started, 1)}
    (staging / BUILD_INFO).write_text(json.dumps(build_info, indent=2) + "\n")
    if target.exists():
        # A directory cannot be os.replace'd over a non-empty one: move the old one aside first.
        retired = parent / f".{target.name}.retired-{os.getpid()}"
        os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired)
    else:
        os.replace(staging, target)


def ensure_embedded_assets(
    root: Path,
    num_images: int = DEFAULT_NUM_IMAGES,
    vae_train_steps: int = DEFAULT_VAE_TRAIN_STEPS,
    seed: int = 0,
) -> EmbeddedAssets:
    """Build (or reuse) `root/tiny-sd` (diffusers SD folder) and `root/shapes` (hub-layout dataset).

    Safe to call on all ranks at once: the first caller builds while the others wait on the lock,
    then find the finished folders and reuse them.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    assets = EmbeddedAssets(model_dir=root / "tiny-sd", dataset_dir=root / "shapes")
    model_recipe = {"version": RECIPE_VERSION, "seed": seed, "vae_train_steps": vae_train_steps}
    dataset_recipe = {"version": RECIPE_VERSION, "seed": seed, "num_images": num_images, "layout": "hub"}
    with _exclusive_lock(root / ".lock"):
        _build_atomically(assets.model_dir, model_recipe, lambda out: _build_model(out, seed, vae_train_steps))
        _build_atomically(assets.dataset_dir, dataset_recipe, lambda out: _build_dataset(out, num_images, seed))
    return assets


def _build_model(out: Path, seed: int, vae_train_steps: int) -> None:
    import torch

    from ds_diffusers.embedded.tiny_model import build_tiny_model

    # Oversubscribing a small CPU box makes the VAE training several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        build_tiny_model(out, seed=seed, vae_train_steps=vae_train_steps)
    finally:
        torch.set_num_threads(threads)


def _build_dataset(out: Path, num_images: int, seed: int) -> None:
    from ds_diffusers.embedded.shapes import write_dataset

    write_dataset(out, num_images, seed, layout="hub")
