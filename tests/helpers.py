"""Helpers shared by several test files: cfg builders, launcher runs and their outputs, small datasets.
Test files import from here and from conftest's fixtures, never from each other."""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys
import weakref
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ds_diffusers.config import load_config, validate_dict
from ds_diffusers.config.checks import check_consistency
from ds_diffusers.distributed import DistInfo, free_port
from ds_diffusers.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SINGLE = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))

# ---- config: the seed project's file and variations of it ----

# Every key of the seed project's (deepspeed-diffusers) cfg/default.json, with its values.
SEED_DEFAULT = {
    "num_epochs": 1, "validation_epochs": 10, "max_train_steps": 0, "lr_warmup_steps": 500, "save_interval": 1000,
    "seed": 42, "validation_prompts": ["water turtle"], "pretrained_model_name_or_path": "model/stable-diffusion-v1-5",
    "dataset_dir": "datasets/pokemon-blip-captions", "imagefolder": False, "checkpoint_dir": "sd-result/checkpoint-test",
    "output_dir": "/sd-result/sd-pokemon", "use_lora": {"action": False, "rank": 32, "alpha": 32},
    "dataloader_num_workers": 8, "resume_from_checkpoint": True, "use_ema": False, "offline": True, "resolution": 512,
    "center_crop": True, "random_flip": True,
    "use_fp16": {"enabled": True, "auto_cast": False, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "consecutive_hysteresis": False, "min_loss_scale": 1},
    "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 32,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-08, "weight_decay": 0.01}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.0001, "warmup_num_steps": 1000}},
    "wall_clock_breakdown": False, "wandb": {"enabled": False, "group": "ddp", "project": "deepspeed-diffusers"},
    "flops_profiler": {"enabled": False, "profile_step": 1, "module_depth": -1, "top_modules": 1, "detailed": True, "output_file": None},
    "zero_optimization": {"stage": 1, "offload_param": {"device": "auto"}, "offload_optimizer": {"device": "auto"}},
}


def with_changes(**changes) -> dict:
    raw = json.loads(json.dumps(SEED_DEFAULT))
    raw.update(changes)
    return raw


def error_of(raw: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        cfg = validate_dict(raw)
        check_consistency(cfg)
    return info.value


def environment_cfg(tmp_path: Path, **changes):
    """The seed cfg on a stub model folder (configs and empty weight files) and an empty dataset folder."""
    model = tmp_path / "model"
    for sub, name in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                      ("tokenizer", "vocab.json"), ("scheduler", "scheduler_config.json")):
        (model / sub).mkdir(parents=True)
        (model / sub / name).write_text("{}")
        (model / sub / "model.safetensors").write_bytes(b"")
    (tmp_path / "data").mkdir()
    raw = with_changes(pretrained_model_name_or_path=str(model), dataset_dir=str(tmp_path / "data"),
                       output_dir=str(tmp_path / "out"), checkpoint_dir=str(tmp_path / "ckpt"),
                       use_fp16={"enabled": False})
    raw.update(changes)
    return validate_dict(raw)


def checkpoint_cfg(tmp_path, **changes):
    """The seed cfg with its checkpoint and output folders under `tmp_path`."""
    return validate_dict(with_changes(checkpoint_dir=str(tmp_path / "ckpt"), output_dir=str(tmp_path / "out"), **changes))

def checkpoint_model_cfg(tmp_path, **changes):
    """`checkpoint_cfg` with a model folder whose unet/config.json exists (what the settings hash reads)."""
    unet_config = tmp_path / "model" / "unet" / "config.json"
    unet_config.parent.mkdir(parents=True, exist_ok=True)
    unet_config.write_text("{}")
    return checkpoint_cfg(tmp_path, pretrained_model_name_or_path=str(tmp_path / "model"), **changes)


class FakeEngine:
    """Writes a DeepSpeed-like model-states file; `fail` is raised after the first bytes are out."""

    optimizer = None  # as a DeepSpeed engine built without one

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail

    def zero_optimization_stage(self) -> int:
        return 0  # it writes a model-states file and no optimizer-state files, as stage 0 does

    def save_checkpoint(self, save_dir, tag, **_):
        from ds_diffusers.engine.checkpoint_files import MODEL_STATES

        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.ones(4)}, Path(save_dir) / tag / MODEL_STATES)
        if self.fail is not None:
            raise self.fail


