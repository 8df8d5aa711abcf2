"""wandb without a network: no two-minute hang, offline fallback said once, and a failed start leaves
nothing that blocks a plain re-run."""

from __future__ import annotations

import time

import pytest

from ds_diffusers import checkpoint_manager
from ds_diffusers.errors import ConfigError
from ds_diffusers.metrics import RunLogger, wandb_mode
from tests.helpers import checkpoint_cfg as make_cfg


@pytest.fixture
def no_wandb_env(monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("base_url", ["http://127.0.0.1:9", "https://no-such-host.invalid"])
def test_unreachable_server_means_offline_said_once_and_fast(tmp_path, no_wandb_env, base_url):
    no_wandb_env.setenv("WANDB_BASE_URL", base_url)  # refused / unresolvable on any machine
    started = time.monotonic()
    mode, notice = wandb_mode(make_cfg(tmp_path, offline=False, wandb={"enabled": True}))
    assert time.monotonic() - started < 6.0
    assert mode == "offline" and "cannot reach" in notice and "wandb sync" in notice and "\n" not in notice


def test_explicit_choices_are_obeyed(tmp_path, no_wandb_env):
    assert wandb_mode(make_cfg(tmp_path, offline=True, wandb={"enabled": True})) == ("offline", None)
    no_wandb_env.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(make_cfg(tmp_path, offline=False, wandb={"enabled": True})) == (None, None)


def test_failed_start_is_one_line_and_leaves_nothing_that_blocks_a_rerun(tmp_path, no_wandb_env):
    import wandb

    cfg = make_cfg(tmp_path, offline=True, wandb={"enabled": True})

    def failing_init(dir, **_):
        (tmp_path / "out" / "wandb" / "run-1").mkdir(parents=True)
        raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])\nmore")

    no_wandb_env.setattr(wandb, "init", failing_init)
    with pytest.raises(ConfigError) as info:
        RunLogger(cfg, is_main=True, total_steps=1, initial_step=0)
    assert info.value.field == "wandb.enabled" and "api_key not configured" in info.value.fix and "\n" not in str(info.value)
    assert not (tmp_path / "out" / "wandb").exists() and not (tmp_path / "out" / "logs").exists()
    checkpoint_manager.check_fresh_start(make_cfg(tmp_path, resume_from_checkpoint=False))  # the plain re-run may start


def test_offline_fallback_really_logs(tmp_path, no_wandb_env, capsys):
    no_wandb_env.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    no_wandb_env.setenv("WANDB_SILENT", "true")
    logger = RunLogger(make_cfg(tmp_path, offline=False, wandb={"enabled": True}), is_main=True, total_steps=1, initial_step=0)
    logger.log_step(1, {"loss": 0.5, "lr": 1e-4})
    logger.close()
    assert "logging offline" in capsys.readouterr().err
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb"))
