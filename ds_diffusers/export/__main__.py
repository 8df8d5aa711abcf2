"""Offline export of a checkpoint, no process group needed:

    python -m ds_diffusers.export --checkpoint CHECKPOINT_DIR[/step_N] --out DIR [--export-dtype fp32|fp16|bf16]

The fp32 master weights are read from the checkpoint (ZeRO-1/2/3 partitions merged with DeepSpeed's
own consolidation; at stage 0 the fp16/bf16 optimizer's fp32 copies) and cast to `export_dtype`
(the run's setting unless --export-dtype is given): the same bytes as the end-of-training export,
in the same layout (`unet/`, `unet_ema/` with EMA, or `pytorch_lora_weights.safetensors` for LoRA).
"""

from __future__ import annotations

import argparse
import sys

from ds_diffusers.errors import ConfigError
from ds_diffusers.export.offline import export_checkpoint
from ds_diffusers.export.write import EXPORT_DTYPES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_diffusers.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint_dir (uses its latest) or one step_<N> folder")
    parser.add_argument("--out", required=True, help="folder to write the diffusers export into")
    parser.add_argument("--export-dtype", choices=sorted(EXPORT_DTYPES), default=None,
                        help="dtype of the written weights (default: the run's export_dtype, fp32 unless set)")
    args = parser.parse_args(argv)
    try:
        path = export_checkpoint(args.checkpoint, args.out, args.export_dtype)
    except ConfigError as err:
        print(f"ds-diffusers: export error: {err}", file=sys.stderr)
        return 2
    print(f"exported {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
