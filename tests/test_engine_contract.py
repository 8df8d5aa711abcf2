"""Contract with DeepSpeed's internals: one test per private attribute, hook or file layout that
`ds_diffusers/engine/` relies on, run against the installed DeepSpeed on tiny in-process engines.

On a version bump a failure names the internal that moved and the module that uses it, e.g.
"DeepSpeed internal moved: param._hp_mapping.hp_fragment (used by engine/masters.py)". The stage
is set explicitly here, not by `engine_zero_stage`: the contract is about what each stage's engine
holds, whatever stage the policy picks.
"""

from __future__ import annotations

import gc
import inspect
import math
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ds_diffusers.config import to_deepspeed_config, validate_dict
from ds_diffusers.engine import (MasterWeights, full_numel, full_shape, gathered, is_zero3_param, local_partition,
                                 mmap_checkpoint_reads, optimizer_fp32_tensors, release_checkpoint_files, skip_nonfinite_steps,
                                 skip_single_rank_allreduce)
from ds_diffusers.engine.checkpoint_files import BF16_OPTIMIZER_STATES, MODEL_STATES, deepspeed_writer_rank, read_fp32_state
from ds_diffusers.engine.params import partition_numel, regather_held

MICRO = 4
# (stage, precision, gradient accumulation): one engine of each optimizer class DeepSpeed builds on a CPU.
ENGINES = {
    "stage0-fp32": (0, "fp32", 1),  # a plain torch optimizer
    "stage0-bf16": (0, "bf16", 1),  # FP16_UnfusedOptimizer
    "stage1-fp32": (1, "fp32", 1),  # DeepSpeedZeroOptimizer
    "stage1-bf16-accum": (1, "bf16", 2),  # BF16_Optimizer (fp32 gradient accumulation)
    "stage2-bf16": (2, "bf16", 1),  # DeepSpeedZeroOptimizer
    "stage3-fp32": (3, "fp32", 1),  # DeepSpeedZeroOptimizer_Stage3
    "stage3-bf16": (3, "bf16", 1),
}


def moved(internal: str, user: str) -> str:
    return f"DeepSpeed internal moved: {internal} (used by {user})"


def ds_config(stage: int, precision: str, accumulation: int = 1, clipping: float = 0.0, offload: str = "none") -> dict:
    cfg = validate_dict({"pretrained_model_name_or_path": ".", "dataset_dir": ".", "train_micro_batch_size_per_gpu": MICRO,
                         "gradient_accumulation_steps": accumulation, "gradient_clipping": clipping,
                         "scheduler": {"type": "none"}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
                         **({"zero_optimization": {"stage": stage, "offload_optimizer": {"device": offload}}}
                            if offload != "none" else {}),
                         **({"bf16": {"enabled": True}} if precision == "bf16" else {})})
    config = to_deepspeed_config(cfg, world_size=1)
    config["zero_optimization"]["stage"] = stage
    return config


def build(name: str, clipping: float = 0.0, offload: str = "none"):
    import deepspeed

    stage, precision, accumulation = ENGINES[name]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                      config=ds_config(stage, precision, accumulation, clipping, offload))
    return engine


def train_step(engine, poison: bool = False) -> None:
    """One optimizer step; `poison` makes every gradient nan."""
    dtype = next(engine.module.parameters()).dtype
    for _ in range(engine.gradient_accumulation_steps()):
        inputs = torch.randn(MICRO, 8)
        loss = engine(inputs.to(dtype)).float().pow(2).mean()
        engine.backward(loss * math.nan if poison else loss)
        engine.step()


