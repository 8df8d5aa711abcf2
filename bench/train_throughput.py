"""How fast does ds-diffusers train, next to a bare PyTorch loop (and Hugging Face's example)?

One run measures, with the same model, data and micro batch (cfg/default.json on the embedded
tiny SD): the floor (bench/throughput_floor.py, a bare loop on pre-encoded batches) and
floor+encoders (the VAE and text encoder run every step); ds-diffusers through
scripts/train_text_to_image.sh (as users start it) for each ZeRO stage × process count, uncached (compared with floor+encoders) and with the
encoder cache (compared with the floor; a "cold" run builds the cache first and is reported on its
own); with --peer, diffusers' examples/text_to_image script through `accelerate launch`. Children
run one at a time, each in a fresh folder under --work-dir, with OMP_NUM_THREADS = cores // processes.
Throughput is steady state: the median time per step over windows of log_every_n_steps steps
after --warmup-steps, the same windows for every program.

    python bench/train_throughput.py                                    # ZeRO 0/2/3 × 1/2 processes
    python bench/train_throughput.py --steps 70 --warmup-steps 10 --stages 0 2 --procs 1
    python bench/train_throughput.py --peer ../shared/peer --stages 0 2 --procs 1 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

REPO = Path(__file__).resolve().parents[1]
# Run as a plain script from anywhere: make the repository's package importable without installing.
sys.path.insert(0, str(REPO))

from ds_diffusers.config import Config, load_config
from ds_diffusers.data import load_train_dataset
from ds_diffusers.distributed import free_port
from ds_diffusers.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench's own helper modules
import throughput_peer as peer  # noqa: E402
from throughput_report import (Result, add_ratios, cache_ceilings, host_description, median_run,  # noqa: E402
                               peer_ratios, print_table)

CFG_FILE = REPO / "cfg" / "default.json"
FLOOR_SCRIPT = Path(__file__).with_name("throughput_floor.py")
TRAIN_SCRIPT = REPO / "scripts" / "train_text_to_image.sh"
PATH_KINDS = ("uncached", "cached")


class BenchError(Exception):
    """A child failed, timed out or did not log every step; the message says which and why."""


@dataclass(frozen=True)
class Variant:
    kind: str  # floor, floor+encoders, uncached, cold (builds the cache), cached (reuses it), peer
    procs: int  # for a floor: the process count whose thread share it runs with
    stage: int | None = None

    @property
    def name(self) -> str:
        if self.kind.startswith("floor"):
            return f"{self.kind} for ×{self.procs}"
        zero = f" ZeRO-{self.stage}" if self.stage is not None else ""
        return f"{self.kind}{zero} ×{self.procs}"

    @property
    def folder(self) -> str:
        zero = f"-z{self.stage}" if self.stage is not None else ""
        return f"{self.kind.replace('+', '-')}{zero}-p{self.procs}"


@dataclass(frozen=True)
class Bench:
    cfg: Config
    work_dir: Path
    steps: int
    warmup: int
    cores: int
    timeout: float

    def threads(self, procs: int) -> int:
        return max(1, self.cores // procs)

    def batch(self, procs: int) -> int:
        return self.cfg.train_micro_batch_size_per_gpu * self.cfg.gradient_accumulation_steps * procs


@dataclass
class ChildRun:
    launched_at: float  # time.time() just before Popen
    peak_rss_mb: float
    lines: list[tuple[float, str]]  # (time the text arrived, text): the output split on \r and \n
    log_path: Path

    def tail(self, count: int = 30) -> str:
        return "\n".join(text for _, text in self.lines[-count:])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--paths", nargs="+", default=list(PATH_KINDS), choices=PATH_KINDS,
                        help="ds-diffusers data paths: uncached (encoders every step), cached (encoder cache)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup-steps", type=int, default=10, help="first steps left out of the throughput")
    parser.add_argument("--model-dir", type=Path, default=REPO / "data/embedded/tiny-sd")
    parser.add_argument("--dataset-dir", type=Path, default=REPO / "data/embedded/shapes")
    parser.add_argument("--peer", type=Path, default=None, help="peer folder with run_peer.py and train_text_to_image.py")
    parser.add_argument("--work-dir", type=Path, default=REPO / "outputs/bench/train_throughput")
    parser.add_argument("--out", type=Path, default=REPO / "outputs/bench/train_throughput.json")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of every run; each variant reports its median round (steadier on a noisy machine)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds any one child may run")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats: at least 1")
    if min(args.procs) < 1:
        parser.error("--procs: process counts start at 1")
    if not 1 <= args.warmup_steps < args.steps:
        parser.error("need 1 <= --warmup-steps < --steps (throughput is measured between the two)")
    return args


def ensure_inputs(model_dir: Path, dataset_dir: Path) -> None:
    """Build the embedded model and dataset when missing, as scripts/train_text_to_image.sh does."""
    if model_dir.is_dir() and dataset_dir.is_dir():
        return
    root = model_dir.parent
    if (model_dir.name, dataset_dir.name, dataset_dir.parent) != ("tiny-sd", "shapes", root):
        raise BenchError(f"{model_dir} or {dataset_dir} is missing; only the embedded ROOT/tiny-sd and ROOT/shapes "
                         "can be built here")
    from ds_diffusers.embedded import ensure_embedded_assets

    print(f"building the embedded model and dataset in {root} ...", flush=True)
    ensure_embedded_assets(root)


def plan(args: argparse.Namespace) -> list[Variant]:
    variants = [Variant(kind, procs) for procs in args.procs for kind in ("floor", "floor+encoders")]
    ds_kinds = (["uncached"] if "uncached" in args.paths else []) + (["cold", "cached"] if "cached" in args.paths else [])
    return variants + [Variant(kind, procs, stage) for stage in args.stages for procs in args.procs for kind in ds_kinds]


def cache_dir(bench: Bench, variant: Variant) -> Path:
    # One cache per stage and process count, shared by its cold and cached runs only: every cold
    # run really builds, every cached run really reuses.
    return bench.work_dir / "cache" / f"z{variant.stage}-p{variant.procs}"


def ds_overrides(bench: Bench, variant: Variant) -> list[str]:
    run_dir = bench.work_dir / variant.folder
    overrides = [
        f"pretrained_model_name_or_path={bench.cfg.pretrained_model_name_or_path}", f"dataset_dir={bench.cfg.dataset_dir}",
        f"max_train_steps={bench.steps}", "validation_steps=0", "validation_epochs=0", "save_interval=0",
        f"output_dir={run_dir / 'model'}", f"checkpoint_dir={run_dir / 'checkpoints'}", "overwrite_output_dir=true",
        f"zero_optimization.stage={variant.stage}",
    ]
    if variant.kind in ("cold", "cached"):
        overrides += ["cache_latents=true", "cache_text_embeddings=true", f"cache_dir={cache_dir(bench, variant)}"]
    return overrides


def check_configs(bench: Bench, variants: list[Variant]) -> None:
    """Every ds-diffusers run's config, validated before the first child starts: a bad key should
    not surface after minutes of other runs."""
    for variant in variants:
        if variant.stage is not None:
            try:
                load_config(CFG_FILE, ds_overrides(bench, variant))
            except ConfigError as error:
                raise BenchError(f"{variant.name}: config error: {error}") from None


# --- children ---------------------------------------------------------------------------------

def read_lines(fd: int, log_file: BinaryIO, deadline: float) -> list[tuple[float, str]]:
    """Every output line with the time its text arrived. tqdm ends a line only with the next \\r,
    so a line is stamped when its last byte comes in, not when its terminator does."""
    lines, pending, pending_at = [], b"", time.time()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError("timed out (raise --timeout if the runs are this slow)")
            if not selector.select(timeout=remaining):
                continue
            chunk = os.read(fd, 1 << 16)
            now = time.time()
            if not chunk:
                break
            log_file.write(chunk)
            first, *rest = re.split(rb"[\r\n]", chunk)
            pending, pending_at = pending + first, now if first else pending_at
            for part in rest:
                lines.append((pending_at, pending.decode(errors="replace")))
                pending, pending_at = part, now
    lines.append((pending_at, pending.decode(errors="replace")))
    return [(at, text) for at, text in lines if text.strip()]


def run_child(bench: Bench, variant: Variant, cmd: list[str], env: dict[str, str] | None = None) -> ChildRun:
    """Run one child to its end, output in its folder's output.log; a failure raises BenchError with its tail."""
    log_path = bench.work_dir / variant.folder / "output.log"
    child_env = {**os.environ, "OMP_NUM_THREADS": str(bench.threads(variant.procs)), "PYTHONUNBUFFERED": "1", **(env or {})}
    launched_at = time.time()
    # Its own session, so a timeout or Ctrl-C takes down the launcher and every rank it started.
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        with log_path.open("wb") as log_file:
            lines = read_lines(proc.stdout.fileno(), log_file, time.monotonic() + bench.timeout)
    except BaseException as error:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if isinstance(error, BenchError):
            raise BenchError(f"{variant.name}: {error}; output in {log_path}") from None
        raise
    finally:
        proc.stdout.close()
    # wait4 rather than Popen.wait: its rusage holds the largest RSS of the whole tree, since the
    # launchers wait for their ranks.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    child = ChildRun(launched_at, usage.ru_maxrss / 1024, lines, log_path)  # ru_maxrss is in KiB on Linux
    if proc.returncode != 0:
        raise BenchError(f"{variant.name} failed with exit code {proc.returncode}; last lines:\n{child.tail()}\n"
                         f"(full output in {log_path})")
    return child


