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
docs/bench/gpu_check-<gpu>-<date>.json.

The peer, HF diffusers' text-to-image example (`../shared/peer`, through `accelerate launch`, its
`--mixed_precision bf16`), runs the SD 1.5 full fine-tune at 512 px, micro-batch 8, on the same
model and data; ours runs the same settings without the latent cache (the peer has none), and the
report gives the ratio of the two throughputs measured in this one run.
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
    peer: bool = False  # the HF example at this check's settings, not ds-diffusers
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
    # Ours and the HF example at the same settings, both encoding every step (the peer has no cache).
    same = ["use_fp16.enabled=false", "bf16.enabled=true", "zero_optimization.stage=2",
            "zero_optimization.offload_optimizer.device=none", "resolution=512", "train_micro_batch_size_per_gpu=8"]
    checks.append(Check("sd15-full-bf16-zero2-512px-mb8-uncached", "sd15", "cfg/sd15_full.json", same, steps, 8, mfu=True))
    checks.append(Check("peer-hf-example-sd15-full-bf16-512px-mb8", "sd15", "cfg/sd15_full.json", same, steps, 8,
                        mfu=True, peer=True))
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
        who = "HF example (accelerate, mixed_precision bf16)" if check.peer else f"{cfg.weight_dtype_name}, engine ZeRO-{stage}"
        print(f"  {check.name}: {check.steps} steps, {who}, "
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
    lines = (work / "runs" / check.name / "model" / "logs" / "metrics.jsonl").read_text().splitlines()
    records = [record for line in lines if "loss" in (record := json.loads(line))]  # not validation records
    steady = [r for r in records if r["step"] > 5] or records  # the first window holds start-up and compilation
    samples_per_s = sum(r["samples_per_s"] for r in steady) / len(steady)
    check.result.update(images_per_s=round(samples_per_s, 2), final_loss=records[-1]["loss"],
                        peak_gpu_gib=round(max(r.get("peak_accelerator_mb", 0) for r in records) / 1024, 2))


def run_peer(check: Check, paths: dict[str, Path], work: Path, timeout: float) -> None:
    """The HF example at the check's settings; images/s from its progress bar's step times, the first
    fifth of the steps left out (start-up), as ours leaves out its first window."""
    import throughput_peer as peer
    from train_throughput import read_lines

    from ds_diffusers.config import load_config

    peer_dir = REPO.parent / "shared" / "peer"
    if not (peer_dir / "train_text_to_image.py").is_file():
        check.result = {"returncode": None, "error": f"no peer at {peer_dir} (see its README.md)"}
        return
    cfg = load_config(REPO / check.cfg, overrides_for(check, paths, work))
    imagefolder = peer.write_imagefolder(cfg, work / "peer-imagefolder")
    peer.warm_peer_dataset_cache(imagefolder)
    run_dir = work / "runs" / check.name
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = peer.peer_command(cfg, check.steps, 4, peer_dir, imagefolder, run_dir, on_cpu=False, mixed_precision="bf16")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    with (run_dir / "output.log").open("wb") as log:
        lines = read_lines(proc.stdout.fileno(), log, time.monotonic() + timeout)
    check.result = {"returncode": proc.wait(), "wall_s": round(time.perf_counter() - started, 1)}
    times = peer.step_times(lines, check.steps)
    first = max(1, check.steps // 5)
    if check.result["returncode"] != 0 or first not in times or check.steps not in times:
        check.result["error"] = "\n".join(text for _, text in lines[-30:])[-2000:]
        return
    check.result["images_per_s"] = round((check.steps - first) * check.samples_per_step / (times[check.steps] - times[first]), 2)


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
        (run_peer if check.peer else run)(check, paths, args.work_dir, args.timeout)
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
    ours, theirs = (next(c for c in checks if c.name == name).result.get("images_per_s") for name in
                    ("sd15-full-bf16-zero2-512px-mb8-uncached", "peer-hf-example-sd15-full-bf16-512px-mb8"))
    vs_peer = {"ours_images_per_s": ours, "peer_images_per_s": theirs, "ratio": round(ours / theirs, 3) if ours and theirs else None}
    print(f"  vs HF example (SD 1.5 full, bf16, 512 px, micro-batch 8, uncached): {vs_peer}")
    report = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "gpu": gpu, "peak_bf16_tflops": peak,
              "torch": torch.__version__, "checks": [asdict(c) for c in checks], "fp16_learning": learning, "vs_peer": vs_peer}
    out = REPO / "docs" / "bench" / f"gpu_check-{gpu.replace(' ', '_')}-{datetime.now(UTC).date()}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"gpu_check: wrote {out}")
    failed = [c.name for c in checks if c.result.get("returncode") != 0 and not c.peer] + (["fp16 learning"] if learning and not learning["passed"] else [])
    return 1 if failed or not learning else 0


if __name__ == "__main__":
    sys.exit(main())
