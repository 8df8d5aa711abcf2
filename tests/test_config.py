"""Config loading, validation and override merging (no processes, no models)."""

from __future__ import annotations

import pytest

from ds_diffusers.config import apply_overrides, load_config, validate_dict
from ds_diffusers.config.checks import check_consistency, check_environment
from ds_diffusers.errors import ConfigError
from tests.helpers import REPO, SEED_DEFAULT, environment_cfg, error_of, with_changes


def test_seed_default_is_accepted_with_its_meaning():
    cfg = validate_dict(SEED_DEFAULT)
    check_consistency(cfg)
    assert cfg.gradient_accumulation_steps == 32
    assert cfg.use_lora.rank == 32 and cfg.use_lora.action is False
    assert cfg.use_fp16.enabled and cfg.use_fp16.initial_scale_power == 16
    assert cfg.zero_optimization.offload_param.device == "auto"
    assert cfg.weight_dtype_name == "float16"


@pytest.mark.parametrize("raw_change, field, fragment", [
    ({"resolutoin": 512}, "resolutoin", "did you mean 'resolution'"),
    ({"use_lora": {"action": True, "rnak": 4}}, "use_lora.rnak", "did you mean 'use_lora.rank'"),
    ({"resolution": "512"}, "resolution", "valid integer"),
    ({"use_fp16": {"enabled": 1}}, "use_fp16.enabled", "valid boolean"),
    ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu", "greater than or equal to 1"),
    ({"resolution": 500}, "resolution", "multiple of 8"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage", "less than or equal to 3"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}}, "zero_optimization.offload_optimizer.device", "'none', 'cpu', 'nvme' or 'auto'"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "zero_optimization.offload_param.device", "stage 3"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, "zero_optimization.offload_param.nvme_path", "nvme_path"),
    ({"bf16": {"enabled": True}}, "bf16.enabled", "both true"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": -1}}}, "optimizer.params.lr", "positive learning rate"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}, "param_groups": [{"match": "(", "lr_scale": 2}]}}, "optimizer.param_groups[0].match", "regular expression"),
    ({"scheduler": {"type": "OneCycle"}}, "scheduler.type", "WarmupLR"),
    ({"scheduler": {"type": "WarmupLR", "params": {"cos_min_ratio": 0.1}}}, "scheduler.params.cos_min_ratio", "not a parameter of WarmupLR"),
    ({"scheduler": {"type": "WarmupCosineLR", "params": {"warmup_min_lr": 0}}}, "scheduler.params.warmup_min_lr", "did you mean 'warmup_min_ratio'"),
    ({"prediction_type": "sample"}, "prediction_type", "epsilon"),
    ({"validation_prompts": []}, "validation_prompts", "nothing to validate"),
])
def test_bad_values_name_field_value_and_fix(raw_change, field, fragment):
    err = error_of(with_changes(**raw_change))
    assert err.field == field
    assert fragment in str(err)
    assert "\n" not in str(err)


def test_missing_required_key_is_reported():
    raw = with_changes()
    del raw["dataset_dir"]
    err = error_of(raw)
    assert err.field == "dataset_dir" and "missing" in err.fix


def test_overrides_merge_typed_values_without_touching_the_input():
    raw = with_changes()
    merged = apply_overrides(raw, ["use_lora.rank=8", "use_lora.action=true", "validation_prompts=[\"a\", \"b\"]", "output_dir=out/x"])
    assert merged["use_lora"] == {"action": True, "rank": 8, "alpha": 32}
    assert merged["validation_prompts"] == ["a", "b"] and merged["output_dir"] == "out/x"
    assert raw["use_lora"]["rank"] == 32
    with pytest.raises(ConfigError) as info:
        apply_overrides(raw, ["resolution.x=1"])
    assert info.value.field == "--set"
    with pytest.raises(ConfigError):
        apply_overrides(raw, ["no_equals_sign"])


def test_load_config_reports_bad_json_and_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.json")
    assert info.value.field == "--cfg"
    bad = tmp_path / "bad.json"
    bad.write_text("{\"seed\": 1,}")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "line 1" in info.value.fix


def test_environment_checks(tmp_path):
    check_environment(environment_cfg(tmp_path))
    (tmp_path / "a_file").write_text("keep me")
    for field, value, fragment in [
        ("output_dir", str(tmp_path / "a_file"), "is a file"),
        ("checkpoint_dir", str(tmp_path / "a_file" / "sub"), "is a file"),
        ("dataset_dir", str(tmp_path / "missing"), "no such folder"),
        ("pretrained_model_name_or_path", str(tmp_path / "data"), "no unet, vae"),
    ]:
        with pytest.raises(ConfigError) as info:
            check_environment(environment_cfg(tmp_path / field, **{field: value}))
        assert info.value.field == field and fragment in info.value.fix
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_fp16_on_cpu_suggests_bf16(tmp_path):
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        pytest.skip("this accelerator supports fp16")
    with pytest.raises(ConfigError) as info:
        check_environment(environment_cfg(tmp_path, use_fp16={"enabled": True}))
    assert info.value.field == "use_fp16.enabled" and "bf16" in info.value.fix


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "cfg").glob("*.json")))
def test_presets_validate(preset):
    cfg = load_config(REPO / "cfg" / preset)
    assert cfg.train_micro_batch_size_per_gpu >= 1


def test_presets_cover_the_documented_set():
    names = {p.name for p in (REPO / "cfg").glob("*.json")}
    assert {"default.json", "sd15_full.json", "sd15_lora.json", "sd15_zero3_offload.json", "sd2_768.json",
            "flux_lora.json", "flux_full.json", "sd35_lora.json", "sd35_full.json"} <= names
