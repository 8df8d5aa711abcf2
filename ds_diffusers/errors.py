"""The one exception the entrypoints turn into a single-line message and a non-zero exit."""

from __future__ import annotations

from typing import Any

_FROM_WORKER = object()


class ConfigError(Exception):
    """Bad user input: names the field, the offending value and how to fix it."""

    def __init__(self, field: str, value: Any = _FROM_WORKER, fix: str = "") -> None:
        if value is _FROM_WORKER:
            # torch's DataLoader re-raises a worker's exception as `type(text)`, the text being the
            # worker's traceback, whose last line is "...ConfigError: <our one line>": keep that line.
            line = (field.strip().splitlines() or [""])[-1].split("Error: ", 1)[-1]
            self.field, _, rest = line.partition("=")
            self.value, _, self.fix = rest.partition(": ")
            super().__init__(line)
            return
        self.field = field
        self.value = value
        self.fix = fix
        super().__init__(f"{field}={value!r}: {fix}")

    def __reduce__(self):  # picklable, so rank 0's refusal can be broadcast to the other ranks
        return (ConfigError, (self.field, self.value, self.fix))


class TrainingError(Exception):
    """A run that must stop (e.g. a non-finite loss); the message says why and what to try."""
