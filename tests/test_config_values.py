"""Values a user writes by mistake: NaN and ±Infinity (Python's json reads them), numbers in quotes,
a folder as `--cfg`, keys under another tool's name. Each is one line naming the field, the value and
the fix, exit code 2, and nothing written."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from ds_diffusers.config import apply_overrides, load_config
from ds_diffusers.errors import ConfigError
from tests.helpers import REPO, environment_cfg, error_of, with_changes

NAN, INF = float("nan"), float("inf")


def adamw(**params) -> dict:
    return {"optimizer": {"type": "AdamW", "params": {"lr": 1e-4, **params}}}


@pytest.mark.parametrize("change, field", [
    (adamw(lr=NAN), "optimizer.params.lr"),
    (adamw(lr=INF), "optimizer.params.lr"),
    (adamw(weight_decay=INF), "optimizer.params.weight_decay"),
    (adamw(eps=NAN), "optimizer.params.eps"),
    (adamw(betas=[0.9, NAN]), "optimizer.params.betas"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": -INF}}}, "scheduler.params.warmup_max_lr"),
    ({"noise_offset": NAN}, "noise_offset"),  # a typed float with ge=0: NaN >= 0 is False, but so is NaN < 0
    ({"gradient_clipping": INF}, "gradient_clipping"),
    ({"use_lora": {"action": True, "alpha": INF}}, "use_lora.alpha"),
    ({"resolution": INF}, "resolution"),  # an int field says "not a finite number", not "not a valid integer"
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}, "param_groups": [{"match": "attn", "lr_scale": NAN}]}},
     "optimizer.param_groups.0.lr_scale"),
    ({"sample": {"lora_scale": NAN}}, "sample.lora_scale"),
])
def test_non_finite_numbers_are_refused_everywhere(change, field):
    err = error_of(with_changes(**change))
    assert err.field == field and "not a finite number" in err.fix and "\n" not in str(err)
    assert not (isinstance(err.value, float) and math.isfinite(err.value))


@pytest.mark.parametrize("override, field", [
    ("optimizer.params.lr=NaN", "optimizer.params.lr"),
    ("optimizer.params.weight_decay=Infinity", "optimizer.params.weight_decay"),
    ("validation_guidance_scale=-Infinity", "validation_guidance_scale"),
])
def test_non_finite_overrides_are_refused(override, field):
    err = error_of(apply_overrides(with_changes(), [override]))
    assert err.field == field and "not a finite number" in err.fix


@pytest.mark.parametrize("change, field, fragment", [
    (adamw(lr="1e-4"), "optimizer.params.lr", 'it is a string; write it without quotes: "lr": 1e-4'),
    (adamw(weight_decay="0.01"), "optimizer.params.weight_decay", 'without quotes: "weight_decay": 0.01'),
    ({"noise_offset": "0.1"}, "noise_offset", 'without quotes: "noise_offset": 0.1'),
    ({"use_lora": {"action": "true"}}, "use_lora.action", 'without quotes: "action": true'),
    ({"resolution": "big"}, "resolution", "it is a string; write a number or true/false, without quotes"),
])
def test_numbers_in_quotes_say_they_are_strings(change, field, fragment):
    err = error_of(with_changes(**change))
    assert err.field == field and fragment in err.fix


@pytest.mark.parametrize("key, fragment", [
    ("learning_rate", "diffusers' --learning_rate is 'optimizer.params.lr' here"),
    ("lr", "did you mean 'optimizer.params.lr'?"),
    ("weight_decay", "did you mean 'optimizer.params.weight_decay'?"),
    ("lora_rank", "did you mean 'use_lora.rank'?"),
    ("zero_stage", "did you mean 'zero_optimization.stage'?"),
    ("max_grad_norm", "'gradient_clipping'"),
    ("mixed_precision", "'use_fp16.enabled' or 'bf16.enabled'"),
    ("batch_size", "did you mean 'train_micro_batch_size_per_gpu'?"),
    ("model", "did you mean 'pretrained_model_name_or_path'?"),
])
def test_unknown_top_level_key_suggests_the_nearest_name(key, fragment):
    err = error_of(with_changes(**{key: 1}))
    assert err.field == key and "unknown key" in err.fix and fragment in err.fix


def test_cfg_folder_is_called_a_folder_with_a_file_to_pass(tmp_path):
    (tmp_path / "sd15.json").write_text("{}")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.field == "--cfg" and "no such file" not in info.value.fix
    assert "is a folder" in info.value.fix and str(tmp_path / "sd15.json") in info.value.fix


def _cfg_file(tmp_path, **params) -> str:
    """A cfg file on a stub model that passes every start-up check, with these optimizer params."""
    raw = environment_cfg(tmp_path).model_dump(mode="json")
    raw["optimizer"]["params"].update(params)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(raw))  # NaN is written as NaN, which json.loads reads back
    return str(path)


def test_nan_lr_in_the_file_stops_train_main_before_writing(tmp_path, capsys):
    from ds_diffusers.train import main

    cfg_file = _cfg_file(tmp_path, lr=NAN)
    assert '"lr": NaN' in (tmp_path / "run.json").read_text()
    assert main(["--cfg", cfg_file]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ds-diffusers: config error: optimizer.params.lr=nan: not a finite number (NaN and ±Infinity are "
                   "refused); write a finite number, e.g. the default (docs/config.md)"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt").exists()


def test_infinite_weight_decay_override_through_python_m(tmp_path):
    cfg_file = _cfg_file(tmp_path)
    result = subprocess.run([sys.executable, "-m", "ds_diffusers.train", "--cfg", cfg_file, "--set",
                             "optimizer.params.weight_decay=Infinity"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("ds-diffusers:")]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("ds-diffusers: config error: optimizer.params.weight_decay=inf: not a finite")
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt").exists()
