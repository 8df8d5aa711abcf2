"""Shared fixtures: one small build of the embedded tiny model and dataset per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _restore_environ():
    """Tests that run an entrypoint in-process (its `main()`) leave MASTER_PORT, RANK, DS_ACCELERATOR
    ... in os.environ; every later subprocess would inherit them and reuse a port the in-process
    group may still hold. Each test starts from the environment the session started with."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    from ds_diffusers.embedded import ensure_embedded_assets

    root: Path = tmp_path_factory.mktemp("embedded")
    return ensure_embedded_assets(root, num_images=96, vae_train_steps=60)


def _real_arch_assets(family: str, tiny_assets, tmp_path_factory):
    """A random-weight model with `family`'s real block structure at test width, on the shapes dataset."""
    from ds_diffusers.embedded import EmbeddedAssets
    from ds_diffusers.embedded.arch_sd import build_sd

    model_dir: Path = tmp_path_factory.mktemp(family) / "model"
    build_sd(model_dir, family, size="test")
    return EmbeddedAssets(model_dir=model_dir, dataset_dir=tiny_assets.dataset_dir)


@pytest.fixture(scope="session")
def sd15_assets(tiny_assets, tmp_path_factory):
    return _real_arch_assets("sd15", tiny_assets, tmp_path_factory)


@pytest.fixture(scope="session")
def sd2_assets(tiny_assets, tmp_path_factory):
    return _real_arch_assets("sd2", tiny_assets, tmp_path_factory)
