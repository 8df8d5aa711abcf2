"""The training progress bar: one count per optimizer step, whatever the log cadence, and a run
stopped early does not show 100%; metrics.jsonl after a resume from an older step."""

from __future__ import annotations

import re

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
    # The count, not the rate: "12192.74it/s" once made a check for "4it" fail.
    assert re.search(r"\| 3/3 \[", shown) and not re.search(r"\| [4-9]/3 \[|\| \d+it \[", shown), shown


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


def test_a_resume_from_an_older_step_drops_the_records_after_it(tmp_path):
    """After a resume from step 3 (say the step-5 checkpoint was damaged), steps 4 and 5 are logged
    again: the earlier attempt's records of them (and a line cut short by its crash) are dropped, so
    each step appears once, in order."""
    import json

    cfg = make_cfg(tmp_path)
    metrics = tmp_path / "out" / "logs" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    metrics.write_text("".join(json.dumps({"step": step, "loss": 1.0}) + "\n" for step in range(1, 6)) + '{"step": 6, "lo')
    logger = RunLogger(cfg, is_main=True, total_steps=6, initial_step=3)
    _run(logger, 3, first=4)
    logger.close()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2, 3, 4, 5, 6]
    assert [record["loss"] for record in records] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]
