"""Rank-0 reporting: tqdm progress bar, wandb (imported only when enabled) and DeepSpeed's monitors
(TensorBoard/CSV blocks of the config). Every method is a no-op on other ranks, so the loop calls
them unconditionally and rank discipline lives here alone.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ds_diffusers.config.schema import Config


def peak_memory_mb() -> dict[str, float]:
    from deepspeed.accelerator import get_accelerator

    # ru_maxrss is in KiB on Linux.
    stats = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        stats["peak_accelerator_mb"] = accelerator.max_memory_allocated() / 2**20
    return stats


class RunLogger:
    def __init__(self, cfg: Config, *, is_main: bool, total_steps: int, initial_step: int, monitor: Any = None) -> None:
        self.is_main = is_main
        self.monitor = monitor if monitor is not None and getattr(monitor, "enabled", False) else None
        self.wandb_run = None
        self.bar = None
        self.metrics_file = None
        if not is_main:
            return
        # One JSON line per optimizer step: the run's history, readable without any logging service.
        metrics_path = Path(cfg.output_dir) / "logs" / "metrics.jsonl"
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self.metrics_file = metrics_path.open("a")
        # Always shown: the launch scripts pipe output through `tee`, which tqdm's auto-detection
        # would take for a non-terminal and silence. Through a pipe, refresh less often.
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True, file=sys.stderr,
                        mininterval=1.0 if sys.stderr.isatty() else 5.0, disable=False)
        if cfg.wandb.enabled:
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.wandb.project, group=cfg.wandb.group, entity=cfg.wandb.entity, name=cfg.wandb.name,
                dir=cfg.output_dir, config=cfg.model_dump(), mode="offline" if cfg.offline else "online",
            )

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        # Wall-clock time and peak memory on every line: benchmarks read start-up and throughput from here.
        record = {"step": step, "time": time.time(), **metrics, **peak_memory_mb()}
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "lr", "samples_per_s")}, refresh=False)
            if step >= self.bar.total:
                # Closed at the last step, the final bar is printed once: an open bar is printed again
                # with every later message (validation, checkpoint, done), and close() prints it too.
                self.bar.n = step
                self.bar.close()
                self.bar = None
            else:
                self.bar.update(1)
        if self.wandb_run is not None:
            self.wandb_run.log({f"train/{k}": v for k, v in record.items() if k not in ("step", "time")}, step=step)
        if self.monitor is not None:
            self.monitor.write_events([(f"Train/{k}", v, step) for k, v in metrics.items()])

    def log_images(self, step: int, path: str, prompts: list[str]) -> None:
        if not self.is_main:
            return
        self.message(f"validation images at step {step}: {path}")
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({"validation": wandb.Image(path, caption=" | ".join(prompts))}, step=step)

    def message(self, text: str) -> None:
        if self.is_main:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