def full_fp32(engine) -> dict[str, torch.Tensor]:
    """DeepSpeed's own (public) reassembly of the fp32 masters, the reference for ours (ZeRO-1/2/3
    and BF16_Optimizer; it has none at stage 0)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p).detach().clone() for name, p in engine.module.named_parameters()}


def gathered_masters(engine) -> dict[str, torch.Tensor]:
    masters = MasterWeights(engine)
    return masters.gather_full(masters.local())


# ZeRO-3 parameters (engine/params.py, masters.py, zero_load.py, ema.py, export/write.py)

@pytest.mark.parametrize("name", ["stage3-fp32", "stage3-bf16"])
def test_zero3_parameter_bookkeeping(one_rank, name):
    engine = build(name)
    shapes = {"0.weight": (16, 8), "0.bias": (16,), "2.weight": (8, 16), "2.bias": (8,)}
    for param_name, param in engine.module.named_parameters():
        assert is_zero3_param(param), moved("param.ds_id (marks a ZeRO-3 parameter)", "engine/params.py")
        assert param.data.numel() == 0, moved("ZeRO-3 parameter .data as an empty placeholder", "engine/params.py")
        assert tuple(full_shape(param)) == shapes[param_name], moved("param.ds_shape", "engine/params.py")
        assert full_numel(param) == math.prod(shapes[param_name]), moved("param.ds_numel", "engine/params.py")
        partition = local_partition(param)
        assert partition.dim() == 1 and partition.numel() == partition_numel(param) >= full_numel(param), \
            moved("param.ds_tensor (1-D partition) and ds_tensor.ds_numel (its size)", "engine/params.py, engine/masters.py")


def test_gathered_parameters_gather_and_modifier_rank_broadcasts(one_rank):
    engine = build("stage3-fp32")
    param = engine.module[0].weight
    with gathered([param], modifier_rank=0):
        assert tuple(param.shape) == (16, 8), moved("deepspeed.zero.GatheredParameters (full values inside)", "engine/params.py")
        param.data.fill_(1.5)
    assert torch.equal(local_partition(param)[:full_numel(param)], torch.full((128,), 1.5)), \
        moved("deepspeed.zero.GatheredParameters(modifier_rank=) re-partitions the change", "engine/zero_load.py")


def test_zero_init_partitions_modules_built_inside(one_rank):
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=ds_config(3, "fp32")):
        layer = torch.nn.Linear(8, 16)
    assert all(is_zero3_param(p) for p in layer.parameters()), moved("deepspeed.zero.Init(config_dict_or_path=)", "engine/zero_load.py")


# Where the fp32 masters live (engine/masters.py; EMA and exports read them)

@pytest.mark.parametrize("name, offload", [("stage3-fp32", "none"), ("stage3-bf16", "none"), ("stage3-bf16", "cpu")])
def test_zero3_local_fp32_partition(one_rank, name, offload):
    from deepspeed.utils import safe_get_local_fp32_param

    engine = build(name, offload=offload)
    train_step(engine)
    reference = full_fp32(engine)
    optimizer = engine.optimizer
    flats = {flat.untyped_storage().data_ptr() for flat in getattr(optimizer, "fp32_partitioned_groups_flat", [])}
    for (param_name, param), (ours, start) in zip(engine.module.named_parameters(), MasterWeights(engine).local()):
        local = safe_get_local_fp32_param(param)
        assert local is not None and local.dtype == torch.float32 and local.numel() == partition_numel(param), \
            moved("deepspeed.utils.safe_get_local_fp32_param (this rank's fp32 partition)", "engine/masters.py")
        assert torch.equal(local.view(-1)[:full_numel(param)], reference[param_name].view(-1)), \
            moved("safe_get_local_fp32_param: rank r holds [r * ds_tensor.ds_numel, ...)", "engine/masters.py")
        # Ours is found as get_local_fp32_param finds it, without its copy to the accelerator.
        assert param._z3_optimizer is optimizer and not optimizer._swappable_optimizer_subgroup(0), \
            moved("param._z3_optimizer / DeepSpeedZeroOptimizer_Stage3._swappable_optimizer_subgroup", "engine/masters.py")
        assert start == 0 and torch.equal(ours, local.view(-1)) and ours.untyped_storage().data_ptr() in flats, \
            moved("Stage3 grad_position[get_param_id(p)] = (group, offset, numel) into fp32_partitioned_groups_flat",
                  "engine/masters.py")
    assert optimizer.offload_optimizer == (offload == "cpu") and all(
        flat.device.type == "cpu" for flat in optimizer.fp32_partitioned_groups_flat)


@pytest.mark.parametrize("name", ["stage1-fp32", "stage1-bf16-accum", "stage2-bf16"])
def test_zero12_compute_copy_is_the_masters_cast(one_rank, tmp_path, name):
    """What lets the EMA swap rebuild the compute copy from the masters instead of cloning it: DeepSpeed
    copies its fp32 partitions into the 16-bit ones after each step and on load (load_from_fp32_weights)."""
    engine = build(name)
    for _ in range(2):
        train_step(engine)

    def check(when: str) -> None:
        masters = gathered_masters(engine)
        for param_name, param in engine.module.named_parameters():
            assert param.data.untyped_storage().data_ptr() != param._hp_mapping.hp_fragment.untyped_storage().data_ptr()
            assert torch.equal(param.data, masters[param_name].to(param.dtype)), \
                moved(f"{type(engine.optimizer).__name__}: compute copy = fp32 masters cast ({when})", "engine/masters.py")

    check("after a step")
    engine.save_checkpoint(str(tmp_path), tag="step_2", save_latest=False)
    saved = gathered_masters(engine)
    train_step(engine)
    engine.load_checkpoint(str(tmp_path), tag="step_2")
    assert all(torch.equal(saved[n], t) for n, t in gathered_masters(engine).items())
    check("after load_checkpoint")


def test_zero3_persistent_parameters_stay_gathered(one_rank):
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    engine = build("stage3-bf16")  # DeepSpeed's default threshold (1e5 elements) makes every parameter here persistent
    train_step(engine)
    params = list(engine.module.parameters())
    assert all(p.ds_persist and p.ds_status == ZeroParamStatus.AVAILABLE and p.data.numel() == full_numel(p) for p in params), \
        moved("param.ds_persist / ds_status AVAILABLE (persistent parameters gathered between steps)", "engine/params.py")
    with torch.no_grad():
        for p in params:
            local_partition(p).add_(1)
    regather_held(params)
    assert all(p.ds_status == ZeroParamStatus.AVAILABLE and torch.equal(p.data.view(-1), local_partition(p)[:full_numel(p)])
               for p in params), moved("param.partition(list) / param.all_gather(list) re-gathering from ds_tensor",
                                       "engine/params.py")


@pytest.mark.parametrize("name", ["stage1-fp32", "stage1-bf16-accum", "stage2-bf16"])
def test_hp_mapping_fragments_follow_the_optimizer(one_rank, name):
    engine = build(name)
    before = {n: p._hp_mapping.hp_fragment.detach().clone() for n, p in engine.module.named_parameters()
              if getattr(p, "_hp_mapping", None) is not None}
    assert len(before) == 4, moved("param._hp_mapping (ZeRO-1/2 and BF16_Optimizer fragments)", "engine/masters.py")
    train_step(engine)
    reference = full_fp32(engine)
    for param_name, param in engine.module.named_parameters():
        mapping = param._hp_mapping
        assert mapping.hp_fragment.dtype == torch.float32, moved("param._hp_mapping.hp_fragment (fp32)", "engine/masters.py")
        # One rank holds every fragment whole, at offset 0 of the flattened parameter.
        assert mapping.lp_fragment_address.start == 0 and mapping.lp_fragment_address.numel == param.numel(), \
            moved("param._hp_mapping.lp_fragment_address.start/numel", "engine/masters.py")
        # A view of the live masters, not a copy taken at initialize: the EMA reads it every step.
        assert torch.equal(mapping.hp_fragment.view(-1), reference[param_name].view(-1)) \
            and not torch.equal(mapping.hp_fragment, before[param_name]), \
            moved("param._hp_mapping.hp_fragment as a view of the optimizer's fp32 partition", "engine/masters.py")


def test_stage0_16bit_optimizer_keeps_fp32_groups(one_rank):
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

    engine = build("stage0-bf16")
    optimizer = engine.optimizer
    assert hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "fp32_groups"), \
        moved("optimizer.fp16_groups / fp32_groups (FP16_UnfusedOptimizer at stage 0)", "engine/masters.py")
    for low, high in zip(optimizer.fp16_groups, optimizer.fp32_groups):
        assert [p.shape for p in low] == [m.shape for m in high] and all(m.dtype == torch.float32 for m in high), \
            moved("optimizer.fp32_groups (one fp32 master per 16-bit parameter, same order)", "engine/masters.py")
    # The fused wrapper (fp16 on a GPU) cannot be built on a CPU: its flat buffer is checked by source.
    assert "self.fp32_groups_flat" in inspect.getsource(FP16_Optimizer.__init__), \
        moved("FP16_Optimizer.fp32_groups_flat", "engine/masters.py")


@pytest.mark.parametrize("name", list(ENGINES))
def test_master_weights_equal_deepspeeds_full_fp32_params(one_rank, name):
    engine = build(name)
    train_step(engine)
    ours = gathered_masters(engine)
    params = dict(engine.module.named_parameters())
    assert ours.keys() == params.keys() and all(t.dtype == torch.float32 for t in ours.values())
    # Stage 0 has no DeepSpeed reassembly: the 16-bit compute copy is the master rounded, an fp32
    # parameter its own master.
    reference = full_fp32(engine) if ENGINES[name][0] > 0 else {n: p.detach() for n, p in params.items()}
    for param_name, tensor in reference.items():
        assert torch.equal(ours[param_name].to(tensor.dtype), tensor), \
            moved(f"fp32 masters of {type(engine.optimizer).__name__} (differ from safe_get_full_fp32_param)", "engine/masters.py")


def test_zero3_optimizer_keeps_flat_fp32_partitions_outside_step(one_rank):
    engine = build("stage3-bf16")
    train_step(engine)
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    assert flats and all(flat.dtype == torch.float32 for flat in flats), \
        moved("DeepSpeedZeroOptimizer_Stage3.fp32_partitioned_groups_flat", "engine/overflow.py")
    # Why the inner optimizer's groups cannot be read instead: ZeRO-3 empties them after step().
    assert not [p for group in engine.optimizer.optimizer.param_groups for p in group["params"]]


@pytest.mark.parametrize("name", ["stage0-bf16", "stage2-bf16", "stage3-bf16"])
def test_weight_check_sees_a_nonfinite_master(one_rank, name):
    from ds_diffusers.nonfinite import master_weights_finite

    engine = build(name)
    train_step(engine)
    assert master_weights_finite(engine, torch.device("cpu"))
    master, _ = MasterWeights(engine).local()[0]
    with torch.no_grad():
        master[0] = math.inf
    assert not master_weights_finite(engine, torch.device("cpu")), \
        moved(f"the fp32 masters of {type(engine.optimizer).__name__} as the tensors its optimizer steps", "engine/overflow.py")


@pytest.mark.parametrize("name", list(ENGINES))
def test_wrapped_torch_optimizer_holds_the_fp32_masters(one_rank, name):
    engine = build(name)
    train_step(engine)
    tensors = optimizer_fp32_tensors(engine)
    trainable = sum(full_numel(p) for p in engine.module.parameters())
    assert tensors and all(t.dtype == torch.float32 for t in tensors) and sum(t.numel() for t in tensors) >= trainable, \
        moved(f"the fp32 tensors {type(engine.optimizer).__name__} steps (engine.optimizer.optimizer)", "engine/overflow.py")


# Skipping non-finite steps (engine/overflow.py)

def test_stage0_engine_clips_through_clip_fp32_gradients(one_rank):
    engine = build("stage0-fp32", clipping=1.0)
    assert callable(getattr(engine, "clip_fp32_gradients", None)) and engine.gradient_clipping() == 1.0, \
        moved("engine.clip_fp32_gradients / engine.gradient_clipping()", "engine/overflow.py")
    skip_nonfinite_steps(engine)
    calls = []
    patched = engine.clip_fp32_gradients
    engine.clip_fp32_gradients = lambda: calls.append(1) or patched()
    train_step(engine)
    assert calls == [1], moved("engine.step calling engine.clip_fp32_gradients (stage 0, fp32)", "engine/overflow.py")


def test_bf16_zero12_optimizer_checks_overflow_by_default(one_rank):
    engine = build("stage2-bf16")
    assert engine.optimizer.check_grad_overflow is True, \
        moved("DeepSpeedZeroOptimizer.check_grad_overflow (on by bf16's default; it alone makes a bf16 ZeRO-1/2 "
              "step skip on a non-finite norm)", "engine/overflow.py")


class ScanCounter(TorchDispatchMode):
    """Counts the whole-tensor finiteness scans (isinf/isnan/isfinite, amax/amin) an optimizer step
    runs on more than one element: the work a skip decision costs beyond the norm."""

    SCANS = {"isinf", "isnan", "isfinite", "amax", "amin"}

    def __init__(self) -> None:
        super().__init__()
        self.scans: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SCANS and isinstance(args[0], torch.Tensor) and args[0].numel() > 1:
            self.scans.append((name, args[0].numel()))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["stage1-fp32", "stage3-fp32", "stage3-bf16"])
def test_skip_decision_costs_no_scan_beyond_the_norm(one_rank, name):
    """ZeRO-3 (every dtype) and ZeRO-1/2 in fp32 decide from the gradient norm their step computes
    for clipping; a finiteness scan on top reads the whole gradient partition again (two bool
    tensors of its size under ZeRO-3), an all-reduce and a host sync per step."""
    engine = build(name)
    skip_nonfinite_steps(engine)
    dtype = next(engine.module.parameters()).dtype
    engine.backward(engine(torch.randn(MICRO, 8).to(dtype)).float().pow(2).mean())
    with ScanCounter() as counter:
        engine.step()
    assert counter.scans == [], f"{type(engine.optimizer).__name__} scans the gradients beyond the norm: {counter.scans}"


@pytest.mark.parametrize("name, offload", [("stage1-fp32", "none"), ("stage2-bf16", "none"), ("stage3-fp32", "none"),
                                           ("stage3-bf16", "none"), ("stage2-bf16", "cpu"), ("stage3-bf16", "cpu")])
def test_one_infinite_gradient_element_skips_the_step(one_rank, name, offload):
    """The norm sees a single inf as surely as a scan would, with the optimizer offloaded too (where
    ZeRO-3 sums per-parameter norms on the host)."""
    engine = build(name, offload=offload)
    skip_nonfinite_steps(engine)
    before = gathered_masters(engine)
    dtype = next(engine.module.parameters()).dtype
    weight = next(engine.module.parameters())
    weight.register_hook(lambda grad: grad.index_put((torch.tensor([0]),) * grad.dim(), torch.tensor(math.inf, dtype=grad.dtype)))
    engine.backward(engine(torch.randn(MICRO, 8).to(dtype)).float().pow(2).mean())
    engine.step()
    assert engine.skipped_steps == 1 and all(torch.equal(gathered_masters(engine)[n], before[n]) for n in before), \
        moved(f"{type(engine.optimizer).__name__}.step skipping on an invalid gradient norm (is_invalid_grad_norm)",
              "engine/overflow.py")


@pytest.mark.parametrize("name", list(ENGINES))
def test_nonfinite_gradients_are_skipped_and_counted(one_rank, name):
    engine = build(name)
    skip_nonfinite_steps(engine)
    before = gathered_masters(engine)
    train_step(engine, poison=True)
    assert engine.skipped_steps == 1, moved(f"optimizer.overflow -> engine.skipped_steps under {type(engine.optimizer).__name__}",
                                            "engine/overflow.py")
    after = gathered_masters(engine)
    assert all(torch.equal(after[n], before[n]) for n in before), \
        moved(f"a skipped step leaves the masters of {type(engine.optimizer).__name__} untouched", "engine/overflow.py")
    train_step(engine)
    assert engine.skipped_steps == 1 and not all(torch.equal(gathered_masters(engine)[n], before[n]) for n in before)


# Memory-mapped checkpoint reads (engine/checkpoint_reads.py)

def _anonymous_rss_mb() -> float:
    """This process's private (anonymous) resident memory; a memory-mapped file's pages are not in it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssAnon in /proc/self/status")


