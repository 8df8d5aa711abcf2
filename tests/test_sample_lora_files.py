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


# ---- a LoRA checked against the base UNet's modules and shapes ----

def unet_model(tmp_path, unet_config, name="model"):
    """A model folder whose unet/config.json is `unet_config` (the check builds it on the meta device)."""
    unet = tmp_path / name / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **unet_config}))
    save_file({"conv_in.weight": torch.ones(2)}, str(unet / "diffusion_pytorch_model.safetensors"))
    return tmp_path / name


def attention_lora(path, unet_config, kohya=False, rank=2):
    """A LoRA on every attention projection of the UNet `unet_config` describes, in diffusers' or kohya's names."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    tensors = {}
    for name, module in unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            out_features, in_features = module.weight.shape
            if kohya:
                tensors[f"lora_unet_{name.replace('.', '_')}.lora_down.weight"] = torch.zeros(rank, in_features)
                tensors[f"lora_unet_{name.replace('.', '_')}.lora_up.weight"] = torch.zeros(out_features, rank)
            else:
                tensors[f"unet.{name}.lora_A.weight"] = torch.zeros(rank, in_features)
                tensors[f"unet.{name}.lora_B.weight"] = torch.zeros(out_features, rank)
    save_file(tensors, str(path))
    return path


def lora_cfg(model, tmp_path, lora):
    return validate_dict(with_changes(pretrained_model_name_or_path=str(model), output_dir=str(tmp_path / "out"),
                                      sample={"weights": ["lora"], "loras": [{"path": str(lora)}]}))


def test_sd15_lora_on_sdxl_with_the_same_text_width_is_refused_naming_the_key(tmp_path):
    """The issue's case: widths equal, so the old width check passed and diffusers dropped 8 tensors."""
    from ds_diffusers.embedded.arch_sd import FULL
    from ds_diffusers.embedded.arch_sdxl import SDXL_BASE_UNET

    sdxl_768 = unet_model(tmp_path, {**SDXL_BASE_UNET, "cross_attention_dim": 768})
    lora = attention_lora(tmp_path / "sd15.safetensors", FULL["sd15"].unet)
    cfg = lora_cfg(sdxl_768, tmp_path, lora)
    with pytest.raises(ConfigError) as info:
        resolve_weights(cfg, SamplePlan.from_config(cfg))
    message = str(info.value)
    assert info.value.field == "sample.loras[0].path" and "\n" not in message
    # SDXL's first down block has no attention: the first key (sorted) names that module.
    assert "key 'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight'" in message
    assert "has 'down_blocks.0' but no 'down_blocks.0.attentions'" in message and "made for another model" in message


@pytest.mark.parametrize("kohya", [False, True])
def test_a_lora_of_the_base_models_family_passes(tmp_path, kohya):
    from ds_diffusers.embedded.arch_sd import FULL

    sd15 = unet_model(tmp_path, FULL["sd15"].unet)
    lora = attention_lora(tmp_path / "sd15.safetensors", FULL["sd15"].unet, kohya=kohya)
    cfg = lora_cfg(sd15, tmp_path, lora)
    assert [source.name for source in resolve_weights(cfg, SamplePlan.from_config(cfg))] == ["lora"]


def test_a_lora_key_of_the_wrong_shape_is_refused_with_the_width_expected(tmp_path):
    from ds_diffusers.embedded.arch_sd import FULL

    sd15 = unet_model(tmp_path, FULL["sd15"].unet)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"
    lora = tmp_path / "wide.safetensors"
    save_file({key: torch.zeros(640, 2), key.replace("lora_B", "lora_A"): torch.zeros(2, 320)}, str(lora))
    cfg = lora_cfg(sd15, tmp_path, lora)
    with pytest.raises(ConfigError) as info:
        resolve_weights(cfg, SamplePlan.from_config(cfg))
    assert f"key '{key}' has shape [640, 2]" in info.value.fix and "has output width 320" in info.value.fix
