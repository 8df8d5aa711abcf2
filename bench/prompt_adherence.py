"""How often do generated images show what their prompt says? Baseline vs tuned, on the embedded
shapes data.

Every (colour, shape) class of the synthetic dataset is prompted with each caption template, and
the images are drawn by the sampling entrypoint's own code (same seeds, schedulers, weights) from
the training cfg. The project's hand-written classifier (`ds_diffusers.embedded.judge`) then reads
colour and shape off each image. The classifier is first checked on the real dataset images: below
95 % right there, its verdicts on samples mean little and the bench stops.

    python bench/prompt_adherence.py                        # cfg/default.json, after training it
    python bench/prompt_adherence.py --cfg cfg/default.json --set sample.weights='["baseline","ema"]'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image

# Run as a plain script from anywhere: make the repository's package importable without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_diffusers.config import load_config
from ds_diffusers.data import load_train_dataset
from ds_diffusers.embedded.judge import judge
from ds_diffusers.embedded.shapes import CAPTION_TEMPLATES, CLASSES
from ds_diffusers.errors import ConfigError
from ds_diffusers.quiet import quiet_known_notices
from ds_diffusers.sample import prepare, sample

JUDGE_MIN_ACCURACY = 0.95


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", default="cfg/default.json", help="the training cfg (its sample block sets steps, sampler, weights)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("outputs/prompt_adherence"))
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--templates", choices=["plain", "all"], default="all",
                        help="plain: 'a {color} {shape}' only; all: every caption template of the dataset")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    return parser.parse_args()


def judge_dataset(dataset_dir: str, imagefolder: bool) -> dict:
    """The classifier on the real training images, whose class is known from the dataset columns."""
    dataset = load_train_dataset(dataset_dir, imagefolder)
    if not {"color", "shape"} <= set(dataset.column_names):
        raise ConfigError("dataset_dir", dataset_dir, "needs the embedded shapes dataset (color and shape columns); "
                          "build it with `python -m ds_diffusers.embedded`")
    hits = {"color": 0, "shape": 0, "both": 0}
    for row in dataset:
        verdict = judge(row["image"])
        color_ok, shape_ok = verdict.color == row["color"], verdict.shape == row["shape"]
        hits["color"] += color_ok
        hits["shape"] += shape_ok
        hits["both"] += color_ok and shape_ok
    return {f"{key}_accuracy": round(value / len(dataset), 4) for key, value in hits.items()} | {"num_images": len(dataset)}


def class_prompts(templates: str) -> list[tuple[str, str, str]]:
    chosen = CAPTION_TEMPLATES if templates == "all" else CAPTION_TEMPLATES[:1]
    return [(template.format(color=color, shape=shape), color, shape) for color, shape in CLASSES for template in chosen]


def score_samples(manifest_path: Path, prompts: list[tuple[str, str, str]]) -> dict:
    """Per weight: colour, shape and both right, overall and per class."""
    manifest = json.loads(manifest_path.read_text())
    counts: dict[str, dict] = defaultdict(lambda: defaultdict(lambda: [0, 0, 0, 0]))  # weight -> class -> [n, colour, shape, both]
    for record in manifest["images"]:
        _, color, shape = prompts[record["prompt_index"]]
        with Image.open(manifest_path.parent / record["file"]) as image:
            verdict = judge(image)
        tally = counts[record["weight"]][f"{color} {shape}"]
        tally[0] += 1
        tally[1] += verdict.color == color
        tally[2] += verdict.shape == shape
        tally[3] += verdict.color == color and verdict.shape == shape
    scores = {}
    for weight in manifest["settings"]["weights"]:
        per_class = counts[weight]
        total = [sum(tally[k] for tally in per_class.values()) for k in range(4)]
        scores[weight] = {
            "color_accuracy": round(total[1] / total[0], 4), "shape_accuracy": round(total[2] / total[0], 4),
            "both_accuracy": round(total[3] / total[0], 4), "num_images": total[0],
            "both_accuracy_per_class": {name: round(tally[3] / tally[0], 4) for name, tally in per_class.items()},
        }
    return scores


def print_table(judge_check: dict, scores: dict) -> None:
    print(f"judge on the dataset's own images: colour {judge_check['color_accuracy']:.1%}, shape "
          f"{judge_check['shape_accuracy']:.1%}, both {judge_check['both_accuracy']:.1%} of {judge_check['num_images']}")
    print(f"{'weight':10s} {'colour':>8s} {'shape':>8s} {'both':>8s} {'images':>7s}")
    for weight, score in scores.items():
        print(f"{weight:10s} {score['color_accuracy']:8.1%} {score['shape_accuracy']:8.1%} {score['both_accuracy']:8.1%} "
              f"{score['num_images']:7d}")
    if "baseline" in scores:
        for weight, score in scores.items():
            if weight != "baseline" and scores["baseline"]["both_accuracy"] > 0:
                print(f"{weight} / baseline (both right): {score['both_accuracy'] / scores['baseline']['both_accuracy']:.2f}x")


def write_report(out: Path, report: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def main() -> int:
    args = parse_args()
    quiet_known_notices()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = class_prompts(args.templates)
    sample_dir = args.out / "samples"
    overrides = [*args.overrides, f"sample.prompts={json.dumps([text for text, _, _ in prompts])}",
                 f"sample.num_images_per_prompt={args.images_per_prompt}", f"sample.output_dir={sample_dir}"]
    try:
        cfg = load_config(args.cfg, overrides)
        judge_check = judge_dataset(cfg.dataset_dir, cfg.imagefolder)
        if judge_check["both_accuracy"] < JUDGE_MIN_ACCURACY:
            write_report(args.out, {"cfg": args.cfg, "judge_on_dataset": judge_check, "judge_trusted": False})
            print(f"the judge is right on only {judge_check['both_accuracy']:.1%} of the real dataset images "
                  f"(needs >= {JUDGE_MIN_ACCURACY:.0%}); its verdicts on samples would mean little", file=sys.stderr)
            return 1
        plan, sources = prepare(cfg)
        started = time.perf_counter()
        manifest_path = sample(cfg, plan, sources, {"cfg": args.cfg, "overrides": overrides, "bench": "prompt_adherence"})
    except ConfigError as err:
        print(f"ds-diffusers: config error: {err}", file=sys.stderr)
        return 2
    scores = score_samples(manifest_path, prompts)
    report = {
        "cfg": args.cfg, "overrides": args.overrides, "templates": args.templates, "num_prompts": len(prompts),
        "images_per_prompt": args.images_per_prompt, "sampling_seconds": round(time.perf_counter() - started, 1),
        "settings": {key: value for key, value in plan.to_dict().items() if key != "prompts"},
        "judge_on_dataset": judge_check, "judge_trusted": True, "scores": scores, "manifest": str(manifest_path),
    }
    print_table(judge_check, scores)
    print(f"report: {write_report(args.out, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
