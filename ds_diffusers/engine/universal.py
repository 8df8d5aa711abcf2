"""A step folder in DeepSpeed's universal form, and loading it into an engine of another topology.

DeepSpeed's ZeRO files are laid out for the process count and stage that wrote them. Its universal
checkpoint (`deepspeed.checkpoint.ds_to_universal`, loaded with `checkpoint.load_universal`) keeps
every trainable parameter whole, by name: `zero/<name>/fp32.pt`, `exp_avg.pt`, `exp_avg_sq.pt`,
`step.pt`, next to `zero/optimizer_state.pt` (the optimizer's hyperparameters and loss scaler) and
the rank-0 model-states file (lr schedule, step counters). DeepSpeed 0.19.8 covers part of what we
need, and this module writes the rest:
- written from ZeRO-1/2/3 folders by `ds_to_universal` itself; from a stage-0 folder (one process in
  fp32, where DeepSpeed writes no ZeRO files and its converter has nothing to read) by
  `_write_from_stage_0`, out of the torch optimizer's state dict;
- each state file is `{"param": tensor}` (the ZeRO-3 converter writes bare tensors, which the
  ZeRO-1/2 loader cannot read), and `optimizer_state.pt` carries both the keys the ZeRO-1/2 loader reads (`param_groups`, loss
  scaler, clip_grad, ds_version) and those the ZeRO-3 loader reads (`optimizer_state_dict` with
  `state[0].step` and `param_groups`): the converter writes one or the other, by the source's stage,
  so a ZeRO-2 folder could not otherwise load into ZeRO-3;
- loaded into ZeRO-1/2/3 engines by DeepSpeed (`load_universal_checkpoint` switched on for the one
  call); into a stage-0 engine (one process in fp32, which DeepSpeed's universal loader does not
  serve) by `_load_into_stage_0`: the parameters are their own masters, the torch optimizer's state
  is set per parameter.
Only the Adam family's state (exp_avg, exp_avg_sq, step) is carried; the caller refuses others.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from argparse import Namespace
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import torch

from ds_diffusers.engine.checkpoint_files import MODEL_STATES, written_at_stage_0

ZERO_DIR = "zero"
OPTIMIZER_STATE = "optimizer_state.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def _load(path: Path, mapped: bool = False) -> Any:
    """`mapped`: memory-mapped (never for a file this module rewrites: its pages would vanish)."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mapped and zipfile.is_zipfile(path))


def _model_states(step_dir: Path) -> dict[str, Any]:
    """Rank 0's model-states file: lr schedule, step counters, ds_version."""
    name = MODEL_STATES if (step_dir / MODEL_STATES).is_file() else ZERO3_MODEL_STATES
    # Mapped: every rank asks whether a stage-0 step is convertible, and that file holds the whole
    # model and Adam state (about 10 GB for SD 1.5); only what is used is read.
    return _load(step_dir / name, mapped=True)


def stage_0_optimizer_is_plain(step_dir: Path) -> bool:
    """Whether a stage-0 folder's optimizer state is a torch optimizer's (fp32 runs), which the
    stage-0 writer reads; 16-bit stage-0 folders (FP16_Optimizer wrappers) are not."""
    optimizer = _model_states(step_dir).get("optimizer") or {}
    return "state" in optimizer and "param_groups" in optimizer


def _save_param(zero_dir: Path, name: str, key: str, value: Any) -> None:
    folder = zero_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(value if key == "step" else {"param": value}, folder / f"{key}.pt")


def _write_from_stage_0(step_dir: Path, out_dir: Path, optimizer_order: list[str]) -> None:
    """`optimizer_order`: the trainable parameters' names in the order of the optimizer's groups,
    which is how a torch optimizer's state dict numbers them."""
    states = _model_states(step_dir)
    module, optimizer = states["module"], states["optimizer"]
    zero_dir = out_dir / ZERO_DIR
    indices = [index for group in optimizer["param_groups"] for index in group["params"]]
    for index, name in zip(indices, optimizer_order):
        _save_param(zero_dir, name, "fp32", module[name].float())
        state = optimizer["state"].get(index, {})
        for key in ADAM_STATE_KEYS:
            if key in state:
                _save_param(zero_dir, name, key, state[key].float())
        if "step" in state:
            _save_param(zero_dir, name, "step", state["step"])
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer["param_groups"]]
    torch.save({"param_groups": groups, "ds_version": states.get("ds_version")}, zero_dir / OPTIMIZER_STATE)
    torch.save(states, out_dir / MODEL_STATES)


def _write_with_deepspeed(step_dir: Path, out_dir: Path) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
    # Our checkpoints carry no UNIVERSAL_CHECKPOINT_INFO (no tensor or pipeline parallelism to
    # describe): inject_missing_state supplies the empty one the converter asks for.
    # Its step-by-step prints and progress bars go nowhere: the caller announces the conversion in one line.
    with open(os.devnull, "w") as devnull, redirect_stdout(devnull), redirect_stderr(devnull):
        ds_to_universal(Namespace(input_folder=str(step_dir), output_folder=str(out_dir), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))


