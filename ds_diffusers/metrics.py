"""Rank-0 reporting: tqdm progress bar, wandb (imported only when enabled) and DeepSpeed's monitors
(TensorBoard/CSV blocks of the config). Every method is a no-op on other ranks, so the loop calls
them unconditionally and rank discipline lives here alone.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tqdm import tqdm

from ds_diffusers.config.schema import Config
from ds_diffusers.errors import ConfigError


def peak_memory_mb() -> dict[str, float]:
    from deepspeed.accelerator import get_accelerator

    # ru_maxrss is in KiB on Linux.
    stats = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        stats["peak_accelerator_mb"] = accelerator.max_memory_allocated() / 2**20
    return stats


def wandb_unreachable(timeout_s: float = 5.0) -> str | None:
    """Why wandb's server cannot be reached from here (None when it can): a TCP connect to its host.
    Without this, an online `wandb.init` on a machine without network retries for about two minutes."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout_s).close()
    except OSError as err:
        return f"cannot reach {url.hostname}:{port} ({err.strerror or err})"
    return None


def wandb_mode(cfg: Config) -> tuple[str | None, str | None]:
    """(mode for wandb.init, notice for the log). `offline: true` and an explicit WANDB_MODE are
    obeyed; otherwise an unreachable server means offline mode, said once, instead of a hang."""
    if cfg.offline:
        return "offline", None
    if os.environ.get("WANDB_MODE"):
        return None, None  # wandb reads it itself
    reason = wandb_unreachable()
    if reason is None:
        return "online", None
    return "offline", (f"wandb: {reason}; logging offline to {Path(cfg.output_dir) / 'wandb'} instead "
                       "(upload later with `wandb sync`; set offline: true or WANDB_MODE=offline to skip this check)")


def start_wandb(cfg: Config) -> Any:
    """Rank 0. A wandb run, or ConfigError (one line) with nothing of this attempt left on disk."""
    import wandb

    mode, notice = wandb_mode(cfg)
    if notice:
        print(f"ds-diffusers: {notice}", file=sys.stderr, flush=True)
    wandb_dir = Path(cfg.output_dir) / "wandb"
    existed = wandb_dir.exists()
    try:
        return wandb.init(project=cfg.wandb.project, group=cfg.wandb.group, entity=cfg.wandb.entity, name=cfg.wandb.name,
                          dir=cfg.output_dir, config=cfg.model_dump(), mode=mode)
    except Exception as err:  # wandb raises its own types (UsageError, CommError, ...) and plain ones
        if not existed:
            shutil.rmtree(wandb_dir, ignore_errors=True)
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError("wandb.enabled", True, f"wandb could not start ({type(err).__name__}: {first_line}); run `wandb login` "
                          "or set WANDB_API_KEY, or log offline with offline: true (or WANDB_MODE=offline)") from None


def keep_history_until(metrics_path: Path, step: int) -> None:
    """Rank 0, before a (resumed) run appends: drop the records after `step`, the step it resumes from.
    They were logged by an attempt whose later checkpoints were lost or skipped (a crash after the log
    point, a damaged step the resume fell back from); kept, the same steps would appear twice and a
    plot of the file would zigzag. A line cut short by a crash is dropped too."""
    if not metrics_path.is_file():
        return
    kept = []
    for line in metrics_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = metrics_path.with_name(f".{metrics_path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, metrics_path)


class RunLogger:
    def __init__(self, cfg: Config, *, is_main: bool, total_steps: int, initial_step: int, monitor: Any = None) -> None:
        self.is_main = is_main
        self.monitor = monitor if monitor is not None and getattr(monitor, "enabled", False) else None
        self.wandb_run = None
        self.bar = None
        self.metrics_file = None
        if not is_main:
            return
        # wandb first: a failed start must not leave logs/ behind, which would block a plain re-run.
        if cfg.wandb.enabled:
            self.wandb_run = start_wandb(cfg)
        # One JSON line per optimizer step: the run's history, readable without any logging service.
        metrics_path = Path(cfg.output_dir) / "logs" / "metrics.jsonl"
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        keep_history_until(metrics_path, initial_step)
        self.metrics_file = metrics_path.open("a")
        # Always shown: the launch scripts pipe output through `tee`, which tqdm's auto-detection
        # would take for a non-terminal and silence. Through a pipe, refresh less often.
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True, file=sys.stderr,
                        mininterval=1.0 if sys.stderr.isatty() else 5.0, disable=False)

    def advance(self) -> None:
        """One optimizer step done; host-side only, so the bar moves every step between log points."""
        if self.is_main:
            self.bar.update(1)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """At a log point: `metrics` hold the values all ranks agreed on (the loss is the mean over the
        interval since the previous log point), and every sink gets the same numbers."""
        if not self.is_main:
            return
        # Wall-clock time and peak memory on every line: benchmarks read start-up and throughput from here.
        record = {"step": step, "time": time.time(), **metrics, **peak_memory_mb()}
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "lr", "samples_per_s")}, refresh=False)
            # advance() counts the steps; here the bar only shows the numbers (counting here too made
            # a 3-step run end at 4it).
            if step >= self.bar.total:
                # Closed at the last step, the final bar is printed once: an open bar is printed again
                # with every later message (validation, checkpoint, done), and close() prints it too.
                self.bar.n = step
                self.bar.close()
                self.bar = None
        if self.wandb_run is not None:
            self.wandb_run.log({f"train/{k}": v for k, v in record.items() if k not in ("step", "time")}, step=step)
        if self.monitor is not None:
            self.monitor.write_events([(f"Train/{k}", v, step) for k, v in metrics.items()])

    def log_validation(self, step: int, metrics: dict[str, float], seconds: float) -> None:
        """A validation's numbers (`val_loss`): one line on screen, a `metrics.jsonl` record of their own
        (with `step`, `time` and no training keys), `validation/` in wandb, `Validation/` in DeepSpeed's monitor."""
        if not self.is_main:
            return
        self.message(f"validation at step {step}: " + ", ".join(f"{k} {v:.5g}" for k, v in metrics.items()) + f" ({seconds:.1f} s)")
        self.metrics_file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.metrics_file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({f"validation/{k}": v for k, v in metrics.items()}, step=step)
        if self.monitor is not None:
            self.monitor.write_events([(f"Validation/{k}", v, step) for k, v in metrics.items()])

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
