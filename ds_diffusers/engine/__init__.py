"""Engine room: everything that knows DeepSpeed's internals, in one package.

DeepSpeed's public API (`deepspeed.initialize`, `engine.backward/step`, `save_checkpoint`) is used
where it is needed; its private attributes, monkeypatches, stage policy and checkpoint file layout
are used only here, so a version bump has one place to audit and one test to run
(tests/test_engine_contract.py names the internal that moved).

    params            ZeRO-3 parameter probes (`ds_id`, `ds_numel`, `ds_tensor`) and gathering
    masters           where the fp32 master weights live, per engine (`_hp_mapping`, `fp32_groups`)
    overflow          skipping non-finite steps (patches the optimizer's overflow check)
    stage             which ZeRO stage the engine runs, and the single-rank all-reduce switch
    zero_load         building the UNet already partitioned under ZeRO-3 (`zero.Init`)
    checkpoint_files  the fp32 masters out of DeepSpeed's checkpoint files, without an engine
    checkpoint_reads  DeepSpeed's checkpoint reads memory-mapped (`engine.checkpoint_engine.load`),
                      and the mapped files released after a resume
    universal         a step folder in DeepSpeed's universal form, loaded into an engine of another
                      process count or stage (`ds_to_universal`, `load_universal_checkpoint`)
"""

# config.deepspeed imports the stage policy from here, and the policy reads config's types: loading
# config first resolves the two in either import order.
import ds_diffusers.config  # noqa: F401  (isort: skip)
from ds_diffusers.engine.checkpoint_reads import mmap_checkpoint_reads, release_checkpoint_files
from ds_diffusers.engine.masters import MasterWeights, StartingValues
from ds_diffusers.engine.overflow import grad_norm, optimizer_fp32_tensors, skip_nonfinite_steps
from ds_diffusers.engine.params import full_numel, full_shape, gathered, is_zero3_param, local_partition
from ds_diffusers.engine.stage import accumulates_in_fp32, engine_zero_stage, skip_single_rank_allreduce
from ds_diffusers.engine.zero_load import unet_weight_files

__all__ = ["MasterWeights", "StartingValues", "unet_weight_files", "accumulates_in_fp32", "engine_zero_stage", "full_numel", "full_shape", "gathered", "grad_norm",
           "is_zero3_param", "local_partition", "mmap_checkpoint_reads", "optimizer_fp32_tensors", "release_checkpoint_files", "skip_nonfinite_steps", "skip_single_rank_allreduce"]
