"""The training progress bar: one count per optimizer step, whatever the log cadence, and a run
stopped early does not show 100%."""

from __future__ import annotations

from ds_diffusers.metrics import RunLogger
from tests.helpers import checkpoint_cfg as make_cfg


def _run(logger: RunLogger, steps: int, first: int = 1) -> list[int]:
    """The loop's calls at `log_every_n_steps: 1`; the bar's count after each step."""
    bar, counts = logger.bar, []
    for step in range(first, first + steps):
        logger.advance()
        logger.log_step(step, {"loss": 0.5, "lr": 1e-4, "samples_per_s": 8.0})
        counts.append(bar.n)
    return counts


def test_each_step_is_counted_once(tmp_path, capsys):
    logger = RunLogger(make_cfg(tmp_path), is_main=True, total_steps=3, initial_step=0)
    assert _run(logger, 3) == [1, 2, 3]
    logger.close()
    shown = capsys.readouterr().err.split("\r")[-1]
    assert "3/3" in shown and "4it" not in shown


def test_a_stop_at_step_2_of_4_shows_2_of_4(tmp_path, capsys):
    logger = RunLogger(make_cfg(tmp_path), is_main=True, total_steps=4, initial_step=0)
    bar = logger.bar
    assert _run(logger, 2) == [1, 2]
    logger.close()  # what train() does on a stop signal before raising Preempted
    shown = capsys.readouterr().err.split("\r")[-1]
    assert bar.n == 2 and "2/4" in shown and "100%" not in shown


def test_a_resumed_run_counts_from_its_step(tmp_path):
    logger = RunLogger(make_cfg(tmp_path), is_main=True, total_steps=6, initial_step=3)
    assert _run(logger, 2, first=4) == [4, 5]
    logger.close()
