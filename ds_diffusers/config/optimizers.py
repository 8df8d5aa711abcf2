"""The `optimizer` block against what the installed DeepSpeed (0.19.8) builds from it.

DeepSpeed's engine (`_configure_basic_optimizer`) lower-cases its own names (`DEEPSPEED_OPTIMIZERS`
in runtime/config.py) and looks any other name up as a `torch.optim` class, case-sensitively; the
params are passed to the class as keyword arguments, after the engine has popped its own keys.
A wrong name or param would otherwise surface as a traceback after `output_dir` was written.

`check_optimizer_block` (pure) checks the name and that every param is accepted by at least one
class the name can become; `check_optimizer_backend` (needs the accelerator) checks the one class
this run will build. The param sets mirror the classes' signatures (tests compare them).
"""

from __future__ import annotations

import difflib
import importlib.util
from typing import Any

from ds_diffusers.config.blocks import unquoted
from ds_diffusers.errors import ConfigError

_TORCH_ADAMW = {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused"}
_TORCH_ADAGRAD = {"lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps", "foreach", "maximize", "differentiable", "fused"}
_FUSED_ADAM = {"lr", "bias_correction", "betas", "eps", "weight_decay", "amsgrad", "set_grad_none"}  # adam_w_mode: engine key
_CPU_ADAM = {"lr", "bias_correction", "betas", "eps", "weight_decay", "amsgrad"}  # adamw_mode: set by the engine
_ADAM_ENGINE_KEYS = {"adam_w_mode", "torch_adam", "fp32_optimizer_states"}

# name (lower case) -> backend -> params the class (plus the engine) accepts. Backends: "torch"
# (torch's class), "cpu" (DeepSpeed's CPU kernel, used with optimizer offload), "fused" (DeepSpeed's
# accelerator kernel), "mup" (the mup package's class).
DEEPSPEED_OPTIMIZERS: dict[str, dict[str, set[str]]] = {
    "adam": {"torch": _TORCH_ADAMW | _ADAM_ENGINE_KEYS, "cpu": _CPU_ADAM | _ADAM_ENGINE_KEYS,
             "fused": _FUSED_ADAM | _ADAM_ENGINE_KEYS},
    "adamw": {"torch": _TORCH_ADAMW | _ADAM_ENGINE_KEYS, "cpu": _CPU_ADAM | _ADAM_ENGINE_KEYS,
              "fused": _FUSED_ADAM | _ADAM_ENGINE_KEYS},
    "adagrad": {"torch": _TORCH_ADAGRAD, "cpu": {"lr", "eps", "weight_decay", "amsgrad", "fp32_optimizer_states"}},
    # max_grad_norm is FusedLamb's, but the engine refuses it for every optimizer (gradient_clipping instead).
    "lamb": {"fused": {"lr", "bias_correction", "betas", "eps", "eps_inside_sqrt", "weight_decay", "max_coeff", "min_coeff"}},
    "lion": {"cpu": {"lr", "betas", "weight_decay", "fp32_optimizer_states"}, "fused": {"lr", "betas", "weight_decay", "set_grad_none"}},
    "muadam": {"mup": _TORCH_ADAMW | {"decoupled_wd"}},
    "muadamw": {"mup": _TORCH_ADAMW | {"decoupled_wd"}},
    "musgd": {"mup": {"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach", "differentiable",
                      "fused", "decoupled_wd"}},
    # Muon splits the parameters into a Muon half and an auxiliary Adam half (engine._muon_param_groups).
    "muon": {"fused": {"lr", "momentum", "weight_decay", "ns_method", "betas", "eps", "muon_lr", "adam_lr"} | _ADAM_ENGINE_KEYS},
}
# torch.optim classes DeepSpeed's step cannot drive: LBFGS needs a closure, SparseAdam sparse gradients.
_UNDRIVABLE = {"LBFGS": "it needs a closure at every step", "SparseAdam": "it takes sparse gradients only", "Optimizer": "it is the base class"}
_NON_NEGATIVE = ("eps", "weight_decay", "momentum", "lr_decay", "dampening", "initial_accumulator_value", "muon_lr", "adam_lr")


def _torch_classes() -> dict[str, type]:
    import inspect

    import torch

    return {name: cls for name, cls in vars(torch.optim).items()
            if inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer) and name not in _UNDRIVABLE}


def _torch_params(cls: type) -> set[str]:
    import inspect

    return {name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "params")}


def known_names() -> list[str]:
    """Every accepted `optimizer.type`, DeepSpeed's in their usual spelling first."""
    torch_names = [name for name in sorted(_torch_classes()) if name.lower() not in DEEPSPEED_OPTIMIZERS]
    return ["Adam", "AdamW", "Adagrad", "Lamb", "Lion", "MuAdam", "MuAdamW", "MuSGD", "Muon", *torch_names]


