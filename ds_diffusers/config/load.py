"""Read a cfg JSON file, merge `--set key.sub=value` overrides, and validate the result.

Every failure becomes a `ConfigError` naming the field, the bad value and the fix; nothing here
writes to disk.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import json
import math
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel, ValidationError

from ds_diffusers.config.blocks import NOT_FINITE, unquoted
from ds_diffusers.config.nearest import unknown_key_hint
from ds_diffusers.config.schema import Config
from ds_diffusers.errors import ConfigError


def read_cfg_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.json"))
        example = found[0] if found else path / "default.json"
        raise ConfigError("--cfg", str(path), f"is a folder; pass the path of a JSON config file, e.g. {example}")
    if not path.is_file():
        raise ConfigError("--cfg", str(path), "no such file; pass the path of a JSON config, e.g. cfg/default.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError("--cfg", str(path), f"not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})")
    if not isinstance(raw, dict):
        raise ConfigError("--cfg", str(path), "the file must hold one JSON object of config keys")
    return raw


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=1` -> (["a", "b"], 1). Values are JSON (numbers, true/false, lists); anything else is a string."""
    key, sep, value_text = text.partition("=")
    if not sep or not key:
        raise ConfigError("--set", text, "write overrides as key=value, e.g. --set use_lora.rank=8")
    try:
        value = json.loads(value_text)
    except json.JSONDecodeError:
        value = value_text
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    merged = json.loads(json.dumps(raw))  # deep copy; the caller's dict stays as read
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                dotted = ".".join(path[: depth + 1])
                raise ConfigError("--set", text, f"{dotted} is not a block of keys, so {'.'.join(path)} cannot be set")
            node = child
        node[path[-1]] = value
    return merged


def _check_unknown_keys(raw: dict[str, Any], model: type[BaseModel], prefix: str = "") -> None:
    """Unknown keys, with the closest valid key suggested. Free-form dicts (optimizer.params) are skipped."""
    fields = model.model_fields
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(dotted, value, f"unknown key; {unknown_key_hint(key, model, prefix)}")
        annotation = fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, dict):
            _check_unknown_keys(value, annotation, prefix=f"{dotted}.")


# pydantic's error types for a number or a bool given as a JSON string ("1e-4", "true").
_QUOTED_TYPES = ("int_type", "float_type", "bool_type")


def _first_error(err: ValidationError) -> ConfigError:
    first = err.errors()[0]
    loc = [str(part) for part in first["loc"] if not isinstance(part, str) or not part.startswith("function-")]
    field = ".".join(loc) or "config"
    value = first.get("input")
    if first["type"] == "missing":
        return ConfigError(field, None, "required key is missing; add it to the cfg file or pass --set " f"{field}=...")
    if isinstance(value, float) and not math.isfinite(value):
        return ConfigError(field, value, NOT_FINITE)  # whatever the field's type: an int field says "valid integer"
    if first["type"] == "value_error":  # our own validators' ValueError: its text is the fix
        return ConfigError(field, value, first["msg"].removeprefix("Value error, "))
    if isinstance(value, str) and first["type"] in _QUOTED_TYPES:
        return ConfigError(field, value, f"{first['msg']} ({unquoted(loc[-1], value)})")
    return ConfigError(field, value, f"{first['msg']}")


def validate_dict(raw: dict[str, Any]) -> Config:
    """Shape, type and range validation. Disk and accelerator checks are `checks.check_environment`."""
    _check_unknown_keys(raw, Config)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise _first_error(err) from None


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    cfg = validate_dict(apply_overrides(read_cfg_file(path), overrides))
    from ds_diffusers.config.checks import check_consistency

    check_consistency(cfg)
    return cfg


def parse_cfg_args(argv: list[str] | None, *, prog: str, description: str, cfg_help: str, set_example: str,
                   add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """`--cfg PATH [--set KEY=VALUE ...]`, the command line of every entrypoint that reads a cfg file;
    `add_arguments` adds an entrypoint's own options."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--cfg", required=True, help=cfg_help)
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help=f"override config keys, e.g. --set {set_example}")
    # The deepspeed launcher appends --local_rank; the rank is read from the environment instead.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    if add_arguments is not None:
        add_arguments(parser)
    return parser.parse_args(argv)
