"""Ratios, the table and the host description of bench/train_throughput.py."""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path

FLOOR_OF = {"uncached": "floor+encoders", "peer": "floor+encoders", "cold": "floor", "cached": "floor"}


@dataclass
class Result:
    name: str
    kind: str
    stage: int | None
    procs: int
    threads: int
    global_batch: int
    samples_per_s: float
    step_s: float
    first_step_s: float  # from the bench's clock just before Popen to the first step finished
    peak_rss_mb: float  # largest RSS of any process of the child's tree
    rank0_peak_rss_mb: float | None  # what the run logged itself (rank 0)
    peak_accelerator_mb: float | None
    vs_floor: float | None = None  # time per step ÷ the matching floor's (FLOOR_OF, same threads)
    cached_vs_uncached: float | None = None  # samples/s, same stage and process count
    step_s_rounds: list[float] = field(default_factory=list)  # every round's step time (--repeats)


def median_run(runs: list[Result]) -> Result:
    """The round with the median step time (the lower middle one for an even count), all rounds noted."""
    ordered = sorted(runs, key=lambda run: run.step_s)
    chosen = ordered[(len(ordered) - 1) // 2]
    chosen.step_s_rounds = [run.step_s for run in runs]
    return chosen


def add_ratios(results: list[Result]) -> None:
    by_key = {(r.kind, r.stage, r.procs): r for r in results}
    for result in results:
        floor = by_key.get((FLOOR_OF.get(result.kind), None, result.procs))
        if floor is not None:
            result.vs_floor = result.step_s / floor.step_s
        uncached = by_key.get(("uncached", result.stage, result.procs))
        if result.kind in ("cold", "cached") and uncached is not None:
            result.cached_vs_uncached = result.samples_per_s / uncached.samples_per_s


def peer_ratios(results: list[Result]) -> list[dict]:
    peer = next((r for r in results if r.kind == "peer"), None)
    if peer is None:
        return []
    ours = [r for r in results if r.procs == 1 and r.stage in (0, 2) and r.kind in ("uncached", "cached")]
    return [{"name": r.name, "samples_per_s_vs_peer": r.samples_per_s / peer.samples_per_s,
             "paired_rounds_vs_peer": paired(r, peer), "first_step_vs_peer": r.first_step_s / peer.first_step_s}
            for r in ours]


def paired(result: Result, peer: Result) -> list[float]:
    """samples/s ÷ the peer's, round by round. Rounds run the variants one after the other, minutes
    apart, and a shared or virtual machine's speed drifts over minutes, so a ratio within one round
    (the two runs nearest in time) is steadier than the ratio of two independently chosen rounds."""
    return [peer_step / step for step, peer_step in zip(result.step_s_rounds, peer.step_s_rounds)]


def cache_ceilings(results: list[Result]) -> dict[int, float]:
    """Per process count: floor+encoders' step time ÷ the floor's, the speed-up a perfect cache gives."""
    floors = {(r.kind, r.procs): r.step_s for r in results if r.kind.startswith("floor")}
    return {procs: floors[("floor+encoders", procs)] / floors[("floor", procs)]
            for procs in sorted({procs for _, procs in floors}) if ("floor", procs) in floors and ("floor+encoders", procs) in floors}


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: list[Result], vs_peer: list[dict]) -> None:
    header = (f"{'variant':<26}{'thr':>4}{'batch':>6}{'samples/s':>11}{'s/step':>8}{'×floor':>8}{'cached/unc':>11}"
              f"{'1st step s':>11}{'RSS MB':>8}{'rank0 MB':>9}{'accel MB':>9}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        print(f"{r.name:<26}{r.threads:>4}{r.global_batch:>6}{r.samples_per_s:>11.1f}{r.step_s:>8.3f}"
              f"{fmt(r.vs_floor, '.2f'):>8}{fmt(r.cached_vs_uncached, '.2f'):>11}{r.first_step_s:>11.1f}"
              f"{r.peak_rss_mb:>8.0f}{fmt(r.rank0_peak_rss_mb, '.0f'):>9}{fmt(r.peak_accelerator_mb, '.0f'):>9}")
    print("×floor: time per step ÷ the floor's with the same threads (uncached, peer: floor+encoders; cold, cached: "
          "floor).\n1st step: from launch to the first step finished. RSS: largest process of the tree; rank0: as logged.")
    for procs, ceiling in cache_ceilings(results).items():
        print(f"floor+encoders ÷ floor for ×{procs}: {ceiling:.2f}× (the most any encoder cache can gain)")
    print("With one process ZeRO-1/2 run as ZeRO-0 (nothing to partition; see ds_diffusers/engine/stage.py).")
    for ratio in vs_peer:
        rounds = ratio["paired_rounds_vs_peer"]
        per_round = f" (round by round {', '.join(f'{r:.2f}' for r in rounds)}; median {statistics.median(rounds):.2f}×)" if len(rounds) > 1 else ""
        print(f"{ratio['name']} ÷ peer: samples/s {ratio['samples_per_s_vs_peer']:.2f}×{per_round}, "
              f"time to first step {ratio['first_step_vs_peer']:.2f}×")


def host_description() -> dict:
    import accelerate
    import deepspeed
    import diffusers
    import torch
    import transformers
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator().device_name()
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.is_file() else []
    cpu = models[0] if models else platform.processor() or "unknown CPU"
    device = f"{accelerator}: {torch.cuda.get_device_name()}" if accelerator == "cuda" else f"{accelerator}: {cpu}"
    versions = {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                "accelerate": accelerate.__version__}
    return {"hostname": platform.node(), "platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "accelerator": accelerator, "device": device, "load_average_1m_at_start": os.getloadavg()[0],
            "versions": versions}
