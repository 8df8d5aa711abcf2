"""Config room: load and validate cfg JSON, merge overrides, translate to DeepSpeed."""

from ds_diffusers.config.checks import check_environment
from ds_diffusers.config.deepspeed import to_deepspeed_config
from ds_diffusers.config.load import apply_overrides, load_config, parse_cfg_args, read_cfg_file, validate_dict
from ds_diffusers.config.schema import Config

__all__ = ["Config", "apply_overrides", "check_environment", "load_config", "parse_cfg_args", "read_cfg_file", "to_deepspeed_config", "validate_dict"]
