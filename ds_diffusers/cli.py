"""The `ds-diffusers` command: each subcommand hands the rest of its command line, unchanged, to
the `main(argv)` of the entrypoint it names.

    ds-diffusers train --cfg cfg/default.json            = python -m ds_diffusers.train --cfg ...
    ds-diffusers sample --cfg cfg/default.json           = python -m ds_diffusers.sample --cfg ...
    ds-diffusers export --checkpoint DIR --out DIR       = python -m ds_diffusers.export ...
    ds-diffusers prepare-demo [--out data/embedded]      = python -m ds_diffusers.embedded ...
    ds-diffusers prepare-cache --cfg cfg/default.json    = python -m ds_diffusers.cache --cfg ...
    ds-diffusers print-deepspeed-config --cfg ...        = python -m ds_diffusers.train --print-deepspeed-config ...

Entrypoints are imported only when their subcommand runs, so `--help` costs no torch import.
Multi-GPU runs still start through the launcher (`deepspeed --module ds_diffusers.train ...`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable

# subcommand -> (module whose main(argv) runs it, argv prefix, one-line help)
COMMANDS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "train": ("ds_diffusers.train", (), "train from a cfg file (--cfg PATH [--set KEY=VALUE ...])"),
    "sample": ("ds_diffusers.sample", (), "baseline vs tuned images from a cfg file's sample block"),
    "export": ("ds_diffusers.export", (), "export a checkpoint to a diffusers folder (--checkpoint DIR --out DIR)"),
    "prepare-demo": ("ds_diffusers.embedded", (), "build the embedded tiny model and shapes dataset"),
    "prepare-cache": ("ds_diffusers.cache", (), "build a cfg file's encoder caches ahead of training (--cfg PATH)"),
    "print-deepspeed-config": ("ds_diffusers.train", ("--print-deepspeed-config",),
                               "print the DeepSpeed config a cfg file makes, without training"),
}


def entrypoint(module_name: str) -> Callable[[list[str]], int]:
    """The `main` that `python -m module_name` runs: the module's own, or for a package its
    `__main__`'s."""
    for candidate in (module_name, f"{module_name}.__main__"):
        if importlib.util.find_spec(candidate) is not None:
            module = importlib.import_module(candidate)
            if hasattr(module, "main"):
                return module.main
    raise ImportError(f"no main() for `python -m {module_name}`")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="ds-diffusers", description="DeepSpeed training for diffusers text-to-image models.",
                                  epilog="`ds-diffusers COMMAND --help` shows a command's own options.")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, _, help_text) in COMMANDS.items():
        # add_help=False: `--help` after the command is the entrypoint's own.
        commands.add_parser(name, help=help_text, add_help=False)
    return top


def dispatch(argv: list[str]) -> tuple[str, list[str]]:
    """(module, argv for its main) for a `ds-diffusers` command line."""
    known, rest = parser().parse_known_args(argv[:1])
    module_name, prefix, _ = COMMANDS[known.command]
    return module_name, [*prefix, *rest, *argv[1:]]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    module_name, forwarded = dispatch(argv)
    return entrypoint(module_name)(forwarded)


if __name__ == "__main__":
    sys.exit(main())