def overwrite_in_place(path: Path, offset: int, size: int) -> None:
    """`size` random bytes written over the file from `offset`, as a bad disk or copy leaves it: same
    size, a torch file's zip directory intact."""
    length = path.stat().st_size
    random_bytes = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(random_bytes.numpy().tobytes())
    assert path.stat().st_size == length


def cache_cfg(model_dir: Path, dataset_dir: Path, cache_dir: Path, *overrides: str):
    """cfg/default.json on the given model and data with both encoder caches on, at 32 px."""
    return load_config(REPO / "cfg/default.json", [
        f"pretrained_model_name_or_path={model_dir}", f"dataset_dir={dataset_dir}", f"cache_dir={cache_dir}",
        "resolution=32", "train_micro_batch_size_per_gpu=8", "cache_latents=true", "cache_text_embeddings=true", *overrides])


def prepare_caches_in_process(cfg, image_column: str = "image", caption_column: str = "text"):
    """(latent_cache, text_cache, log lines) for `cfg` in one process."""
    from ds_diffusers.data import load_train_dataset, prepare_caches
    from ds_diffusers.models import DTYPES, load_frozen_components

    messages: list[str] = []
    dataset = load_train_dataset(cfg.dataset_dir, imagefolder=False)
    frozen = load_frozen_components(cfg.pretrained_model_name_or_path, torch.device("cpu"), DTYPES[cfg.weight_dtype_name], None)
    latent_cache, text_cache = prepare_caches(cfg, dataset, image_column, caption_column, frozen, SINGLE, log=messages.append)
    return latent_cache, text_cache, messages


# ---- training runs through the real launcher ----

def run_cfg(tiny_assets, tmp_path: Path, *overrides: str) -> list[str]:
    """A cfg file for the tiny model (the default's recipe, shortened) plus output paths."""
    return [
        f"pretrained_model_name_or_path={tiny_assets.model_dir}", f"dataset_dir={tiny_assets.dataset_dir}",
        f"output_dir={tmp_path / 'model'}", f"checkpoint_dir={tmp_path / 'checkpoints'}",
        "validation_steps=0", "save_interval=0", "train_micro_batch_size_per_gpu=8", "resolution=32",
        "lr_warmup_steps=5", "log_every_n_steps=1", *overrides,
    ]


def launch(overrides: list[str], *, procs: int = 1, timeout: int = 420, cfg: str = "cfg/default.json",
           env: dict[str, str] | None = None, rank_logs: Path | None = None, runner: bool = False) -> subprocess.CompletedProcess:
    """A training run through the deepspeed launcher. `rank_logs`: a folder where the launcher writes
    each rank's output to its own file (rank_output); `runner`: see launch_module."""
    return launch_module("ds_diffusers.train", ["--cfg", cfg, "--set", *overrides], procs=procs, timeout=timeout,
                         env=env, rank_logs=rank_logs, runner=runner)