def _step_of(zero_dir: Path) -> Any:
    for step_file in sorted(zero_dir.glob("*/step.pt")):
        return _load(step_file)
    return None


def _complete_optimizer_state(out_dir: Path, clip_grad: float) -> None:
    """Give `optimizer_state.pt` the keys both DeepSpeed loaders read, whichever wrote it."""
    import deepspeed

    # The ZeRO-3 converter saves each state as a bare tensor, which the ZeRO-1/2 loader cannot index.
    for state_file in (out_dir / ZERO_DIR).glob("*/*.pt"):
        value = _load(state_file)
        if state_file.name != "step.pt" and isinstance(value, torch.Tensor):
            torch.save({"param": value}, state_file)
    path = out_dir / ZERO_DIR / OPTIMIZER_STATE
    state = _load(path)
    inner = state.get("optimizer_state_dict") or {}
    groups = state.get("param_groups") or inner.get("param_groups") or []
    groups = [{k: v for k, v in group.items() if k != "params"} for group in groups]
    step = _step_of(out_dir / ZERO_DIR)
    if step is None:  # the ZeRO-3 converter keeps the step in the optimizer state only; the ZeRO-1/2 loader reads step.pt
        step = next(iter((inner.get("state") or {}).values()), {}).get("step")
        for param_dir in (out_dir / ZERO_DIR).iterdir():
            if param_dir.is_dir() and step is not None:
                torch.save(step, param_dir / "step.pt")
    state.update(param_groups=groups, optimizer_state_dict={"state": {0: {"step": step}}, "param_groups": groups})
    state.setdefault("clip_grad", clip_grad)
    state["ds_version"] = state.get("ds_version") or deepspeed.__version__
    torch.save(state, path)
    # The ZeRO-3 loader reads the model-states file under its own name; the same content serves.
    if (out_dir / MODEL_STATES).is_file() and not (out_dir / ZERO3_MODEL_STATES).is_file():
        shutil.copy2(out_dir / MODEL_STATES, out_dir / ZERO3_MODEL_STATES)
    elif not (out_dir / MODEL_STATES).is_file():
        shutil.copy2(out_dir / ZERO3_MODEL_STATES, out_dir / MODEL_STATES)


def write_universal(step_dir: Path, out_dir: Path, optimizer_order: list[str], clip_grad: float) -> Path:
    """One process. `step_dir` in universal form under `out_dir` (replaced if there); the step
    folder itself is only read."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    if written_at_stage_0(step_dir):
        _write_from_stage_0(step_dir, out_dir, optimizer_order)
    else:
        _write_with_deepspeed(step_dir, out_dir)
    _complete_optimizer_state(out_dir, clip_grad)
    return out_dir


def read_universal_param(universal_dir: Path, name: str, key: str) -> torch.Tensor | Any:
    """One parameter's saved state (`fp32`, `exp_avg`, `exp_avg_sq` tensors; `step` as saved)."""
    value = _load(universal_dir / ZERO_DIR / name / f"{key}.pt")
    return value["param"] if isinstance(value, dict) else value


def _load_into_stage_0(engine: Any, universal_dir: Path) -> None:
    """A stage-0 fp32 engine: each trainable parameter is its own master; the torch optimizer's
    per-parameter state is set as its first step would have made it, with the saved values."""
    optimizer = engine.optimizer
    name_of = {id(p): name for name, p in engine.module.named_parameters()}
    saved_groups = _load(universal_dir / ZERO_DIR / OPTIMIZER_STATE)["param_groups"]
    with torch.no_grad():
        for group, saved in zip(optimizer.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k in group and k != "params"})
            for p in group["params"]:
                name = name_of[id(p)]
                p.copy_(read_universal_param(universal_dir, name, "fp32").view_as(p))
                step = read_universal_param(universal_dir, name, "step")
                state = {key: read_universal_param(universal_dir, name, key).view_as(p).to(p.device).clone()
                         for key in ADAM_STATE_KEYS}
                state["step"] = torch.tensor(float(step), dtype=torch.float32)
                optimizer.state[p] = state
    states = _model_states(universal_dir)
    if engine.lr_scheduler is not None and states.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(states["lr_scheduler"])
    engine.global_steps = states["global_steps"]
    engine.global_samples = states.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = states["skipped_steps"]


def load_universal(engine: Any, universal_dir: Path) -> None:
    """All ranks. Weights (fp32 masters and the compute copy), Adam state, lr schedule and step
    counters from a universal folder, into an engine of any stage and process count."""
    if engine.zero_optimization_stage() == 0:
        _load_into_stage_0(engine, universal_dir)
        return
    # The flag is read at load time only (`DeepSpeedEngine.load_universal_checkpoint`); set for this
    # call, the engine's own (non-universal) saves stay as they are.
    config = engine._config
    previous = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        path, _ = engine.load_checkpoint(str(universal_dir.parent), tag=universal_dir.name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True, load_module_strict=False)
    finally:
        config.load_universal_checkpoint = previous
    if path is None:
        raise RuntimeError(f"DeepSpeed found no model-states file in {universal_dir}")
