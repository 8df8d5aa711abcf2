"""Checkpoint room: DeepSpeed engine state plus what makes a resume exact — global step, epoch,
position in the epoch, per-rank RNG states, EMA shards — and a record of the settings a checkpoint
can only be resumed with.

Layout of `checkpoint_dir`:
    step_<N>/            engine.save_checkpoint files (every rank writes its ZeRO shard)
    step_<N>/rank_<R>.pt RNG state (and EMA shard) of rank R
    step_<N>/ds_diffusers.json   position, settings, every file's digest; written last, marks the folder complete
    latest               the tag of the newest complete checkpoint, replaced atomically

`save` and `load` are collective: call them on all ranks. Both read back through
`checkpoint_reader`, as the offline export does. When to save, how many step folders to keep and
whether to resume is `checkpoint_manager`'s.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from ds_diffusers.checkpoint_digests import DIGESTS_KEY, changed_file, own_file_digests, unrecorded_note
from ds_diffusers.checkpoint_reader import LATEST, META_FILE, rank_file, read_meta, read_rank_state
from ds_diffusers.config.schema import Config
from ds_diffusers.distributed import DistInfo, all_gather, all_ranks_ok, barrier
from ds_diffusers.engine.checkpoint_files import written_at_stage_0
from ds_diffusers.engine.checkpoint_reads import release_checkpoint_files
from ds_diffusers.engine.universal import stage_0_optimizer_is_plain
from ds_diffusers.errors import ConfigError, TrainingError
from ds_diffusers.families import FAMILY_NAMES, detect_family, model_family
from ds_diffusers.topology import TOPOLOGY_SETTINGS, changed_topology, check_topology, load_other_topology, requested_batch
from ds_diffusers.train_state import RNG_KEY, TrainState

_STEP_DIR = re.compile(r"^step_(\d+)$")
_DAMAGED = "is damaged (truncated, unreadable or changed since it was saved)"
# Config keys that do not change what is trained (paths, logging, cadence); the rest are hashed.
_NOT_TRAINING = {"num_epochs", "max_train_steps", "validation_epochs", "validation_steps", "num_validation_images",
                 "validation_prompts", "validation_use_ema", "validation_inference_steps", "validation_guidance_scale", "save_interval",
                 "checkpoint_dir", "output_dir", "resume_from_checkpoint", "checkpoints_total_limit",
                 "overwrite_output_dir", "dataloader_num_workers", "offline", "wandb", "tensorboard", "csv_monitor",
                 "flops_profiler", "wall_clock_breakdown", "pretrained_model_name_or_path", "dataset_dir", "sample",
                 "cache_latents", "cache_text_embeddings", "cache_dir", "log_every_n_steps", "max_nonfinite_steps",
                 "channels_last", "compile"}


def step_tag(global_step: int) -> str:
    return f"step_{global_step}"


def _unet_config_hash(cfg: Config) -> str:
    """The denoiser's config (`unet/`, or the family's folder), under the key name checkpoints keep."""
    config_file = Path(cfg.pretrained_model_name_or_path) / detect_family(cfg.pretrained_model_name_or_path).denoiser_folder / "config.json"
    return hashlib.sha256(config_file.read_bytes()).hexdigest()[:16]


def resume_settings(cfg: Config, world_size: int) -> dict[str, Any]:
    """What a checkpoint can only be resumed with; a difference is an error, not a shape mismatch."""
    family = detect_family(cfg.pretrained_model_name_or_path)
    return {
        "model family": family.name,
        "unet architecture (unet/config.json)": _unet_config_hash(cfg),
        "use_lora.action": cfg.use_lora.action,
        "use_lora.rank": cfg.use_lora.rank if cfg.use_lora.action else None,
        "use_lora.target_modules": sorted(family.lora_target_modules(cfg.use_lora.target_modules)) if cfg.use_lora.action else None,
        "use_ema": cfg.use_ema,
        "zero_optimization.stage": cfg.zero_optimization.stage,
        "number of processes": world_size,
    }


def training_config(cfg: Config) -> dict[str, Any]:
    return {key: value for key, value in cfg.model_dump().items() if key not in _NOT_TRAINING}


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(training_config(cfg), sort_keys=True).encode()).hexdigest()[:16]


def complete_steps(checkpoint_dir: str) -> list[int]:
    """Steps of the complete checkpoints in the folder, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / META_FILE).is_file()]
    return sorted(steps)