def _saved_stage0_engine(width: int, tmp_path: Path):
    """A ZeRO-0 fp32 engine of one Linear(width, width) with mapped checkpoint reads, one step taken and
    saved as tmp_path/t; with the weight's AdamW state as saved."""
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Linear(width, width)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config(0, "fp32"))
    mmap_checkpoint_reads(engine)
    engine.backward(engine(torch.randn(MICRO, width)).pow(2).mean())
    engine.step()
    engine.save_checkpoint(str(tmp_path), tag="t")
    return engine, model, {key: value.clone() for key, value in engine.optimizer.state[model.weight].items()}


def test_stage0_resume_reads_the_optimizer_state_memory_mapped(one_rank, tmp_path):
    """Every rank reads the model-states file whole; under ZeRO-0 it holds the full optimizer state.
    Memory-mapped, loading it adds (almost) no private memory, and the round trip is exact."""
    engine, model, saved = _saved_stage0_engine(2000, tmp_path)  # about 48 MB of fp32 weights and AdamW state
    reads = []
    patched = engine.checkpoint_engine.load
    engine.checkpoint_engine.load = lambda path, map_location=None: reads.append(Path(path).name) or patched(path, map_location)
    before = _anonymous_rss_mb()
    engine.load_checkpoint(str(tmp_path), tag="t")
    grown = _anonymous_rss_mb() - before
    assert "mp_rank_00_model_states.pt" in reads, moved("engine.load_checkpoint reading through engine.checkpoint_engine.load",
                                                        "engine/checkpoint_reads.py")
    restored = engine.optimizer.state[model.weight]
    assert all(torch.equal(restored[key], value) for key, value in saved.items())
    file_mb = (tmp_path / "t" / "mp_rank_00_model_states.pt").stat().st_size / 2**20
    assert grown < file_mb / 4, f"loading a {file_mb:.0f} MB checkpoint added {grown:.0f} MB of private memory"


