"""DeepSpeed's checkpoint reads, memory-mapped, so the ranks of a node share one copy of a file.

`engine.load_checkpoint` reads every file through `engine.checkpoint_engine.load` (a plain
`torch.load` into private host memory). Every rank reads the model-states file whole: under ZeRO-0
it holds the full optimizer state (fp32 AdamW: 12 bytes a parameter, 10 GB for the SD 1.5 UNet),
under ZeRO-1/2 the full 16-bit module. Eight ranks of a node made eight private copies before
anything moved to the GPU. Memory-mapped, the tensors are backed by the file: the node's page cache
holds one copy, read on demand, and what the optimizer later writes in place is copied per page.
"""

from __future__ import annotations

import types
import zipfile
from typing import Any

import torch


def mmap_checkpoint_reads(engine: Any) -> None:
    """Make the engine's checkpoint reads memory-mapped. Files in torch's legacy (non-zip) format,
    which cannot be mapped, are read as before."""
    checkpoint_engine = engine.checkpoint_engine
    plain_load = checkpoint_engine.load

    def load(self: Any, path: str, map_location: Any = None) -> Any:
        if not zipfile.is_zipfile(path):
            return plain_load(path, map_location=map_location)
        return torch.load(path, map_location=map_location, weights_only=False, mmap=True)

    checkpoint_engine.load = types.MethodType(load, checkpoint_engine)


def release_checkpoint_files(engine: Any) -> None:
    """After `engine.load_checkpoint`: copy the optimizer state that still lies on the host into
    private memory. torch's `Optimizer.load_state_dict` keeps a host tensor of the right dtype as it
    is (no copy), so on a host-side optimizer (CPU runs, offload) the state stayed backed by the
    mapped file for the whole run: pruning that step at the first save then deleted a file still in
    use, its disk space was not freed until the run ended, and on NFS the folder could not be
    removed (the file becomes a hidden `.nfs*`), leaving an empty-looking step folder. Adam writes
    every element each step, so these pages would be copied at the first step anyway."""
    optimizers = [engine.optimizer, getattr(engine.optimizer, "optimizer", None)]  # ZeRO wraps a torch optimizer
    states = {id(state): state for optimizer in optimizers if isinstance(state := getattr(optimizer, "state", None), dict)}
    for state in states.values():  # a ZeRO wrapper's `state` is its torch optimizer's: copied once
        for param_state in state.values():
            if not isinstance(param_state, dict):
                continue
            for key, value in param_state.items():
                if isinstance(value, torch.Tensor) and value.device.type == "cpu":  # Adam's 0-dim step too
                    param_state[key] = value.clone()
