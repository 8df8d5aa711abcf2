"""The hint of an unknown config key: the valid key its writer most likely meant.

A misspelling is found by `difflib` among the keys of its block. At the top level a key may also be
one that belongs in a nested block (`lr`, `stage`, `lora_rank`), or a flag of diffusers'
`train_text_to_image.py` (docs/coming-from-diffusers.md), which `difflib` alone maps to unrelated
names (`learning_rate` → `variant`).
"""

from __future__ import annotations

import difflib
from functools import lru_cache

from pydantic import BaseModel

# diffusers' flag names whose key here is not a near spelling of them (docs/coming-from-diffusers.md).
DIFFUSERS_NAMES = {
    "learning_rate": "optimizer.params.lr", "lr_scheduler": "scheduler.type", "max_grad_norm": "gradient_clipping",
    "checkpointing_steps": "save_interval", "mixed_precision": "use_fp16.enabled' or 'bf16.enabled",
    "adam_beta1": "optimizer.params.betas", "adam_beta2": "optimizer.params.betas",
    "adam_weight_decay": "optimizer.params.weight_decay", "adam_epsilon": "optimizer.params.eps",
    "report_to": "wandb.enabled', 'tensorboard.enabled' or 'csv_monitor.enabled",
    "train_batch_size": "train_micro_batch_size_per_gpu", "num_train_epochs": "num_epochs",
}

# Short names difflib maps to an unrelated key that merely starts alike (`model` → `mode_scale`).
SHORT_NAMES = {"model": "pretrained_model_name_or_path"}


def _is_block(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


@lru_cache(maxsize=None)
def nested_keys(model: type[BaseModel], prefix: str = "") -> dict[str, str]:
    """Last name -> dotted key, for every key inside the nested blocks (and the default keys of the
    free-form `params`); the first block listing a name wins."""
    found: dict[str, str] = {}
    for name, field in model.model_fields.items():
        if _is_block(field.annotation):
            for leaf, dotted in nested_keys(field.annotation, f"{prefix}{name}.").items():
                found.setdefault(leaf, dotted)
        elif prefix and isinstance(field.default, dict):
            for leaf in field.default:
                found.setdefault(leaf, f"{prefix}{name}.{leaf}")
        elif prefix:
            found.setdefault(name, f"{prefix}{name}")
    return found


def unknown_key_hint(key: str, model: type[BaseModel], prefix: str = "") -> str:
    """The fix of an unknown `key` in the block `model` (at `prefix`)."""
    fields = list(model.model_fields)
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    if prefix:  # a nested block has few keys: all of them fit on the line
        return f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys here: {', '.join(sorted(fields))}"
    if key in SHORT_NAMES:
        return f"did you mean '{SHORT_NAMES[key]}'?"
    if key in DIFFUSERS_NAMES:
        return f"diffusers' --{key} is '{DIFFUSERS_NAMES[key]}' here"
    leaves = nested_keys(model)
    if key in leaves:
        return f"'{key}' belongs in a block: did you mean '{leaves[key]}'?"
    # A nested key under its own name or its dotted path with underscores (lora_rank ~ use_lora_rank).
    spelled = {**{dotted.replace(".", "_"): dotted for dotted in leaves.values()}, **leaves}
    close = close or [spelled[name] for name in difflib.get_close_matches(key, list(spelled), n=1, cutoff=0.6)]
    if close:
        return f"did you mean '{close[0]}'?"
    containing = [field for field in fields if key.lower() in field]
    if containing:
        return f"did you mean '{containing[0]}'?"
    return f"no valid key is close to it; the valid keys (docs/config.md): {', '.join(sorted(fields))}"
