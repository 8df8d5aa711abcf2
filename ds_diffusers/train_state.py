"""Where a run is: optimizer steps done, the epoch, the samples of it consumed, and this process's
random streams. Restoring all of it makes a resumed run draw the same samples, noise and timesteps
as a run that never stopped.

A checkpoint keeps the position once (`global_step`, `epoch`, `samples_in_epoch` in its
`ds_diffusers.json`) and the random states once per rank (`rng` in `rank_<R>.pt`); see `checkpoint`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

POSITION_KEYS = ("global_step", "epoch", "samples_in_epoch")
RNG_KEY = "rng"


def rng_state() -> dict[str, Any]:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if accelerator.device_name() != "cpu":
        state["accelerator"] = accelerator.get_rng_state()
    return state


def fresh_rng_state(seed: int) -> dict[str, Any]:
    """The random states every stream of this process has right after seeding it with `seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return rng_state()


def set_rng_state(state: dict[str, Any]) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


@dataclass
class TrainState:
    global_step: int = 0  # optimizer steps done
    epoch: int = 0
    # Over all ranks: the cursor in the epoch's global order (`data.sampler`), independent of the
    # world size. Accumulation windows are placed by this count, so a resumed run cuts them in the
    # same places.
    samples_in_epoch: int = 0
    # What the epoch order depends on besides (seed, epoch): the dataset's row count, or the shard
    # list. Saved with the position, so that a resume onto other data says the cursor now points into
    # another order (`data_order_was` holds the checkpoint's, when it differs).
    data_order: str = ""
    data_order_was: str | None = None

    def state_dict(self) -> dict[str, Any]:
        """The position and this process's random states as they are now."""
        return {"global_step": self.global_step, "epoch": self.epoch, "samples_in_epoch": self.samples_in_epoch,
                "data_order": self.data_order, RNG_KEY: rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the position and this process's random states; keys other than those of
        `state_dict` are ignored (a checkpoint's metadata holds more). `data_order` stays this run's."""
        self.global_step, self.epoch, self.samples_in_epoch = (int(state[key]) for key in POSITION_KEYS)
        saved_order = state.get("data_order")  # absent in checkpoints from before it was kept
        self.data_order_was = saved_order if saved_order and self.data_order and saved_order != self.data_order else None
        set_rng_state(state[RNG_KEY])
