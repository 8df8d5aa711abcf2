"""Does ds-diffusers hold up at full size? The exact SD 1.5 architecture, trained a few steps.

Builds offline (once, reused) the SD 1.5 architecture with random weights — UNet 859.5 M parameters,
the real VAE and CLIP ViT-L/14 text-encoder configs (`ds_diffusers.embedded.arch_sd`, a small
tokenizer) — in the diffusers layout, and a small synthetic captioned dataset at 64 px. Then, for
each of full / LoRA × ZeRO stage × process count, it trains through scripts/train_text_to_image.sh
as a user would: `--steps` steps with a checkpoint half-way and at the end, then a second run that
resumes from `latest` for one more step. Reported per run: peak RSS of the largest process (and
rank 0's own peak accelerator memory on a GPU), seconds per step, checkpoint size on disk, time to
save, to resume and to export (as the trainer logs them), export size, and whether the export loads
in `StableDiffusionPipeline` and denoises one step. Each combination's model-state memory is set
beside DeepSpeed's own estimators (`estimate_zero2/3_model_states_mem_needs`, the numbers the
`*_all_live` helpers print); combinations whose estimate cannot fit in --memory-gb are listed with
the estimate instead of run.

    python bench/scale.py                                   # full, lora × ZeRO 0/2/3 × 1/2 processes
    python bench/scale.py --modes lora --stages 2 3 --procs 2 --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ds_diffusers.distributed import free_port  # noqa: E402
from ds_diffusers.embedded.arch_sd import build_sd, sd_arch  # noqa: E402
from ds_diffusers.embedded.shapes import write_dataset  # noqa: E402
from scale_memory import DEFAULT_BUCKET_ELEMENTS, MemoryPlan, plan_memory  # noqa: E402
from throughput_report import host_description  # noqa: E402
from train_throughput import BenchError, Variant, metrics_steps, run_child  # noqa: E402

TRAIN_SCRIPT = REPO / "scripts" / "train_text_to_image.sh"
CFG_FILE = REPO / "cfg" / "sd15_full.json"
# Lines the trainer prints (train.py); the bench reads its durations from them.
TIMINGS = {
    "save_s": re.compile(r"checkpoint saved: .* \(step \d+, ([0-9.]+) s\)"),
    "resume_s": re.compile(r"resumed from .* in ([0-9.]+) s"),
    "export_s": re.compile(r"export written in ([0-9.]+) s"),
}


@dataclass
class ScaleResult:
    mode: str
    stage: int
    procs: int
    memory: MemoryPlan
    ran: bool = False
    note: str = ""
    step_s: float | None = None
    peak_rss_mb: float | None = None  # largest process of the run's tree
    rank0_peak_accelerator_mb: float | None = None
    checkpoint_mb: float | None = None
    save_s: float | None = None
    resume_s: float | None = None
    export_s: float | None = None
    export_mb: float | None = None
    export_loads: bool | None = None
    timings: dict = field(default_factory=dict)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=4, help="steps of the first run (a checkpoint at half and at the end)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--memory-gb", type=float, default=None,
                        help="memory the runs may use (default: MemAvailable at start, less 1.5 GiB)")
    parser.add_argument("--work-dir", type=Path, default=REPO / "outputs/bench/scale")
    parser.add_argument("--out", type=Path, default=REPO / "outputs/bench/scale.json")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds any one run may take")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="extra",
                        help="more config overrides for every run, e.g. zero_optimization.reduce_bucket_size=50000000")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps: at least 2 (one checkpoint half-way, one at the end)")
    return args


def set_value(extra: list[str], key: str) -> str | None:
    """The last value --set gives `key` (quotes stripped), or None."""
    values = [item[len(key) + 1:].strip('"') for item in extra if item.startswith(key + "=")]
    return values[-1] if values else None


def bucket_elements(extra: list[str]) -> int:
    """The gradient bucket the runs use: `zero_optimization.reduce_bucket_size` from --set, else DeepSpeed's."""
    value = set_value(extra, "zero_optimization.reduce_bucket_size")
    return int(float(value)) if value else DEFAULT_BUCKET_ELEMENTS


def nvme_sub_group(extra: list[str]) -> int | None:
    """The sub-group size when --set offloads the optimizer to NVMe (DeepSpeed's default 1e9), else None."""
    if set_value(extra, "zero_optimization.offload_optimizer.device") != "nvme":
        return None
    value = set_value(extra, "zero_optimization.sub_group_size")
    return int(float(value)) if value else int(1e9)


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    raise BenchError("no MemAvailable in /proc/meminfo; pass --memory-gb")


