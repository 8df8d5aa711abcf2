"""Hub ids in the path keys, offline: against a hub cache laid out as huggingface_hub writes it
(blobs, snapshot symlinks, refs), built from the tiny embedded model and shapes dataset."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from ds_diffusers.config import load_config, validate_dict
from ds_diffusers.config.checks import check_environment
from ds_diffusers.config.hub import HubSource, files_to_download, hub_sources, resolve_hub_ids
from ds_diffusers.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
VARIANT_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def cache_repo(cache: Path, repo_id: str, source: Path, commit: str, repo_type: str = "model",
               refs: tuple[str, ...] = ("main",)) -> Path:
    """Copy `source` into the hub cache as huggingface_hub stores a download: content-addressed
    files in blobs/, the snapshot as relative symlinks to them, and refs/<name> holding the commit."""
    storage = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        blob = storage / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def local_assets(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(model, the same model as fp16-variant files only, hub-layout dataset), built locally."""
    from ds_diffusers.embedded.shapes import write_dataset
    from ds_diffusers.embedded.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("hub_assets")
    build_tiny_model(root / "model", vae_train_steps=0)
    variant = root / "variant"
    shutil.copytree(root / "model", variant)
    for weights in list(variant.rglob("*.safetensors")):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    write_dataset(root / "dataset", 8, 0, "hub")
    return root / "model", variant, root / "dataset"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, local_assets) -> Path:
    """HF_HOME in tmp_path, offline, holding org/tiny (main and tag v1), org/tiny-variant and datasets org/shapes."""
    model, variant, dataset = local_assets
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "hf" / "hub"
    cache_repo(cache, "org/tiny", model, COMMIT, refs=("main", "v1"))
    cache_repo(cache, "org/tiny-variant", variant, VARIANT_COMMIT)
    cache_repo(cache, "org/shapes", dataset, COMMIT, repo_type="dataset")
    return cache


def run_cfg(tmp_path: Path, **keys) -> dict:
    raw = json.loads((REPO / "cfg" / "default.json").read_text())
    raw.update(output_dir=str(tmp_path / "out"), checkpoint_dir=str(tmp_path / "ckpt"), validation_steps=0,
               pretrained_model_name_or_path="org/tiny", dataset_dir="org/shapes")
    raw.update(keys)
    return raw


def load(tmp_path: Path, **keys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run_cfg(tmp_path, **keys)))
    return load_config(path)


def test_model_and_dataset_ids_resolve_to_their_snapshots_and_load(hub_cache, tmp_path, local_assets, capsys):
    from ds_diffusers.data import load_train_dataset
    from ds_diffusers.models import build_unet, load_frozen_components

    cfg = resolve_hub_ids(load(tmp_path))
    assert cfg.pretrained_model_name_or_path == str(hub_cache / "models--org--tiny" / "snapshots" / COMMIT)
    assert cfg.dataset_dir == str(hub_cache / "datasets--org--shapes" / "snapshots" / COMMIT)
    out = capsys.readouterr().out
    assert f"org/tiny (revision main, commit {COMMIT[:12]})" in out and "org/shapes" in out
    check_environment(cfg)
    frozen = load_frozen_components(cfg.pretrained_model_name_or_path, torch.device("cpu"), torch.float32, None)
    assert frozen.vae.config.latent_channels > 0
    unet = build_unet(cfg)
    from safetensors.torch import load_file

    expected = load_file(local_assets[0] / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(tensor, expected[name]) for name, tensor in unet.state_dict().items())
    assert len(load_train_dataset(cfg.dataset_dir, imagefolder=False)) == 8


def test_a_tag_revision_and_a_commit_resolve_to_the_same_snapshot(hub_cache, tmp_path):
    by_tag = resolve_hub_ids(load(tmp_path, revision="v1"))
    by_commit = resolve_hub_ids(load(tmp_path, revision=COMMIT))
    assert by_tag.pretrained_model_name_or_path == by_commit.pretrained_model_name_or_path
    assert by_tag.revision == "v1"  # the requested revision stays in the config, for the record


def test_variant_loads_the_variant_files(hub_cache, tmp_path):
    from ds_diffusers.models import build_unet, load_frozen_components

    cfg = resolve_hub_ids(load(tmp_path, pretrained_model_name_or_path="org/tiny-variant", variant="fp16"))
    check_environment(cfg)
    load_frozen_components(cfg.pretrained_model_name_or_path, torch.device("cpu"), torch.float32, None, variant="fp16")
    assert sum(p.numel() for p in build_unet(cfg).parameters()) > 0
    with pytest.raises(ConfigError) as info:  # the plain name would find no weights: say which variant is there
        resolve_hub_ids(load(tmp_path, pretrained_model_name_or_path="org/tiny-variant"))
    assert info.value.field == "variant" and "fp16" in info.value.fix


def test_an_existing_local_folder_wins_over_a_hub_id(hub_cache, tmp_path, local_assets):
    shutil.copytree(local_assets[0], tmp_path / "org" / "tiny")
    cfg = resolve_hub_ids(load(tmp_path))
    assert cfg.pretrained_model_name_or_path == "org/tiny"
    with pytest.raises(ConfigError) as info:
        hub_sources(validate_dict(run_cfg(tmp_path, revision="v1")))
    assert info.value.field == "revision"