def _backends(optimizer_type: str) -> dict[str, set[str]]:
    """Backend -> accepted params for a valid name; ConfigError with the closest name otherwise."""
    if optimizer_type.lower() in DEEPSPEED_OPTIMIZERS:
        return DEEPSPEED_OPTIMIZERS[optimizer_type.lower()]
    classes = _torch_classes()
    if optimizer_type in classes:
        return {"torch": _torch_params(classes[optimizer_type])}
    if optimizer_type in _UNDRIVABLE:
        raise ConfigError("optimizer.type", optimizer_type, f"DeepSpeed cannot drive torch.optim.{optimizer_type} ({_UNDRIVABLE[optimizer_type]}); "
                          "use AdamW, SGD or another name from torch.optim")
    names = known_names()
    by_lower = {name.lower(): name for name in names}
    close = [by_lower[optimizer_type.lower()]] if optimizer_type.lower() in by_lower else difflib.get_close_matches(optimizer_type, names, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(names)}"
    raise ConfigError("optimizer.type", optimizer_type, f"not an optimizer the installed DeepSpeed can build; {hint}")


def _check_param_names(optimizer_type: str, params: dict[str, Any], accepted: set[str], what: str) -> None:
    for key, value in params.items():
        if key == "max_grad_norm":
            raise ConfigError("optimizer.params.max_grad_norm", value, "DeepSpeed refuses it; set the top-level gradient_clipping instead")
        if key not in accepted:
            close = difflib.get_close_matches(key, sorted(accepted), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"it takes: {', '.join(sorted(accepted))}"
            raise ConfigError(f"optimizer.params.{key}", value, f"not a parameter of {what}; {hint}")


def check_optimizer_block(optimizer_type: str, params: dict[str, Any]) -> None:
    """Name known, every param accepted by some class the name can become, numbers in range."""
    backends = _backends(optimizer_type)
    _check_param_names(optimizer_type, params, set().union(*backends.values()), optimizer_type)
    for key in _NON_NEGATIVE:
        value = params.get(key, 0)
        if isinstance(value, str):
            raise ConfigError(f"optimizer.params.{key}", value, unquoted(key, value))
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"optimizer.params.{key}", value, "must be a non-negative number")


def backend(optimizer_type: str, params: dict[str, Any], offloads_optimizer: bool, accelerator_name: str) -> str:
    """Which class DeepSpeed will build, as the engine decides it (see config.deepspeed.optimizer_block
    for the torch_adam default on the CPU)."""
    backends = _backends(optimizer_type)
    name = optimizer_type.lower()
    if name in ("adam", "adamw"):
        torch_adam = params.get("torch_adam", accelerator_name == "cpu" and not offloads_optimizer)
        return "torch" if torch_adam else ("cpu" if offloads_optimizer else "fused")
    if "cpu" in backends and offloads_optimizer:
        return "cpu"
    return next(kind for kind in ("torch", "mup", "fused", "cpu") if kind in backends)


_CLASS_NAMES = {"torch": "torch's class", "cpu": "DeepSpeed's CPU optimizer (used with optimizer offload)",
                "fused": "DeepSpeed's fused accelerator kernel", "mup": "the mup package's class"}


def check_optimizer_backend(optimizer_type: str, params: dict[str, Any], offloads_optimizer: bool, accelerator_name: str) -> None:
    """The class this run builds exists here and takes every param; call after `check_optimizer_block`."""
    kind = backend(optimizer_type, params, offloads_optimizer, accelerator_name)
    name = optimizer_type.lower()
    if offloads_optimizer and not (kind == "cpu" and name in ("adam", "adamw", "lion")):
        # engine._configure_zero_optimizer: any other class under offload is a ZeRORuntimeException
        # (unless zero_force_ds_cpu_optimizer is false, which ds-diffusers does not set).
        what = "torch_adam: true" if params.get("torch_adam") else optimizer_type
        raise ConfigError("zero_optimization.offload_optimizer.device", "cpu/nvme", f"with optimizer offload DeepSpeed only runs "
                          f"its CPU Adam, AdamW or Lion kernels, not {what}; choose one of those (without torch_adam) or turn offload off")
    if kind == "mup" and importlib.util.find_spec("mup") is None:
        raise ConfigError("optimizer.type", optimizer_type, "needs the mup package; `pip install mup` or choose AdamW")
    if kind == "fused" and name in ("lamb", "lion") and accelerator_name == "cpu":
        fix = "set zero_optimization.offload_optimizer.device to cpu (stage >= 1)" if name == "lion" else "choose AdamW"
        raise ConfigError("optimizer.type", optimizer_type, f"DeepSpeed's fused {optimizer_type} kernel needs a GPU; {fix}")
    if kind in ("cpu", "fused") and name in ("adam", "adamw") and params.get("amsgrad"):
        raise ConfigError("optimizer.params.amsgrad", True, "DeepSpeed's Adam kernels have no AMSGrad; set torch_adam true or remove amsgrad")
    accepted = _backends(optimizer_type)[kind]
    _check_param_names(optimizer_type, params, accepted, f"{optimizer_type} here ({_CLASS_NAMES[kind]})")
