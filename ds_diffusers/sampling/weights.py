"""Where each requested weight comes from, checked on disk before any model is loaded.

baseline  the base model's `unet/` (`pretrained_model_name_or_path`; FLUX.1: `transformer/`, the family's folder)
tuned     what training exported to `output_dir`: `unet/` (full fine-tune) or
          `pytorch_lora_weights.safetensors` (LoRA run) on the base UNet
ema       `output_dir/unet_ema/` (a `use_ema` run; FLUX.1: `transformer_ema/`)
lora      the base UNet plus peft adapters: the `sample.loras` files, or the training run's LoRA
          file, each adapter weighted by its `weight` times `sample.lora_scale`
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from ds_diffusers.config.schema import Config
from ds_diffusers.errors import ConfigError
from ds_diffusers.export import LORA_WEIGHTS
from ds_diffusers.export.write import ema_folder
from ds_diffusers.families import detect_family
from ds_diffusers.sampling.lora_targets import check_lora_targets
from ds_diffusers.sampling.plan import LoraFile, SamplePlan

# What `save_pretrained` writes (safetensors, or its shard index: FLUX.1's transformer ships sharded) and
# what older exports hold (bin).
_UNET_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                      "diffusion_pytorch_model.safetensors.index.json")


@dataclass(frozen=True)
class WeightSource:
    name: str  # the column of the comparison grid: baseline, tuned, ema or lora
    unet_dir: str  # a diffusers UNet folder (config.json + weights)
    loras: tuple[LoraFile, ...] = ()  # adapter files on top of the UNet, weight already times lora_scale
    variant: str | None = None  # the base model's weight variant (the `variant` key); exports have none


def _unet_places(unet_dir: Path, variant: str | None = None) -> list[Path]:
    from diffusers.utils import _add_variant

    return [unet_dir / _add_variant(name, variant) for name in _UNET_WEIGHT_FILES]


def _has_unet(unet_dir: Path, variant: str | None = None) -> bool:
    return (unet_dir / "config.json").is_file() and any(place.is_file() for place in _unet_places(unet_dir, variant))


def _lora_places(path: Path) -> list[Path]:
    """A LoRA entry names the file itself or a folder holding the standard file name."""
    return [path, path / LORA_WEIGHTS] if path.suffix != ".safetensors" else [path]


def _find_lora(path: Path) -> Path | None:
    return next((place for place in _lora_places(path) if place.is_file()), None)


def check_lora_file(path: Path, field: str, value: object) -> None:
    """A readable safetensors file holding LoRA tensors, checked from its header alone (no tensor is
    read): a truncated copy or a full UNet file given as a LoRA fails here, naming the file, rather
    than as a traceback once the models are loaded."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                raise ValueError(f"header of {header_len} bytes in a {size}-byte file")
            header = json.loads(handle.read(header_len))
        tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
        end = max((entry["data_offsets"][1] for entry in tensors.values()), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise ConfigError(field, value, f"{path} is not a readable safetensors file ({err}); export the LoRA again "
                          "(python -m ds_diffusers.export) or copy it again") from None
    if 8 + header_len + end > size:
        raise ConfigError(field, value, f"{path} is truncated ({size} bytes, its header needs {8 + header_len + end}); "
                          "copy or export it again")
    if not any("lora" in name.lower() for name in tensors):
        example = next(iter(tensors), "no tensors at all")
        raise ConfigError(field, value, f"{path} holds no LoRA weights ({len(tensors)} tensors such as '{example}'; "
                          "a full UNet's weights belong in a model folder, sampled as tuned); give a LoRA file")


def _missing(field: str, value: object, places: list[Path], fix: str) -> ConfigError:
    return ConfigError(field, value, f"no weight file found; looked in {', '.join(str(place) for place in places)}; {fix}")


def _denoiser_folder(cfg: Config) -> str:
    return detect_family(cfg.pretrained_model_name_or_path).denoiser_folder


def _baseline(cfg: Config) -> WeightSource:
    unet_dir = Path(cfg.pretrained_model_name_or_path) / _denoiser_folder(cfg)
    if not _has_unet(unet_dir, cfg.variant):
        raise _missing("pretrained_model_name_or_path", cfg.pretrained_model_name_or_path,
                       [unet_dir / "config.json", *_unet_places(unet_dir, cfg.variant)],
                       "point it at a local diffusers model folder (the one holding model_index.json)")
    return WeightSource("baseline", str(unet_dir), variant=cfg.variant)


def _tuned(cfg: Config, baseline: WeightSource) -> WeightSource:
    out = Path(cfg.output_dir)
    full, lora = out / _denoiser_folder(cfg), out / LORA_WEIGHTS
    # Look first where this cfg's training run exports, then at the other kind of export.
    kinds = ["lora", "full"] if cfg.use_lora.action else ["full", "lora"]
    for kind in kinds:
        if kind == "full" and _has_unet(full):
            return WeightSource("tuned", str(full))
        if kind == "lora" and lora.is_file():
            check_lora_file(lora, "sample.weights", "tuned")
            return WeightSource("tuned", baseline.unet_dir, (LoraFile(str(lora), 1.0),), baseline.variant)
    places = {"full": [full / "config.json", *_unet_places(full)], "lora": [lora]}
    raise _missing("sample.weights", "tuned", [place for kind in kinds for place in places[kind]],
                   "train first (python -m ds_diffusers.train --cfg ...) or set output_dir to the training run's output_dir")


def _ema(cfg: Config) -> WeightSource:
    unet_dir = Path(cfg.output_dir) / ema_folder(_denoiser_folder(cfg))
    if not _has_unet(unet_dir):
        raise _missing("sample.weights", "ema", [unet_dir / "config.json", *_unet_places(unet_dir)],
                       "train with use_ema true (full fine-tune), or remove ema from sample.weights")
    return WeightSource("ema", str(unet_dir))


def _lora(cfg: Config, plan: SamplePlan, baseline: WeightSource) -> WeightSource:
    if not plan.loras:
        path = Path(cfg.output_dir) / LORA_WEIGHTS
        if not path.is_file():
            raise _missing("sample.weights", "lora", [path], "train with use_lora.action true, or list LoRA files "
                           "in sample.loras ([{\"path\": ..., \"weight\": 1.0}])")
        check_lora_file(path, "sample.weights", "lora")
        return WeightSource("lora", baseline.unet_dir, (LoraFile(str(path), plan.lora_scale),), baseline.variant)
    files = []
    for index, entry in enumerate(plan.loras):
        found = _find_lora(Path(entry.path))
        if found is None:
            raise _missing(f"sample.loras[{index}].path", entry.path, _lora_places(Path(entry.path)),
                           "give a .safetensors LoRA file or a folder holding pytorch_lora_weights.safetensors")
        check_lora_file(found, f"sample.loras[{index}].path", entry.path)
        files.append(LoraFile(str(found), entry.weight * plan.lora_scale))
    return WeightSource("lora", baseline.unet_dir, tuple(files), baseline.variant)


def _lora_context_width(lora_file: Path) -> int | None:
    """The text width a LoRA's cross-attention key projection was trained for (its lora_A input
    size), read from the file header; None when the file adapts no UNet cross-attention."""
    from safetensors import safe_open

    with safe_open(str(lora_file), framework="pt") as handle:
        for name in handle.keys():
            if name.startswith("unet.") and "attn2.to_k" in name and ("lora_A" in name or "lora.down" in name):
                return int(handle.get_slice(name).get_shape()[1])
    return None


def check_lora_fits(field: str, lora_file: Path, unet_dir: str) -> None:
    """A LoRA made for another family (SD 1.5's 768-wide text vs SDXL's 2048) would fail deep inside
    peft with a shape mismatch; say which file and which models instead."""
    width = _lora_context_width(lora_file)
    expected = json.loads((Path(unet_dir) / "config.json").read_text()).get("cross_attention_dim")  # a UNet's
    if width is not None and width != expected:
        kinds = {768: " (SD 1.x)", 1024: " (SD 2.x)", 2048: " (SDXL)"}
        raise ConfigError(field, str(lora_file), f"this LoRA was trained on a UNet with {width}-wide text conditioning"
                          f"{kinds.get(width, '')}, but the base UNet {unet_dir} takes {expected}{kinds.get(expected, '')}; "
                          "use a LoRA trained on this base model, or set pretrained_model_name_or_path to the model it was trained on")


def resolve_weights(cfg: Config, plan: SamplePlan) -> list[WeightSource]:
    """One source per name in `plan.weights`, in that order; ConfigError naming every place looked
    at when a file is missing, or the LoRA file that is damaged or no LoRA, or one made for another
    model (a key that adapts no module of the base UNet, or not with its shape). Reads no tensor."""
    baseline = _baseline(cfg)  # the LoRA weights sit on the base UNet, so it must exist in any case
    sources = []
    for name in plan.weights:
        if name == "baseline":
            sources.append(baseline)
        elif name == "tuned":
            sources.append(_tuned(cfg, baseline))
        elif name == "ema":
            sources.append(_ema(cfg))
        else:
            sources.append(_lora(cfg, plan, baseline))
    for source in sources:
        for index, lora in enumerate(source.loras):
            field = f"sample.loras[{index}].path" if source.name == "lora" and plan.loras else "sample.weights"
            check_lora_fits(field, Path(lora.path), source.unet_dir)
            check_lora_targets(field, Path(lora.path), source.unet_dir)
    return sources
