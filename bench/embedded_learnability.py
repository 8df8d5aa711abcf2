"""Is the embedded tiny SD + shapes dataset learnable in minutes on a CPU?

Plain PyTorch, no DeepSpeed: frozen VAE and text encoder, AdamW on the UNet from its random init,
epsilon loss. Then samples every class with StableDiffusionPipeline, scores the samples with the
hand-written judge (colour, shape) and saves a labelled grid.

    python bench/embedded_learnability.py --root data/embedded --steps 1000
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from datasets import load_dataset
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers import UNet2DConditionModel
from diffusers.training_utils import compute_snr
from PIL import Image, ImageDraw
from transformers import CLIPTextModel, CLIPTokenizer

# Run as a plain script from anywhere: make the repository's package importable without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_diffusers.embedded import ensure_embedded_assets
from ds_diffusers.embedded.judge import judge
from ds_diffusers.embedded.shapes import CLASSES


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("data/embedded"))
    parser.add_argument("--out", type=Path, default=Path("outputs/embedded_learnability"))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--snr-gamma", type=float, default=None, help="Min-SNR loss weighting (e.g. 5)")
    parser.add_argument("--caption-dropout", type=float, default=0.0, help="fraction of captions replaced by ''")
    parser.add_argument("--cache-latents", action="store_true",
                        help="encode the dataset once (posterior mean/std) instead of every step")
    parser.add_argument("--samples-per-class", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup then cosine down to 10%, as cfg/default.json's WarmupCosineLR."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def load_training_data(dataset_dir: Path) -> tuple[torch.Tensor, list[list[str]]]:
    """All images as one [-1, 1] tensor (the dataset is ~20 MB as floats) plus their caption lists."""
    dataset = load_dataset(str(dataset_dir), split="train")
    pixels = np.stack([np.asarray(image.convert("RGB")) for image in dataset["image"]])
    pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, list(dataset["text"])


def epsilon_loss(
    noise_pred: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler,
    snr_gamma: float | None,
) -> torch.Tensor:
    """MSE on the noise; with `snr_gamma`, Min-SNR weighting (Hang et al. 2023) as in cfg's `snr_gamma`."""
    if snr_gamma is None:
        return torch.nn.functional.mse_loss(noise_pred, noise)
    snr = compute_snr(scheduler, timesteps)
    weights = torch.minimum(snr, torch.full_like(snr, snr_gamma)) / snr
    per_example = (noise_pred - noise).pow(2).mean(dim=(1, 2, 3))
    return (per_example * weights).mean()


def encode_all(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, so a step only has to draw `mean + std * noise`."""
    means, stds = [], []
    with torch.no_grad():
        for chunk in pixels.split(64):
            posterior = vae.encode(chunk).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(args: argparse.Namespace, model_dir: Path, dataset_dir: Path) -> tuple[UNet2DConditionModel, dict]:
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").train()
    noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    pixels, captions = load_training_data(dataset_dir)
    cached_posteriors = encode_all(vae, pixels) if args.cache_latents else None

    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-2)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, args.warmup, args.steps))
    picker = random.Random(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(args.steps):
        indices = torch.randint(len(pixels), (args.batch_size,), generator=generator)
        prompts = [
            "" if picker.random() < args.caption_dropout else picker.choice(captions[int(i)]) for i in indices
        ]
        with torch.no_grad():
            input_ids = tokenizer(
                prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids
            encoder_hidden_states = text_encoder(input_ids)[0]
            if cached_posteriors is None:
                latents = vae.encode(pixels[indices]).latent_dist.sample(generator=generator)
            else:
                mean, std = cached_posteriors[0][indices], cached_posteriors[1][indices]
                latents = mean + std * torch.randn(mean.shape, generator=generator)
            latents = latents * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (args.batch_size,), generator=generator)
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        noise_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
        loss = epsilon_loss(noise_pred, noise, timesteps, noise_scheduler, args.snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            elapsed = time.perf_counter() - started
            print(f"step {step + 1:5d}  loss(last 100) {np.mean(losses[-100:]):.4f}  {(step + 1) / elapsed:.2f} steps/s",
                  flush=True)
    seconds = time.perf_counter() - started
    stats = {"train_seconds": round(seconds, 1), "steps_per_second": round(args.steps / seconds, 2),
             "final_loss_avg100": round(float(np.mean(losses[-100:])), 4)}
    return unet.eval(), stats


def sample_and_score(args: argparse.Namespace, model_dir: Path, unet: UNet2DConditionModel) -> tuple[list, dict]:
    pipeline = StableDiffusionPipeline.from_pretrained(model_dir, unet=unet)
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    rows, color_hits, shape_hits, both_hits = [], 0, 0, 0
    for class_index, (color, shape) in enumerate(CLASSES):
        generator = torch.Generator().manual_seed(args.seed + class_index)
        images = pipeline(
            [f"a {color} {shape}"] * args.samples_per_class, num_inference_steps=args.sample_steps,
            guidance_scale=args.guidance, height=64, width=64, generator=generator,
        ).images
        verdicts = [judge(image) for image in images]
        color_hits += sum(v.color == color for v in verdicts)
        shape_hits += sum(v.shape == shape for v in verdicts)
        both_hits += sum(v.color == color and v.shape == shape for v in verdicts)
        rows.append((f"{color} {shape}", images, verdicts))
    total = len(CLASSES) * args.samples_per_class
    scores = {"color_accuracy": round(color_hits / total, 3), "shape_accuracy": round(shape_hits / total, 3),
              "both_accuracy": round(both_hits / total, 3), "num_samples": total}
    return rows, scores


def save_grid(rows: list, path: Path) -> None:
    """One row per prompt: label, then the samples, each with the judge's verdict underneath."""
    cell, label_width, verdict_height = 96, 110, 12
    columns = len(rows[0][1])
    grid = Image.new("RGB", (label_width + columns * cell, len(rows) * (cell + verdict_height)), "white")
    draw = ImageDraw.Draw(grid)
    for row_index, (label, images, verdicts) in enumerate(rows):
        top = row_index * (cell + verdict_height)
        draw.text((4, top + cell // 2 - 6), label, fill="black")
        for column, (image, verdict) in enumerate(zip(images, verdicts)):
            left = label_width + column * cell
            grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (left, top))
            wanted = label.split()
            mark = "ok" if [verdict.color, verdict.shape] == wanted else "x"
            draw.text((left + 2, top + cell), f"{verdict.color} {verdict.shape} {mark}", fill="gray")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    assets = ensure_embedded_assets(args.root)
    build_seconds = time.perf_counter() - started
    unet, train_stats = train_unet(args, assets.model_dir, assets.dataset_dir)
    sampling_started = time.perf_counter()
    rows, scores = sample_and_score(args, assets.model_dir, unet)
    grid_path = args.out / "samples.png"
    save_grid(rows, grid_path)
    report = {
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup,
        "caption_dropout": args.caption_dropout, "snr_gamma": args.snr_gamma, "guidance": args.guidance, "sample_steps": args.sample_steps,
        "ensure_assets_seconds": round(build_seconds, 1), **train_stats,
        "sampling_seconds": round(time.perf_counter() - sampling_started, 1), **scores,
        "total_seconds": round(time.perf_counter() - started, 1), "grid": str(grid_path),
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
