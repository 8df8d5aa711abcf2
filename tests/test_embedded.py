"""The embedded tiny model and shapes dataset: loadable by the real loaders, deterministic, cached."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_dataset, load_from_disk
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from ds_diffusers.embedded import ensure_embedded_assets
from ds_diffusers.embedded.judge import judge
from ds_diffusers.embedded.shapes import CLASSES, LAYOUTS, render, write_dataset
from ds_diffusers.embedded.tiny_model import build_tiny_model
from ds_diffusers.embedded.tokenizer import corpus_words

# A reduced build: a few VAE steps exercise the training code without costing test time.
FAST_VAE_STEPS = 2
FAST_NUM_IMAGES = 24


@pytest.fixture(scope="module")
def fast_assets(tmp_path_factory):
    return ensure_embedded_assets(
        tmp_path_factory.mktemp("embedded"), num_images=FAST_NUM_IMAGES, vae_train_steps=FAST_VAE_STEPS
    )


def _load(layout: str, out_dir: Path):
    if layout == "hub":
        return load_dataset(str(out_dir), split="train")
    if layout == "imagefolder":
        return load_dataset("imagefolder", data_dir=str(out_dir), split="train")
    return load_from_disk(str(out_dir))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_with_captions_naming_the_class(tmp_path, layout):
    write_dataset(tmp_path / layout, num_images=12, seed=0, layout=layout)
    dataset = _load(layout, tmp_path / layout)
    assert len(dataset) == 12
    assert {"image", "text", "color", "shape"} <= set(dataset.column_names)
    row = dataset[5]
    assert row["image"].size == (64, 64)
    assert 2 <= len(row["text"]) <= 3
    assert all(row["color"] in caption and row["shape"] in caption for caption in row["text"])
    assert {(r["color"], r["shape"]) for r in dataset} == set(CLASSES)


def _file_digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*")) if path.is_file()
    }


@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_seed_gives_byte_identical_files(tmp_path, layout):
    write_dataset(tmp_path / "a", num_images=12, seed=3, layout=layout)
    write_dataset(tmp_path / "b", num_images=12, seed=3, layout=layout)
    write_dataset(tmp_path / "c", num_images=12, seed=4, layout=layout)
    assert _file_digests(tmp_path / "a") == _file_digests(tmp_path / "b")
    assert _file_digests(tmp_path / "a") != _file_digests(tmp_path / "c")


def test_judge_recognises_rendered_shapes():
    rng = np.random.default_rng(0)
    for color, shape in CLASSES * 5:
        verdict = judge(render(color, shape, rng))
        assert (verdict.color, verdict.shape) == (color, shape)


def test_pipeline_loads_and_generates_64px(fast_assets):
    pipeline = StableDiffusionPipeline.from_pretrained(fast_assets.model_dir)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.safety_checker is None
    image = pipeline(
        "a red circle", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)


def test_tokenizer_round_trips_any_prompt_and_keeps_dataset_words_whole(fast_assets):
    tokenizer = CLIPTokenizer.from_pretrained(fast_assets.model_dir, subfolder="tokenizer")
    # CLIP lowercases and decodes each pre-token as a word (so "x=3" comes back as "x = 3");
    # every character, accents, CJK and emoji included, must survive the byte-level BPE.
    prompt = "Ünïcödé façade 東京 🚀 — 'quoted', x=3!"
    input_ids = tokenizer(prompt).input_ids
    assert tokenizer.unk_token_id not in input_ids[1:-1]
    decoded = tokenizer.decode(input_ids, skip_special_tokens=True)
    assert "".join(decoded.split()) == "".join(prompt.lower().split())
    for word in corpus_words():
        assert len(tokenizer(word).input_ids) == 3, word  # BOS, the word, EOS


def test_model_build_is_deterministic(tmp_path):
    build_tiny_model(tmp_path / "a", seed=0, vae_train_steps=FAST_VAE_STEPS)
    build_tiny_model(tmp_path / "b", seed=0, vae_train_steps=FAST_VAE_STEPS)
    weight_files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.safetensors"))
    assert len(weight_files) == 3  # text_encoder, vae, unet
    for relative in weight_files:
        tensors_a, tensors_b = load_file(tmp_path / "a" / relative), load_file(tmp_path / "b" / relative)
        assert tensors_a.keys() == tensors_b.keys()
        assert all(torch.equal(tensors_a[name], tensors_b[name]) for name in tensors_a), relative
    vae_config = json.loads((tmp_path / "a" / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == json.loads((tmp_path / "b" / "vae" / "config.json").read_text())[
        "scaling_factor"
    ]


def test_cached_build_is_reused_and_a_changed_recipe_rebuilds(tmp_path, monkeypatch):
    first = ensure_embedded_assets(tmp_path, num_images=FAST_NUM_IMAGES, vae_train_steps=0)
    unet_weights = first.model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    parquet = first.dataset_dir / "data" / "train-00000-of-00001.parquet"
    stamps = (unet_weights.stat().st_mtime_ns, parquet.stat().st_mtime_ns)

    import ds_diffusers.embedded.cache as cache

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a cached asset was rebuilt")

    with monkeypatch.context() as patch:
        patch.setattr(cache, "_build_model", no_rebuild)
        patch.setattr(cache, "_build_dataset", no_rebuild)
        second = ensure_embedded_assets(tmp_path, num_images=FAST_NUM_IMAGES, vae_train_steps=0)
    assert second == first
    assert (unet_weights.stat().st_mtime_ns, parquet.stat().st_mtime_ns) == stamps

    ensure_embedded_assets(tmp_path, num_images=FAST_NUM_IMAGES + 12, vae_train_steps=0)
    assert len(load_dataset(str(first.dataset_dir), split="train")) == FAST_NUM_IMAGES + 12
    assert unet_weights.stat().st_mtime_ns == stamps[0]  # only the dataset recipe changed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != ".lock"]


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    import ds_diffusers.embedded.cache as cache

    def crash_half_way(out_dir, *args, **kwargs):
        (Path(out_dir) / "data").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "_build_dataset", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        ensure_embedded_assets(tmp_path, num_images=FAST_NUM_IMAGES, vae_train_steps=0)
    assert (tmp_path / "tiny-sd" / "BUILD_INFO.json").exists()  # finished before the crash
    assert not (tmp_path / "shapes").exists()

    monkeypatch.undo()
    assets = ensure_embedded_assets(tmp_path, num_images=FAST_NUM_IMAGES, vae_train_steps=0)
    assert len(load_dataset(str(assets.dataset_dir), split="train")) == FAST_NUM_IMAGES
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != ".lock"]


def test_concurrent_callers_build_once(tmp_path, monkeypatch):
    # flock locks belong to open file descriptions, so threads contend exactly as ranks would.
    import threading

    import ds_diffusers.embedded.cache as cache

    builds = []
    real_build = cache._build_model

    def counting_build(*args, **kwargs):
        builds.append(threading.get_ident())
        real_build(*args, **kwargs)

    monkeypatch.setattr(cache, "_build_model", counting_build)
    results = []
    callers = [
        threading.Thread(
            target=lambda: results.append(ensure_embedded_assets(tmp_path, num_images=12, vae_train_steps=0))
        )
        for _ in range(3)
    ]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(builds) == 1
    assert len(results) == 3 and len(set(results)) == 1
    assert StableDiffusionPipeline.from_pretrained(results[0].model_dir).unet is not None
