"""The config documents itself: every key carries a description (and every top-level key a section)
in the schema, docs/config.md is exactly what the schema generates, and the diffusers-mapping table
in docs/coming-from-diffusers.md names real keys with their real defaults."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from ds_diffusers.config import Config
from ds_diffusers.config import docs
from ds_diffusers.config.schema import SECTIONS, section_of

REPO = Path(__file__).resolve().parents[1]
DIFFUSERS_TABLE = REPO / "docs" / "coming-from-diffusers.md"
REQUIRED = object()


def all_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, FieldInfo) of every key, nested blocks and list entries (`key[].sub`) included."""
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        out.append((key, field))
        annotation = field.annotation
        item = getattr(annotation, "__args__", [None])[0] if getattr(annotation, "__origin__", None) is list else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += all_fields(annotation, f"{key}.")
        elif isinstance(item, type) and issubclass(item, BaseModel):
            out += all_fields(item, f"{key}[].")
    return out


def test_every_key_has_a_description():
    missing = [key for key, field in all_fields(Config) if not (field.description or "").strip()]
    assert not missing, f"config keys without a description (add Field(description=...) in the schema): {missing}"


def test_every_top_level_key_has_a_section_and_every_section_a_key():
    for name, field in Config.model_fields.items():
        extra = field.json_schema_extra
        assert isinstance(extra, dict) and extra.get("section") in SECTIONS, (
            f"{name}: give it json_schema_extra={{'section': ...}} with one of {SECTIONS}")
    used = {section_of(name) for name in Config.model_fields}
    assert used == set(SECTIONS), f"sections without a key: {set(SECTIONS) - used}"


def test_config_reference_is_fresh():
    assert docs.DOC_PATH.is_file(), f"docs/config.md is missing; generate it with `{docs.REGENERATE}`"
    assert docs.DOC_PATH.read_text() == docs.render(), f"docs/config.md is stale; regenerate it with `{docs.REGENERATE}`"


def reference_rows() -> dict[str, list[str]]:
    """key -> [type, default, description] of every table row of docs/config.md."""
    rows = {}
    for line in docs.DOC_PATH.read_text().splitlines():
        match = re.match(r"^\| `([^`]+)` \| (.*) \|$", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in re.split(r"(?<!\\)\|", match.group(2))]
    return rows


def test_every_config_key_has_a_row_with_its_default():
    rows = reference_rows()
    for key, field in all_fields(Config):
        assert key in rows, f"{key} has no row in docs/config.md"
        if field.is_required():
            assert rows[key][1] == "required", key
        elif not isinstance(field.default, BaseModel):
            assert rows[key][1] == f"`{json.dumps(field.default)}`", key
    # The default is the schema's null; what null means is in the description.
    assert rows["dataloader_num_workers"][1] == "`null`" and "min(8, CPUs" in rows["dataloader_num_workers"][2]
    assert rows["zero_optimization.stage"][0] == "int in [0, 3]"


def test_check_command_fails_on_a_stale_page_and_write_fixes_it(tmp_path, monkeypatch, capsys):
    page = tmp_path / "config.md"
    page.write_text(docs.render().replace("| `seed` |", "| `seed_renamed` |"))
    monkeypatch.setattr(docs, "DOC_PATH", page)
    assert docs.main(["--check"]) == 1
    assert docs.REGENERATE in capsys.readouterr().err
    assert docs.main(["--write"]) == 0 and docs.main(["--check"]) == 0


# The second column of the diffusers table: `key` (JSON default or "required"), comma-separated, or "—".
ENTRY = r"`([A-Za-z_][\w.]*)` \(([^()]*)\)"


def diffusers_rows() -> list[list[str]]:
    lines = [line for line in DIFFUSERS_TABLE.read_text().splitlines() if line.startswith("|")]
    assert lines[0].startswith("| their flag (default) | our key (default) | note |"), "the table's header changed"
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[2:]]
    assert rows and all(len(row) == 3 for row in rows), "every row has three cells (no | inside a cell)"
    return rows


def schema_default(key: str) -> Any:
    """The default of a dotted key; keys inside a free-form block (`optimizer.params.lr`) read its default dict."""
    model: type[BaseModel] = Config
    parts = key.split(".")
    for index, part in enumerate(parts):
        assert part in model.model_fields, f"{key} is not a config key"
        field = model.model_fields[part]
        rest = parts[index + 1:]
        if not rest:
            return REQUIRED if field.is_required() else field.default
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            model = field.annotation
            continue
        value = field.default
        for name in rest:
            assert isinstance(value, dict) and name in value, f"{key}: {name} is not in the default of {'.'.join(parts[:index + 1])}"
            value = value[name]
        return value
    raise AssertionError(key)


def same_value(stated: Any, default: Any) -> bool:
    """JSON equality that keeps false apart from 0 and lets 0 equal 0.0."""
    if isinstance(stated, bool) or isinstance(default, bool):
        return stated is default
    if isinstance(stated, list) and isinstance(default, list):
        return len(stated) == len(default) and all(map(same_value, stated, default))
    return stated == default


@pytest.mark.parametrize("row", diffusers_rows(), ids=lambda row: row[0][:60])
def test_diffusers_table_keys_and_defaults_are_the_schemas(row):
    their_flag, ours, _note = row
    assert their_flag.replace("*", "").startswith(("`--", "—")), f"first column: a --flag or —, got {their_flag!r}"
    if ours == "—":
        return
    assert re.fullmatch(rf"{ENTRY}(, {ENTRY})*", ours), f"write the keys as `key` (JSON default), comma-separated: {ours!r}"
    for key, stated_text in re.findall(ENTRY, ours):
        default = schema_default(key)
        if stated_text == "required":
            assert default is REQUIRED, f"{key} is not required; its default is {json.dumps(default)}"
            continue
        stated = json.loads(stated_text)
        assert default is not REQUIRED, f"{key} is required; write (required)"
        assert same_value(stated, default), f"{key}: the table says {stated_text}, the schema's default is {json.dumps(default)}"


def test_diffusers_table_maps_allow_tf32_and_the_worker_default():
    rows = {row[0].replace("*", ""): row[1] for row in diffusers_rows()}
    assert rows["`--allow_tf32` (off)"] == "`allow_tf32` (null)"
    assert rows["`--dataloader_num_workers` (0)"] == "`dataloader_num_workers` (null)"
