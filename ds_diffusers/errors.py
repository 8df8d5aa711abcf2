"""The one exception the entrypoints turn into a single-line message and a non-zero exit."""

from __future__ import annotations

from typing import Any


class ConfigError(Exception):
    """Bad user input: names the field, the offending value and how to fix it."""

    def __init__(self, field: str, value: Any, fix: str) -> None:
        self.field = field
        self.value = value
        self.fix = fix
        super().__init__(f"{field}={value!r}: {fix}")

    def __reduce__(self):  # picklable, so rank 0's refusal can be broadcast to the other ranks
        return (ConfigError, (self.field, self.value, self.fix))


class TrainingError(Exception):
    """A run that must stop (e.g. a non-finite loss); the message says why and what to try."""