def fresh_dir(bench: Bench, variant: Variant) -> Path:
    run_dir = bench.work_dir / variant.folder
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    return run_dir


# --- measurements -----------------------------------------------------------------------------

def metrics_steps(path: Path, child: ChildRun, steps: int) -> tuple[dict[int, float], list[dict]]:
    """(step -> wall time it finished, the records) of a metrics.jsonl, which must reach `steps`."""
    lines = path.read_text().splitlines() if path.is_file() else []
    # Training log points only: a validation's record (`val_loss`) would move its step's time past the step.
    records = [record for line in lines if line.strip() and "loss" in (record := json.loads(line))]
    times = {record["step"]: record["time"] for record in records}
    if max(times, default=0) != steps:
        raise BenchError(f"{path} ends at step {max(times, default=0)}, expected {steps}; last lines of the run:\n"
                         f"{child.tail()}\n(full output in {child.log_path})")
    return times, records


def peer_steps(child: ChildRun, steps: int) -> dict[int, float]:
    times = peer.step_times(child.lines, steps)
    if max(times, default=0) != steps:
        raise BenchError(f"peer exited 0 but its progress bar stopped at step {max(times, default=0)} of {steps}; "
                         f"last lines:\n{child.tail()}\n(full output in {child.log_path})")
    return times


