"""Check an imagefolder's metadata.jsonl files before `datasets` reads them.

`datasets` answers an empty metadata.jsonl with an IndexError traceback and bytes that are not UTF-8
with a DatasetGenerationError naming no file or line. One pass over the bytes here finds both (and a
line that is not a JSON object) and says which file, which line and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

from ds_diffusers.errors import ConfigError

_JSONL_FORMAT = 'one JSON object per line, e.g. {"file_name": "0001.png", "text": "a caption"}'


def check_metadata_files(dataset_dir: str, folder: Path) -> None:
    """ConfigError (field dataset_dir) naming the file and line of the first empty, non-UTF-8 or
    non-JSON metadata.jsonl under `folder`."""
    for metadata in sorted(folder.rglob("metadata.jsonl")):
        _check_jsonl(dataset_dir, metadata)


def _check_jsonl(dataset_dir: str, metadata: Path) -> None:
    raw = metadata.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a leading BOM is fine for datasets' json reader
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise ConfigError("dataset_dir", dataset_dir, f"{metadata} line {line}: byte 0x{raw[error.start]:02x} "
                          f"at column {column} is not UTF-8; save the file as UTF-8 (e.g. `iconv -f latin1 "
                          f"-t utf-8 metadata.jsonl > fixed.jsonl`, then replace it)") from None
    rows = 0
    for line, content in enumerate(text.splitlines(), start=1):
        if not content.strip():
            continue
        try:
            row = json.loads(content)
        except json.JSONDecodeError as error:
            raise ConfigError("dataset_dir", dataset_dir, f"{metadata} line {line}: not JSON ({error.msg}, "
                              f"column {error.colno}); write {_JSONL_FORMAT}") from None
        if not isinstance(row, dict):
            raise ConfigError("dataset_dir", dataset_dir, f"{metadata} line {line}: a JSON "
                              f"{type(row).__name__}, not an object; write {_JSONL_FORMAT}")
        rows += 1
    if rows == 0:
        raise ConfigError("dataset_dir", dataset_dir, f"{metadata} line 1: the file has no rows; write "
                          f"{_JSONL_FORMAT}, one line per image")
