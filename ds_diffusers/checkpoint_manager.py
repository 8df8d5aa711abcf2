"""Checkpoint policy: whether a run resumes or starts fresh, when it saves, and how many step
folders it keeps. `checkpoint` writes and reads one step folder; this module decides around it.

- Before any process group exists, `resume_or_fresh_start` picks the step folder to resume from, or
  refuses a fresh start that would overwrite another run's results; once the run folders are
  locked, rank 0 runs `clear_previous_run` on a fresh start.
- During the run, `CheckpointManager` saves the run's stateful parts (DeepSpeed engine, train state,
  EMA) every `save_interval` steps, when a stop signal asks for it, and at the end, never twice for
  one step, and keeps the newest `checkpoints_total_limit` step folders.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ds_diffusers import checkpoint, preemption
from ds_diffusers.checkpoint import LATEST, complete_steps, step_tag
from ds_diffusers.checkpoint_reader import read_meta
from ds_diffusers.config.schema import Config
from ds_diffusers.distributed import DistInfo
from ds_diffusers.errors import ConfigError
from ds_diffusers.export import EXPORT_RESULTS
from ds_diffusers.nonfinite import check_weights_before_writing
from ds_diffusers.train_state import TrainState

if TYPE_CHECKING:
    from ds_diffusers.metrics import RunLogger


def resume_or_fresh_start(cfg: Config, world_size: int) -> Path | None:
    """The step folder to resume from, or None for a fresh start that overwrites nothing it must not.
    Reads files only (each checkpoint file is opened): rank 0 calls it, before any folder is created
    and before any model is loaded, so settings the checkpoint cannot be resumed with (LoRA, EMA, a
    topology change it cannot convert, ...) are refused at once."""
    resume_from = checkpoint.resume_target(cfg)
    if resume_from is None:
        check_fresh_start(cfg)
    else:
        checkpoint.check_settings(read_meta(resume_from), cfg, world_size, resume_from)
    return resume_from


def check_fresh_start(cfg: Config) -> None:
    """Refuse to start a new run on top of another run's results unless `overwrite_output_dir`.

    A run's results are its checkpoints and its export. Logs and ds_config.json alone are an attempt
    that failed before its first save (a bad image, a non-finite stop, Ctrl-C during that save): the
    same command must start again once the cause is fixed, and `clear_previous_run` removes them."""
    leftovers = []
    if complete_steps(cfg.checkpoint_dir) or (Path(cfg.checkpoint_dir) / LATEST).exists():
        leftovers.append(f"checkpoint_dir {cfg.checkpoint_dir} holds checkpoints")
    out = Path(cfg.output_dir)
    if any((out / name).exists() for name in EXPORT_RESULTS):
        leftovers.append(f"output_dir {cfg.output_dir} holds a previous run's results")
    if leftovers and not cfg.overwrite_output_dir:
        raise ConfigError("overwrite_output_dir", False, f"{'; '.join(leftovers)}. Resume it with "
                          "resume_from_checkpoint=latest, choose new folders, or set overwrite_output_dir=true to replace them")


def clear_previous_run(cfg: Config) -> None:
    """Rank 0, on a fresh start: an earlier attempt's metrics and (with overwrite_output_dir) old
    checkpoints would otherwise mix with the new run's."""
    if cfg.overwrite_output_dir:
        for step in complete_steps(cfg.checkpoint_dir):
            shutil.rmtree(Path(cfg.checkpoint_dir) / step_tag(step))
        (Path(cfg.checkpoint_dir) / LATEST).unlink(missing_ok=True)
    shutil.rmtree(Path(cfg.output_dir) / "logs", ignore_errors=True)


def stale_steps(steps: list[int], keep: int, protected: int) -> list[int]:
    """Of the complete checkpoints' steps (oldest first), those to delete so that the newest `keep`
    remain; never `protected`, the step `latest` names."""
    return [step for step in steps[: max(0, len(steps) - keep)] if step != protected]


