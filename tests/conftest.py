"""Shared fixtures: one small build of the embedded tiny model and dataset per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    from ds_diffusers.embedded import ensure_embedded_assets

    root: Path = tmp_path_factory.mktemp("embedded")
    return ensure_embedded_assets(root, num_images=96, vae_train_steps=60)
