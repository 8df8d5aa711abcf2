"""The family registry: each model folder is read as the family its model_index.json names, the
names checkpoints store stay as they were, and the old `family` module still answers the same."""

from __future__ import annotations

import json

import pytest

from ds_diffusers import family as old_family_module
from ds_diffusers.families import FAMILIES, SD, SDXL, detect_family, family_named, model_family
from ds_diffusers.families.sd3 import SD3


@pytest.mark.parametrize("index, expected", [
    ({"_class_name": "StableDiffusionXLPipeline"}, SDXL),
    ({"_class_name": "StableDiffusionXLImg2ImgPipeline"}, SDXL),
    ({"_class_name": "StableDiffusionPipeline"}, SD),
    ({"_class_name": "StableDiffusion3Pipeline"}, SD3),
    ({"_class_name": "SomeOtherPipeline"}, SD),
    (None, SD),  # no model_index.json at all
])
def test_a_folder_is_read_as_the_family_its_model_index_names(tmp_path, index, expected):
    if index is not None:
        (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert detect_family(tmp_path) is expected
    assert model_family(tmp_path) == old_family_module.model_family(tmp_path) == expected.name


def test_stored_names_and_what_each_family_brings():
    # Checkpoints record these names ("model family"): renaming one would refuse every old checkpoint.
    assert {name: family_named(name).title for name in FAMILIES} == {"sd": "Stable Diffusion 1.x/2.x",
                                                                      "sdxl": "Stable Diffusion XL", "flux": "FLUX.1",
                                                                      "sd3": "Stable Diffusion 3.5",
                                                                      "qwen_image": "Qwen-Image"}
    assert old_family_module.FAMILY_NAMES == {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "Stable Diffusion XL",
                                              "flux": "FLUX.1", "sd3": "Stable Diffusion 3.5",
                                              "qwen_image": "Qwen-Image"}
    assert (SD.records_crop, SD.upcasts_vae, SD.text_outputs, SD.extra_parts) == (False, False, ("encoder_hidden_states",), ())
    assert (SDXL.records_crop, SDXL.upcasts_vae, SDXL.text_outputs) == (True, True, ("encoder_hidden_states", "text_embeds"))
    assert SDXL.extra_parts == old_family_module.SDXL_PARTS == ("text_encoder_2", "tokenizer_2")
    assert SD.objective == SDXL.objective == "diffusion"