def damaged_file(step_dir: Path) -> Path | None:
    """The first file of a complete-looking checkpoint that cannot be read back, or None.

    Cheap enough for start-up (no tensor is read): the metadata must parse, each rank's RNG file
    must exist, and every torch file must end in a zip central directory, which a file truncated
    by a crash, a full disk or a partial copy lacks. Then every file whose digest was recorded at
    save time is read and hashed: bytes changed in place keep the size and the zip directory."""
    meta_file = step_dir / META_FILE
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return meta_file
    expected = [rank_file(step_dir, rank) for rank in range(int(meta.get("world_size", 0)))]
    for path in [*expected, *sorted(set(step_dir.glob("*.pt")) - set(expected))]:
        try:
            with zipfile.ZipFile(path):
                pass
        except (OSError, zipfile.BadZipFile):
            return path
    return changed_file(step_dir, meta[DIGESTS_KEY]) if meta.get(DIGESTS_KEY) else None


def intact_before(checkpoint_dir: str, step: int) -> Path | None:
    """The newest complete, undamaged checkpoint older than `step`."""
    for older in reversed([s for s in complete_steps(checkpoint_dir) if s < step]):
        if damaged_file(Path(checkpoint_dir) / step_tag(older)) is None:
            return Path(checkpoint_dir) / step_tag(older)
    return None


def resume_target(cfg: Config) -> Path | None:
    """The step folder to resume from, or None to start fresh.

    `true`/"latest" use `checkpoint_dir/latest` when it exists (a fresh start otherwise, as in the seed
    project), falling back with a warning to the previous intact step when its files are damaged; a
    path names one step folder, refused when damaged; `false` never resumes.
    """
    value = cfg.resume_from_checkpoint
    if value is False:
        return None
    if value is True or value == "latest":
        latest = Path(cfg.checkpoint_dir) / LATEST
        if not latest.is_file():
            return None
        step_dir = Path(cfg.checkpoint_dir) / latest.read_text().strip()
    else:
        step_dir = Path(value)
        if not (step_dir / META_FILE).is_file():
            raise ConfigError("resume_from_checkpoint", value, "not a complete ds-diffusers checkpoint folder (no "
                              f"{META_FILE}); use true/\"latest\", false, or a folder such as {cfg.checkpoint_dir}/step_100")
    damaged = damaged_file(step_dir)
    if damaged is None:
        return _accepted(cfg, step_dir)
    match = _STEP_DIR.match(step_dir.name)
    previous = intact_before(str(step_dir.parent), int(match.group(1))) if match else None
    if previous is not None and value in (True, "latest"):
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"ds-diffusers: warning: {damaged} {_DAMAGED}; resuming from the previous "
                  f"complete checkpoint {previous} instead of {step_dir}", file=sys.stderr, flush=True)
        return _accepted(cfg, previous)
    fix = (f"resume from the previous complete step with resume_from_checkpoint={previous}" if previous is not None else
           "no earlier complete step is left; set resume_from_checkpoint=false (and overwrite_output_dir=true) to start again")
    raise ConfigError("resume_from_checkpoint", str(value), f"{damaged} {_DAMAGED}; {fix}")


def _accepted(cfg: Config, step_dir: Path) -> Path:
    note = unrecorded_note(step_dir, read_meta(step_dir))
    if note is not None and int(os.environ.get("RANK", "0")) == 0:
        print(note, file=sys.stderr, flush=True)
    check_family(cfg, step_dir)
    return step_dir


def check_family(cfg: Config, step_dir: Path) -> None:
    """Before anything is loaded or written: an SD 1.x/2.x checkpoint cannot continue as SDXL or back."""
    saved = read_meta(step_dir).get("settings", {}).get("model family")
    current = model_family(cfg.pretrained_model_name_or_path)
    if saved is not None and saved != current:
        raise ConfigError("resume_from_checkpoint", str(step_dir), f"this checkpoint trained a {FAMILY_NAMES[saved]} model "
                          f"but pretrained_model_name_or_path={cfg.pretrained_model_name_or_path} is {FAMILY_NAMES[current]}; "
                          "point pretrained_model_name_or_path at the model the checkpoint came from, or start a new run in "
                          "another checkpoint_dir")


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_error(err: Exception, step_dir: Path) -> str:
    """One line for a failed write. A full disk shows up as OSError(ENOSPC) from our files and as
    torch's zip writer's "unexpected pos" RuntimeError from DeepSpeed's."""
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "unexpected pos" in str(err) or "No space left" in str(err):
        return f"no space left on {step_dir.parent}"
    if isinstance(err, OSError):
        return f"{err.strerror or err} ({err.filename or step_dir})"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} ({step_dir})"


