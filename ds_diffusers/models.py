"""Models room: the frozen components (tokenizer, text encoder, VAE, noise scheduler) and the
trainable UNet, optionally wrapped with peft LoRA adapters.

The frozen components are loaded with plain `from_pretrained` (never inside `deepspeed.zero.Init`),
cast to the weight dtype and moved to the accelerator; they are never handed to DeepSpeed, so ZeRO-3
never partitions them. Only the UNet goes to `deepspeed.initialize`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from ds_diffusers.config.schema import Config, LoraCfg
from ds_diffusers.errors import ConfigError
from ds_diffusers.families import ModelFamily, detect_family, family_named, model_index, vae_downsampling
from ds_diffusers.engine.params import is_zero3_param

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class FrozenComponents:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel | None  # None when the text cache covers the run (data/text_prepass.py)
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler  # a FlowMatchEulerDiscreteScheduler for a flow family
    # SDXL: the second (OpenCLIP bigG-shaped) encoder, whose pooled projection conditions the UNet;
    # FLUX.1: T5, whose sequence conditions the transformer.
    tokenizer_2: Any = None
    text_encoder_2: Any = None
    # SD 3.x: T5 (None when model_index.json leaves it out, as StableDiffusion3Pipeline allows), and the
    # width of the zeros that then stand in for its states (the transformer's `joint_attention_dim`).
    tokenizer_3: Any = None
    text_encoder_3: Any = None
    joint_attention_dim: int | None = None
    family: str = "sd"  # the `families.FAMILIES` name
    # model_index.json's SDXL pipeline option: an empty negative prompt is a zero embedding, not "".
    force_zeros_for_empty_prompt: bool = True
    # The dtype text conditioning is handed to the denoiser in (the encoders' weight dtype), kept
    # here so it is known with the encoders freed.
    weight_dtype: torch.dtype = torch.float32
    # ZeRO-3 inference engines of partitioned encoders (`text_encoder_zero3`): kept alive with them.
    encoder_engines: list[Any] = field(default_factory=list)

    @property
    def latent_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_scale_factor(self) -> int:
        return vae_downsampling(self.vae.config)

    @property
    def tokenizers(self) -> dict[str, CLIPTokenizer]:
        """Batch key of each text encoder's token ids -> its tokenizer."""
        named = (("input_ids", self.tokenizer), ("input_ids_2", self.tokenizer_2), ("input_ids_3", self.tokenizer_3))
        return {name: tokenizer for name, tokenizer in named if tokenizer is not None}

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """Every loaded text encoder by field name (`text_encoder`, `text_encoder_2`, ...)."""
        found = {f.name: getattr(self, f.name) for f in fields(self) if f.name.startswith("text_encoder")}
        return {name: encoder for name, encoder in found.items() if encoder is not None}

    def free_text_encoders(self) -> None:
        """Drop every text encoder (and its ZeRO-3 engine); the accelerator's cache is emptied."""
        from deepspeed.accelerator import get_accelerator

        for name in self.text_encoders:
            setattr(self, name, None)
        for engine in self.encoder_engines:
            engine.destroy()
        self.encoder_engines.clear()
        get_accelerator().empty_cache()

    @torch.no_grad()
    def encode_text(self, token_ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """"encoder_hidden_states" [B, T, D] (and for SDXL "text_embeds" [B, P]) from `tokenize`d ids,
        as the family encodes them (`ModelFamily.encode_text`)."""
        return family_named(self.family).encode_text(self, token_ids)


def tokenize(tokenizers: dict[str, Any], captions: str | list[str]) -> dict[str, torch.Tensor]:
    """Token ids per text encoder ({"input_ids": [B, T], ...}), padded to each tokenizer's length."""
    return {name: tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                            return_tensors="pt").input_ids for name, tokenizer in tokenizers.items()}