def _mapped_files(folder: Path) -> set[str]:
    return {line.split(maxsplit=5)[-1].strip() for line in Path("/proc/self/maps").read_text().splitlines()
            if str(folder) in line}


def test_a_resumed_step_is_not_held_mapped(one_rank, tmp_path):
    """torch's Optimizer.load_state_dict keeps a host tensor as it is, so the mapped state stayed backed
    by the step's file for the whole run (pruning it freed no space; on NFS it left the folder behind).
    After `release_checkpoint_files` nothing of the step folder is mapped and the state is unchanged."""
    engine, model, saved = _saved_stage0_engine(200, tmp_path)
    engine.load_checkpoint(str(tmp_path), tag="t")
    gc.collect()
    assert _mapped_files(tmp_path / "t"), "the loaded optimizer state no longer aliases the mapped file: release is moot"
    release_checkpoint_files(engine)
    gc.collect()
    assert not _mapped_files(tmp_path / "t")
    restored = engine.optimizer.state[model.weight]
    assert all(torch.equal(restored[key], value) for key, value in saved.items())


# The single-rank all-reduce switch (engine/stage.py)

def test_backward_allreduce_switch(one_rank):
    engine = build("stage0-fp32")
    assert engine.enable_backward_allreduce is True, moved("engine.enable_backward_allreduce", "engine/stage.py")
    calls = []
    engine.allreduce_gradients = lambda *args, **kwargs: calls.append(1)
    train_step(engine)
    assert calls, moved("engine.backward calling allreduce_gradients while enable_backward_allreduce", "engine/stage.py")
    skip_single_rank_allreduce(engine, world_size=1, engine_stage=0)
    calls.clear()
    train_step(engine)
    assert not calls, moved("engine.enable_backward_allreduce = False skipping the all-reduce", "engine/stage.py")


