"""The one-shot GPU check: what only a GPU can show, in one run of a few minutes on one GPU.

    bash bench/gpu_check.sh                 # installs carried wheels if needed, then runs this
    python bench/gpu_check.py --dry-run     # anywhere: builds and checks the plan, trains nothing

Checks, each a real `python -m ds_diffusers.train` run of one process on random-weight models with
the real architectures (built offline once in --work-dir):
- SD 1.5 (full size, 859.5 M UNet parameters) at 512 px, bf16, ZeRO-2, cached latents: full
  fine-tune and LoRA, micro-batch 8 and 16; images/s, MFU and peak GPU memory;
- fp16 LoRA on one GPU (the case where DeepSpeed's stage-0 fp16 path never scaled the loss), on the
  embedded tiny model, against the same run in bf16: the adapters must move about as far (the
  broken path moved them 65,536 times less);
- SDXL-architecture LoRA at 1024 px with gradient checkpointing (full-size UNet; its text encoders
  are the test-size ones, so the cross-attention inputs are narrower than SDXL's); images/s, memory.

MFU counts 2.41 TFLOP per 512 px SD 1.5 training sample (forward and backward of the UNet) against
the GPU's dense bf16 peak (--peak-tflops, or the table below by device name). Results go to
docs/bench/gpu_check-<gpu>-<date>.json. The HF example (`../shared/peer`) is compared by
bench/train_throughput.py --peer, not here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SD15_TFLOP_PER_SAMPLE = 2.41
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


@dataclass
class Check:
    name: str
    model: str  # "sd15", "sdxl" or "tiny"
    cfg: str
    overrides: list[str]
    steps: int
    samples_per_step: int
    mfu: bool = False
    result: dict = field(default_factory=dict)


def plan(steps: int) -> list[Check]:
    cached = ["cache_latents=true", "cache_text_embeddings=true"]
    checks = []
    for mode, cfg in (("full", "cfg/sd15_full.json"), ("lora", "cfg/sd15_lora.json")):
        for micro in (8, 16):
            checks.append(Check(f"sd15-{mode}-bf16-zero2-512px-mb{micro}", "sd15", cfg,
                                ["use_fp16.enabled=false", "bf16.enabled=true", "zero_optimization.stage=2",
                                 "zero_optimization.offload_optimizer.device=none", "resolution=512",
                                 f"train_micro_batch_size_per_gpu={micro}", *cached], steps, micro, mfu=True))
    for precision in ("fp16", "bf16"):
        flags = ["use_fp16.enabled=true", "bf16.enabled=false"] if precision == "fp16" else ["use_fp16.enabled=false", "bf16.enabled=true"]
        checks.append(Check(f"tiny-lora-{precision}-learning", "tiny", "cfg/sd15_lora.json",
                            [*flags, "zero_optimization.stage=2", "resolution=64", "train_micro_batch_size_per_gpu=16",
                             "optimizer.params.lr=1e-3", "lr_warmup_steps=0", "snr_gamma=null"], 5 * steps, 16))
    checks.append(Check("sdxl-lora-bf16-1024px-gc", "sdxl", "cfg/sdxl_lora.json",
                        ["resolution=1024", "train_micro_batch_size_per_gpu=4", "gradient_checkpointing=true", *cached],
                        steps, 4))
    return checks


def build_inputs(work: Path) -> dict[str, Path]:
    """Model folders and the dataset, built once (the full-size folders take a minute each)."""
    import torch
    from diffusers import UNet2DConditionModel

    from ds_diffusers.embedded import ensure_embedded_assets
    from ds_diffusers.embedded.arch_sd import build_sd
    from ds_diffusers.embedded.arch_sdxl import SDXL_BASE_UNET, TEXT_HIDDEN_1, TEXT_HIDDEN_2, TEXT_PROJECTION_2, build_sdxl_model

    tiny = ensure_embedded_assets(work / "embedded")
    paths = {"tiny": tiny.model_dir, "dataset": tiny.dataset_dir, "sd15": work / "sd15-full", "sdxl": work / "sdxl-unet-full"}
    if not (paths["sd15"] / "model_index.json").is_file():
        build_sd(paths["sd15"], "sd15", size="full")
    if not (paths["sdxl"] / "model_index.json").is_file():
        build_sdxl_model(paths["sdxl"], resolution=1024)
        # The full SDXL UNet, conditioned by the test-size encoders: their widths replace SDXL's.
        config = {**SDXL_BASE_UNET, "cross_attention_dim": TEXT_HIDDEN_1 + TEXT_HIDDEN_2,
                  "projection_class_embeddings_input_dim": TEXT_PROJECTION_2 + 6 * SDXL_BASE_UNET["addition_time_embed_dim"]}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            UNet2DConditionModel(**config).save_pretrained(paths["sdxl"] / "unet")
    return paths


def overrides_for(check: Check, paths: dict[str, Path], work: Path) -> list[str]:
    out = work / "runs" / check.name
    return [f"pretrained_model_name_or_path={paths[check.model]}", f"dataset_dir={paths['dataset']}",
            f"output_dir={out / 'model'}", f"checkpoint_dir={out / 'checkpoints'}", f"cache_dir={work / 'cache' / check.model}",
            "overwrite_output_dir=true", "resume_from_checkpoint=false", f"max_train_steps={check.steps}", "save_interval=0",
            "validation_steps=0", "log_every_n_steps=5", "dataloader_num_workers=4", "vae_path=null", *check.overrides]


def check_plan(checks: list[Check], paths: dict[str, Path] | None, work: Path) -> None:
    """Every run's config validates and translates for one GPU, and no 16-bit run reaches stage 0."""
    from ds_diffusers.config import load_config, to_deepspeed_config

    for check in checks:
        fake = paths or {"tiny": work, "sd15": work, "sdxl": work, "dataset": work}
        cfg = load_config(REPO / check.cfg, overrides_for(check, fake, work))
        ds_config = to_deepspeed_config(cfg, world_size=1, accelerator_name="cuda")
        stage = ds_config["zero_optimization"]["stage"]
        if cfg.weight_dtype_name != "float32" and stage == 0:
            raise SystemExit(f"{check.name}: a 16-bit run would take ZeRO stage 0")
        print(f"  {check.name}: {check.steps} steps, {cfg.weight_dtype_name}, engine ZeRO-{stage}, "
              f"micro-batch {cfg.train_micro_batch_size_per_gpu}, {cfg.resolution} px")