def launch_module(module: str, args: list[str], *, procs: int, timeout: int = 420, env: dict[str, str] | None = None,
                  rank_logs: Path | None = None, runner: bool = False) -> subprocess.CompletedProcess:
    """`python -m module args` in `procs` processes through DeepSpeed's launcher, from the repository root.

    By default this is the command the `deepspeed` runner starts on one node once it has counted the
    devices (`python -m deepspeed.launcher.launch --world_info=...`, the local branch of
    deepspeed/launcher/runner.py): the same processes, environment and rank variables, without the
    ~1.5 s the runner spends importing DeepSpeed first, which every launch of the suite would pay.
    `runner=True` types the `deepspeed` command itself, as scripts/*.sh do
    (test_train_integration's 2-process run and the sampling runs of run_sample do)."""
    port = str(free_port())
    if runner:
        each_rank = ["--enable_each_rank_log", str(rank_logs)] if rank_logs is not None else []
        cmd = ["deepspeed", "--num_gpus", str(procs), "--master_port", port, *each_rank, "--module", module, *args]
    else:
        world_info = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(procs))}).encode()).decode()
        each_rank = [f"--enable_each_rank_log={rank_logs}"] if rank_logs is not None else []
        cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}", "--master_addr=127.0.0.1",
               f"--master_port={port}", "--module", *each_rank, "--log_level=info", module, *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(max(1, 2 // procs)), **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def rank_output(rank_logs: Path, rank: int) -> str:
    """What rank `rank` printed in a `launch(..., rank_logs=...)` run."""
    return next(rank_logs.glob(f"*_rank{rank}.log")).read_text()


def metrics_records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def losses(output_dir: Path) -> list[float]:
    """The training loss of each log point (validation records have `val_loss` instead)."""
    return [record["loss"] for record in metrics_records(output_dir) if "loss" in record]


def validation_losses(output_dir: Path) -> dict[int, float]:
    return {record["step"]: record["val_loss"] for record in metrics_records(output_dir) if "val_loss" in record}


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


# ---- resume: a long run against a stopped and resumed one ----

RESUME_STEPS = 8
# A constant-after-warmup schedule: the schedule of a run stopped at RESUME_STEPS/2 is the same as the long run's.
RESUME_COMMON = ("scheduler.type=WarmupLR", "scheduler.params={}", "lr_warmup_steps=2", "save_interval=0")


def tensors(path: Path) -> dict:
    return load_file(str(path))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def three_runs(tiny_assets, tmp_path: Path, *overrides: str, steps: int = RESUME_STEPS) -> tuple[Path, Path]:
    """2N steps straight, and N steps + resume for N more; returns both output folders."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert_ok(launch(run_cfg(tiny_assets, straight, *RESUME_COMMON, *overrides, f"max_train_steps={steps}"), procs=2))
    assert_ok(launch(run_cfg(tiny_assets, resumed, *RESUME_COMMON, *overrides, f"max_train_steps={steps // 2}"), procs=2))
    result = launch(run_cfg(tiny_assets, resumed, *RESUME_COMMON, *overrides, f"max_train_steps={steps}",
                            "resume_from_checkpoint=latest"), procs=2)
    assert_ok(result)
    assert f"resumed from {resumed / 'checkpoints' / f'step_{steps // 2}'}" in result.stdout + result.stderr
    return straight / "model", resumed / "model"


# ---- the flow-matching transformer families (FLUX.1, SD 3.5) through the launcher, 1 process ----

TRANSFORMER_LORA = ("use_lora.action=true", "use_lora.rank=4", "use_lora.alpha=8", "optimizer.params.lr=0.01",
                    "zero_optimization.stage=2")


def transformer_run_cfg(model_dir: Path, dataset_dir: Path, run_dir: Path, *overrides: str) -> list[str]:
    """3 steps at 64 px on 16 rows (the resumed run's caches encode only those), no validation or saves."""
    return [f"pretrained_model_name_or_path={model_dir}", f"dataset_dir={dataset_dir}", f"output_dir={run_dir / 'model'}",
            f"checkpoint_dir={run_dir / 'checkpoints'}", f"cache_dir={run_dir / 'cache'}", "resolution=64",
            "train_micro_batch_size_per_gpu=4", "validation_steps=0", "save_interval=0", "lr_warmup_steps=1",
            "log_every_n_steps=1", "scheduler.params={}", "max_train_steps=3", "max_train_samples=16", *overrides]


def lora_resumed_from_caches(model_dir: Path, dataset_dir: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """A LoRA run under ZeRO-2 saved at step 2 of 3, and a run resumed from that checkpoint with both encoder
    caches (built at its start): asserts the same losses and adapters as the uncached straight run, and
    returns the straight run's LoRA file's tensors (its output folder is `tmp_path / "straight" / "model"`).
    One fp32 process runs the configured ZeRO-2 as ZeRO-0: this is each flow family's LoRA ZeRO-0 run
    (test_transformer_processes runs ZeRO-1 in bf16 on one process, ZeRO-2 and ZeRO-3 on two)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = launch(transformer_run_cfg(model_dir, dataset_dir, straight, *TRANSFORMER_LORA, "save_interval=2"))
    assert_ok(first)
    assert "ZeRO-2 (run as ZeRO-0: one process has nothing to partition), float32, 1 process(es)" in first.stdout
    result = launch(transformer_run_cfg(model_dir, dataset_dir, resumed, *TRANSFORMER_LORA, "cache_latents=true",
                                        "cache_text_embeddings=true",
                                        f"resume_from_checkpoint={straight / 'checkpoints' / 'step_2'}"))
    assert_ok(result)
    assert "resumed from" in result.stdout + result.stderr
    history = losses(straight / "model")
    assert len(history) == 3 and all(math.isfinite(loss) for loss in history) and len(set(history)) == 3
    assert losses(resumed / "model") == pytest.approx(history[2:], abs=1e-6)
    weights = load_file(str(straight / "model" / "pytorch_lora_weights.safetensors"))
    again = load_file(str(resumed / "model" / "pytorch_lora_weights.safetensors"))
    assert weights.keys() == again.keys() and all(torch.allclose(weights[k], again[k], atol=1e-6) for k in weights)
    return weights


def assert_lora_loads_and_changes_images(pipe, lora_dir: Path, num_targets: int) -> None:
    """The LoRA file loads in `pipe.load_lora_weights` with `num_targets` target modules and changes its images."""
    before = sample_64px(pipe)
    pipe.load_lora_weights(lora_dir)
    assert len(pipe.transformer.peft_config["default_0"].target_modules) == num_targets
    assert abs(sample_64px(pipe) - before).max() > 1e-4


def full_transformer_run(model_dir: Path, dataset_dir: Path, run_dir: Path, *overrides: str) -> str:
    """A full fine-tune under ZeRO-3 with a validation image at step 3: asserts the transformer loaded
    partitioned, the image and three finite, distinct losses; returns the run's stdout."""
    result = launch(transformer_run_cfg(model_dir, dataset_dir, run_dir, "zero_optimization.stage=3",
                                        "optimizer.params.lr=1e-3", "validation_steps=3", "num_validation_images=1",
                                        "validation_inference_steps=2", "validation_prompts=[\"a red circle\"]", *overrides))
    assert_ok(result)
    assert "full transformer" in result.stdout and "loaded partitioned" in result.stdout
    assert (run_dir / "model" / "validation" / "step_000003.png").stat().st_size > 0
    history = losses(run_dir / "model")
    assert len(history) == 3 and all(math.isfinite(loss) for loss in history) and len(set(history)) == 3
    return result.stdout


def assert_trained_from(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> None:
    """Trained (every weight moved by Adam) but from the base weights, not zero.Init's random ones."""
    assert tuned.keys() == base.keys()
    changes = [(tuned[name] - base[name]).abs().max().item() for name in base]
    assert 0 < max(changes) < 0.05 and sum(change > 0 for change in changes) > len(changes) // 2


def sample_64px(pipe):
    """One 64 px image of "a red circle" in 2 steps from a fixed generator, as a numpy array."""
    return pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


# ---- sampling runs ----

# One thread per process: on a shared CPU box more threads oversubscribe the cores, and the same
# thread count in every run keeps the 1- and 2-process images bitwise comparable.
SAMPLE_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run_sample(args: list[str], *, procs: int = 0, cfg: str = "cfg/default.json") -> subprocess.CompletedProcess:
    """procs=0: plain `python -m`; otherwise the `deepspeed` command with that many processes."""
    sample_args = ["--cfg", cfg, "--set", *args]
    if procs:
        result = launch_module("ds_diffusers.sample", sample_args, procs=procs, timeout=300, runner=True,
                               env={"OMP_NUM_THREADS": "1"})
    else:
        result = subprocess.run([sys.executable, "-m", "ds_diffusers.sample", *sample_args], cwd=REPO, env=SAMPLE_ENV,
                                capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_manifest(samples_dir: Path) -> dict:
    return json.loads((samples_dir / "manifest.json").read_text())


# ---- small in-memory datasets ----

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
RESOLUTION = 16


def solid_images(sizes=((20, 24), (24, 20), (16, 16), (8, 12), (30, 18), (18, 18))) -> list[Image.Image]:
    return [Image.new("RGB", size, colour) for size, colour in zip(sizes, COLOURS)]


def captions_for(row: int) -> list[str]:
    return [f"photo {row} one", f"photo {row} two", f"photo {row} three"]


def in_memory_dataset(num_rows: int = 6) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "text": datasets.List(datasets.Value("string"))})
    images = (solid_images() * (num_rows // 6 + 1))[:num_rows]
    return datasets.Dataset.from_dict(
        {"image": images, "text": [captions_for(row) for row in range(num_rows)]}, features=features)


# ---- memory: what a piece of code allocates, counted exactly ----

class AllocationMeter(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of tensor storage that the operations run inside it allocate, while alive: `live` now,
    `peak` the most at any one time. Deterministic (storage sizes, not the allocator's figures), on any
    device. An output whose storage one of the operation's inputs already had (a view, an in-place
    write) allocates nothing; a storage is counted until Python frees it."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._count(tensor.untyped_storage(), inputs)
        return out

    def _count(self, storage, inputs: set[int]) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in inputs or key in self._counted:
            return
        self._counted.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, key, size)

    def _freed(self, key: int, size: int) -> None:
        self._counted.discard(key)
        self.live -= size
