"""What the text pre-pass costs (data/text_prepass.py): seconds per caption on the FLUX.1-shaped test
model (CLIP + T5 at test width), in one process, with the encoders replicated and partitioned by ZeRO-3
(`text_encoder_zero3`), and the ratio of the two. Captions are synthetic, distinct, 6 to 12 words.

    python bench/text_prepass.py --captions 512
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ds_diffusers.config import load_config  # noqa: E402
from ds_diffusers.data.text_prepass import TextSources, prepare_text  # noqa: E402
from ds_diffusers.distributed import init_distributed  # noqa: E402
from ds_diffusers.embedded.arch_flux import build_flux  # noqa: E402
from ds_diffusers.models import load_frozen_components  # noqa: E402

WORDS = "red blue green circle square triangle small large on a the over under bright dark shape".split()


def seconds_per_caption(model_dir: Path, captions: list[str], cache_dir: Path, zero3: bool) -> float:
    cfg = load_config(REPO / "cfg/default.json", [f"pretrained_model_name_or_path={model_dir}", "dataset_dir=.",
                                                 f"cache_dir={cache_dir}", "cache_text_embeddings=true",
                                                 "train_micro_batch_size_per_gpu=8", f"text_encoder_zero3={str(zero3).lower()}"])
    dist = init_distributed()
    started = time.perf_counter()
    frozen = load_frozen_components(str(model_dir), dist.device, torch.float32, None, with_text_encoders=False)
    prepare_text(cfg, TextSources(datasets.Dataset.from_dict({"text": captions}), "text"), frozen, dist, log=lambda _: None)
    return (time.perf_counter() - started) / len(captions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=512)
    args = parser.parse_args()
    rng = random.Random(0)
    captions = sorted({" ".join(rng.choices(WORDS, k=rng.randint(6, 12))) + f" {i}" for i in range(args.captions)})
    with tempfile.TemporaryDirectory() as work:
        model_dir = Path(work) / "flux"
        build_flux(model_dir, "dev")
        replicated = seconds_per_caption(model_dir, captions, Path(work) / "replicated", zero3=False)
        partitioned = seconds_per_caption(model_dir, captions, Path(work) / "zero3", zero3=True)
    print(f"{len(captions)} captions, 1 process, test-size FLUX.1 (load + encode + write + free): "
          f"replicated {replicated * 1e3:.2f} ms/caption, ZeRO-3 partitioned {partitioned * 1e3:.2f} ms/caption "
          f"({partitioned / replicated:.2f}x)")


if __name__ == "__main__":
    main()