def _save_fix(cfg: Config, error: str, previous: str | None) -> str:
    """What helps after a failed save. A new step is written before the oldest is pruned (so a failed
    save never costs the last good one): a full disk needs room for one more step, whatever
    checkpoints_total_limit is."""
    if not error.startswith("no space left"):
        return "Fix the cause above (permissions, the folder)"
    previous_dir = Path(cfg.checkpoint_dir) / (previous or "")
    size = sum(f.stat().st_size for f in previous_dir.rglob("*") if f.is_file()) if previous else 0
    room = f"about {max(size / 1e9, 0.1):.1f} GB (the size of {previous})" if size else "the size of one checkpoint"
    fix = (f"A save needs room for one more step before the oldest is pruned: free {room} on that disk, or move "
           "checkpoint_dir to a disk with more room")
    if cfg.checkpoints_total_limit > 1:
        fix += f" (or lower checkpoints_total_limit, now {cfg.checkpoints_total_limit}, to keep fewer old steps)"
    return fix


def _write_rank_files(engine: Any, cfg: Config, dist: DistInfo, state: TrainState, ema: Any) -> dict[str, Any]:
    """This rank's files; returns the train state's position, the same on every rank, for the metadata."""
    tag = step_tag(state.global_step)
    # Frozen base weights come from the pretrained folder again on resume; LoRA checkpoints stay small.
    engine.save_checkpoint(cfg.checkpoint_dir, tag=tag, save_latest=False, exclude_frozen_parameters=cfg.use_lora.action)
    position = state.state_dict()
    rank_state = {RNG_KEY: position.pop(RNG_KEY), "ema": ema.state_dict() if ema is not None else None}
    torch.save(rank_state, rank_file(Path(cfg.checkpoint_dir) / tag, dist.rank))
    return position


def _mark_complete(cfg: Config, dist: DistInfo, position: dict[str, Any], digests: dict[str, str],
                   requested: list[int]) -> None:
    global_step = position["global_step"]
    step_dir = Path(cfg.checkpoint_dir) / step_tag(global_step)
    meta = {**position, "world_size": dist.world_size, "requested_batch": requested, "config_hash": config_hash(cfg),
            "training_config": training_config(cfg), "settings": resume_settings(cfg, dist.world_size),
            "pretrained_model_name_or_path": str(Path(cfg.pretrained_model_name_or_path).resolve()), DIGESTS_KEY: digests}
    _write_atomically(step_dir / META_FILE, json.dumps(meta, indent=2, default=str))
    _write_atomically(Path(cfg.checkpoint_dir) / LATEST, step_tag(global_step))


def save(engine: Any, cfg: Config, dist: DistInfo, state: TrainState, ema: Any = None,
         requested: list[int] | None = None) -> Path:
    """All ranks must call this. `latest` moves only after every rank has written everything; a
    failed save removes its partial step folder and stops every rank with one message, and a save cut
    short by a second Ctrl-C (see `preemption`) removes it before the KeyboardInterrupt goes on.
    `requested`: the user's micro batch and accumulation (`topology.requested_batch`) when `cfg`'s
    were adjusted to keep the global batch on another process count."""
    step_dir = Path(cfg.checkpoint_dir) / step_tag(state.global_step)
    try:
        return _save(engine, cfg, dist, state, ema, requested or requested_batch(cfg))
    except KeyboardInterrupt:
        if dist.is_main and not (step_dir / META_FILE).is_file():  # complete once its metadata is out
            shutil.rmtree(step_dir, ignore_errors=True)
        raise


def _save(engine: Any, cfg: Config, dist: DistInfo, state: TrainState, ema: Any, requested: list[int]) -> Path:
    global_step = state.global_step
    step_dir = Path(cfg.checkpoint_dir) / step_tag(global_step)
    latest = Path(cfg.checkpoint_dir) / LATEST
    previous = latest.read_text().strip() if latest.is_file() else None
    error, position, digests = "", {}, None
    try:
        position = _write_rank_files(engine, cfg, dist, state, ema)
    except (OSError, RuntimeError) as err:
        error = _write_error(err, step_dir)
    if all_ranks_ok(not error, dist.device):
        try:  # every rank's files are out: each hashes its own, rank 0 records them all
            digests = own_file_digests(step_dir, dist.rank)
        except OSError as err:
            error = _write_error(err, step_dir)
        shares = all_gather(digests)
        if dist.is_main and None not in shares:
            try:
                _mark_complete(cfg, dist, position, {name: digest for share in shares for name, digest in share.items()},
                               requested)
            except OSError as err:
                error = _write_error(err, step_dir)
    if not all_ranks_ok(not error, dist.device):
        if dist.is_main and previous != step_dir.name:
            shutil.rmtree(step_dir, ignore_errors=True)
        barrier()
        kept = f"'{LATEST}' still names {previous}" if previous else f"no complete checkpoint is in {cfg.checkpoint_dir} yet"
        raise TrainingError(f"saving checkpoint {step_dir} failed: {error or 'on another rank, see its message'}; the partial "
                            f"folder was removed and {kept}. {_save_fix(cfg, error, previous)}, then resume with "
                            "resume_from_checkpoint=latest.")
    barrier()
    return step_dir


