"""ZeRO-3 loads the UNet already partitioned (`engine.zero_load`), on the SD 1.5-shaped test model, in one
in-process rank: the weights equal `from_pretrained`'s, LoRA attaches to the partitioned UNet, and
layouts it does not read fall back to the ordinary loader. (Two ranks: the ZeRO-3 launcher tests.)"""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from ds_diffusers.config import to_deepspeed_config, validate_dict
from ds_diffusers.engine import is_zero3_param
from ds_diffusers.engine.zero_load import WEIGHTS, load_unet_partitioned
from ds_diffusers.models import build_unet


def zero3(model_dir, **changes):
    cfg = validate_dict({"pretrained_model_name_or_path": str(model_dir), "dataset_dir": ".",
                         "zero_optimization": {"stage": 3}, **changes})
    return cfg, to_deepspeed_config(cfg, world_size=1)


def gathered_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(unet.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {name: tensor.detach().clone() for name, tensor in unet.state_dict().items()}


def test_partitioned_load_equals_from_pretrained(sd15_assets, one_rank):
    _, ds_config = zero3(sd15_assets.model_dir)
    unet = load_unet_partitioned(str(sd15_assets.model_dir), ds_config, rank=0)
    assert unet is not None
    assert all(is_zero3_param(p) and p.numel() == 0 for p in unet.parameters()), "parameters must stay partitioned"
    reference = UNet2DConditionModel.from_pretrained(sd15_assets.model_dir, subfolder="unet").state_dict()
    loaded = gathered_state(unet)
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[name], reference[name]) for name in reference)


def test_lora_attaches_to_the_partitioned_unet(sd15_assets, one_rank):
    lora = {"action": True, "rank": 4, "alpha": 4}
    cfg, ds_config = zero3(sd15_assets.model_dir, use_lora=lora)
    unet = build_unet(cfg, ds_config)
    plain = build_unet(zero3(sd15_assets.model_dir, use_lora=lora)[0])
    trainable = {name for name, p in unet.named_parameters() if p.requires_grad}
    assert trainable and trainable == {name for name, p in plain.named_parameters() if p.requires_grad}
    assert all(is_zero3_param(p) for name, p in unet.named_parameters() if name not in trainable)


@pytest.mark.parametrize("change", ["bin", "renamed"])
def test_other_layouts_fall_back_to_the_ordinary_loader(sd15_assets, one_rank, tmp_path, change):
    model_dir = tmp_path / "model"
    shutil.copytree(sd15_assets.model_dir / "unet", model_dir / "unet")
    weights = load_file(str(model_dir / "unet" / WEIGHTS))
    (model_dir / "unet" / WEIGHTS).unlink()
    if change == "bin":
        torch.save(weights, model_dir / "unet" / "diffusion_pytorch_model.bin")
    else:
        name = next(iter(weights))
        save_file({**{k: v for k, v in weights.items() if k != name}, "legacy." + name: weights[name]},
                  str(model_dir / "unet" / WEIGHTS))
    assert load_unet_partitioned(str(model_dir), zero3(model_dir)[1], rank=0) is None
