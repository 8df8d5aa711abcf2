"""Content digests of a checkpoint step's files: each rank hashes the files it wrote once they are
out (`own_file_digests`), rank 0 records them in the step's metadata, and `changed_file` finds a file
whose bytes differ from that record before a resume or an offline export reads it.

`checkpoint.damaged_file` finds a truncated file without them (its zip directory is gone), but bytes
overwritten in place keep the size and the zip directory: torch.load returns changed tensors, the
run trains on and writes them into every later step. Steps saved before digests were recorded have
none; they are accepted as before, with a note. What hashing costs: docs/checkpoints.md.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ds_diffusers.checkpoint_reader import META_FILE
from ds_diffusers.data.file_digests import hash_file
from ds_diffusers.engine.checkpoint_files import deepspeed_writer_rank

DIGESTS_KEY = "file_digests"
_RANK_FILE = re.compile(r"^rank_(\d+)\.pt$")  # checkpoint_reader.rank_file
# hashlib releases the GIL while it hashes a chunk, so the files of a step verify in parallel threads.
_VERIFY_THREADS = min(8, os.cpu_count() or 1)


def _writer_rank(name: str) -> int:
    match = _RANK_FILE.match(name)
    return int(match.group(1)) if match else deepspeed_writer_rank(name)


def _step_files(step_dir: Path) -> list[str]:
    """Every file of the step folder but the metadata (which holds the digests) and hidden temporaries."""
    return sorted(str(path.relative_to(step_dir)) for path in step_dir.rglob("*")
                  if path.is_file() and path.name != META_FILE and not path.name.startswith("."))


def own_file_digests(step_dir: Path, rank: int) -> dict[str, str]:
    """Digests of the files this rank wrote into `step_dir` (its DeepSpeed shards and rank file; rank 0
    also DeepSpeed's unranked files), by path relative to the folder. Each rank hashes its own files
    right after writing them: the ranks read in parallel, each from its own node's page cache."""
    return {name: hash_file(step_dir / name) for name in _step_files(step_dir) if _writer_rank(name) == rank}


def changed_file(step_dir: Path, digests: dict[str, str]) -> Path | None:
    """The first recorded file (by name) that is missing or no longer has its recorded digest, or None."""
    names = sorted(digests)

    def intact(name: str) -> bool:
        try:
            return hash_file(step_dir / name) == digests[name]
        except OSError:
            return False

    with ThreadPoolExecutor(_VERIFY_THREADS) as pool:
        results = list(pool.map(intact, names))
    return next((step_dir / name for name, ok in zip(names, results) if not ok), None)


def unrecorded_note(step_dir: Path, meta: dict[str, Any]) -> str | None:
    """One line for a step saved before file digests were recorded (checked for truncation only), or None."""
    if meta.get(DIGESTS_KEY):
        return None
    return (f"ds-diffusers: {step_dir} has no file digests (saved before ds-diffusers recorded them): its files are "
            "checked for truncation only, not for changed bytes")
