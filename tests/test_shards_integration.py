"""Training from WebDataset shards through the real launcher, on the tiny model: raw shards resume
exactly (2 processes, across an epoch end), and pre-encoded shards train as the raw ones do."""

from __future__ import annotations

import pytest

from ds_diffusers.config import load_config
from ds_diffusers.data.write_shards import write_shards
from tests.helpers import REPO, assert_ok, launch, losses, run_cfg, three_runs

pytestmark = pytest.mark.multiprocess

# 96 rows, 12 to a shard: 8 shards, one per partition; 2 processes × 8 samples: 6 micro-batches an epoch.
STEPS = 8


@pytest.fixture(scope="module")
def shard_folders(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    cfg = load_config(REPO / "cfg/default.json", [f"pretrained_model_name_or_path={tiny_assets.model_dir}",
                                                  f"dataset_dir={tiny_assets.dataset_dir}", "resolution=32",
                                                  "train_micro_batch_size_per_gpu=8"])
    assert write_shards(cfg, root / "raw", samples_per_shard=12, encode=False) == 8
    assert write_shards(cfg, root / "encoded", samples_per_shard=12, encode=True) == 8
    return root / "raw", root / "encoded"


def test_raw_shards_resume_exactly_and_pre_encoded_shards_train_alike(tiny_assets, shard_folders, tmp_path):
    raw, encoded = shard_folders
    straight, resumed = three_runs(tiny_assets, tmp_path, f"dataset_dir={raw}", "dataset_format=webdataset", steps=STEPS)
    a, b = losses(straight), losses(resumed)  # the resumed folder logs both halves
    assert len(a) == len(b) == STEPS
    # Stopped mid-epoch (step 4 of 6 an epoch), resumed across the epoch end; as test_full_resume_is_exact.
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6

    pre_encoded = tmp_path / "encoded"
    assert_ok(launch(run_cfg(tiny_assets, pre_encoded, f"dataset_dir={encoded}", "dataset_format=webdataset",
                             "scheduler.type=WarmupLR", "scheduler.params={}", "lr_warmup_steps=2", "max_train_steps=4"),
                     procs=2))
    # The same samples, draws and encoder outputs (stored instead of computed): the same losses to float noise.
    assert losses(pre_encoded / "model") == pytest.approx(losses(straight)[:4], rel=1e-4)
