"""The README documents every config key (new keys must be findable by users)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from ds_diffusers.config import Config

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def dotted_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += dotted_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def documented(key: str) -> bool:
    if f"`{key}`" in README:
        return True
    parent, _, leaf = key.rpartition(".")
    top = key.split(".")[0]
    return any(f"`{top}." in line and f"`{leaf}`" in line for line in README.splitlines() if line.startswith("|"))


def test_every_config_key_is_in_the_readme():
    missing = [key for key in dotted_keys(Config) if not documented(key)]
    assert not missing, f"undocumented config keys: {missing}"
