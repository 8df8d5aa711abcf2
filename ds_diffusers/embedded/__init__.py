"""The project's own tiny Stable Diffusion base model and synthetic captioned-shapes dataset,
built locally (no downloads) and cached, so training runs anywhere out of the box."""

from ds_diffusers.embedded.cache import EmbeddedAssets, ensure_embedded_assets

__all__ = ["EmbeddedAssets", "ensure_embedded_assets"]