@pytest.mark.parametrize("keys, field, words", [
    ({"pretrained_model_name_or_path": "org/absent"}, "pretrained_model_name_or_path", "HF_HUB_OFFLINE"),
    ({"revision": "v9"}, "revision", "no snapshot of org/tiny at this revision"),
    ({"pretrained_model_name_or_path": "org/bad--id"}, "pretrained_model_name_or_path", "not a valid hub id"),
    ({"dataset_dir": "org/absent"}, "dataset_dir", "HF_HUB_OFFLINE"),
    ({"dataset_revision": "v9"}, "dataset_revision", "at this revision"),
    ("missing file", "pretrained_model_name_or_path", "unet/config.json is missing"),
])
def test_hub_errors_are_one_line_exit_2_and_write_nothing(hub_cache, tmp_path, capsys, keys, field, words):
    from ds_diffusers.train import main

    if keys == "missing file":
        (hub_cache / "models--org--tiny" / "snapshots" / COMMIT / "unet" / "config.json").unlink()
        keys = {}
    (tmp_path / "run.json").write_text(json.dumps(run_cfg(tmp_path, **keys)))
    assert main(["--cfg", str(tmp_path / "run.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ds-diffusers: config error: {field}=") and words in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt").exists()


def test_sample_reports_an_uncached_id_the_same_way(hub_cache, tmp_path, capsys):
    from ds_diffusers.sample import main

    (tmp_path / "run.json").write_text(json.dumps(run_cfg(tmp_path, pretrained_model_name_or_path="org/absent")))
    assert main(["--cfg", str(tmp_path / "run.json")]) == 2
    assert "pretrained_model_name_or_path='org/absent'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


SD15_FILES = [
    ".gitattributes", "README.md", "model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors",
    "feature_extractor/preprocessor_config.json", "safety_checker/config.json", "safety_checker/model.safetensors",
    "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin", "text_encoder/flax_model.msgpack",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.bin", "unet/model.onnx",
    "vae/config.json", "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin",
]


def source(kind: str = "pipeline", variant: str | None = None) -> HubSource:
    return HubSource("pretrained_model_name_or_path", "org/name", kind, None, "revision", variant)


def test_downloads_only_what_loading_reads():
    assert files_to_download(SD15_FILES, source()) == [
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
        "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.bin"]
    fp16 = files_to_download(SD15_FILES, source(variant="fp16"))
    assert [f for f in fp16 if "model" in f.split("/")[-1] and f.endswith(("safetensors", "bin"))] == [
        "text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.bin"]
    sharded = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
               "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
               "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors", "unet/diffusion_pytorch_model.safetensors"]
    assert files_to_download(sharded, source(variant="fp16")) == sorted(set(sharded) - {"unet/diffusion_pytorch_model.safetensors"})
    vae = ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "sdxl_vae.safetensors", "README.md"]
    assert files_to_download(vae, source("vae")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert files_to_download([".gitattributes", "README.md", "data/train-0.parquet"], source("dataset")) == [
        "README.md", "data/train-0.parquet"]


def test_a_repo_without_the_wanted_weights_is_refused_before_downloading():
    with pytest.raises(ConfigError) as info:
        files_to_download(SD15_FILES, source(variant="bf16"))
    assert info.value.field == "pretrained_model_name_or_path" and "bf16" in info.value.fix
    with pytest.raises(ConfigError) as info:
        files_to_download(["README.md", "sd_xl_base_1.0.safetensors"], source())
    assert "model_index.json" in info.value.fix


def test_online_download_asks_for_the_selected_files_once_per_node(hub_cache, tmp_path, monkeypatch):
    """The online path with the hub replaced by stubs: one file list, and the download limited to it."""
    import huggingface_hub
    from huggingface_hub import ResolvedRevision

    from ds_diffusers.config import hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "resolve_revision", lambda self, repo_id, **kw: ResolvedRevision(
        resolved=COMMIT, initial=kw["revision"], repo_id=repo_id, repo_type=kw["repo_type"]))
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, **kw: SD15_FILES)

    def snapshot_download(repo_id, **kw):
        calls.append(kw["allow_patterns"])
        return str(hub_cache / "models--org--tiny" / "snapshots" / COMMIT)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    folder = hub.resolve_source(HubSource("pretrained_model_name_or_path", "org/tiny", "pipeline", None, "revision", None))
    assert folder.name == COMMIT
    assert calls == [files_to_download(SD15_FILES, source())]
    assert list((hub_cache / ".locks").glob("ds-diffusers--models--org--tiny.lock"))


def test_an_export_from_a_variant_model_loads_without_the_variant(hub_cache, tmp_path):
    """The frozen parts are copied from the snapshot (its files, not its symlinks) under plain names,
    as the exported unet/ is written."""
    from transformers import CLIPTextModel

    from ds_diffusers.export import copy_frozen_components

    snapshot = hub_cache / "models--org--tiny-variant" / "snapshots" / VARIANT_COMMIT
    copy_frozen_components(snapshot, tmp_path / "export", variant="fp16")
    assert (tmp_path / "export" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert not any(path.is_symlink() for path in (tmp_path / "export").rglob("*"))
    CLIPTextModel.from_pretrained(tmp_path / "export" / "text_encoder")
    assert (snapshot / "text_encoder" / "model.fp16.safetensors").is_file()  # the cache is untouched


def test_write_shards_reads_hub_ids_like_training(hub_cache, tmp_path):
    """`python -m ds_diffusers.data.write_shards` resolves a model and a dataset id from the hub cache, as
    train/cache/sample do (it passed them on unresolved, and `--encode` read the model's family from a
    folder that does not exist)."""
    from ds_diffusers.data.write_shards import main

    path = tmp_path / "run.json"
    path.write_text(json.dumps(run_cfg(tmp_path, resolution=32, train_micro_batch_size_per_gpu=4)))
    assert main(["--cfg", str(path), "--out", str(tmp_path / "shards"), "--samples-per-shard", "4", "--encode"]) == 0
    assert len(list((tmp_path / "shards").glob("*.tar"))) == 2  # the 8 rows of org/shapes