def run(check: Check, paths: dict[str, Path], work: Path, timeout: float) -> None:
    cmd = [sys.executable, "-m", "ds_diffusers.train", "--cfg", check.cfg, "--set", *overrides_for(check, paths, work)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    check.result = {"returncode": proc.returncode, "wall_s": round(time.perf_counter() - started, 1)}
    if proc.returncode != 0:
        check.result["error"] = (proc.stdout + proc.stderr)[-2000:]
        return
    records = [json.loads(line) for line in (work / "runs" / check.name / "model" / "logs" / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if r["step"] > 5] or records  # the first window holds start-up and compilation
    samples_per_s = sum(r["samples_per_s"] for r in steady) / len(steady)
    check.result.update(images_per_s=round(samples_per_s, 2), final_loss=records[-1]["loss"],
                        peak_gpu_gib=round(max(r.get("peak_accelerator_mb", 0) for r in records) / 1024, 2))


def lora_movement(work: Path, name: str) -> float:
    from safetensors.torch import load_file

    weights = load_file(str(work / "runs" / name / "model" / "pytorch_lora_weights.safetensors"))
    # lora_B starts at zero: its norm is how far training moved the adapters.
    return float(sum(t.float().norm() ** 2 for key, t in weights.items() if "lora_B" in key or "lora.up" in key) ** 0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="check the plan (configs, stages) without a GPU; trains nothing")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--work-dir", type=Path, default=REPO / "outputs/bench/gpu_check")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU (default: by name)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds any one run may take")
    args = parser.parse_args()
    checks = plan(args.steps)
    print(f"gpu_check: {len(checks)} runs")
    if args.dry_run:
        check_plan(checks, None, args.work_dir)
        print("gpu_check: plan ok (dry run: nothing trained)")
        return 0
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --dry-run to check the plan on a CPU")
    gpu = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    paths = build_inputs(args.work_dir)
    check_plan(checks, paths, args.work_dir)
    for check in checks:
        run(check, paths, args.work_dir, args.timeout)
        if check.mfu and peak and "images_per_s" in check.result:
            check.result["mfu"] = round(check.result["images_per_s"] * SD15_TFLOP_PER_SAMPLE / peak, 3)
        print(f"  {check.name}: {check.result}")
    learning = {}
    if all(c.result.get("returncode") == 0 for c in checks if c.model == "tiny"):
        fp16, bf16 = (lora_movement(args.work_dir, f"tiny-lora-{p}-learning") for p in ("fp16", "bf16"))
        learning = {"fp16_lora_movement": fp16, "bf16_lora_movement": bf16, "ratio": fp16 / bf16,
                    "passed": 0.5 <= fp16 / bf16 <= 2.0}
        print(f"  fp16 LoRA learning check: adapters moved {fp16:.4g} (fp16) vs {bf16:.4g} (bf16): "
              f"{'passed' if learning['passed'] else 'FAILED'}")
    report = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "gpu": gpu, "peak_bf16_tflops": peak,
              "torch": torch.__version__, "checks": [asdict(c) for c in checks], "fp16_learning": learning}
    out = REPO / "docs" / "bench" / f"gpu_check-{gpu.replace(' ', '_')}-{datetime.now(UTC).date()}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"gpu_check: wrote {out}")
    failed = [c.name for c in checks if c.result.get("returncode") != 0] + (["fp16 learning"] if learning and not learning["passed"] else [])
    return 1 if failed or not learning else 0


if __name__ == "__main__":
    sys.exit(main())
