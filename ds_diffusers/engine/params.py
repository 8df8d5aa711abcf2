"""What a parameter is under ZeRO-3, asked in one place.

ZeRO-3 replaces each parameter's data with an empty placeholder and hangs its bookkeeping on the
tensor itself: `ds_id` marks a partitioned parameter, `ds_numel`/`ds_shape` give the full size,
`ds_tensor` is this rank's partition. Small parameters (at most `stage3_param_persistence_threshold`
elements: biases, norms) are "persistent": ZeRO-3 keeps them gathered between steps (`ds_status`
AVAILABLE) and gathers them again after each optimizer step. These are DeepSpeed attributes, not API;
the contract test (tests/test_engine_contract.py) checks them on every version bump.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def is_zero3_param(param: torch.Tensor) -> bool:
    """True for a parameter that ZeRO-3 partitioned (its `.data` is an empty placeholder)."""
    return hasattr(param, "ds_id")


def full_numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter, partitioned or not."""
    return param.ds_numel if is_zero3_param(param) else param.numel()


def full_shape(param: torch.Tensor) -> torch.Size:
    """Shape of the whole parameter, partitioned or not."""
    return param.ds_shape if is_zero3_param(param) else param.shape


def local_partition(param: torch.Tensor) -> torch.Tensor:
    """What this rank holds of the compute copy: its ZeRO-3 partition (1-D, the last one padded),
    or the full parameter."""
    return param.ds_tensor if is_zero3_param(param) else param.data


def partition_numel(param: torch.Tensor) -> int:
    """Elements per rank of a ZeRO-3 parameter; every rank's partition has this size, so rank r
    holds [r * size, (r + 1) * size) of the flattened parameter."""
    return param.ds_tensor.ds_numel


@contextmanager
def gathered(params: list[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """All ranks must enter this. Inside, ZeRO-3 parameters hold their full values (others are
    untouched). With `modifier_rank`, that rank's changes are broadcast and re-partitioned on exit."""
    import deepspeed

    partitioned = [p for p in params if is_zero3_param(p)]
    if not partitioned:
        yield
        return
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def regather_held(params: list[torch.Tensor]) -> None:
    """All ranks. After their partitions were written, the ZeRO-3 parameters that stay gathered
    between forward passes (persistent ones) are gathered from them again, as DeepSpeed does after an
    optimizer step: their full `.data` was gathered before and would still hold the old values."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    held = [p for p in params if is_zero3_param(p) and p.ds_status == ZeroParamStatus.AVAILABLE]
    if held:
        held[0].partition(held)  # drops the stale full values; the partitions are kept
        held[0].all_gather(held)
