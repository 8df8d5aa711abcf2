"""Silence library notices a user cannot act on, at their source, before the libraries load.

Each entry is known to be harmless for this project; anything else the libraries say still shows.
(The other two such notices are avoided where they arise: the VAE is loaded in its dtype rather than
cast with `.to()`, and the lr is never asked of a scheduler before its first step.)
"""

from __future__ import annotations

import logging
import os

# transformers asks for torchvision, which this project does not use (no image processors are
# needed: safety checker and feature extractor are off), and falls back to the PIL classes anyway.
_HARMLESS = {"transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",)}


class _DropHarmless(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_known_notices() -> None:
    """Call first in an entrypoint, before DeepSpeed is imported."""
    import torch

    from ds_diffusers.devices import gpu_request

    if "DS_ACCELERATOR" not in os.environ and not torch.accelerator.is_available() and gpu_request(os.environ) is None:
        # Named, DeepSpeed picks the CPU without its "unable to detect a GPU" warning; with an
        # accelerator present it still detects it itself. Where GPUs were requested the CPU is a
        # fault that devices.check_accelerator_expected reports, so nothing is named for it.
        os.environ["DS_ACCELERATOR"] = "cpu"
    for name, fragments in _HARMLESS.items():
        logging.getLogger(name).addFilter(_DropHarmless(fragments))
    # The frozen components load in well under a second; their per-file weight bars are noise.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
