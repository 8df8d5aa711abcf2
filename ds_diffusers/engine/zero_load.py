"""Load the denoiser (a UNet, or a transformer such as Flux's) for ZeRO-3 without a full copy per
rank (run on all ranks).

Loading the UNet normally and letting `deepspeed.initialize` partition it makes every rank hold the
whole fp32 UNet first (3.4 GB for SD 1.5) on top of what ZeRO-3 then allocates. diffusers' `from_pretrained` fails inside
`deepspeed.zero.Init` (meta tensors, or a size check against the partitioned parameters), so this
module builds the UNet from its config inside `zero.Init`, which partitions every submodule as soon
as it exists, then fills the partitions module by module: each module's parameters are gathered
(`GatheredParameters(modifier_rank=0)`), rank 0 copies that module's tensors out of the safetensors
file, and DeepSpeed broadcasts and re-partitions them on exit. The peak is one module's full
parameters, not the model.

Only the layouts diffusers writes today are read this way: `diffusion_pytorch_model.safetensors`, or
its sharded form with an index. Anything else (a `.bin` checkpoint, key names that need diffusers'
legacy conversion) returns None and the caller loads the UNet the ordinary way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ds_diffusers.engine.params import gathered

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"


def weight_files(unet_dir: Path, variant: str | None = None) -> dict[str, Path] | None:
    """Tensor name -> safetensors file holding it, or None when the folder has no safetensors weights
    (of `variant`, named as diffusers names them: `diffusion_pytorch_model.fp16.safetensors`)."""
    from diffusers.utils import _add_variant
    from safetensors import safe_open

    index, weights = _add_variant(INDEX, variant), _add_variant(WEIGHTS, variant)
    if (unet_dir / index).is_file():
        weight_map = json.loads((unet_dir / index).read_text())["weight_map"]
        return {name: unet_dir / shard for name, shard in weight_map.items()}
    if (unet_dir / weights).is_file():
        with safe_open(str(unet_dir / weights), framework="pt") as handle:
            return {name: unet_dir / weights for name in handle.keys()}
    return None


def unet_weight_files(model_dir: str, variant: str | None = None, subfolder: str = "unet") -> dict[str, Path] | None:
    """`weight_files` of a model folder's denoiser folder (`unet/`, or `transformer/`)."""
    return weight_files(Path(model_dir) / subfolder, variant)


class _Reader:
    """Tensors by name out of the checkpoint's safetensors file(s), each opened once."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.handles: dict[Path, Any] = {}

    def copy_into(self, tensor: torch.Tensor, name: str) -> None:
        from safetensors import safe_open

        path = self.files[name]
        if path not in self.handles:
            self.handles[path] = safe_open(str(path), framework="pt")
        with torch.no_grad():
            tensor.data.copy_(self.handles[path].get_tensor(name).view(tensor.shape))


def load_unet_partitioned(model_dir: str, ds_config: dict, rank: int, variant: str | None = None) -> UNet2DConditionModel | None:
    """`load_partitioned` of a model folder's `unet/`."""
    from diffusers import UNet2DConditionModel

    return load_partitioned(model_dir, "unet", UNet2DConditionModel, ds_config, rank, variant)


def load_partitioned(model_dir: str, subfolder: str, model_class: type, ds_config: dict, rank: int,
                     variant: str | None = None) -> torch.nn.Module | None:
    """`model_class` (a diffusers model: UNet2DConditionModel, FluxTransformer2DModel, ...) built from
    `model_dir/subfolder` inside `deepspeed.zero.Init(ds_config)` with the checkpoint's weights (one
    file or a sharded index), every parameter already partitioned; None when the weights are not in
    a layout read here. All ranks."""
    import deepspeed

    folder = Path(model_dir) / subfolder
    files = weight_files(folder, variant)
    if files is None:
        return None
    config = model_class.load_config(str(folder))
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = model_class.from_config(config)
    if set(model.state_dict()) != set(files):
        return None  # e.g. names from before a diffusers rename: the ordinary loader converts them
    reader = _Reader(files)
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        params = dict(module.named_parameters(recurse=False))
        # Buffers are never partitioned: every rank fills its own.
        for name, buffer in module.named_buffers(recurse=False):
            if prefix + name in files:
                reader.copy_into(buffer, prefix + name)
        if not params:
            continue
        # Only rank 0 reads; DeepSpeed broadcasts its values and re-partitions when the context exits.
        with gathered(list(params.values()), modifier_rank=0):
            if rank == 0:
                for name, param in params.items():
                    reader.copy_into(param, prefix + name)
    return model