def _frozen(module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> torch.nn.Module:
    """dtype None: the module was loaded in its dtype (diffusers warns on a `.to(dtype)` cast)."""
    module.requires_grad_(False)
    module.eval()
    return module.to(device=device) if dtype is None else module.to(device=device, dtype=dtype)


def vae_folder(model_dir: str, vae_path: str | None) -> Path:
    """The VAE to use: `vae_path` (e.g. an fp16-safe SDXL VAE) when given, else the model's own."""
    return Path(vae_path) if vae_path else Path(model_dir) / "vae"


def vae_dtype(vae_config: dict[str, Any], dtype: torch.dtype) -> torch.dtype:
    """fp32 for a VAE whose config says it overflows in fp16 (`force_upcast`, the SDXL VAE), as the
    diffusers pipelines upcast it; the weight dtype otherwise (bf16 has fp32's range)."""
    return torch.float32 if dtype == torch.float16 and vae_config.get("force_upcast", True) else dtype


def _accept_any_float_latents(vae: AutoencoderKL) -> None:
    """An fp32 VAE next to an fp16 UNet: the pipelines hand it fp16 latents to decode."""
    def cast(module: torch.nn.Module, args: tuple) -> tuple:
        return tuple(arg.to(vae.dtype) if torch.is_tensor(arg) and arg.is_floating_point() else arg for arg in args)

    for module in (vae.post_quant_conv, vae.decoder):
        if module is not None:
            module.register_forward_pre_hook(cast)


def encoder_bytes(module: torch.nn.Module) -> int:
    """Bytes of weights this process holds of `module` (its partitions only, under ZeRO-3)."""
    from ds_diffusers.engine.params import local_partition

    return sum(local_partition(p).numel() * p.element_size() for p in module.parameters())


def load_text_encoders(model_dir: str, device: torch.device, dtype: torch.dtype, variant: str | None,
                       zero3_config: dict | None = None) -> dict[str, Any]:
    """Every text encoder of the model's family by FrozenComponents field (with the extra tokenizers),
    frozen in `dtype` on `device`. With `zero3_config` (all ranks) each is loaded partitioned (transformers'
    zero.Init load, rank 0 reading the files) and wrapped in a ZeRO-3 inference engine, returned under
    "encoder_engines", whose hooks gather one layer at a time in the forward."""
    family = detect_family(model_dir)
    hf_config = None
    if zero3_config is not None:
        from transformers.integrations import HfDeepSpeedConfig

        hf_config = HfDeepSpeedConfig(zero3_config)  # transformers loads under zero.Init while it is alive
    try:
        tokenizer, text_encoder = family.load_text_encoder(model_dir, variant, dtype)
        parts = {"tokenizer": tokenizer, "text_encoder": text_encoder, **family.load_extra_text_encoders(model_dir, variant)}
    finally:
        if hf_config is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
    loaded: dict[str, Any] = {}
    engines = []
    for name, part in parts.items():
        if not isinstance(part, torch.nn.Module):
            loaded[name] = part
        elif zero3_config is None:
            loaded[name] = _frozen(part, device, dtype)
        else:
            import deepspeed

            part.requires_grad_(False)
            part.eval()
            engine, *_ = deepspeed.initialize(model=part, config=zero3_config)
            engines.append(engine)
            loaded[name] = part
    if engines:
        loaded["encoder_engines"] = engines
    return loaded


def load_frozen_components(model_dir: str, device: torch.device, dtype: torch.dtype, prediction_type: str | None,
                           vae_path: str | None = None, variant: str | None = None,
                           with_text_encoders: bool = True) -> FrozenComponents:
    """`variant` ("fp16": the `*.fp16.safetensors` files) applies to the model's own parts, not to `vae_path`.
    Without `with_text_encoders` only the tokenizers of the text side are loaded (`load_text_encoders`
    adds the encoders when the run needs them: data/text_prepass.py)."""
    import diffusers

    family = detect_family(model_dir)
    tokenizer = family.load_tokenizer(model_dir)
    vae_dir, vae_class = vae_folder(model_dir, vae_path), getattr(diffusers, family.vae_class)
    vae_weights_dtype = vae_dtype(vae_class.load_config(vae_dir), dtype) if family.upcasts_vae else dtype
    vae = vae_class.from_pretrained(vae_dir, torch_dtype=vae_weights_dtype, variant=None if vae_path else variant)
    noise_scheduler = family.load_noise_scheduler(model_dir)
    if prediction_type is not None:
        # SD 2.x-768 checkpoints are v_prediction; an explicit key overrides what the scheduler says.
        noise_scheduler.register_to_config(prediction_type=prediction_type)
    text = (load_text_encoders(model_dir, device, dtype, variant) if with_text_encoders
            else {"text_encoder": None, **family.load_extra_tokenizers(model_dir)})
    vae = _frozen(vae, device, None)
    if vae.dtype != dtype:
        _accept_any_float_latents(vae)
    return FrozenComponents(**{"tokenizer": tokenizer, **text}, vae=vae, noise_scheduler=noise_scheduler, family=family.name,
                            weight_dtype=dtype,
                            force_zeros_for_empty_prompt=bool(model_index(model_dir).get("force_zeros_for_empty_prompt", True)))


def load_unet(model_dir: str, gradient_checkpointing: bool, zero3_config: dict | None = None, rank: int = 0,
              variant: str | None = None, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """Weights on the host in `dtype` (fp32 by default); DeepSpeed casts and moves them. With `zero3_config`
    (a ZeRO-3 run; all ranks call this) the UNet is partitioned while it loads (`ModelFamily.load_denoiser`),
    so no rank holds all of it."""
    unet = detect_family(model_dir).load_denoiser(model_dir, zero3_config, rank, variant, dtype)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet


def lora_config(lora: LoraCfg, target_modules: list[str] | None = None) -> Any:
    """`target_modules`: the resolved list (`ModelFamily.lora_target_modules`); the configured one by default."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        init_lora_weights=lora.init,
        target_modules=list(target_modules or lora.target_modules or ModelFamily.lora_targets),
    )


def add_lora(unet: UNet2DConditionModel, lora: LoraCfg, target_modules: list[str] | None = None) -> None:
    """Freeze the base UNet and attach peft adapters; only their parameters stay trainable."""
    unet.requires_grad_(False)
    try:
        unet.add_adapter(lora_config(lora, target_modules))
    except ValueError as err:
        raise ConfigError("use_lora.target_modules", lora.target_modules, f"peft could not attach adapters ({err}); "
                          "name modules of the denoiser, e.g. [\"to_q\", \"to_k\", \"to_v\", \"to_out.0\"]") from None
    trainable = [p for p in unet.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("use_lora.target_modules", lora.target_modules, "matched no module of the denoiser; use e.g. [\"to_q\", \"to_k\", \"to_v\"]")
    # Adapters train in fp32 master precision; DeepSpeed casts the compute copy.
    for param in trainable:
        param.data = param.data.float()


def build_unet(cfg: Config, zero3_config: dict | None = None, rank: int = 0) -> UNet2DConditionModel:
    """The trainable UNet (with LoRA adapters if configured). Pass the run's DeepSpeed config as
    `zero3_config` when the engine runs ZeRO-3 (all ranks) to load it already partitioned."""
    # LoRA initialisations computed from the base weights (PiSSA, OLoRA, LoftQ) need them whole, in fp32.
    from_base = cfg.use_lora.action and cfg.use_lora.init not in (True, False, "gaussian")
    if from_base:
        zero3_config = None
    # A LoRA run's base weights stay frozen in the weight dtype (the engine casts them to it): load them
    # in it, rather than an fp32 copy per process (FLUX.1: 47.6 GB, against 23.8 GB in bf16). The
    # adapters start from the base layers' dtype, as in diffusers' LoRA scripts, then train in fp32.
    dtype = DTYPES[cfg.weight_dtype_name] if cfg.use_lora.action and not from_base and zero3_config is None else torch.float32
    # Building inside zero.Init runs the UNet's random initialisation (then overwritten) and the
    # ordinary load does not: keep the RNG out of it, so LoRA's initialisation is the same either way.
    with torch.random.fork_rng(devices=[]):
        unet = load_unet(cfg.pretrained_model_name_or_path, cfg.gradient_checkpointing, zero3_config, rank, cfg.variant,
                         dtype)
    if cfg.use_lora.action:
        family = detect_family(cfg.pretrained_model_name_or_path)
        add_lora(unet, cfg.use_lora, family.lora_target_modules(cfg.use_lora.target_modules))
    return unet


def cast_trainable_like_partitioned(unet: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give parameters created after a `zero.Init` build (LoRA adapters, fp32) the weight dtype.

    `deepspeed.initialize` casts a module to fp16/bf16 only when it was not built inside zero.Init,
    and ZeRO-3 takes its compute dtype, and with it the loss scaler, from the first trainable
    parameter: fp32 adapters on a partitioned UNet would make an fp16 run's loss scale a static 1.
    Cast here, as the engine does on the ordinary load path, so both paths compute the same numbers
    (the fp32 masters are written from the values before the cast, `masters.StartingValues`)."""
    if not any(is_zero3_param(p) for p in unet.parameters()):
        return
    for param in unet.parameters():
        if param.requires_grad and not is_zero3_param(param) and param.dtype != dtype:
            param.data = param.data.to(dtype)


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """Trainable parameters split by `optimizer.param_groups` (first matching rule wins), each group
    with its own lr (base lr × `lr_scale`; the schedule multiplies every group's lr alike) and weight decay."""
    base_lr = float(cfg.optimizer.params["lr"])
    rules = cfg.optimizer.param_groups
    buckets: list[list[torch.nn.Parameter]] = [[] for _ in range(len(rules) + 1)]
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        slot = next((i + 1 for i, rule in enumerate(rules) if re.search(rule.match, name)), 0)
        buckets[slot].append(param)
    groups: list[dict[str, Any]] = []
    for slot, params in enumerate(buckets):
        if slot > 0 and not params:
            raise ConfigError(f"optimizer.param_groups[{slot - 1}].match", rules[slot - 1].match,
                              "matches no trainable parameter name; check the pattern against the denoiser's parameter names")
        if not params:
            continue
        group: dict[str, Any] = {"params": params}
        if slot > 0:
            rule = rules[slot - 1]
            group["lr"] = base_lr * rule.lr_scale
            if rule.weight_decay is not None:
                group["weight_decay"] = rule.weight_decay
        groups.append(group)
    return groups


def set_tf32(enabled: bool) -> None:
    """TF32 matmuls and convolutions on Ampere and newer GPUs: ~10 mantissa bits in the products,
    fp32 accumulation; no effect on CPUs or on fp16/bf16 compute."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9; the old flags are deprecated
        precision = "tf32" if enabled else "ieee"
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def attention_description(unet: torch.nn.Module, accelerator_name: str) -> str:
    """Which attention the UNet runs, for the start-up line: diffusers' processors by class, and for
    PyTorch SDPA (AttnProcessor2_0) the backends SDPA may pick from on this accelerator."""
    processors = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    if not any(name.endswith("2_0") for name in processors):
        return f"attention {'/'.join(processors)}"
    if accelerator_name == "cpu":
        backends = "CPU kernels"
    elif accelerator_name == "cuda":
        enabled = {"flash": torch.backends.cuda.flash_sdp_enabled(), "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                   "cudnn": torch.backends.cuda.cudnn_sdp_enabled(), "math": torch.backends.cuda.math_sdp_enabled()}
        backends = "/".join(name for name, on in enabled.items() if on) + " enabled"
    else:
        backends = accelerator_name
    return f"attention PyTorch SDPA ({backends})"

