"""Per-purpose torch generators derived from integer parts, identical in every process."""

from __future__ import annotations

import hashlib

import torch


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from `parts`, e.g. (seed, epoch) or (seed, epoch, index).

    The parts are hashed rather than added so that (seed=1, epoch=0) and (seed=0, epoch=1)
    give unrelated streams; blake2b, unlike `hash()`, is the same in every worker and rank.
    """
    digest = hashlib.blake2b(",".join(str(int(part)) for part in parts).encode(), digest_size=8).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return generator
