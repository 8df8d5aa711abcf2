"""Sample room: baseline vs tuned images from a trained run (`python -m ds_diffusers.sample`).

plan       the `sample` block with defaults filled in, cross-field checks, sharding and file names
weights    where each weight comes from (checked on disk before anything loads)
schedulers sampler names -> diffusers schedulers
pipeline   a pipeline for one weight (UNet + LoRA adapters + sampler)
generate   the images of one prompt (through ds_diffusers.generation, as validation draws them)
outputs    PNGs, the comparison grid and manifest.json
"""