def ensure_inputs(work_dir: Path) -> tuple[Path, Path]:
    model_dir, dataset_dir = work_dir / "sd15-full", work_dir / "shapes"
    if not (model_dir / "model_index.json").is_file():
        print(f"building the full-size SD 1.5 architecture (random weights) in {model_dir} ...", flush=True)
        shutil.rmtree(model_dir, ignore_errors=True)
        staging = work_dir / "sd15-full.partial"
        shutil.rmtree(staging, ignore_errors=True)
        build_sd(staging, "sd15", "full")
        os.replace(staging, model_dir)
    if not dataset_dir.is_dir():
        write_dataset(dataset_dir, num_images=32, seed=0, layout="hub")
    return model_dir, dataset_dir


def du_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def overrides(result: ScaleResult, model_dir: Path, dataset_dir: Path, run_dir: Path, steps: int, resolution: int,
              resume: bool, extra: list[str]) -> list[str]:
    sets = [
        f"pretrained_model_name_or_path={model_dir}", f"dataset_dir={dataset_dir}", f"resolution={resolution}",
        "center_crop=true", "random_flip=false", "train_micro_batch_size_per_gpu=1", "gradient_accumulation_steps=1",
        f"max_train_steps={steps}", f"save_interval={max(1, steps // 2)}", "validation_steps=0", "validation_epochs=0",
        "validation_prompts=[]", "use_ema=false", "bf16.enabled=false", "use_fp16.enabled=false",
        "gradient_checkpointing=false", "cache_latents=false", "cache_text_embeddings=false",
        f"output_dir={run_dir / 'model'}", f"checkpoint_dir={run_dir / 'checkpoints'}",
        f"zero_optimization.stage={result.stage}", 'zero_optimization.offload_optimizer.device="none"',
        'zero_optimization.offload_param.device="none"', f"use_lora.action={'true' if result.mode == 'lora' else 'false'}",
        "dataloader_num_workers=0", "log_every_n_steps=1",
    ]
    sets.append("resume_from_checkpoint=latest" if resume else "overwrite_output_dir=true")
    return sets + extra


def timing(lines: list[tuple[float, str]], key: str) -> float | None:
    values = [float(m.group(1)) for _, text in lines if (m := TIMINGS[key].search(text))]
    return max(values) if values else None


