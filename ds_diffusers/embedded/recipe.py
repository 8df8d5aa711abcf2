"""What the embedded assets are built from: the recipe version and the default sizes.

Shared by the cache (which stamps them into BUILD_INFO.json) and the builders (whose defaults they
are). It imports nothing heavy: the launch scripts check the assets before every run, and a reuse
should cost milliseconds, not torch and diffusers imports.
"""

# Bump when anything that changes the built files changes (architecture, VAE recipe, rendering,
# captions, tokenizer words): existing caches then rebuild instead of being silently reused.
RECIPE_VERSION = 3
DEFAULT_NUM_IMAGES = 1536
DEFAULT_VAE_TRAIN_STEPS = 400
