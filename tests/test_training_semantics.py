"""One short run as a user starts it (`python -m ds_diffusers.train`, what the launch script runs for
one process) with every logger on, a partial accumulation window at the epoch end, caption dropout,
input perturbation and max_train_samples: each logger wrote loss and lr, no secret reached any file,
the output carries none of the known harmless library notices, and the final progress bar shows once."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, run_cfg

# One real training process (the user's start-up path), not an in-process test: outside the fast tier.
pytestmark = pytest.mark.slow
SECRET = "fake-wandb-key-0123456789abcdef0123456789"
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
STEPS = 4
NOTICES = ("Setting accelerator to CPU", "should be kept in float32", "before it has started",
           "requires torchvision (not installed)")


@pytest.fixture(scope="module")
def run(tiny_assets, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("semantics")
    # 40 samples / micro-batch 8 = 5 micro-batches per epoch; windows of 2 -> 2, 2, 1: 3 steps per epoch.
    overrides = run_cfg(tiny_assets, tmp_path, "max_train_samples=40", "gradient_accumulation_steps=2",
                        f"max_train_steps={STEPS}", "lr_warmup_steps=0", "caption_dropout=0.2", "input_perturbation=0.1",
                        "validation_steps=4", "num_validation_images=1", "validation_inference_steps=2",
                        "wandb.enabled=true", "offline=true", "csv_monitor.enabled=true",
                        f"tensorboard.enabled={str(HAS_TENSORBOARD).lower()}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", "WANDB_MODE": "offline", "WANDB_API_KEY": SECRET,
           "WANDB_DIR": str(tmp_path), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")}
    env.pop("DS_ACCELERATOR", None)
    result = subprocess.run([sys.executable, "-m", "ds_diffusers.train", "--cfg", "cfg/default.json", "--set", *overrides],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path, result.stdout + result.stderr


def test_partial_window_at_the_epoch_end_makes_a_step(run):
    tmp_path, _ = run
    records = [json.loads(line) for line in (tmp_path / "model/logs/metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [0, 0, 0, 1]
    assert records[0]["lr"] == pytest.approx(1e-3), "zero warmup: the first step runs at the full lr"


def test_wandb_and_csv_wrote_loss_and_lr(run):
    tmp_path, _ = run
    (wandb_file,) = (tmp_path / "model/wandb").glob("offline-run-*/run-*.wandb")
    content = wandb_file.read_bytes()
    assert b"train/loss" in content and b"train/lr" in content
    csv = tmp_path / "model/logs/csv/ds-diffusers"
    for name in ("Train_loss.csv", "Train_lr.csv"):
        rows = (csv / name).read_text().splitlines()
        assert len(rows) == STEPS + 1 and float(rows[-1].split(",")[1]) > 0, rows


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="the tensorboard package is not installed (requirements.txt pins it)")
def test_tensorboard_wrote_loss_and_lr(run):
    tmp_path, _ = run
    events = list((tmp_path / "model/logs/tensorboard").rglob("events.out.tfevents.*"))
    assert events and all(tag in b"".join(p.read_bytes() for p in events) for tag in (b"Train/loss", b"Train/lr"))


def test_no_secret_in_any_output_file_or_log(run):
    tmp_path, output = run
    assert SECRET not in output
    leaks = [path for path in tmp_path.rglob("*") if path.is_file() and SECRET.encode() in path.read_bytes()]
    assert not leaks, leaks


def test_output_is_free_of_harmless_notices_and_shows_the_final_bar_once(run):
    _, output = run
    for notice in NOTICES:
        assert notice not in output, notice
    assert output.count(f"{STEPS}/{STEPS} [") == 1, output[-3000:]
