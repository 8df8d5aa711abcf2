"""Reading a checkpoint step folder: the one reader for resume (`checkpoint.load`) and the offline
export (`export.offline`), so neither re-parses what the other reads.

Our files (written by `checkpoint.save`):
    step_<N>/ds_diffusers.json   position, settings; written last, marks the folder complete
    step_<N>/rank_<R>.pt         RNG state and EMA shard of rank R
    latest                       the tag of the newest complete checkpoint
DeepSpeed's files in the same folder are read by `engine.load_checkpoint` on resume and by
`engine.checkpoint_files` for the export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ds_diffusers.engine.masters import place_slice
from ds_diffusers.errors import ConfigError

META_FILE = "ds_diffusers.json"
LATEST = "latest"


def rank_file(step_dir: Path, rank: int) -> Path:
    return step_dir / f"rank_{rank}.pt"


def resolve_step_dir(path: Path) -> Path:
    """A checkpoint_dir means the step its `latest` names; anything else is taken as a step folder."""
    if (path / LATEST).is_file():
        return path / (path / LATEST).read_text().strip()
    return path


def read_meta(step_dir: Path) -> dict[str, Any]:
    meta_file = step_dir / META_FILE
    if not meta_file.is_file():
        raise ConfigError("resume_from_checkpoint", str(step_dir), f"incomplete checkpoint (no {META_FILE}); "
                          "resume from an earlier step folder or set resume_from_checkpoint=false")
    try:
        return json.loads(meta_file.read_text())
    except ValueError:
        raise ConfigError("resume_from_checkpoint", str(step_dir), f"{meta_file} is damaged (not valid JSON); "
                          "resume from an earlier step folder or set resume_from_checkpoint=false") from None


def read_rank_state(step_dir: Path, rank: int) -> dict[str, Any]:
    """{"rng": ..., "ema": ShardedEMA.state_dict() or None} of one rank, on the CPU."""
    # Python and numpy RNG states are pickled objects, not tensors.
    return torch.load(rank_file(step_dir, rank), map_location="cpu", weights_only=False)


def read_ema(step_dir: Path, world_size: int, engine_stage: int, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The full fp32 EMA weights, reassembled from the slices the ranks saved: each covers
    [start, start + len) of the flattened parameter (all of it at ZeRO-0, a fragment at ZeRO-1/2, a
    padded partition at ZeRO-3)."""
    ranks = [read_rank_state(step_dir, rank)["ema"] for rank in range(world_size)]
    state = {}
    for index, name in enumerate(ranks[0]["names"]):
        if "starts" not in ranks[0]:  # saved before slices carried their offsets: ZeRO-3 partitions or full
            slices = [(rank["shadow"][index].view(-1), r * ranks[0]["shadow"][index].numel() if engine_stage == 3 else 0)
                      for r, rank in enumerate(ranks)]
        else:
            slices = [(rank["shadow"][index].view(-1), rank["starts"][index]) for rank in ranks]
        full = torch.zeros(shapes[name].numel(), dtype=torch.float32)
        for shadow, start in slices:
            place_slice(full, shadow, start)
        state[name] = full.view(shapes[name])
    return state
