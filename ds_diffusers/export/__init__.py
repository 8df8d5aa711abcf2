"""Export room: the trained weights as a diffusers folder.

    write     gathered fp32 masters -> `unet/`, `unet_ema/` or `pytorch_lora_weights.safetensors`
              (the end-of-run export, all ranks)
    offline   the same files from a checkpoint folder, in one process
    __main__  `python -m ds_diffusers.export --checkpoint ... --out ...`
"""

from ds_diffusers.export.write import (EMA_DIR, EXPORT_DTYPES, EXPORT_RESULTS, FROZEN_PARTS, LORA_WEIGHTS, UNET_DIR,
                                       UNET_WEIGHTS, cast_for_export, copy_frozen_components, export_model,
                                       gathered_state_dict, write_lora, write_unet)

__all__ = ["EMA_DIR", "EXPORT_DTYPES", "EXPORT_RESULTS", "FROZEN_PARTS", "LORA_WEIGHTS", "UNET_DIR", "UNET_WEIGHTS",
           "cast_for_export", "copy_frozen_components", "export_model", "gathered_state_dict", "write_lora", "write_unet"]