def check_settings(meta: dict[str, Any], cfg: Config, world_size: int, step_dir: Path) -> None:
    """Raise on settings the checkpoint cannot be loaded with. Reads the metadata only: the resume
    check calls it before any model is loaded, so a refusal costs seconds, not a model load. The
    process count and ZeRO stage may differ (`topology`)."""
    current = resume_settings(cfg, world_size)
    for key, saved in meta.get("settings", {}).items():
        if key not in TOPOLOGY_SETTINGS and current.get(key) != saved:
            raise ConfigError("resume_from_checkpoint", str(step_dir), f"the checkpoint was saved with {key} = {saved}, "
                              f"this run has {current.get(key)}; restore that setting, or start a new run in another checkpoint_dir")
    check_topology(meta, cfg, current, step_dir)


def check_compatible(meta: dict[str, Any], cfg: Config, world_size: int, step_dir: Path) -> list[str]:
    """Raise on settings the checkpoint cannot be loaded with; return the other changed training keys."""
    check_settings(meta, cfg, world_size, step_dir)
    old, new = meta["training_config"], training_config(cfg)
    return sorted(key for key in new if json.dumps(new[key], default=str) != json.dumps(old.get(key), default=str))


def load(engine: Any, cfg: Config, dist: DistInfo, step_dir: Path, state: TrainState, ema: Any = None) -> dict[str, Any]:
    """All ranks must call this. Restores engine, train state (position and this rank's RNG) and EMA;
    returns the checkpoint's metadata."""
    meta = read_meta(step_dir)
    meta["changed_keys"] = check_compatible(meta, cfg, dist.world_size, step_dir)
    saved_stage = 0 if written_at_stage_0(step_dir) else int(meta["settings"]["zero_optimization.stage"])
    if meta["world_size"] != dist.world_size or saved_stage != engine.zero_optimization_stage():
        if saved_stage != 0 or stage_0_optimizer_is_plain(step_dir):
            load_other_topology(engine, cfg, dist, step_dir, meta, saved_stage, state, ema)
            meta["topology_change"] = (changed_topology(meta, resume_settings(cfg, dist.world_size))
                                       or f"ZeRO-{saved_stage} files -> a ZeRO-{engine.zero_optimization_stage()} engine")
            return meta
    if written_at_stage_0(step_dir) and engine.zero_optimization_stage() != 0:
        raise ConfigError("resume_from_checkpoint", str(step_dir), "it was written by a ZeRO-0 engine, which 16-bit runs "
                          f"no longer use (DeepSpeed's stage-0 fp16 path never scaled the loss); this run's engine is ZeRO-"
                          f"{engine.zero_optimization_stage()}. Export it with python -m ds_diffusers.export --checkpoint "
                          f"{step_dir} --out DIR and start a new run from DIR")
    try:
        path, _ = engine.load_checkpoint(str(step_dir.parent), tag=step_dir.name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True, load_module_strict=not cfg.use_lora.action)
        if path is not None:
            release_checkpoint_files(engine)  # else the step stays in use: its pruning frees nothing
        rank_state = read_rank_state(step_dir, dist.rank) if path is not None else None
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        path, reason = None, f" ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    else:
        reason = ""
    if path is None:
        previous = intact_before(str(step_dir.parent), int(meta["global_step"]))
        fix = f"resume_from_checkpoint={previous}" if previous else "resume_from_checkpoint=false"
        raise ConfigError("resume_from_checkpoint", str(step_dir), f"DeepSpeed could not read this checkpoint{reason}; "
                          f"resume from the previous complete step with {fix}")
    state.load_state_dict({**meta, RNG_KEY: rank_state[RNG_KEY]})
    if ema is not None:
        ema.load_state_dict(rank_state["ema"])
    return meta

