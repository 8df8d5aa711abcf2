"""End-to-end runs through DeepSpeed's launcher on the embedded tiny model.

Kept few and short: each run trains a few dozen steps at 32 px. They check what a user relies on:
the loss falls, the export loads in diffusers, errors stop the run with the right exit code and
leave nothing behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, assert_ok, launch, losses, run_cfg

pytestmark = pytest.mark.multiprocess


def assert_loss_falls(output_dir: Path, steps: int) -> None:
    history = losses(output_dir)
    assert len(history) == steps
    head, tail = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert tail < 0.8 * head, f"loss did not fall: first five {history[:5]}, last five {history[-5:]}"


def assert_full_export_loads(tmp_path: Path, base_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model")
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)
    base = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    changed = [not torch.equal(p, q) for p, q in zip(base.parameters(), pipe.unet.parameters())]
    assert sum(changed) > 0.9 * len(changed), "export does not hold the trained weights"


# One process runs ZeRO-1/2 as stage 0 (tested in test_deepspeed_config), so stage 3 is the other path.
@pytest.mark.parametrize("stage", [0, 3])
def test_full_finetune_single_process(tiny_assets, tmp_path, stage):
    result = launch(run_cfg(tiny_assets, tmp_path, f"zero_optimization.stage={stage}", "max_train_steps=30"))
    assert_ok(result)
    assert_loss_falls(tmp_path / "model", 30)
    ds_config = json.loads((tmp_path / "model" / "ds_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == stage and ds_config["train_batch_size"] == 8
    assert_full_export_loads(tmp_path, tiny_assets.model_dir)


@pytest.mark.parametrize("stage", [0, 2])
def test_lora_single_process(tiny_assets, tmp_path, stage):
    overrides = run_cfg(tiny_assets, tmp_path, f"zero_optimization.stage={stage}", "max_train_steps=30", "use_lora.action=true",
                        "use_lora.rank=4", "use_lora.alpha=8", "optimizer.params.lr=0.01")
    assert_ok(launch(overrides))
    history = losses(tmp_path / "model")
    assert len(history) == 30 and sum(history[-5:]) < sum(history[:5])
    lora_file = tmp_path / "model" / "pytorch_lora_weights.safetensors"
    assert lora_file.stat().st_size > 10_000
    assert not (tmp_path / "model" / "unet").exists()

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_assets.model_dir)
    generator = torch.Generator().manual_seed(0)
    before = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np", generator=generator).images
    pipe.load_lora_weights(tmp_path / "model")
    adapter = next(iter(pipe.unet.peft_config.values()))
    assert adapter.r == 4 and adapter.lora_alpha == 8  # alpha travels with the file, not alpha = rank
    generator = torch.Generator().manual_seed(0)
    after = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np", generator=generator).images
    assert abs(after - before).max() > 1e-3


def test_two_process_zero2(tiny_assets, tmp_path):
    # Through the `deepspeed` command itself, as scripts/train_text_to_image.sh starts it (launch's docstring).
    result = launch(run_cfg(tiny_assets, tmp_path, "zero_optimization.stage=2", "max_train_steps=20"), procs=2, runner=True)
    assert_ok(result)
    assert "2 process(es)" in result.stdout + result.stderr
    ds_config = json.loads((tmp_path / "model" / "ds_config.json").read_text())
    assert ds_config["train_batch_size"] == 16  # micro 8 x accumulation 1 x 2 ranks
    assert_loss_falls(tmp_path / "model", 20)
    assert_full_export_loads(tmp_path, tiny_assets.model_dir)


def test_nan_loss_stops_every_rank_and_writes_no_weights(tiny_assets, tmp_path):
    overrides = run_cfg(tiny_assets, tmp_path, "max_train_steps=30", "optimizer.params.lr=1e12", "gradient_clipping=0",
                        "scheduler.type=none", "scheduler.params={}")
    result = launch(overrides)
    assert result.returncode != 0
    assert "training stopped: loss is nan/inf at 10 optimizer steps in a row" in result.stderr + result.stdout
    assert "Likely causes" in result.stderr + result.stdout
    assert not (tmp_path / "model" / "unet").exists()
    assert not list((tmp_path / "checkpoints").glob("step_*"))


def test_config_error_is_one_line_exit_2_and_changes_nothing(tmp_path):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"pretrained_model_name_or_path": "m", "dataset_dir": "d", "learning_rate": 1,
                               "output_dir": str(tmp_path / "out")}))
    result = subprocess.run([sys.executable, "-m", "ds_diffusers.train", "--cfg", str(cfg)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("ds-diffusers:")]
    assert len(lines) == 1 and lines[0].startswith("ds-diffusers: config error: learning_rate=1: unknown key;")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
