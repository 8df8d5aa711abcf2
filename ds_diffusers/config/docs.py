"""Generate the config reference, docs/config.md, from the schema: per section (`schema.SECTIONS`) one
table of key | type | default | description, nested blocks as dotted keys. The schema is the only
source: types, ranges and defaults are read from the fields, never written by hand.

    python -m ds_diffusers.config.docs            # print the page
    python -m ds_diffusers.config.docs --write    # rewrite docs/config.md
    python -m ds_diffusers.config.docs --check    # exit 1 when docs/config.md is stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ds_diffusers.config.schema import SECTIONS, Config, section_of

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "config.md"
REGENERATE = "python -m ds_diffusers.config.docs --write"

INTRO = """\
Every key of the seed project's `cfg/default.json` (deepspeed-diffusers) is accepted with its
meaning, so such a file trains unchanged once its paths point at local folders (on a CPU, set
`use_fp16.enabled` to false: the CPU has no fp16 training). Unknown keys, wrong types and
out-of-range values stop the run before any work with one line naming the field, the value and the
fix (exit code 2); a string is never read as a number or a bool, and no number may be `NaN`,
`Infinity` or `-Infinity` (Python's json reads them), in the free-form `params` blocks too. An
unknown key gets the nearest valid one suggested (also for keys of a nested block written at the top
level, and diffusers' flag names). Any key can be set on the command line with `--set key.sub=value`
(the value is read as JSON, anything else as a string).

The config is flat, as the seed's: the sections below are for reading only. Keys of a nested block
are written with dots (`zero_optimization.stage`), and `[]` stands for each entry of a list
(`optimizer.param_groups[].match`)."""

# Prose that belongs to a whole section rather than to one key.
SECTION_NOTES = {
    "Optimizer and learning rate": """\
Every `scheduler.type` is one torch `LambdaLR` over the optimizer DeepSpeed builds, handed to
`deepspeed.initialize` (so `ds_config.json` has no `scheduler` block). Optimizer step *k* (from 1)
runs at the optimizer's lr × factor(*k* − 1), as in diffusers; `lr_warmup_steps: 0` means the full lr
from the first step. DeepSpeed's own classes are not used because they clamp the warmup to at least 2
steps and start one step late (with `warmup_num_steps: 0` the first two optimizer steps ran at lr 0),
and default to a `log` warmup. The diffusers names are built by `diffusers.optimization` itself, so
their values are the script's; DeepSpeed's names keep their parameters and formulas (linear warmup
unless `warmup_type: "log"`). Per-module `lr_scale`s scale the whole curve. The checkpoint holds the
schedule's position; a resumed run continues the same curve (tested for every type against the formulas
in `tests/test_schedules.py`, and bit-exact through resume in the checkpoint tests).""",
    "Precision and ZeRO": """\
The DeepSpeed dict these keys become is written to `output_dir/ds_config.json` for every run.""",
    "Memory and kernels": """\
All but `allow_tf32` leave the losses unchanged (`compile` to float tolerance).""",
    "Sampling": """\
The `sample` block is read by `python -m ds_diffusers.sample`. A null default takes the value of the
training key named in its description, so the default cfg samples what its validation grid showed.""",
}

_NAMES = {bool: "bool", int: "int", float: "float", str: "str", type(None): "null"}


@dataclass(frozen=True)
class Row:
    key: str
    type: str
    default: str
    description: str


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _range(metadata: Sequence[Any]) -> str:
    """` in [0, 1)`, ` ≥ 1`, ...: the numeric bounds pydantic checks."""
    low = next((("[", m.ge) for m in metadata if isinstance(m, annotated_types.Ge)), None)
    low = low or next((("(", m.gt) for m in metadata if isinstance(m, annotated_types.Gt)), None)
    high = next(((m.le, "]") for m in metadata if isinstance(m, annotated_types.Le)), None)
    high = high or next(((m.lt, ")") for m in metadata if isinstance(m, annotated_types.Lt)), None)
    if low and high:
        return f" in {low[0]}{_number(low[1])}, {_number(high[0])}{high[1]}"
    if low:
        return f" {'≥' if low[0] == '[' else '>'} {_number(low[1])}"
    if high:
        return f" {'≤' if high[1] == ']' else '<'} {_number(high[0])}"
    return ""


def type_text(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """The accepted values in words, e.g. `int ≥ 0 or null`, `"fp32", "fp16" or "bf16"`."""
    return _one_of(_alternatives(annotation, metadata))


def _one_of(alternatives: list[str]) -> str:
    return alternatives[0] if len(alternatives) == 1 else f"{', '.join(alternatives[:-1])} or {alternatives[-1]}"


def _alternatives(annotation: Any, metadata: Sequence[Any]) -> list[str]:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = get_args(annotation)
        return [text for arg in args if arg is not type(None) for text in _alternatives(arg, metadata)] + (
            ["null"] if type(None) in args else [])
    if origin is Literal:
        return [json.dumps(value) for value in get_args(annotation)]
    if origin is list:
        (item,) = get_args(annotation)
        if _is_block(item):
            return ["list of blocks"]
        items = _alternatives(item, [])
        return [f"list of {items[0]}" if len(items) == 1 else f"list of ({_one_of(items)})"]
    if origin is dict:
        return ["dict"]
    if _is_block(annotation):
        return ["block"]
    name = _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))
    if any(isinstance(m, annotated_types.MinLen) and m.min_length > 0 for m in metadata):
        name = f"non-empty {name}"
    return [name + _range(metadata)]


def _is_block(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if isinstance(field.default, BaseModel):
        return ""  # a block: its keys' defaults are on their own rows
    return f"`{json.dumps(field.default)}`"


def rows(model: type[BaseModel], prefix: str = "") -> Iterator[Row]:
    """One row per key, then the keys of a block or of a list's entries (`key[].sub`) after it."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        yield Row(key, type_text(field.annotation, field.metadata), default_text(field), field.description or "")
        if _is_block(field.annotation):
            yield from rows(field.annotation, f"{key}.")
        elif get_origin(field.annotation) is list and _is_block(get_args(field.annotation)[0]):
            yield from rows(get_args(field.annotation)[0], f"{key}[].")


def _anchor(title: str) -> str:
    """GitHub's heading anchor."""
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _top_level(key: str) -> str:
    return re.split(r"[.\[]", key, maxsplit=1)[0]


def render() -> str:
    """The whole page, as docs/config.md must hold it."""
    all_rows = list(rows(Config))
    lines = ["# Config reference", "",
             f"<!-- Generated by `{REGENERATE}` from the schema (ds_diffusers/config/schema.py, blocks.py, "
             "sample_schema.py); edit the descriptions there, not this page. -->",
             "", INTRO, "", "Sections: " + " · ".join(f"[{title}](#{_anchor(title)})" for title in SECTIONS)]
    for title in SECTIONS:
        lines += ["", f"## {title}", ""]
        if title in SECTION_NOTES:
            lines += [SECTION_NOTES[title], ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        lines += [f"| `{row.key}` | {_cell(row.type)} | {_cell(row.default)} | {_cell(row.description)} |"
                  for row in all_rows if section_of(_top_level(row.key)) == title]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_diffusers.config.docs", description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"rewrite {DOC_PATH}")
    action.add_argument("--check", action="store_true", help=f"exit 1 when {DOC_PATH} is not what the schema generates")
    args = parser.parse_args(argv)
    page = render()
    if args.write:
        DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
        DOC_PATH.write_text(page)
        print(f"wrote {DOC_PATH}")
    elif args.check:
        if not DOC_PATH.is_file() or DOC_PATH.read_text() != page:
            print(f"{DOC_PATH} is stale; regenerate it with `{REGENERATE}`", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
