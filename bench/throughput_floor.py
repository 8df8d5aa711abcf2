"""The floor of bench/train_throughput.py: a bare PyTorch training loop, nothing but the work itself.

Same UNet, data, micro batch, AdamW settings and gradient clipping as the cfg file; no DeepSpeed, no
DataLoader, no scheduler. A few fixed batches are prepared before the loop (through the project's
data transforms) and cycled. Without `--encoders` they are encoded once, up front, by the frozen
VAE (posterior sample × scaling factor) and CLIP text encoder; with it every step encodes its batch
again first, as a trainer without a cache does. One JSON line per step goes to
OUT/logs/metrics.jsonl in the trainer's format (step, time, loss, peak memory), so the bench reads
both the same way.

    python bench/throughput_floor.py --out outputs/bench/floor --steps 60
    python bench/throughput_floor.py --out outputs/bench/floor-encoders --steps 60 --encoders
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

# Run as a plain script from anywhere: make the repository's package importable without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_diffusers.config import Config, load_config
from ds_diffusers.data import CaptionedImageDataset, collate_examples, load_train_dataset, resolve_columns
from ds_diffusers.metrics import peak_memory_mb

NUM_FIXED_BATCHES = 8  # enough to vary the inputs; few, so preparing them adds little to start-up


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", type=Path, default=Path("cfg/default.json"))
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="cfg overrides, as for ds_diffusers.train (e.g. the model and dataset folders)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--encoders", action="store_true", help="run the VAE and text encoder every step")
    return parser.parse_args()


def fixed_batches(cfg: Config, tokenizer: CLIPTokenizer) -> list[dict[str, torch.Tensor]]:
    rows = load_train_dataset(cfg.dataset_dir, cfg.imagefolder)
    image_column, caption_column = resolve_columns(rows, cfg.image_column, cfg.caption_column)
    dataset = CaptionedImageDataset(rows, image_column, caption_column, tokenizer, cfg.resolution, cfg.center_crop,
                                    cfg.random_flip, cfg.seed)
    size = cfg.train_micro_batch_size_per_gpu
    return [collate_examples([dataset[(k * size + i) % len(dataset)] for i in range(size)])
            for k in range(NUM_FIXED_BATCHES)]


@torch.no_grad()
def encode(vae: AutoencoderKL, text_encoder: CLIPTextModel, pixel_values: torch.Tensor,
           input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Written out rather than imported from ds_diffusers.objective: the floor must not share the
    # trainer's code, or a slow helper there would slow both and hide in the ratio.
    # Contiguous, as the trainer makes them: a VAE with mid-block attention returns channels-last
    # posteriors at batch >= 2, and the UNet would run another memory layout than the trainer's.
    latents = vae.encode(pixel_values).latent_dist.sample().contiguous() * vae.config.scaling_factor
    return latents, text_encoder(input_ids, return_dict=False)[0]


def train(cfg: Config, steps: int, encoders: bool, metrics_path: Path) -> None:
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().current_device_name())
    torch.manual_seed(cfg.seed)
    model_dir = cfg.pretrained_model_name_or_path
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").to(device).eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").to(device).eval().requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").to(device).train()
    batches = [(batch["pixel_values"].to(device), batch["input_ids"].to(device)) for batch in fixed_batches(cfg, tokenizer)]
    if not encoders:
        batches = [encode(vae, text_encoder, pixel_values, input_ids) for pixel_values, input_ids in batches]

    params = cfg.optimizer.params
    optimizer = torch.optim.AdamW(unet.parameters(), lr=params["lr"], betas=tuple(params.get("betas", (0.9, 0.999))),
                                  eps=params.get("eps", 1e-8), weight_decay=params.get("weight_decay", 0.01))
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    with metrics_path.open("w") as metrics_file:
        for step in range(1, steps + 1):
            inputs = batches[(step - 1) % len(batches)]
            latents, encoder_hidden_states = encode(vae, text_encoder, *inputs) if encoders else inputs
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            noise_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(noise_pred.float(), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.gradient_clipping:
                torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.gradient_clipping)
            optimizer.step()
            loss_value = loss.item()  # waits for the step to finish on an accelerator
            record = {"step": step, "time": time.time(), "loss": loss_value, **peak_memory_mb()}
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()


def main() -> None:
    args = parse_args()
    cfg = load_config(args.cfg, args.overrides)
    train(cfg, args.steps, args.encoders, args.out / "logs" / "metrics.jsonl")


if __name__ == "__main__":
    main()
