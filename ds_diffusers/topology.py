"""Resuming on another topology: a checkpoint saved on N processes (or at one ZeRO stage) continued
on M processes (or at another stage). What may change, what the run keeps, and what it says.

- The data position needs nothing: it is a cursor in the epoch's global order (`data.sampler`).
- The global batch (micro batch x accumulation x processes) is kept: gradient_accumulation_steps
  is scaled by N/M when that is a whole number, in one line; otherwise the resume is refused with
  the fix. A run that sets train_micro_batch_size_per_gpu or gradient_accumulation_steps to other
  values than the checkpoint's asked for another batch, and gets it (one line says so).
- Weights, Adam state, lr schedule: `engine.universal` converts the step folder. Other optimizers'
  state has no layout the conversion knows: refused in one line (resume on the saved topology).
- EMA shards and RNG states are ours: the EMA is reassembled and cut for the new ranks
  (`ShardedEMA.load_full`); each rank's random streams start anew from (seed, rank, step), since
  the saved ones belong to ranks that no longer exist.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ds_diffusers.checkpoint_reader import read_ema
from ds_diffusers.config.schema import Config
from ds_diffusers.distributed import DistInfo, all_ranks_ok, barrier
from ds_diffusers.engine.checkpoint_reads import release_checkpoint_files
from ds_diffusers.engine.params import full_shape
from ds_diffusers.engine.universal import load_universal, write_universal
from ds_diffusers.errors import ConfigError
from ds_diffusers.train_state import RNG_KEY, TrainState, fresh_rng_state

PROCESSES = "number of processes"
STAGE = "zero_optimization.stage"
TOPOLOGY_SETTINGS = (PROCESSES, STAGE)
# Optimizers whose whole state is exp_avg, exp_avg_sq and step: what the universal form carries
# (DeepSpeed's Adam/AdamW, whichever kernel, and torch's).
ADAM_FAMILY = {"adam", "adamw"}
# Under checkpoint_dir: where a step is converted before a resume on another topology (removed after it).
UNIVERSAL_DIR = ".universal"


def topology_of(settings: dict[str, Any]) -> str:
    processes = settings[PROCESSES]
    return f"{processes} process{'es' if processes != 1 else ''}, ZeRO-{settings[STAGE]}"


def changed_topology(meta: dict[str, Any], current: dict[str, Any]) -> str | None:
    """"N processes, ZeRO-a -> M processes, ZeRO-b" when the run's topology differs from the
    checkpoint's, else None."""
    saved = meta.get("settings", {})
    if all(saved.get(key, current[key]) == current[key] for key in TOPOLOGY_SETTINGS):
        return None
    return f"{topology_of({**current, **saved})} -> {topology_of(current)}"


def check_topology(meta: dict[str, Any], cfg: Config, current: dict[str, Any], step_dir: Path) -> None:
    """Refuse a topology change the conversion cannot make; nothing is loaded yet."""
    change = changed_topology(meta, current)
    if change is None:
        return
    if cfg.optimizer.type.lower() not in ADAM_FAMILY:
        raise ConfigError("resume_from_checkpoint", str(step_dir), f"resuming on another topology ({change}) carries "
                          f"the optimizer state of the Adam family only, not {cfg.optimizer.type}'s; resume on "
                          f"{topology_of({**current, **meta['settings']})}, or export it with python -m "
                          f"ds_diffusers.export --checkpoint {step_dir} --out DIR and start a new run from DIR")
    if current[STAGE] == 3 and meta["settings"].get(STAGE) != 3 and cfg.optimizer.param_groups:
        # DeepSpeed's ZeRO-3 universal loader gives every group the first group's hyperparameters.
        raise ConfigError("optimizer.param_groups", [rule.match for rule in cfg.optimizer.param_groups],
                          f"resuming on another topology ({change}) into ZeRO-3 would give every parameter group the "
                          "first one's lr and weight decay; resume at the saved stage, or without optimizer.param_groups")
    rebatched(cfg, meta, current[PROCESSES], step_dir)


def requested_batch(cfg: Config) -> list[int]:
    """The micro batch and accumulation the user's config asks for, recorded in each checkpoint
    (`requested_batch`), so that a later resume tells a batch the user changed from one this
    module adjusted."""
    return [cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps]


