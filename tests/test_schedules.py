"""Learning-rate schedules: the lr each optimizer step runs at, per `scheduler.type`, against the
formulas (diffusers' get_scheduler for its names, DeepSpeed's for its names, both counted from step 1);
zero warmup is the full lr at step 1; param groups keep their scale; a resumed schedule continues exactly."""

from __future__ import annotations

import math

import pytest
import torch

from ds_diffusers.config import validate_dict
from ds_diffusers.config.checks import check_consistency
from ds_diffusers.config.schedules import lr_scheduler_factory
from ds_diffusers.errors import ConfigError
from tests.helpers import with_changes

LR, WARMUP, TOTAL = 0.1, 3, 10


def make_cfg(kind: str, params: dict | None = None, warmup: int = WARMUP):
    cfg = validate_dict(with_changes(scheduler={"type": kind, "params": params or {}}, lr_warmup_steps=warmup,
                                     optimizer={"type": "AdamW", "params": {"lr": LR}}))
    check_consistency(cfg)
    return cfg


def lrs_used(cfg, steps: int = TOTAL + 2, group_lrs: tuple[float, ...] = (LR,)) -> list[list[float]]:
    """The lr of every group during optimizer steps 1..steps (what the step multiplies the update by)."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in group_lrs]
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, group_lrs)], lr=LR)
    scheduler = lr_scheduler_factory(cfg, TOTAL)(optimizer)
    used = []
    for _ in range(steps):
        used.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return used


def warm(s: int) -> float:
    return s / WARMUP


def cosine_restarts(s: int, cycles: int) -> float:
    progress = (s - WARMUP) / (TOTAL - WARMUP)
    return 0.0 if progress >= 1 else 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0)))


def polynomial(s: int, lr_end: float, power: float) -> float:
    if s > TOTAL:
        return lr_end / LR
    return ((LR - lr_end) * (1 - (s - WARMUP) / (TOTAL - WARMUP)) ** power + lr_end) / LR


# factor of LR at 0-based step s (step k runs at s = k - 1), for s >= WARMUP; warmup is linear from 0.
EXPECTED = {
    ("constant", None): lambda s: 1.0,
    ("constant_with_warmup", None): lambda s: 1.0,
    ("linear", None): lambda s: max(0.0, (TOTAL - s) / (TOTAL - WARMUP)),
    ("cosine", None): lambda s: 0.5 * (1 + math.cos(math.pi * (s - WARMUP) / (TOTAL - WARMUP))),
    ("cosine", (("num_cycles", 1.0),)): lambda s: 0.5 * (1 + math.cos(2 * math.pi * (s - WARMUP) / (TOTAL - WARMUP))),
    ("cosine_with_restarts", (("num_cycles", 2),)): lambda s: cosine_restarts(s, 2),
    ("polynomial", (("lr_end", 0.01), ("power", 2.0))): lambda s: polynomial(s, 0.01, 2.0),
    ("WarmupLR", None): lambda s: 1.0,
    ("WarmupDecayLR", None): lambda s: max(0.0, (TOTAL - s) / (TOTAL - WARMUP)),
    ("WarmupCosineLR", None): lambda s: 1e-4 + (1 - 1e-4) * (1 + math.cos(math.pi * min(1.0, (s - WARMUP) / (TOTAL - WARMUP)))) / 2,
}


@pytest.mark.parametrize("kind, params", list(EXPECTED))
def test_lr_at_each_step_follows_the_formula(kind, params):
    after = EXPECTED[(kind, params)]
    has_warmup = kind != "constant"
    want = [(warm(s) if has_warmup and s < WARMUP else after(s)) * LR for s in range(TOTAL + 2)]
    got = [lrs[0] for lrs in lrs_used(make_cfg(kind, dict(params or ())))]
    assert got == pytest.approx(want, abs=1e-12), kind


def test_deepspeed_names_keep_their_parameters_and_log_warmup():
    got = [lrs[0] for lrs in lrs_used(make_cfg("WarmupLR", {"warmup_min_lr": 0.01, "warmup_max_lr": 0.05}))]
    assert got == pytest.approx([0.01, 0.01 + 0.04 / 3, 0.01 + 0.08 / 3] + [0.05] * 9)
    log = [lrs[0] for lrs in lrs_used(make_cfg("WarmupLR", {"warmup_type": "log"}))]
    assert log == pytest.approx([LR * math.log(s + 1) / math.log(WARMUP) for s in range(WARMUP)] + [LR] * 9)
    ratios = [lrs[0] for lrs in lrs_used(make_cfg("WarmupCosineLR", {"warmup_min_ratio": 0.4, "cos_min_ratio": 0.2}))]
    assert ratios[:WARMUP] == pytest.approx([LR * (0.4 + 0.6 * s / WARMUP) for s in range(WARMUP)])
    assert ratios[-1] == pytest.approx(0.2 * LR)


@pytest.mark.parametrize("kind", ["WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "constant_with_warmup", "linear",
                                  "cosine", "cosine_with_restarts", "polynomial"])
def test_zero_warmup_is_the_full_lr_from_the_first_step(kind):
    got = lrs_used(make_cfg(kind, warmup=0), steps=2)
    assert got[0][0] == pytest.approx(LR), f"{kind}: step 1 must run at the full lr, got {got[0][0]}"
    assert got[1][0] <= LR + 1e-12


def test_param_groups_keep_their_lr_scale_through_the_schedule():
    for lrs in lrs_used(make_cfg("linear"), group_lrs=(LR, 2 * LR)):
        assert lrs[1] == pytest.approx(2 * lrs[0])


@pytest.mark.parametrize("kind", ["WarmupDecayLR", "cosine"])
def test_resumed_schedule_continues_the_same_curve(kind):
    cfg = make_cfg(kind)
    straight = lrs_used(cfg)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=LR)
    scheduler = lr_scheduler_factory(cfg, TOTAL)(optimizer)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()
    resumed_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    resumed = lr_scheduler_factory(cfg, TOTAL)(resumed_optimizer)
    resumed_optimizer.load_state_dict(saved_optimizer)
    resumed.load_state_dict(saved_scheduler)
    rest = []
    for _ in range(len(straight) - 5):
        rest.append([resumed_optimizer.param_groups[0]["lr"]])
        resumed_optimizer.step()
        resumed.step()
    assert rest == straight[5:]


@pytest.mark.parametrize("scheduler, field, fragment", [
    ({"type": "OneCycle"}, "scheduler.type", "cosine_with_restarts"),
    ({"type": "cosine", "params": {"warmup_min_lr": 0}}, "scheduler.params.warmup_min_lr", "not a parameter of cosine"),
    ({"type": "WarmupLR", "params": {"warmup_type": "exp"}}, "scheduler.params.warmup_type", "'linear'"),
    ({"type": "WarmupCosineLR", "params": {"cos_min_ratio": 2}}, "scheduler.params.cos_min_ratio", "[0, 1]"),
    ({"type": "linear", "params": {"total_num_steps": 10.5}}, "scheduler.params.total_num_steps", "whole number"),
    ({"type": "cosine_with_restarts", "params": {"num_cycles": 1.5}}, "scheduler.params.num_cycles", "whole number"),
    ({"type": "polynomial", "params": {"lr_end": 1.0}}, "scheduler.params.lr_end", "must not exceed"),
    ({"type": "constant", "params": {"warmup_num_steps": 5}}, "scheduler.params.warmup_num_steps", "constant takes: no params"),
])
def test_bad_scheduler_values_name_the_field(scheduler, field, fragment):
    with pytest.raises(ConfigError) as info:
        check_consistency(validate_dict(with_changes(scheduler=scheduler)))
    assert info.value.field == field and fragment in str(info.value), str(info.value)