def measure(bench: Bench, variant: Variant, child: ChildRun, times: dict[int, float], records: list[dict]) -> Result:
    """Steady state after step `warmup`: the median time per step over windows of
    `log_every_n_steps` steps, for every program. ds-diffusers stamps only its log points; the floor
    and the peer stamp every step, but a median of single steps would leave out the stalls a window
    mean includes (on a shared or virtual machine single steps stall for tens of milliseconds now and
    then, whichever program runs), so all are timed over the same windows. The median, not the mean,
    of the windows for the same reason."""
    window = bench.cfg.log_every_n_steps
    stamped = [step for step in sorted(times) if step >= bench.warmup and step % window == 0]
    durations = [(times[end] - times[start]) / (end - start) for start, end in zip(stamped, stamped[1:])]
    if len(durations) < 5:
        raise BenchError(f"{variant.name}: only {len(durations)} timed windows of {window} steps after step "
                         f"{bench.warmup}; need 5: raise --steps or lower --warmup-steps")
    step_s = statistics.median(durations)

    def peak(key: str) -> float | None:
        return max((record[key] for record in records if key in record), default=None)

    batch = bench.batch(1 if variant.kind.startswith("floor") else variant.procs)
    return Result(name=variant.name, kind=variant.kind, stage=variant.stage, procs=variant.procs,
                  threads=bench.threads(variant.procs), global_batch=batch, samples_per_s=batch / step_s, step_s=step_s,
                  first_step_s=times[min(times)] - child.launched_at, peak_rss_mb=child.peak_rss_mb,
                  rank0_peak_rss_mb=peak("peak_rss_mb"), peak_accelerator_mb=peak("peak_accelerator_mb"))


# --- the three kinds of runs ------------------------------------------------------------------

def run_floor(bench: Bench, variant: Variant) -> Result:
    run_dir = fresh_dir(bench, variant)
    cmd = [sys.executable, str(FLOOR_SCRIPT), "--cfg", str(CFG_FILE), "--steps", str(bench.steps), "--out", str(run_dir),
           "--set", f"pretrained_model_name_or_path={bench.cfg.pretrained_model_name_or_path}",
           f"dataset_dir={bench.cfg.dataset_dir}", *(["--encoders"] if variant.kind == "floor+encoders" else [])]
    child = run_child(bench, variant, cmd)
    return measure(bench, variant, child, *metrics_steps(run_dir / "logs" / "metrics.jsonl", child, bench.steps))


def cache_entries(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()} if folder.is_dir() else set()


