"""The `ds-diffusers` command: which entrypoint gets which argv, and `--help` without heavy imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ds_diffusers import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, module, forwarded", [
    (["train", "--cfg", "c.json", "--set", "seed=1"], "ds_diffusers.train", ["--cfg", "c.json", "--set", "seed=1"]),
    (["sample", "--cfg", "c.json"], "ds_diffusers.sample", ["--cfg", "c.json"]),
    (["export", "--checkpoint", "ck", "--out", "o"], "ds_diffusers.export", ["--checkpoint", "ck", "--out", "o"]),
    (["prepare-demo", "--out", "d"], "ds_diffusers.embedded", ["--out", "d"]),
    (["prepare-cache", "--cfg", "c.json"], "ds_diffusers.cache", ["--cfg", "c.json"]),
    (["print-deepspeed-config", "--cfg", "c.json"], "ds_diffusers.train", ["--print-deepspeed-config", "--cfg", "c.json"]),
    (["train", "--help"], "ds_diffusers.train", ["--help"]),  # the entrypoint's own help
    (["export"], "ds_diffusers.export", []),
])
def test_each_command_forwards_the_rest_unchanged(argv, module, forwarded):
    assert cli.dispatch(argv) == (module, forwarded)


def test_main_calls_the_entrypoint_main_and_returns_its_code(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "entrypoint", lambda module: lambda argv: calls.append((module, argv)) or 7)
    assert cli.main(["sample", "--cfg", "x"]) == 7
    assert calls == [("ds_diffusers.sample", ["--cfg", "x"])]


@pytest.mark.parametrize("module, defined_in", [
    ("ds_diffusers.train", "ds_diffusers.train"), ("ds_diffusers.sample", "ds_diffusers.sample"),
    ("ds_diffusers.embedded", "ds_diffusers.embedded.__main__"),
    ("ds_diffusers.export", "ds_diffusers.export.__main__"),
])
def test_entrypoint_is_what_python_m_runs(module, defined_in):
    main = cli.entrypoint(module)
    assert main.__name__ == "main" and main.__module__ in (defined_in if isinstance(defined_in, tuple) else (defined_in,))


def test_help_lists_the_commands_and_imports_no_torch():
    listed = subprocess.run([sys.executable, "-m", "ds_diffusers.cli", "--help"], cwd=REPO, capture_output=True, text=True)
    assert listed.returncode == 0
    for name in cli.COMMANDS:
        assert name in listed.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys\nfrom ds_diffusers import cli\ntry:\n    cli.main(['--help'])\n"
                            "except SystemExit:\n    pass\nprint('torch' in sys.modules)"], cwd=REPO, capture_output=True, text=True)
    assert probe.stdout.strip().endswith("False"), probe.stdout + probe.stderr
    unknown = subprocess.run([sys.executable, "-m", "ds_diffusers.cli", "tran"], cwd=REPO, capture_output=True, text=True)
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr
