"""`python -m ds_diffusers.train --cfg X --print-deepspeed-config [--world-size N]`: the DeepSpeed config
the engine would get for N processes, after every adjustment (engine stage, dtypes, accumulation dtype,
batch sizes), as JSON on stdout. It writes nothing, needs no GPU and starts no process group; the model
and data are not read (hub ids are not resolved), so it runs on a login node.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable

from ds_diffusers.config.deepspeed import to_deepspeed_config
from ds_diffusers.config.load import load_config
from ds_diffusers.errors import ConfigError


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give the number of processes, 1 or more")
    return value


def add_print_options(parser: argparse.ArgumentParser) -> None:
    printing = parser.add_argument_group("inspecting a run without starting it")
    printing.add_argument("--print-deepspeed-config", action="store_true",
                          help="print the DeepSpeed config the engine would get, after every adjustment (engine stage, "
                               "dtypes, accumulation dtype, batch sizes), as JSON on stdout; writes nothing, needs no GPU, "
                               "starts no process group")
    printing.add_argument("--world-size", type=_positive, default=1, metavar="N",
                          help="with --print-deepspeed-config: the number of processes of the run (default 1)")
    printing.add_argument("--accelerator", default="cuda", metavar="NAME",
                          help="with --print-deepspeed-config: DeepSpeed's accelerator name on the cluster (default cuda; "
                               "cpu shows what a CPU run gets). DeepSpeed's fused Adam is assumed buildable there")


def print_deepspeed_config(cfg_path: str, overrides: Iterable[str], world_size: int, accelerator: str) -> int:
    """Print the translated config; exit code 0, or 2 with one line for a config error."""
    try:
        cfg = load_config(cfg_path, overrides)
    except ConfigError as err:
        print(f"ds-diffusers: config error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(to_deepspeed_config(cfg, world_size=world_size, accelerator_name=accelerator), indent=2))
    return 0
