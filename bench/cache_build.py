"""How fast the encoder caches build, and whether their memory stays bounded as the dataset grows.

Builds offline (once, reused under --work) the SD 1.5 architecture with random weights at the
test size (the real block structure, narrow) and at full size (the real VAE and CLIP ViT-L/14
text encoder), and synthetic captioned 64 px datasets of --rows and --rows/4 rows. Then it runs
`scripts/prepare_cache.sh` (latents and text embeddings, a fresh cache_dir each time) as a user would:

- test size, --rows rows, on each of --procs process counts: rows/s of the whole command and of
  each cache's encode phase, and the largest process's peak RSS;
- test size, --rows/4 rows, on the largest process count: the peak RSS again, so that memory
  growth with the dataset is a measured ratio (bounded: about 1.0);
- full size, --full-rows rows, on the largest process count: the real encoders' rate, the figure
  to extrapolate from.

The results go to docs/bench/cache_build.json and a table on stdout. Rates on a shared machine are
lower bounds; run it with nothing else on the machine.

    python bench/cache_build.py                       # 20000 rows, 1 and 2 processes, 256 full-size rows
    python bench/cache_build.py --rows 2000 --procs 2 --full-rows 32
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ds_diffusers.embedded.arch_sd import build_sd  # noqa: E402
from ds_diffusers.embedded.shapes import write_dataset  # noqa: E402

READY = re.compile(r"ready in .* after ([0-9.]+) s on (\d+) process\(es\), peak RSS (\d+) MiB")
ENCODED = re.compile(r"(latents|text) cache: encoded (\d+) items in ([0-9.]+) s")


def ensure_model(work: Path, size: str) -> Path:
    folder = work / f"sd15-{size}"
    if not (folder / "model_index.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        build_sd(folder, "sd15", size=size)
    return folder


def ensure_dataset(work: Path, rows: int) -> Path:
    folder = work / f"shapes-{rows}"
    if not (folder / "dataset_info.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        write_dataset(folder, rows, seed=0, layout="save_to_disk")
    return folder


def build(work: Path, model: Path, dataset: Path, procs: int, label: str) -> dict:
    """One `scripts/prepare_cache.sh` run into a fresh cache_dir; its figures as the command logs them."""
    cache_dir = work / "caches" / label
    shutil.rmtree(cache_dir, ignore_errors=True)
    overrides = [f"pretrained_model_name_or_path={model}", f"dataset_dir={dataset}", "resolution=64",
                 "cache_latents=true", "cache_text_embeddings=true", f"cache_dir={cache_dir}", "random_flip=false",
                 "train_micro_batch_size_per_gpu=8", f"output_dir={work / 'unused'}", f"checkpoint_dir={work / 'unused'}"]
    env = {**os.environ, "NUM_PROCS": str(procs), "DSD_ALLOW_CPU": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    cfg = work / "cfg.json"  # the default recipe; cfg/default.json itself would make the script build the demo assets
    shutil.copyfile(REPO / "cfg" / "default.json", cfg)
    result = subprocess.run(["bash", "scripts/prepare_cache.sh", str(cfg), "--set", *overrides], cwd=REPO, env=env,
                            capture_output=True, text=True)
    wall = time.perf_counter() - started
    output = result.stdout + result.stderr
    ready = READY.search(output)
    if result.returncode != 0 or ready is None:
        raise SystemExit(f"{label}: exit {result.returncode}\n{output[-4000:]}")
    rows = int(re.search(r"of (\d+) rows ready", output).group(1))
    encoded = {kind: (int(items), float(seconds)) for kind, items, seconds in ENCODED.findall(output)}
    shutil.rmtree(cache_dir, ignore_errors=True)
    return {"label": label, "procs": procs, "rows": rows, "command_s": round(wall, 1), "rows_per_s": round(rows / wall, 1),
            "latent_rows_per_s": round(encoded["latents"][0] / encoded["latents"][1], 1),
            "text_items": encoded["text"][0], "text_items_per_s": round(encoded["text"][0] / encoded["text"][1], 1),
            "peak_rss_mib": int(ready.group(3))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--full-rows", type=int, default=256)
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "bench" / "cache_build")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench" / "cache_build.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    test_model, full_model = ensure_model(args.work, "test"), ensure_model(args.work, "full")
    most = max(args.procs)
    runs = [build(args.work, test_model, ensure_dataset(args.work, args.rows), procs, f"test-{args.rows}-x{procs}")
            for procs in args.procs]
    quarter = build(args.work, test_model, ensure_dataset(args.work, args.rows // 4), most, f"test-{args.rows // 4}-x{most}")
    full = build(args.work, full_model, ensure_dataset(args.work, args.full_rows), most, f"full-{args.full_rows}-x{most}")
    largest = next(run for run in runs if run["procs"] == most)
    report = {"measured": datetime.now(UTC).isoformat(timespec="seconds"), "machine": f"{os.cpu_count()} CPU cores",
              "runs": [*runs, quarter, full],
              "peak_rss_ratio_4x_rows": round(largest["peak_rss_mib"] / quarter["peak_rss_mib"], 3)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'run':<22}{'rows':>7}{'cmd s':>8}{'rows/s':>9}{'latent/s':>10}{'text/s':>9}{'peak MiB':>10}")
    for run in report["runs"]:
        print(f"{run['label']:<22}{run['rows']:>7}{run['command_s']:>8}{run['rows_per_s']:>9}{run['latent_rows_per_s']:>10}"
              f"{run['text_items_per_s']:>9}{run['peak_rss_mib']:>10}")
    print(f"peak RSS at {args.rows} rows / at {args.rows // 4} rows: {report['peak_rss_ratio_4x_rows']}  ({args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