# Checkpoint files (engine/checkpoint_files.py, read by the offline export)

@pytest.mark.parametrize("name", ["stage0-fp32", "stage0-bf16", "stage1-bf16-accum", "stage2-bf16", "stage3-bf16"])
def test_checkpoint_files_hold_the_fp32_masters(one_rank, tmp_path, name):
    engine = build(name)
    train_step(engine)
    engine.save_checkpoint(str(tmp_path), tag="step_1", save_latest=False)
    step_dir = tmp_path / "step_1"
    stage = ENGINES[name][0]
    if stage == 0:
        states = torch.load(step_dir / MODEL_STATES, map_location="cpu", weights_only=False)
        assert "module" in states and "optimizer" in states, moved(f"{MODEL_STATES} with 'module' and 'optimizer'",
                                                                   "engine/checkpoint_files.py")
        if ENGINES[name][1] == "bf16":
            assert "fp32_groups" in states["optimizer"], moved(f"{MODEL_STATES}['optimizer']['fp32_groups']",
                                                               "engine/checkpoint_files.py")
    if name == "stage1-bf16-accum":
        files = sorted(step_dir.glob(BF16_OPTIMIZER_STATES))
        assert [int(f.name.split("_")[4]) for f in files] == [0], moved(BF16_OPTIMIZER_STATES + " (rank at field 4)",
                                                                        "engine/checkpoint_files.py")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["optimizer_state_dict"]
        address = next(iter(state["param_slice_mappings"][0].values()))
        assert state["single_partition_of_fp32_groups"] and hasattr(address, "start") and hasattr(address, "numel"), \
            moved("BF16_Optimizer single_partition_of_fp32_groups / param_slice_mappings", "engine/checkpoint_files.py")
    # checkpoint_digests: each rank hashes the files DeepSpeed names with its rank, rank 0 the unranked ones
    assert all(deepspeed_writer_rank(f.name) == 0 and (f.name == MODEL_STATES or "zero_pp_rank_0_" in f.name)
               for f in step_dir.iterdir()), \
        moved(f"step-folder file names ({MODEL_STATES}, *zero_pp_rank_<R>_*: {sorted(f.name for f in step_dir.iterdir())})",
              "engine/checkpoint_files.py deepspeed_writer_rank")
    names = [n for n, _ in engine.module.named_parameters()]
    shapes = {n: full_shape(p) for n, p in engine.module.named_parameters()}
    state = read_fp32_state(step_dir, stage, trainable_only=False, optimizer_order=names, shapes=shapes)
    reference = gathered_masters(engine)
    assert all(torch.equal(state[n], reference[n]) for n in names), \
        moved(f"the checkpoint files of {type(engine.optimizer).__name__} (fp32 masters read back differ)",
              "engine/checkpoint_files.py")


