"""Learning-rate schedules: names, parameters per name, and the factor of the optimizer's lr at each step.

Every `scheduler.type` becomes one torch `LambdaLR` over the optimizer DeepSpeed builds (passed to
`deepspeed.initialize` as a callable), rather than DeepSpeed's own scheduler classes: those clamp
warmup to >= 2 steps and give optimizer step k the lr of iteration k - 2, so `lr_warmup_steps: 0`
still ran two steps at lr 0. Here step k (1-based) runs at factor(k - 1), as diffusers' schedules do,
and a warmup of 0 means the full lr from the first step. The checkpoint holds the LambdaLR's
position (`last_epoch`, `base_lrs`); the factor is a pure function of the step, so a resumed run
continues the same curve.

- diffusers' names (`get_scheduler` of `train_text_to_image.py`) are built by diffusers itself, so
  the values are theirs exactly: constant, constant_with_warmup, linear, cosine,
  cosine_with_restarts, polynomial.
- DeepSpeed's names keep their parameters (absolute `warmup_min_lr`/`warmup_max_lr`, ratios for
  WarmupCosineLR) and formulas, with a linear warmup unless `warmup_type: "log"`.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Callable, Optional

from ds_diffusers.config.schema import Config
from ds_diffusers.errors import ConfigError

DIFFUSERS_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
DEEPSPEED_SCHEDULES = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")

_WARMUP = {"warmup_num_steps"}
_DECAY = _WARMUP | {"total_num_steps"}
SCHEDULER_PARAMS: dict[str, set[str]] = {
    "none": set(),
    "constant": set(),
    "constant_with_warmup": _WARMUP,
    "linear": _DECAY,
    "cosine": _DECAY | {"num_cycles"},
    "cosine_with_restarts": _DECAY | {"num_cycles"},
    "polynomial": _DECAY | {"power", "lr_end"},
    "WarmupLR": _WARMUP | {"warmup_min_lr", "warmup_max_lr", "warmup_type"},
    "WarmupDecayLR": _DECAY | {"warmup_min_lr", "warmup_max_lr", "warmup_type"},
    "WarmupCosineLR": _DECAY | {"warmup_min_ratio", "cos_min_ratio", "warmup_type"},
}


def check_scheduler(cfg: Config) -> None:
    """One-line ConfigError for a parameter the type does not take or a value out of range."""
    kind, params = cfg.scheduler.type, cfg.scheduler.params
    valid = SCHEDULER_PARAMS[kind]
    for key, value in params.items():
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"{kind} takes: {', '.join(sorted(valid)) or 'no params'}"
            raise ConfigError(f"scheduler.params.{key}", value, f"not a parameter of {kind}; {hint}")
        if key == "warmup_type":
            if value not in ("linear", "log"):
                raise ConfigError("scheduler.params.warmup_type", value, "use 'linear' (the default) or 'log'")
        elif not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"scheduler.params.{key}", value, "must be a non-negative number")
        elif key.endswith("_steps") and value != int(value):
            raise ConfigError(f"scheduler.params.{key}", value, "must be a whole number of optimizer steps")
        elif key.endswith("_ratio") and value > 1:
            raise ConfigError(f"scheduler.params.{key}", value, "is a fraction of the lr; use a value in [0, 1]")
    if kind == "cosine_with_restarts" and params.get("num_cycles", 1) != int(params.get("num_cycles", 1)):
        raise ConfigError("scheduler.params.num_cycles", params["num_cycles"], "cosine_with_restarts takes a whole number of restarts")
    if kind == "polynomial" and params.get("lr_end", 1e-7) > cfg.optimizer.params["lr"]:
        raise ConfigError("scheduler.params.lr_end", params["lr_end"], f"must not exceed optimizer.params.lr ({cfg.optimizer.params['lr']})")


def warmup_steps(cfg: Config) -> int:
    return int(cfg.scheduler.params.get("warmup_num_steps", cfg.lr_warmup_steps))


def _warmup_fraction(step: int, warmup: int, warmup_type: str) -> float:
    """0 -> 1 over `warmup` steps; DeepSpeed's log curve reaches 1 one step earlier than the line."""
    if step >= warmup:
        return 1.0
    if warmup_type == "log" and warmup >= 2:
        return math.log(step + 1) / math.log(warmup)
    return step / warmup


def deepspeed_factor(kind: str, params: dict[str, Any], base_lr: float, warmup: int, total: int) -> Callable[[int], float]:
    """Factor of `base_lr` at (0-based) step for DeepSpeed's three schedules."""
    warmup_type = params.get("warmup_type", "linear")
    if kind == "WarmupCosineLR":
        min_ratio, cos_min = float(params.get("warmup_min_ratio", 0.0)), float(params.get("cos_min_ratio", 1e-4))

        def cosine(step: int) -> float:
            if step < warmup:
                return min_ratio + (1.0 - min_ratio) * _warmup_fraction(step, warmup, warmup_type)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return cos_min + (1.0 - cos_min) * (1.0 + math.cos(math.pi * progress)) / 2.0
        return cosine
    min_lr, max_lr = float(params.get("warmup_min_lr", 0.0)), float(params.get("warmup_max_lr", base_lr))

    def warmup_then(step: int) -> float:
        gamma = _warmup_fraction(step, warmup, warmup_type)
        if kind == "WarmupDecayLR" and step >= warmup:
            gamma = max(0.0, (total - step) / max(1, total - warmup))
        return (min_lr + (max_lr - min_lr) * gamma) / base_lr
    return warmup_then


def lr_scheduler_factory(cfg: Config, total_steps: int) -> Optional[Callable[[Any], Any]]:
    """What `deepspeed.initialize(lr_scheduler=...)` takes: optimizer -> LambdaLR (None for "none")."""
    kind, params = cfg.scheduler.type, cfg.scheduler.params
    if kind == "none":
        return None
    warmup = warmup_steps(cfg)
    total = int(params.get("total_num_steps", 0)) or total_steps

    def build(optimizer: Any) -> Any:
        from torch.optim.lr_scheduler import LambdaLR

        if kind in DEEPSPEED_SCHEDULES:
            return LambdaLR(optimizer, deepspeed_factor(kind, params, float(cfg.optimizer.params["lr"]), warmup, total))
        from diffusers.optimization import get_scheduler

        if kind == "polynomial" and "lr_end" in params:
            from diffusers.optimization import get_polynomial_decay_schedule_with_warmup

            return get_polynomial_decay_schedule_with_warmup(optimizer, warmup, total, lr_end=float(params["lr_end"]),
                                                             power=float(params.get("power", 1.0)))
        if kind == "cosine":  # get_scheduler does not pass num_cycles to the cosine schedule
            from diffusers.optimization import get_cosine_schedule_with_warmup

            return get_cosine_schedule_with_warmup(optimizer, warmup, total, num_cycles=float(params.get("num_cycles", 0.5)))
        return get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                             num_cycles=int(params.get("num_cycles", 1)), power=float(params.get("power", 1.0)))
    return build
