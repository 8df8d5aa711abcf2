"""How long a run is and how it walks through the data: optimizer steps per epoch, where the
accumulation windows end, and the (epoch, batch) sequence from a resumed position on."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

from ds_diffusers.config.schema import Config
from ds_diffusers.data import num_batches_per_epoch


@dataclass(frozen=True)
class RunPlan:
    """Run length in optimizer steps; `max_train_steps` wins over `num_epochs` when set.

    An accumulation window never spans two epochs: the last micro-batches of an epoch, fewer than
    `gradient_accumulation_steps`, still make an optimizer step (as accelerate does in diffusers'
    script). Windows are placed by the position in the epoch, which a checkpoint stores, so a
    resumed run cuts them in the same places."""

    batches_per_epoch: int
    accumulation_steps: int
    steps_per_epoch: int
    total_steps: int
    num_epochs: int

    @classmethod
    def from_config(cls, cfg: Config, dataset_len: int, world_size: int, batches_per_epoch: int | None = None) -> "RunPlan":
        """`batches_per_epoch`: the sampler's count when it is not the plain sharding's (aspect-ratio buckets)."""
        batches = batches_per_epoch or num_batches_per_epoch(dataset_len, cfg.train_micro_batch_size_per_gpu, world_size)
        steps_per_epoch = math.ceil(batches / cfg.gradient_accumulation_steps)
        total = cfg.max_train_steps or cfg.num_epochs * steps_per_epoch
        epochs = math.ceil(total / steps_per_epoch)
        return cls(batches_per_epoch=batches, accumulation_steps=cfg.gradient_accumulation_steps,
                   steps_per_epoch=steps_per_epoch, total_steps=total, num_epochs=epochs)

    def ends_window(self, batch_in_epoch: int) -> bool:
        """Whether micro-batch `batch_in_epoch` (0-based) is the last of its accumulation window."""
        return (batch_in_epoch + 1) % self.accumulation_steps == 0 or batch_in_epoch + 1 == self.batches_per_epoch


def epoch_batches(loader: Any, sampler: Any, dataset: Any, start_epoch: int, num_epochs: int,
                  start_in_epoch: int) -> Iterator[tuple[int, Any]]:
    """(epoch, batch) pairs from `start_epoch` on, skipping the first `start_in_epoch` samples of the
    epoch's global order, consumed over all ranks before a resume; each epoch ends with (epoch, None)."""
    for epoch in range(start_epoch, num_epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        sampler.set_start(start_in_epoch if epoch == start_epoch else 0)
        for batch in loader:
            yield epoch, batch
        yield epoch, None
