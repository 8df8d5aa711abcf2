"""Content digests of the encoder folders that key the encoder cache, each file read once per version.

Hashing every encoder file on every start cost rank 0 a read of several GB (SDXL's two text
encoders, every weight variant) while the other ranks waited. Each file's digest is remembered in
`cache_dir/.file-digests.json` beside its size, mtime, ctime and inode, and a file whose `stat` still
shows the same four values is not read again. Any write to a file moves its ctime, which no tool can
set back (a copy that keeps the mtime still gets a new ctime), so a changed file is always hashed
again. The key stays a hash of the contents: a model folder copied or downloaded again with the same
files costs one read and then finds the same cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

DIGESTS_FILE = ".file-digests.json"


def _file_version(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def hash_file(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class FileDigests:
    """Digests of files, read from and saved to `cache_dir`'s record; rank 0 only."""

    def __init__(self, cache_dir: Path) -> None:
        self.record_path = cache_dir / DIGESTS_FILE
        try:
            self.record: dict[str, dict] = json.loads(self.record_path.read_text())
        except (OSError, ValueError):  # none yet, or damaged: every file is hashed again
            self.record = {}
        self.changed = False

    def of(self, path: Path) -> str:
        resolved = str(path.resolve())
        version = _file_version(path.stat())
        known = self.record.get(resolved)
        if isinstance(known, dict) and known.get("version") == version:
            return known["digest"]
        digest = hash_file(path)
        self.record[resolved] = {"version": version, "digest": digest}
        self.changed = True
        return digest

    def save(self) -> None:
        """Written whole and renamed into place: a concurrent job's reader sees the old or the new record."""
        if not self.changed:
            return
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.record_path.with_name(f"{DIGESTS_FILE}.{os.getpid()}")
        partial.write_text(json.dumps(self.record, indent=1, sort_keys=True))
        os.replace(partial, self.record_path)
        self.changed = False


def hash_folder(folder: Path, digests: FileDigests) -> str:
    """Hash of every file under `folder`: its name (relative to `folder`) and its content's digest."""
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + digests.of(path).encode())
    return digest.hexdigest()
