"""SD 3.5 Medium LoRA at full size through the trainer, on a CPU: peak memory and step time.

`bench/sd35_lora_memory.py` measures the transformer's training step on its own; this runs the
product as a user does: `scripts/train_text_to_image.sh cfg/sd35_lora.json` (LoRA rank 16 on the
joint-attention projections, bf16) on a full-size SD 3.5 Medium folder with random weights, with
`cache_latents` and `cache_text_embeddings` on, so the encoders run once in the cache pass.

The folder (built once into --work-dir, about 5.5 GB): the published configs of the transformer
(2,243,171,520 parameters, saved in bf16 as the published checkpoint is), the VAE and both CLIP
encoders (`embedded.arch_sd3`), and **no T5** (`text_encoder_3: null` in model_index.json, an option
StableDiffusion3Pipeline has: its part of the prompt features is zeros of the same shape, so the
transformer's step is the same computation). T5-XXL is left out because this 24 GiB host cannot hold
it (9.5 GB in bf16) beside the transformer's fp32 load; docs/memory.md says what it adds.

Reported: the peak RSS of the training process tree (`wait4`), the trainer's own `peak_rss_mb` per
step, and the seconds per step. Run it alone on the machine:

    python bench/sd35_trainer_memory.py --resolution 512 --steps 2 --out docs/bench/sd35_medium_trainer-512px.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GiB = 2**30


def build_folder(model_dir: Path) -> None:
    """The full-size SD 3.5 Medium folder without T5, one component in memory at a time."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from ds_diffusers.embedded.arch_sd import random_clip_text_encoder, save_diffusers_folder, write_clip_tokenizer
    from ds_diffusers.embedded.arch_sd3 import CLIP_MAX_LENGTH, sd3_arch
    from ds_diffusers.embedded.tokenizer import EOS_TOKEN

    arch = sd3_arch("medium", "full")
    staging = model_dir.with_name(model_dir.name + ".partial")
    tokenizer = write_clip_tokenizer(staging / "tokenizer", CLIP_MAX_LENGTH, EOS_TOKEN)
    tokenizer_2 = write_clip_tokenizer(staging / "tokenizer_2", CLIP_MAX_LENGTH, "!")
    torch.manual_seed(0)
    written = {}
    for name, build in (
        ("text_encoder", lambda: random_clip_text_encoder(arch.text_encoder, tokenizer, shrink_vocab=False,
                                                          model_class=CLIPTextModelWithProjection)),
        ("text_encoder_2", lambda: random_clip_text_encoder(arch.text_encoder_2, tokenizer_2, shrink_vocab=False,
                                                            model_class=CLIPTextModelWithProjection)),
        ("vae", lambda: AutoencoderKL(**arch.vae)),
        ("transformer", lambda: SD3Transformer2DModel(**arch.transformer).to(torch.bfloat16)),
    ):
        component = build()
        save_diffusers_folder(staging, "StableDiffusion3Pipeline", {name: component})
        written[name] = [type(component).__module__.split(".")[0], type(component).__name__]
        del component
    index = {"_class_name": "StableDiffusion3Pipeline", **written, "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "text_encoder_3": [None, None], "tokenizer_3": [None, None], "feature_extractor": [None, None],
             "image_encoder": [None, None]}
    FlowMatchEulerDiscreteScheduler(**arch.scheduler).save_pretrained(staging / "scheduler")
    (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    staging.rename(model_dir)


def train(model_dir: Path, data_dir: Path, run_dir: Path, args: argparse.Namespace) -> dict:
    overrides = [f"pretrained_model_name_or_path={model_dir}", f"dataset_dir={data_dir}", f"output_dir={run_dir / 'model'}",
                 f"checkpoint_dir={run_dir / 'checkpoints'}", f"cache_dir={run_dir / 'cache'}",
                 f"resolution={args.resolution}", f"max_train_steps={args.steps}", "train_micro_batch_size_per_gpu=1",
                 "gradient_accumulation_steps=1", "validation_steps=0", "save_interval=0", "log_every_n_steps=1",
                 "resume_from_checkpoint=false", "cache_latents=true", "cache_text_embeddings=true",
                 "dataloader_num_workers=0", "lr_warmup_steps=1", "validation_prompts=[]",
                 f"gradient_checkpointing={str(args.gradient_checkpointing).lower()}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NUM_PROCS": "1"}
    started = time.time()
    log_path = run_dir / "output.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(["bash", "scripts/train_text_to_image.sh", "cfg/sd35_lora.json", "--set", *overrides],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss: the largest process of the tree, in KiB
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"training failed; output in {log_path}:\n" + log_path.read_text()[-3000:])
    records = [json.loads(line) for line in (run_dir / "model" / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in records if "loss" in record]
    step_times = [later["time"] - earlier["time"] for earlier, later in zip(steps, steps[1:])]
    return {"wall_s": round(time.time() - started, 1), "peak_rss_gib": round(usage.ru_maxrss * 1024 / GiB, 2),
            "trainer_peak_rss_gib": [round(record["peak_rss_mb"] / 1024, 2) for record in steps],
            "seconds_per_step_after_the_first": [round(seconds, 1) for seconds in step_times],
            "losses": [record["loss"] for record in steps],
            "start_up_line": next((line for line in log_path.read_text().splitlines() if "training " in line and
                                   " parameters (" in line), "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/ds-diffusers-sd35-trainer"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from ds_diffusers.embedded.shapes import write_dataset

    model_dir, data_dir = args.work_dir / "sd35-medium-no-t5", args.work_dir / f"data-{args.rows}"
    if not model_dir.is_dir():
        build_folder(model_dir)
    if not data_dir.is_dir():
        write_dataset(data_dir, args.rows, seed=0, layout="imagefolder")
    run_dir = args.work_dir / f"run-{args.resolution}px-{int(time.time())}"
    run_dir.mkdir(parents=True)
    result = {"date": datetime.now(UTC).strftime("%Y-%m-%d"), "model": "SD 3.5 Medium (full size, random weights, no T5)",
              "resolution": args.resolution, "steps": args.steps, "rows": args.rows,
              "gradient_checkpointing": args.gradient_checkpointing, "cpu_count": os.cpu_count(),
              **train(model_dir, data_dir, run_dir, args)}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