def prune(checkpoint_dir: str, keep: int, protected: int) -> None:
    """Rank 0. Incomplete folders are left alone: the next save of their step overwrites them."""
    for step in stale_steps(complete_steps(checkpoint_dir), keep, protected):
        shutil.rmtree(Path(checkpoint_dir) / step_tag(step), ignore_errors=True)


@dataclass(frozen=True)
class Resumed:
    step_dir: Path
    global_step: int
    load_s: float
    changed_keys: list[str]  # training settings that differ from the checkpoint's (allowed ones)
    topology_change: str | None = None  # "2 processes, ZeRO-2 -> 1 process, ZeRO-2" when converted (`topology`)

    def message(self) -> str:
        changed = f"; changed since: {', '.join(self.changed_keys)}" if self.changed_keys else ""
        converted = f" (converted: {self.topology_change})" if self.topology_change else ""
        return f"resumed from {self.step_dir} at step {self.global_step} in {self.load_s:.1f} s{converted}{changed}"


class CheckpointManager:
    """Saves and loads the run's stateful parts as one checkpoint per step: "engine" (the DeepSpeed
    engine: weights, optimizer, lr schedule), "train_state" (a `TrainState`) and, with use_ema,
    "ema". Every method is collective: call it on all ranks."""

    def __init__(self, cfg: Config, dist: DistInfo, parts: dict[str, Any], total_steps: int,
                 requested: list[int] | None = None) -> None:
        self.cfg = cfg
        self.requested = requested  # the user's batch settings when cfg's were adjusted (`topology`)
        self.dist = dist
        self.parts = parts
        self.total_steps = total_steps
        self.saved_at = -1  # the step this process last saved, so the final save does not repeat it

    @property
    def state(self) -> TrainState:
        return self.parts["train_state"]

    def should_save(self, step: int) -> bool:
        """An interval save; the last step's save is `at_end`'s."""
        interval = self.cfg.save_interval
        return bool(interval) and step % interval == 0 and step < self.total_steps

    def load(self, step_dir: Path) -> Resumed:
        started = time.perf_counter()
        meta = checkpoint.load(self.parts["engine"], self.cfg, self.dist, step_dir, self.state, self.parts.get("ema"))
        changed = list(meta["changed_keys"])
        if self.state.data_order_was is not None:
            changed.append(f"the training data ({self.state.data_order_was} -> {self.state.data_order}: the epoch's order "
                           "is another one, so from the saved position on its samples may repeat or be missed until the "
                           "epoch ends)")
        return Resumed(step_dir, self.state.global_step, time.perf_counter() - started, changed,
                       meta.get("topology_change"))

    def save(self, logger: RunLogger) -> Path:
        step = self.state.global_step
        started = time.perf_counter()
        check_weights_before_writing(self.parts["engine"], self.dist.device, "checkpoint", step)
        saved = checkpoint.save(self.parts["engine"], self.cfg, self.dist, self.state, self.parts.get("ema"),
                                self.requested)
        if self.dist.is_main:
            prune(self.cfg.checkpoint_dir, self.cfg.checkpoints_total_limit, protected=step)
        self.saved_at = step
        logger.message(f"checkpoint saved: {saved} (step {step}, {time.perf_counter() - started:.1f} s)")
        return saved

    def after_step(self, logger: RunLogger, stop: bool) -> None:
        """After each optimizer step: the interval save, or the save a stop asks for (all ranks agree
        on `stop`); a save step that is also the stop step saves once."""
        step = self.state.global_step
        if self.should_save(step) or stop:
            self.save(logger)
        if stop:
            logger.message(f"stopped by {preemption.signal_names()} at step {step}; checkpoint saved in "
                           f"{self.cfg.checkpoint_dir}; start again with resume_from_checkpoint=latest to continue")

    def at_end(self, logger: RunLogger) -> None:
        """The final save, unless the last step is saved already."""
        if self.saved_at != self.state.global_step:
            self.save(logger)