def test_zero_to_fp32_reader_signature():
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    parameters = inspect.signature(get_fp32_state_dict_from_zero_checkpoint).parameters
    assert {"checkpoint_dir", "tag", "exclude_frozen_parameters"} <= set(parameters), \
        moved("deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(tag=, exclude_frozen_parameters=)",
              "engine/checkpoint_files.py")


# Universal checkpoints: resuming on another topology (engine/universal.py)

def _adam_state(engine) -> dict[str, torch.Tensor]:
    """Full fp32 masters and Adam moments by name: DeepSpeed's public getters under ZeRO, the torch
    optimizer's own state at stage 0 (where the parameter is its master)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    out = {}
    for name, p in engine.module.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            value = (engine.optimizer.state[p][key] if engine.zero_optimization_stage() == 0
                     else safe_get_full_optimizer_state(p, key))
            out[f"{name}/{key}"] = value.detach().float().clone()
    masters = full_fp32(engine) if engine.zero_optimization_stage() else {n: p.detach().clone() for n, p in
                                                                         engine.module.named_parameters()}
    return {**out, **{f"{name}/fp32": value.float() for name, value in masters.items()}}


@pytest.mark.parametrize("source, target", [("stage1-fp32", "stage0-fp32"), ("stage0-fp32", "stage3-fp32"),
                                            ("stage3-fp32", "stage1-fp32"), ("stage2-bf16", "stage3-bf16")])
def test_universal_round_trip_between_stages(one_rank, tmp_path, source, target):
    """A step folder of one stage, converted (`write_universal`: DeepSpeed's ds_to_universal for
    ZeRO, ours for stage 0) and loaded into an engine of another (`load_universal`: DeepSpeed's
    universal loader for ZeRO, ours for stage 0): masters, Adam moments, step and lr schedule arrive
    unchanged, and the next step is the one the source would make."""
    from ds_diffusers.engine.universal import load_universal, write_universal

    saved = build(source)
    train_step(saved)
    train_step(saved)
    saved.save_checkpoint(str(tmp_path), tag="step_2", save_latest=False)
    names = [n for n, _ in saved.module.named_parameters()]
    universal = write_universal(tmp_path / "step_2", tmp_path / ".universal" / "step_2", names, 0.0)
    loaded = build(target)
    load_universal(loaded, universal)
    expected, got = _adam_state(saved), _adam_state(loaded)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), \
        moved(f"universal checkpoint write/load between {source} and {target} (state differs)", "engine/universal.py")
    assert loaded.global_steps == saved.global_steps == 2
    torch.manual_seed(1)
    train_step(saved)
    torch.manual_seed(1)
    train_step(loaded)
    after_saved, after_loaded = _adam_state(saved), _adam_state(loaded)
    tolerance = 1e-6 if "fp32" in source else 1e-2  # bf16: the compute copies round alike, reductions may not
    assert max((after_saved[k] - after_loaded[k]).abs().max().item() for k in after_saved) <= tolerance
