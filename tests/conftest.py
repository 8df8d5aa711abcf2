"""Shared fixtures (one small build of each test model per session, a byte-level tokenizer) and the
test tiers: every `multiprocess` and `slurm` test is also `slow`, so `-m "not slow"` is the fast tier."""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import pytest


def pytest_collection_modifyitems(items):
    """Launcher and Slurm runs are slow by nature; the fast tier (`-m "not slow"`) leaves them out."""
    for item in items:
        if item.get_closest_marker("multiprocess") or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)


# The environment the session started with, before any fixture ran.
_SESSION_ENVIRON = dict(os.environ)


def _reset_environ(to: dict[str, str]) -> None:
    for name in set(os.environ) - set(to) - {"PYTEST_CURRENT_TEST"}:  # pytest removes that one itself
        del os.environ[name]
    os.environ.update(to)


@pytest.fixture(autouse=True)
def _restore_environ():
    """Tests that start a process group in-process (an entrypoint's `main()`) leave MASTER_PORT,
    RANK, DS_ACCELERATOR ... in os.environ while the group keeps the port bound; every later
    subprocess would inherit the port (EADDRINUSE). Each test's changes are undone after it."""
    saved = dict(os.environ)
    yield
    _reset_environ(saved)


@pytest.fixture(autouse=True, scope="module")
def _restore_environ_per_module():
    """The same for module-scoped fixtures that start an in-process DeepSpeed group for their tests."""
    yield
    _reset_environ(_SESSION_ENVIRON)


@pytest.fixture(autouse=True)
def _destroy_engines_after_each_test():
    """Destroy the DeepSpeed engines a test built in this process. An engine is not freed with its
    last reference (its hooks keep it alive) and every ZeRO-3 engine reserves a 2 GB bucket: a few
    dozen made this process so large that fork() (DataLoader workers) failed with ENOMEM."""
    deepspeed = sys.modules.get("deepspeed")
    if deepspeed is None:  # imported by the tests that build engines (one_rank), before this runs
        yield
        return
    initialize, engines = deepspeed.initialize, []

    def recording_initialize(*args, **kwargs):
        result = initialize(*args, **kwargs)
        engines.append(result[0])
        return result

    deepspeed.initialize = recording_initialize
    try:
        yield
    finally:
        deepspeed.initialize = initialize
        for engine in engines:
            engine.destroy()
        if engines:
            gc.collect()


@pytest.fixture(scope="module")
def one_rank():
    """A one-process gloo group in this process for a module's tests (in-process DeepSpeed engines)."""
    import deepspeed
    import torch

    from ds_diffusers.distributed import free_port

    if torch.distributed.is_initialized():
        yield
        return
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    torch.distributed.destroy_process_group()
    # DeepSpeed keeps a clone of the world group; a later module's group would find this dead one.
    from deepspeed.utils import groups

    groups._WORLD_GROUP = None


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


@pytest.fixture(scope="session")
def sdxl_model(tmp_path_factory) -> Path:
    from ds_diffusers.embedded.arch_sdxl import build_sdxl_model

    return build_sdxl_model(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="session")
def flux_model(tmp_path_factory) -> Path:
    """A FLUX.1 [dev]-shaped model at test size (`embedded.arch_flux`: the real block structure, sharded transformer)."""
    from ds_diffusers.embedded.arch_flux import build_flux

    model_dir: Path = tmp_path_factory.mktemp("flux") / "tiny-flux-dev"
    build_flux(model_dir, "dev")
    return model_dir


@pytest.fixture(scope="session")
def sd3_model(tmp_path_factory) -> Path:
    """An SD 3.5 Medium-shaped model at test size (`embedded.arch_sd3`: MMDiT-X dual-attention blocks, three text encoders)."""
    from ds_diffusers.embedded.arch_sd3 import build_sd3

    model_dir: Path = tmp_path_factory.mktemp("sd3") / "tiny-sd35-medium"
    build_sd3(model_dir, "medium", size="test")
    return model_dir


@pytest.fixture(scope="session")
def qwen_image_model(tmp_path_factory) -> Path:
    """A Qwen-Image-shaped model at test size (`embedded.arch_qwen_image`: the real block structure, narrow)."""
    from ds_diffusers.embedded.arch_qwen_image import build_qwen_image

    model_dir: Path = tmp_path_factory.mktemp("qwen_image") / "tiny-qwen-image"
    build_qwen_image(model_dir)
    return model_dir


def _bytes_to_unicode() -> list[str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [256 + n for n in range(256 - len(printable))]
    others = [byte for byte in range(256) if byte not in printable]
    return [chr(code) for code in printable] + [chr(shifted[others.index(b)]) for b in others]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A CLIP tokenizer over single bytes (no merges), 12 tokens long: captions tokenize predictably."""
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    symbols = _bytes_to_unicode()
    vocab = {token: i for i, token in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=12, local_files_only=True)
