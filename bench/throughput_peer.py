"""The peer of bench/train_throughput.py: Hugging Face diffusers' examples/text_to_image script,
started through `accelerate launch` with our cfg's settings, on our dataset written as an imagefolder."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ds_diffusers.config import Config
from ds_diffusers.data import default_num_workers, load_train_dataset, resolve_columns

PEER_SCHEDULER = {"WarmupLR": "constant_with_warmup", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine",
                  "none": "constant"}
PEER_STEP = re.compile(r"Steps:.*?\|\s*(\d+)/(\d+) \[")


def step_times(lines: list[tuple[float, str]], steps: int) -> dict[int, float]:
    """(step -> time its tqdm line `Steps: ... N/steps` first arrived), from the peer's output lines."""
    times: dict[int, float] = {}
    for at, text in lines:
        match = PEER_STEP.search(text)
        if match and int(match[2]) == steps and int(match[1]) > 0:
            times.setdefault(int(match[1]), at)
    return times


def write_imagefolder(cfg: Config, dest: Path) -> Path:
    """The dataset as PNGs plus metadata.jsonl (file_name, text: the first caption of a list), the
    layout the peer reads. Kept while the source is unchanged, so the peer's datasets cache stays valid."""
    rows = load_train_dataset(cfg.dataset_dir, cfg.imagefolder)
    image_column, caption_column = resolve_columns(rows, cfg.image_column, cfg.caption_column)
    stamp_path = dest.with_name(dest.name + ".source.json")
    stamp = {"dataset_dir": cfg.dataset_dir, "fingerprint": rows._fingerprint, "rows": len(rows)}
    if dest.is_dir() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with (dest / "metadata.jsonl").open("w") as metadata:
        for index, row in enumerate(rows.select_columns([image_column, caption_column])):
            file_name = f"{index:05d}.png"
            row[image_column].convert("RGB").save(dest / file_name)
            caption = row[caption_column]
            metadata.write(json.dumps({"file_name": file_name, "text": caption if isinstance(caption, str) else caption[0]}) + "\n")
    stamp_path.write_text(json.dumps(stamp) + "\n")
    return dest


def warm_peer_dataset_cache(imagefolder: Path) -> None:
    """The peer's own load_dataset call, once and untimed, so its first step does not include
    converting the PNGs to Arrow: ours reads an Arrow cache that is warm by then too."""
    import datasets

    datasets.disable_progress_bars()
    datasets.config.HF_HUB_OFFLINE = True  # what the peer gets from HF_HUB_OFFLINE=1: no hub request
    datasets.load_dataset("imagefolder", data_files={"train": os.path.join(imagefolder, "**")})


def peer_command(cfg: Config, steps: int, threads: int, peer_dir: Path, imagefolder: Path, run_dir: Path,
                 on_cpu: bool, mixed_precision: str = "no") -> list[str]:
    """`accelerate launch` of the peer script with the cfg's settings mapped onto its flags;
    `mixed_precision` is the peer's own (no, fp16, bf16: fp32 weights under autocast)."""
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        raise FileNotFoundError("the `accelerate` launcher is not on PATH; install accelerate")
    params = cfg.optimizer.params
    betas = params.get("betas", [0.9, 0.999])
    flags = {
        "--pretrained_model_name_or_path": cfg.pretrained_model_name_or_path, "--train_data_dir": imagefolder,
        "--resolution": cfg.resolution, "--train_batch_size": cfg.train_micro_batch_size_per_gpu,
        "--gradient_accumulation_steps": cfg.gradient_accumulation_steps, "--max_train_steps": steps,
        "--learning_rate": params["lr"], "--lr_scheduler": PEER_SCHEDULER[cfg.scheduler.type],
        "--lr_warmup_steps": cfg.lr_warmup_steps, "--adam_beta1": betas[0], "--adam_beta2": betas[1],
        "--adam_weight_decay": params.get("weight_decay", 0.01), "--adam_epsilon": params.get("eps", 1e-8),
        "--max_grad_norm": cfg.gradient_clipping, "--mixed_precision": mixed_precision,
        "--image_interpolation_mode": "bilinear",  # ours resizes bilinearly; the peer's default is lanczos
        "--dataloader_num_workers": (cfg.dataloader_num_workers if cfg.dataloader_num_workers is not None
                                     else default_num_workers()), "--seed": cfg.seed,
        "--checkpointing_steps": steps + 1,  # no checkpoint among the measured steps (default: every 500)
        "--output_dir": run_dir / "model",
    }
    switches = [flag for flag, on in (("--center_crop", cfg.center_crop), ("--random_flip", cfg.random_flip)) if on]
    launcher = [accelerate, "launch", *(["--cpu"] if on_cpu else []), "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", mixed_precision, "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(threads)]
    return [*launcher, str(peer_dir / "run_peer.py"), str(peer_dir / "train_text_to_image.py"),
            *[str(part) for flag, value in flags.items() for part in (flag, value)], *switches]
