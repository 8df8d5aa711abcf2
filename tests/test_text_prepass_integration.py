"""The text pre-pass through DeepSpeed's launcher on the FLUX.1 [dev]-shaped test model: the
caches `python -m ds_diffusers.cache` writes on 2 processes with the encoders partitioned by ZeRO-3
hold the same tensors as on 1 process with them replicated; a LoRA run with both caches frees CLIP and
T5 after the pre-pass, draws its validation grid from prompt embeddings and gives the losses of a run
that kept the encoders, and its resume never loads them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ds_diffusers.data.cache import ShardedStore, TextCache
from tests.helpers import assert_ok, launch, launch_module, losses

pytestmark = pytest.mark.multiprocess

NAMES = ("encoder_hidden_states", "pooled_projections")


def flux_cfg(model_dir: Path, dataset_dir: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [f"pretrained_model_name_or_path={model_dir}", f"dataset_dir={dataset_dir}", f"output_dir={run_dir / 'model'}",
            f"checkpoint_dir={run_dir / 'checkpoints'}", f"cache_dir={run_dir / 'cache'}", "resolution=64",
            "train_micro_batch_size_per_gpu=4", "validation_steps=0", "save_interval=0", "lr_warmup_steps=1",
            "log_every_n_steps=1", "scheduler.params={}", "max_train_steps=3", "max_train_samples=16",
            "validation_prompts=[\"a red circle\", \"a blue square\"]", "use_lora.action=true", "use_lora.rank=4",
            "use_lora.alpha=8", "optimizer.params.lr=0.01", "zero_optimization.stage=2", *overrides]


def text_caches(cache_dir: Path) -> dict[str, TextCache]:
    """Each text-kind cache folder ("text", "prompts") of `cache_dir`, read as training reads it."""
    found = {}
    for meta_file in cache_dir.glob("*/meta.json"):
        meta = json.loads(meta_file.read_text())
        if meta["kind"] in ("text", "prompts"):
            folder = meta_file.parent
            captions = json.loads((folder / "captions.json").read_text())
            found[meta["kind"]] = TextCache(ShardedStore(folder, meta["num_shards"]), captions, NAMES)
    return found


def test_two_partitioned_processes_write_the_caches_of_one_replicated(flux_model, tiny_assets, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert_ok(launch_module("ds_diffusers.cache", ["--cfg", "cfg/default.json", "--set",
                                                   *flux_cfg(flux_model, tiny_assets.dataset_dir, one, "cache_text_embeddings=true")],
                            procs=1))
    built = launch_module("ds_diffusers.cache", ["--cfg", "cfg/default.json", "--set",
                                                 *flux_cfg(flux_model, tiny_assets.dataset_dir, two, "cache_text_embeddings=true",
                                                           "text_encoder_zero3=true")], procs=2)
    assert_ok(built)
    assert "text encoders freed after the pre-pass" in built.stdout and "partitioned by ZeRO-3" in built.stdout
    ones, twos = text_caches(one / "cache"), text_caches(two / "cache")
    assert set(ones) == set(twos) == {"text", "prompts"}
    for kind in ones:
        assert ones[kind].store.folder.name == twos[kind].store.folder.name  # the same key
        assert (twos[kind].store.num_shards, ones[kind].store.num_shards) == (2, 1)
        assert ones[kind].index == twos[kind].index and len(ones[kind].index) > 2
        for caption in ones[kind].index:
            want, got = ones[kind].embeddings(caption), twos[kind].embeddings(caption)
            assert all(torch.equal(want[name], got[name]) for name in NAMES), (kind, caption)


def test_covered_run_frees_the_encoders_with_the_losses_of_a_run_that_kept_them(flux_model, tiny_assets, tmp_path):
    kept, freed = tmp_path / "kept", tmp_path / "freed"
    validated = ("validation_steps=3", "num_validation_images=1", "validation_inference_steps=2", "save_interval=2")
    result = launch(flux_cfg(flux_model, tiny_assets.dataset_dir, kept, "cache_latents=true", *validated))
    assert_ok(result)
    assert "text encoders kept for training (no text cache: cache_text_embeddings is false)" in result.stdout
    result = launch(flux_cfg(flux_model, tiny_assets.dataset_dir, freed, "cache_latents=true", "cache_text_embeddings=true",
                             *validated))
    assert_ok(result)
    assert ("text encoders freed after the pre-pass (text_encoder (CLIPTextModel), text_encoder_2 (T5EncoderModel): "
            in result.stdout) and "0 bytes held in training" in result.stdout
    history = losses(kept / "model")
    assert len(history) == 3 and all(math.isfinite(loss) for loss in history)
    assert losses(freed / "model") == pytest.approx(history, abs=1e-6)
    for run in (kept, freed):
        assert (run / "model" / "validation" / "step_000003.png").stat().st_size > 0

    resumed = launch(flux_cfg(flux_model, tiny_assets.dataset_dir, freed, "cache_latents=true", "cache_text_embeddings=true",
                              *validated, f"resume_from_checkpoint={freed / 'checkpoints' / 'step_2'}",
                              f"output_dir={tmp_path / 'resumed'}"))
    assert_ok(resumed)
    assert "text encoders never loaded" in resumed.stdout and "resumed from" in resumed.stdout
    assert losses(tmp_path / "resumed") == pytest.approx(history[2:], abs=1e-6)
