"""Values that used to reach DeepSpeed, diffusers or peft unchecked: each is refused up front with one
line naming the field, the value and the fix, and nothing on disk changes."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from ds_diffusers.config import validate_dict
from ds_diffusers.config.checks import check_consistency, check_environment, check_writable_folder
from ds_diffusers.config.optimizers import DEEPSPEED_OPTIMIZERS, backend, check_optimizer_backend
from ds_diffusers.errors import ConfigError
from tests.helpers import environment_cfg, error_of, with_changes


def optimizer(type_: str, **params) -> dict:
    return {"optimizer": {"type": type_, "params": {"lr": 1e-4, **params}}}


@pytest.mark.parametrize("change, field, fragment", [
    (optimizer("SGDX"), "optimizer.type", "did you mean 'SGD'?"),
    (optimizer("sgd"), "optimizer.type", "did you mean 'SGD'?"),  # DeepSpeed looks torch names up case-sensitively
    (optimizer("LBFGS"), "optimizer.type", "closure"),
    (optimizer("AdamW", weight_decya=0.1), "optimizer.params.weight_decya", "did you mean 'weight_decay'?"),
    (optimizer("SGD", betas=[0.9, 0.99]), "optimizer.params.betas", "not a parameter of SGD"),
    (optimizer("AdamW", max_grad_norm=1.0), "optimizer.params.max_grad_norm", "gradient_clipping"),
    (optimizer("AdamW", eps=-1), "optimizer.params.eps", "non-negative"),
    (optimizer("Lion", eps=1e-8), "optimizer.params.eps", "not a parameter of Lion"),
])
def test_bad_optimizer_is_refused_with_a_suggestion(change, field, fragment):
    err = error_of(with_changes(**change))
    assert err.field == field and fragment in str(err) and "\n" not in str(err)


@pytest.mark.parametrize("type_", ["AdamW", "adamw", "ADAM", "Adagrad", "Lion", "Lamb", "Muon", "SGD", "RMSprop"])
def test_deepspeed_names_are_case_insensitive_and_torch_classes_pass(type_):
    check_consistency(validate_dict(with_changes(**optimizer(type_))))


def test_table_matches_installed_deepspeed_and_signatures():
    from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
    from deepspeed.ops.lion import DeepSpeedCPULion, FusedLion
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS as INSTALLED

    assert set(DEEPSPEED_OPTIMIZERS) == set(INSTALLED)

    def takes(cls):
        return set(inspect.signature(cls.__init__).parameters) - {"self", "params", "model_params"}

    engine_keys = {"adam_w_mode", "torch_adam", "fp32_optimizer_states"}
    assert DEEPSPEED_OPTIMIZERS["adamw"]["fused"] == takes(FusedAdam) | engine_keys
    assert DEEPSPEED_OPTIMIZERS["adamw"]["cpu"] == takes(DeepSpeedCPUAdam) - {"adamw_mode"} | engine_keys
    assert DEEPSPEED_OPTIMIZERS["lion"] == {"cpu": takes(DeepSpeedCPULion), "fused": takes(FusedLion)}
    assert DEEPSPEED_OPTIMIZERS["adagrad"]["cpu"] == takes(DeepSpeedCPUAdagrad)


def test_backend_follows_the_engine_and_checks_its_params():
    assert backend("AdamW", {}, offloads_optimizer=False, accelerator_name="cpu") == "torch"
    assert backend("AdamW", {}, offloads_optimizer=True, accelerator_name="cpu") == "cpu"
    assert backend("adam", {}, offloads_optimizer=False, accelerator_name="cuda") == "fused"
    with pytest.raises(ConfigError) as info:  # DeepSpeed's kernel takes it, torch's AdamW (CPU, no offload) does not
        check_optimizer_backend("AdamW", {"lr": 1.0, "bias_correction": False}, False, "cpu")
    assert info.value.field == "optimizer.params.bias_correction" and "torch's class" in info.value.fix
    for type_, params in (("SGD", {}), ("AdamW", {"torch_adam": True}), ("Adagrad", {})):
        with pytest.raises(ConfigError) as info:  # DeepSpeed raises ZeRORuntimeException for these under offload
            check_optimizer_backend(type_, {"lr": 1.0, **params}, True, "cpu")
        assert info.value.field == "zero_optimization.offload_optimizer.device"
    check_optimizer_backend("Lion", {"lr": 1.0}, True, "cpu")
    with pytest.raises(ConfigError) as info:
        check_optimizer_backend("Lamb", {"lr": 1.0}, False, "cpu")
    assert "needs a GPU" in info.value.fix
    with pytest.raises(ConfigError) as info:
        check_optimizer_backend("MuAdam", {"lr": 1.0}, False, "cuda")
    assert "pip install mup" in info.value.fix


@pytest.mark.parametrize("damage, fragment", [
    (lambda model: (model / "unet" / "config.json").unlink(), "config.json is missing"),
    (lambda model: (model / "vae" / "config.json").write_text("{"), "unreadable"),
    (lambda model: (model / "text_encoder" / "model.safetensors").unlink(), "holds no weights"),
    (lambda model: (model / "tokenizer" / "vocab.json").unlink(), "no vocab.json"),
])
def test_incomplete_model_folder_is_named_before_diffusers_reads_it(tmp_path, damage, fragment):
    cfg = environment_cfg(tmp_path)
    damage(tmp_path / "model")
    with pytest.raises(ConfigError) as info:
        check_environment(cfg)
    assert info.value.field == "pretrained_model_name_or_path" and fragment in info.value.fix


def test_model_folder_with_only_fp16_variant_weights_needs_the_variant(tmp_path):
    """from_pretrained without a variant finds no plain weights in such a folder and crashes; the
    check names the variant to set, and with it set the folder passes."""
    plain, with_variant = environment_cfg(tmp_path / "a"), environment_cfg(tmp_path / "b", variant="fp16")
    for root in (tmp_path / "a", tmp_path / "b"):
        for part in ("unet", "vae", "text_encoder"):
            weights = root / "model" / part / "model.safetensors"
            weights.rename(weights.with_name("model.fp16.safetensors"))
    with pytest.raises(ConfigError) as info:
        check_environment(plain)
    assert info.value.field == "variant" and "holds only variant weights (fp16); set variant to fp16" in info.value.fix
    check_environment(with_variant)


@pytest.mark.parametrize("change, field", [
    ({"seed": 2**64}, "seed"),
    ({"use_lora": {"action": True, "init": "loftq"}}, "use_lora.init"),
    ({"skip_bad_images": True, "cache_latents": True, "center_crop": True}, "skip_bad_images"),
])
def test_other_values_that_reached_libraries_unchecked(change, field):
    assert error_of(with_changes(**change)).field == field


def test_nvme_offload_needs_the_async_io_op(tmp_path, monkeypatch):
    from deepspeed.accelerator import get_accelerator

    class NoAio:
        def is_compatible(self, verbose=False):
            return False

    monkeypatch.setattr(type(get_accelerator()), "create_op_builder", lambda self, name: NoAio())
    (tmp_path / "nvme").mkdir()
    cfg = environment_cfg(tmp_path, zero_optimization={"stage": 3, "offload_param": {"device": "nvme", "nvme_path": str(tmp_path / "nvme")}})
    with pytest.raises(ConfigError) as info:
        check_environment(cfg)
    assert info.value.field == "zero_optimization.offload_param.device" and "libaio" in info.value.fix


def snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("field, value, fragment", [
    ("flops_profiler", {"enabled": True, "output_file": "{tmp}/missing/flops.txt"}, "does not exist"),
    ("flops_profiler", {"enabled": True, "output_file": "{tmp}/data"}, "is a folder"),
    ("tensorboard", {"enabled": True, "output_path": "{tmp}/a_file/tb"}, "is a file"),
    ("csv_monitor", {"enabled": True, "output_path": "{tmp}/a_file"}, "is a file"),
    ("zero_optimization", {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "{tmp}/a_file"}}, "no such folder"),
])
def test_paths_handed_to_deepspeed_are_checked(tmp_path, field, value, fragment):
    (tmp_path / "a_file").write_text("keep")
    cfg = environment_cfg(tmp_path, **{field: json.loads(json.dumps(value).replace("{tmp}", str(tmp_path)))})
    before = snapshot(tmp_path)  # taken after the cfg's model and data folders exist
    with pytest.raises(ConfigError) as info:
        check_environment(cfg)
    assert info.value.field.startswith(field) and fragment in info.value.fix
    assert snapshot(tmp_path) == before


def test_writable_check_creates_nothing(tmp_path):
    check_writable_folder(str(tmp_path / "a" / "b" / "c"), "output_dir")
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError) as info:
        check_writable_folder(str(tmp_path / "file" / "sub"), "checkpoint_dir")
    assert info.value.field == "checkpoint_dir" and "cannot be created" in info.value.fix
    assert snapshot(tmp_path) == ["file"]


def test_lora_target_that_matches_no_unet_module_is_refused(tiny_assets, tmp_path):
    overrides = {"pretrained_model_name_or_path": str(tiny_assets.model_dir), "dataset_dir": str(tiny_assets.dataset_dir),
                 "output_dir": str(tmp_path / "out"), "checkpoint_dir": str(tmp_path / "ckpt"), "use_fp16": {"enabled": False}}
    good = validate_dict(with_changes(**overrides, use_lora={"action": True, "target_modules": ["to_q", "to_out.0", "proj_in"]}))
    check_environment(good)
    bad = validate_dict(with_changes(**overrides, use_lora={"action": True, "target_modules": ["to_q", "to_qv"]}))
    with pytest.raises(ConfigError) as info:
        check_environment(bad)
    assert info.value.field == "use_lora.target_modules" and info.value.value == "to_qv"
    assert "did you mean" in info.value.fix
    assert not (tmp_path / "out").exists()