def export_loads(model_dir: Path, out_dir: Path, mode: str, resolution: int) -> bool:
    """The standard loader reads the export and one denoising step runs on it."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out_dir if mode == "full" else model_dir, safety_checker=None)
    if mode == "lora":
        pipe.load_lora_weights(out_dir)
    image = pipe("a red circle", num_inference_steps=1, height=resolution, width=resolution,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    del pipe
    return bool(image.shape == (resolution, resolution, 3))


def run_one(args: argparse.Namespace, result: ScaleResult, model_dir: Path, dataset_dir: Path) -> None:
    name = f"{result.mode}-z{result.stage}-p{result.procs}"
    run_dir = args.work_dir / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    # The launch script runs `python`/`deepspeed` from PATH: those of the interpreter running the bench.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {"NUM_PROCS": str(result.procs), "MASTER_PORT": str(free_port()), "PATH": path}

    def launch(tag: str, steps: int, resume: bool):
        variant = Variant(kind=f"{name}/{tag}", procs=result.procs)
        (run_dir / tag).mkdir(exist_ok=True)
        cmd = ["bash", str(TRAIN_SCRIPT), str(CFG_FILE.relative_to(REPO)), "--set",
               *overrides(result, model_dir, dataset_dir, run_dir, steps, args.resolution, resume, args.extra)]
        return run_child(_ChildBench(run_dir, args.timeout), _Folder(variant, tag), cmd, env=env)

    first = launch("train", args.steps, resume=False)
    times, records = metrics_steps(run_dir / "model" / "logs" / "metrics.jsonl", first, args.steps)
    durations = [times[s] - times[s - 1] for s in sorted(times) if s - 1 in times and s - 1 != args.steps // 2]
    result.step_s = min(durations) if durations else None  # the steps that did not include a save
    result.peak_rss_mb = first.peak_rss_mb
    accel = [r["peak_accelerator_mb"] for r in records if "peak_accelerator_mb" in r]
    result.rank0_peak_accelerator_mb = max(accel) if accel else None
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    result.checkpoint_mb = du_mb(latest)
    result.save_s, result.export_s = timing(first.lines, "save_s"), timing(first.lines, "export_s")
    export = run_dir / "model" / ("unet" if result.mode == "full" else "pytorch_lora_weights.safetensors")
    result.export_mb = du_mb(export)
    second = launch("resume", args.steps + 1, resume=True)
    result.resume_s = timing(second.lines, "resume_s")
    result.peak_rss_mb = max(result.peak_rss_mb, second.peak_rss_mb)
    result.export_loads = export_loads(model_dir, run_dir / "model", result.mode, args.resolution)
    result.ran = True
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # gigabytes each; the sizes are recorded


@dataclass
class _ChildBench:
    """What train_throughput.run_child reads of its `bench` argument."""

    work_dir: Path
    timeout: float

    def threads(self, procs: int) -> int:
        return max(1, (os.cpu_count() or 1) // procs)


@dataclass
class _Folder:
    variant: Variant
    folder: str

    @property
    def name(self) -> str:
        return self.variant.name

    @property
    def procs(self) -> int:
        return self.variant.procs


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def print_table(results: list[ScaleResult], budget_gb: float) -> None:
    print(f"\n{'run':<16}{'est GB/rank':>12}{'DS est GB':>10}{'RSS GB':>8}{'s/step':>8}{'ckpt GB':>9}{'save s':>8}"
          f"{'resume s':>9}{'export s':>9}{'export MB':>10}  loads / note")
    for r in results:
        name = f"{r.mode} ZeRO-{r.stage} ×{r.procs}"
        rss = None if r.peak_rss_mb is None else r.peak_rss_mb / 1024
        ckpt = None if r.checkpoint_mb is None else r.checkpoint_mb / 1024
        tail = ("yes" if r.export_loads else "NO") if r.ran else r.note
        print(f"{name:<16}{r.memory.per_rank_gb:>12.1f}{r.memory.deepspeed_gb:>10.1f}{fmt(rss, '.1f'):>8}"
              f"{fmt(r.step_s, '.1f'):>8}{fmt(ckpt, '.2f'):>9}{fmt(r.save_s, '.1f'):>8}{fmt(r.resume_s, '.1f'):>9}"
              f"{fmt(r.export_s, '.1f'):>9}{fmt(r.export_mb, '.0f'):>10}  {tail}")
    print(f"est GB/rank: our fp32 CPU accounting (see bench/scale_memory.py); DS est: DeepSpeed's estimator for the "
          f"same stage and rank count; budget {budget_gb:.1f} GB for all ranks together.")


def main() -> int:
    args = parse_args()
    args.work_dir = args.work_dir.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    budget = args.memory_gb if args.memory_gb is not None else available_gb() - 1.5
    host = host_description()
    results: list[ScaleResult] = []
    try:
        model_dir, dataset_dir = ensure_inputs(args.work_dir)
        unet_config = sd_arch("sd15", "full").unet
        for mode in args.modes:
            for stage in args.stages:
                for procs in args.procs:
                    memory = plan_memory(unet_config, mode, stage, procs, bucket_elements(args.extra),
                                         bf16=set_value(args.extra, "bf16.enabled") == "true", nvme_sub_group=nvme_sub_group(args.extra))
                    result = ScaleResult(mode, stage, procs, memory)
                    results.append(result)
                    if memory.per_rank_gb * procs > budget:
                        result.note = (f"not run: needs ≈{memory.per_rank_gb:.1f} GB × {procs} ranks > {budget:.1f} GB "
                                       f"(DeepSpeed's estimate {memory.deepspeed_gb:.1f} GB per rank)")
                        print(f"{mode} ZeRO-{stage} ×{procs}: {result.note}", flush=True)
                        continue
                    started = time.monotonic()
                    try:
                        run_one(args, result, model_dir, dataset_dir)
                    except BenchError as error:
                        result.note = f"failed: {str(error).splitlines()[0]}"
                    print(f"{mode} ZeRO-{stage} ×{procs}: {'ok' if result.ran else result.note} "
                          f"({time.monotonic() - started:.0f} s)", flush=True)
    except BenchError as error:
        print(f"scale: {error}", file=sys.stderr)
        return 1
    print_table(results, budget)
    report = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "host": host, "memory_budget_gb": budget,
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "results": [asdict(r) for r in results]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwritten {args.out}")
    return 0 if all(r.ran or r.note.startswith("not run") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
