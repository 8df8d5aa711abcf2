"""bf16 runs through the real launcher (1 process): the end-of-run export writes the fp32 masters (or
`export_dtype`), byte for byte what the offline export of the last checkpoint writes. And the EMA
swapped in for validation on 2 ranks (tests/launched/ema_swap.py)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.helpers import REPO, assert_ok, launch, launch_module, run_cfg

pytestmark = pytest.mark.multiprocess
WEIGHTS = "diffusion_pytorch_model.safetensors"


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("accumulation, export_dtype, engine_stage", [(2, "fp32", 1), (1, "bf16", 1)])  # 16-bit never runs stage 0
def test_bf16_end_of_run_export_equals_offline_export(tiny_assets, tmp_path, accumulation, export_dtype, engine_stage):
    extra = ("validation_steps=2", "validation_prompts=[\"a red circle\"]", "num_validation_images=1",
             "validation_inference_steps=2") if accumulation > 1 else ()
    assert_ok(launch(run_cfg(tiny_assets, tmp_path, "bf16.enabled=true", "zero_optimization.stage=2", "max_train_steps=3",
                             f"gradient_accumulation_steps={accumulation}", "use_ema=true", "ema_decay=0.9",
                             f"export_dtype={export_dtype}", *extra)))
    model = tmp_path / "model"
    assert json.loads((model / "ds_config.json").read_text())["zero_optimization"]["stage"] == engine_stage
    if extra:
        assert (model / "validation" / "step_000002.png").is_file()  # validated with the EMA swapped in
    offline = tmp_path / "offline"
    result = subprocess.run([sys.executable, "-m", "ds_diffusers.export", "--checkpoint", str(tmp_path / "checkpoints"),
                             "--out", str(offline)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for sub in ("unet", "unet_ema"):
        assert digest(offline / sub / WEIGHTS) == digest(model / sub / WEIGHTS), sub
    unet = load_file(str(model / "unet" / WEIGHTS))
    assert {str(t.dtype) for t in unet.values()} == {"torch.float32" if export_dtype == "fp32" else "torch.bfloat16"}
    if export_dtype == "fp32":
        # fp32 masters, not the bf16 compute copy widened: some weights lie between bf16 values.
        assert any((t.bfloat16().float() != t).any() for t in unet.values())


def test_ema_swap_on_two_ranks():
    """ZeRO-3: every parameter, the persistent ones too, computes with the EMA inside the swap and is
    restored bit for bit; ZeRO-2: the swap allocates about one fp32 parameter, not the model."""
    result = launch_module("tests.launched.ema_swap", [], procs=2, timeout=300)
    assert_ok(result)
    assert result.stdout.count("ema swap checks passed") == 2