def run_ds(bench: Bench, variant: Variant) -> Result:
    run_dir = fresh_dir(bench, variant)
    if variant.kind == "cold":
        shutil.rmtree(cache_dir(bench, variant), ignore_errors=True)  # left by an earlier bench run
    cached_before = cache_entries(cache_dir(bench, variant))
    # What a user runs: the launch script (its asset check, the launcher choice, the log tee), with
    # the cfg named as users name it, so the script's embedded-asset check runs as it does for them.
    cmd = ["bash", str(TRAIN_SCRIPT), str(CFG_FILE.relative_to(REPO)), "--set", *ds_overrides(bench, variant)]
    child = run_child(bench, variant, cmd, env={"NUM_PROCS": str(variant.procs), "MASTER_PORT": str(free_port())})
    cached_after = cache_entries(cache_dir(bench, variant))
    # A cache that was never written, or rebuilt by the run meant to reuse it, would pass for a
    # measurement of the cached path.
    if variant.kind == "cold" and not cached_after:
        raise BenchError(f"{variant.name} wrote nothing to {cache_dir(bench, variant)}; is the cache implemented?")
    if variant.kind == "cached" and cached_after != cached_before:
        raise BenchError(f"{variant.name} built a new cache in {cache_dir(bench, variant)} instead of reusing the "
                         f"cold run's: {sorted(cached_after - cached_before)}")
    return measure(bench, variant, child, *metrics_steps(run_dir / "model" / "logs" / "metrics.jsonl", child, bench.steps))


def run_peer(bench: Bench, peer_dir: Path, on_cpu: bool) -> Result:
    for name in ("run_peer.py", "train_text_to_image.py"):
        if not (peer_dir / name).is_file():
            raise BenchError(f"--peer {peer_dir}: no {name} there; point it at the peer folder (see its README.md)")
    imagefolder = peer.write_imagefolder(bench.cfg, bench.work_dir / "peer_imagefolder")
    peer.warm_peer_dataset_cache(imagefolder)
    variant = Variant("peer", procs=1)
    run_dir = fresh_dir(bench, variant)
    # Offline, or the peer's load_dataset asks the hub about the imagefolder builder.
    try:
        command = peer.peer_command(bench.cfg, bench.steps, bench.threads(1), peer_dir, imagefolder, run_dir, on_cpu)
    except FileNotFoundError as error:
        raise BenchError(str(error)) from None
    child = run_child(bench, variant, command,
                      env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    return measure(bench, variant, child, peer_steps(child, bench.steps), records=[])


# --- report -----------------------------------------------------------------------------------

def run_bench(args: argparse.Namespace) -> dict:
    model_dir, dataset_dir = args.model_dir.resolve(), args.dataset_dir.resolve()
    ensure_inputs(model_dir, dataset_dir)
    cfg = load_config(CFG_FILE, [f"pretrained_model_name_or_path={model_dir}", f"dataset_dir={dataset_dir}"])
    bench = Bench(cfg=cfg, work_dir=args.work_dir.resolve(), steps=args.steps, warmup=args.warmup_steps,
                  cores=os.cpu_count() or 1, timeout=args.timeout)
    variants = plan(args)
    check_configs(bench, variants)
    # Untimed: every child reads the dataset through datasets' Arrow cache; the first one would
    # otherwise pay for building it.
    load_train_dataset(cfg.dataset_dir, cfg.imagefolder)
    host = host_description()
    threads = ", ".join(f"{bench.threads(p)} for {p}-process runs" for p in args.procs)
    print(f"{host['device']}; {bench.cores} cores: OMP_NUM_THREADS = {threads} (floor and peer included)")
    print(f"{bench.steps} steps, throughput over the {bench.steps - bench.warmup} after step {bench.warmup}; "
          f"micro batch {cfg.train_micro_batch_size_per_gpu}, {cfg.resolution} px; runs in {bench.work_dir}", flush=True)

    # Rounds rather than N runs of one variant in a row: a slow spell of the machine then hits
    # every variant once instead of one variant N times.
    runs: dict[str, list[Result]] = {}
    for round_index in range(1, args.repeats + 1):
        if args.repeats > 1:
            print(f"round {round_index} of {args.repeats}", flush=True)
        for variant in variants:
            result = (run_floor if variant.kind.startswith("floor") else run_ds)(bench, variant)
            runs.setdefault(result.name, []).append(result)
            print(f"  {variant.name}: {result.samples_per_s:.1f} samples/s", flush=True)
        if args.peer is not None:
            result = run_peer(bench, args.peer.resolve(), on_cpu=host["accelerator"] == "cpu")
            runs.setdefault(result.name, []).append(result)
            print(f"  peer: {result.samples_per_s:.1f} samples/s", flush=True)
    results = [median_run(rounds) for rounds in runs.values()]
    add_ratios(results)
    vs_peer = peer_ratios(results)
    print_table(results, vs_peer)
    settings = {**{k: str(v.resolve()) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "cfg": str(CFG_FILE), "threads": {p: bench.threads(p) for p in args.procs}}
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "host": host, "settings": settings,
            "results": [asdict(r) for r in results], "vs_peer": vs_peer, "cache_ceiling": cache_ceilings(results)}


def main() -> int:
    args = parse_args()
    try:
        report = run_bench(args)
    except (BenchError, ConfigError) as error:
        print(f"train_throughput: {error}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