def rebatched(cfg: Config, meta: dict[str, Any], world_size: int, step_dir: Path) -> tuple[Config, str | None]:
    """The run's config with the checkpoint's global batch kept on `world_size` processes, and the
    line that says what changed (None when nothing did). `cfg` is the user's config as given."""
    saved = meta["training_config"]
    saved_batch = saved["train_micro_batch_size_per_gpu"] * saved["gradient_accumulation_steps"] * int(meta["world_size"])
    micro, accumulation = cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps
    saved_micro_step = saved["train_micro_batch_size_per_gpu"] * int(meta["world_size"])
    if cfg.aspect_ratio_buckets and micro * world_size != saved_micro_step:
        raise ConfigError("train_micro_batch_size_per_gpu", micro, f"the checkpoint {step_dir} cut its bucket schedule "
                          f"into global micro-batches of {saved_micro_step} images (aspect_ratio_buckets), which "
                          f"{world_size} process(es) of {micro} do not make; set train_micro_batch_size_per_gpu so "
                          f"that it times the process count is {saved_micro_step}, or resume on "
                          f"{int(meta['world_size'])} process(es)")
    if requested_batch(cfg) != meta.get("requested_batch", [saved["train_micro_batch_size_per_gpu"],
                                                            saved["gradient_accumulation_steps"]]):
        batch = micro * accumulation * world_size
        if batch == saved_batch:
            return cfg, None
        return cfg, (f"global batch {saved_batch} -> {batch} (train_micro_batch_size_per_gpu {micro} x "
                     f"gradient_accumulation_steps {accumulation} x {world_size} process(es), as this run sets them)")
    per_micro_step = micro * world_size
    if saved_batch % per_micro_step:
        raise ConfigError("gradient_accumulation_steps", accumulation, f"the checkpoint {step_dir} trained with a global "
                          f"batch of {saved_batch}, which {world_size} process(es) of train_micro_batch_size_per_gpu "
                          f"{micro} cannot make; set train_micro_batch_size_per_gpu and gradient_accumulation_steps for "
                          "the global batch you want (the run then trains with it), or resume on a process count "
                          "that divides it")
    kept = saved_batch // per_micro_step
    if kept == accumulation:
        return cfg, None
    line = (f"global batch {saved_batch} kept on {world_size} process(es): gradient_accumulation_steps "
            f"{accumulation} -> {kept}")
    return cfg.model_copy(update={"gradient_accumulation_steps": kept}), line


# DeepSpeed's converter and loaders assert and index as they go: any of these is a conversion that failed.
_CONVERSION_ERRORS = (OSError, RuntimeError, ValueError, KeyError, IndexError, AssertionError)


def _one_line(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _optimizer_order(engine: Any, cfg: Config) -> list[str]:
    """The trainable parameters' names in the optimizer's group order (how a torch optimizer's state
    dict numbers them)."""
    from ds_diffusers.models import param_groups

    name_of = {id(p): name for name, p in engine.module.named_parameters()}
    return [name_of[id(p)] for group in param_groups(engine.module, cfg) for p in group["params"]]


def load_other_topology(engine: Any, cfg: Config, dist: DistInfo, step_dir: Path, meta: dict[str, Any],
                         saved_stage: int, state: TrainState, ema: Any) -> None:
    """All ranks. Rank 0 converts the step to DeepSpeed's universal form in this run's checkpoint_dir
    (the step itself is only read, so its digests still hold), every rank loads its share of it, and the
    folder is removed. EMA shards are reassembled and cut for this topology; each rank's random
    streams start from (seed, rank, step), as the saved ones belong to the saved ranks."""
    universal_dir = Path(cfg.checkpoint_dir) / UNIVERSAL_DIR / step_dir.name  # this run's folder, which it has locked
    error = ""
    if dist.is_main:
        try:
            write_universal(step_dir, universal_dir, _optimizer_order(engine, cfg), cfg.gradient_clipping)
        except _CONVERSION_ERRORS as err:
            error = _one_line(err)
    ok = all_ranks_ok(not error, dist.device)
    if ok:
        try:
            load_universal(engine, universal_dir)
            release_checkpoint_files(engine)  # the folder is removed next: nothing may stay mapped from it
        except _CONVERSION_ERRORS as err:
            error = _one_line(err)
        ok = all_ranks_ok(not error, dist.device)
    barrier()
    if dist.is_main:
        shutil.rmtree(universal_dir.parent, ignore_errors=True)
    if not ok:
        raise ConfigError("resume_from_checkpoint", str(step_dir), "converting it for this topology (DeepSpeed's universal "
                          f"checkpoint) failed: {error or 'on another rank, see its message'}; resume on the topology it "
                          "was saved with, or export it with python -m ds_diffusers.export and start a new run from that")
    if ema is not None:
        shapes = {name: full_shape(p) for name, p in engine.module.named_parameters()}
        ema.load_full(read_ema(step_dir, int(meta["world_size"]), saved_stage, shapes))
    seed = int(cfg.seed) + dist.rank + 1_000_003 * int(meta["global_step"])
    state.load_state_dict({**meta, RNG_KEY: fresh_rng_state(seed)})
