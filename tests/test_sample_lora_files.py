"""LoRA files checked before any model loads: a truncated copy, a non-safetensors file and a full UNet
file given as a LoRA are named with the field and the fix (no models needed)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from ds_diffusers.config import validate_dict
from ds_diffusers.errors import ConfigError
from ds_diffusers.sampling.plan import SamplePlan
from ds_diffusers.sampling.weights import check_lora_file, resolve_weights
from tests.helpers import with_changes

LORA_KEYS = ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
             "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight")


def lora_file(path, keys=LORA_KEYS):
    save_file({key: torch.ones(4, 4) for key in keys}, str(path))
    return path


def fake_model(tmp_path):
    unet = tmp_path / "model" / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text("{}")
    save_file({"conv_in.weight": torch.ones(2)}, str(unet / "diffusion_pytorch_model.safetensors"))
    return tmp_path / "model"


def test_a_good_lora_passes(tmp_path):
    check_lora_file(lora_file(tmp_path / "good.safetensors"), "sample.loras[0].path", "good")


@pytest.mark.parametrize("damage, fragment", [
    (lambda data: data[: len(data) - 10], "is truncated"),
    (lambda data: data[:20], "not a readable safetensors file"),
    (lambda data: b"PK\x03\x04 a zip, say a .pt file", "not a readable safetensors file"),
])
def test_damaged_lora_is_named(tmp_path, damage, fragment):
    path = lora_file(tmp_path / "bad.safetensors")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ConfigError) as info:
        check_lora_file(path, "sample.loras[0].path", str(path))
    assert str(path) in info.value.fix and fragment in info.value.fix and "\n" not in str(info.value)


def test_unet_file_given_as_lora_is_refused_before_models_load(tmp_path):
    model = fake_model(tmp_path)
    unet_file = model / "unet" / "diffusion_pytorch_model.safetensors"
    loras = json.dumps([{"path": str(lora_file(tmp_path / "ok.safetensors"))}, {"path": str(unet_file)}])
    cfg = validate_dict(with_changes(pretrained_model_name_or_path=str(model), output_dir=str(tmp_path / "out"),
                                     sample={"weights": ["lora"], "loras": json.loads(loras)}))
    with pytest.raises(ConfigError) as info:
        resolve_weights(cfg, SamplePlan.from_config(cfg))
    assert info.value.field == "sample.loras[1].path" and "holds no LoRA weights" in info.value.fix
    assert "conv_in.weight" in info.value.fix


def test_truncated_exported_lora_fails_as_tuned(tmp_path):
    model = fake_model(tmp_path)
    (tmp_path / "out").mkdir()
    exported = lora_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    exported.write_bytes(exported.read_bytes()[:-1])
    cfg = validate_dict(with_changes(pretrained_model_name_or_path=str(model), output_dir=str(tmp_path / "out"),
                                     use_lora={"action": True}))
    with pytest.raises(ConfigError) as info:
        resolve_weights(cfg, SamplePlan.from_config(cfg))
    assert info.value.field == "sample.weights" and info.value.value == "tuned" and "truncated" in info.value.fix
