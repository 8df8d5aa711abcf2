"""`python -m ds_diffusers.sample` on the embedded tiny model: reproducible PNGs, prompts sharded
over 2 processes through the real `deepspeed` launcher, LoRA scaling and combination, and errors
that name the field (and every place a missing weight file was looked for).

Tuned weights are made directly instead of trained: a perturbed copy of the tiny UNet saved as
`output_dir/unet/`, and a LoRA file with random (non-zero) B written by the export code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch
from PIL import Image

from ds_diffusers.config import load_config
from ds_diffusers.config.sample_schema import SchedulerName
from ds_diffusers.errors import ConfigError
from ds_diffusers.sampling.plan import SamplePlan
from ds_diffusers.sampling.schedulers import SCHEDULERS
from tests.helpers import REPO, read_manifest, run_sample

# Small enough that process start-up dominates: 3 prompts (an odd count, so 2 ranks get unequal
# shares) x 2 images x 2 weights, 4 steps at 32 px.
PROMPTS = ["a red circle", "a blue square", "a green triangle"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The in-process samples too: tiny convolutions gain nothing from threads, and on a busy CPU box
    two OpenMP threads per process were 20-30 times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tiny_assets, tmp_path_factory) -> Path:
    """A training `output_dir` holding a full fine-tune (`unet/`) and a LoRA export."""
    from diffusers import UNet2DConditionModel

    from ds_diffusers.config.schema import LoraCfg
    from ds_diffusers.export import write_lora
    from ds_diffusers.models import add_lora

    out = tmp_path_factory.mktemp("trained") / "model"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_pretrained(tiny_assets.model_dir, subfolder="unet")
        with torch.no_grad():
            for param in unet.parameters():
                param.add_(0.05 * torch.randn_like(param))
        unet.save_pretrained(out / "unet")
        lora_unet = UNet2DConditionModel.from_pretrained(tiny_assets.model_dir, subfolder="unet")
        add_lora(lora_unet, LoraCfg(action=True, rank=4, alpha=4.0, init=False))  # init=False: B is random, not 0
    adapters = {name: param.detach().clone() for name, param in lora_unet.named_parameters() if param.requires_grad}
    write_lora(lora_unet, adapters, out)
    return out


def overrides(tiny_assets, output_dir: Path, *extra: str) -> list[str]:
    return [
        f"pretrained_model_name_or_path={tiny_assets.model_dir}", f"dataset_dir={tiny_assets.dataset_dir}",
        f"output_dir={output_dir}", f"sample.prompts={json.dumps(PROMPTS)}", "sample.num_images_per_prompt=2",
        "sample.num_inference_steps=4", "sample.resolution=32", *extra,
    ]


def png_bytes(samples_dir: Path) -> dict[str, bytes]:
    return {path.relative_to(samples_dir).as_posix(): path.read_bytes() for path in sorted(samples_dir.rglob("*.png"))}


@pytest.fixture(scope="module")
def single_process_run(tiny_assets, trained, tmp_path_factory) -> Path:
    samples = tmp_path_factory.mktemp("samples") / "first"
    run_sample(overrides(tiny_assets, trained, f"sample.output_dir={samples}"))
    return samples


@pytest.mark.slow
def test_same_cfg_gives_byte_identical_pngs(tiny_assets, trained, single_process_run, tmp_path):
    manifest = read_manifest(single_process_run)
    assert len(manifest["images"]) == len(PROMPTS) * 2 * 2
    assert [w["name"] for w in manifest["weights"]] == ["baseline", "tuned"]
    assert manifest["weights"][1]["unet_dir"] == str(trained / "unet")
    default_cfg = json.loads((Path(__file__).resolve().parents[1] / "cfg" / "default.json").read_text())
    assert manifest["settings"]["guidance_scale"] == default_cfg["validation_guidance_scale"]  # inherited, not the SampleCfg default

    second = tmp_path / "second"
    run_sample(overrides(tiny_assets, trained, f"sample.output_dir={second}"))
    first_pngs, second_pngs = png_bytes(single_process_run), png_bytes(second)
    assert len(first_pngs) == len(PROMPTS) * 2 * 2 + 1  # + the grid
    assert first_pngs == second_pngs
    # Same starting noise, different UNet: the tuned images differ from the baseline ones.
    for p in range(len(PROMPTS)):
        for i in range(2):
            name = f"p{p:03d}_{PROMPTS[p].replace(' ', '-')}_i{i:02d}.png"
            assert first_pngs[f"baseline/{name}"] != first_pngs[f"tuned/{name}"]


@pytest.mark.multiprocess
def test_two_processes_split_prompts_and_write_each_image_once(tiny_assets, trained, single_process_run, tmp_path):
    samples = tmp_path / "samples"
    result = run_sample(overrides(tiny_assets, trained, f"sample.output_dir={samples}"), procs=2)
    assert "on 2 process(es)" in result.stdout
    manifest = read_manifest(samples)
    images = manifest["images"]
    keys = [(image["weight"], image["prompt_index"], image["image_index"]) for image in images]
    assert len(keys) == len(set(keys)) == len(PROMPTS) * 2 * 2
    assert {image["rank"] for image in images} == {0, 1}
    assert all(image["rank"] == image["prompt_index"] % 2 for image in images)  # a prompt stays on one rank
    assert len(list(samples.rglob("*.png"))) == len(images) + 1
    assert not list(samples.rglob(".*partial*"))
    # Sharding changes who draws an image, not the image.
    reference = {image["file"]: image["sha256"] for image in read_manifest(single_process_run)["images"]}
    assert {image["file"]: image["sha256"] for image in images} == reference
    with Image.open(samples / manifest["grid"]) as grid:
        # 4 columns (2 weights x 2 images) of 32 px; 3 rows of 32 px, each under a label band, plus a header.
        assert grid.size[0] == 4 * 32 and grid.size[1] > 3 * 32


def _images(cfg, plan: SamplePlan, source_index: int = 0) -> np.ndarray:
    """The images of prompt 0 for one weight, as float arrays, in-process (no process group)."""
    from ds_diffusers.models import load_frozen_components
    from ds_diffusers.sampling.generate import generate_prompt_images
    from ds_diffusers.sampling.pipeline import weight_pipeline
    from ds_diffusers.sampling.weights import resolve_weights

    source = resolve_weights(cfg, plan)[source_index]
    frozen = load_frozen_components(cfg.pretrained_model_name_or_path, torch.device("cpu"), torch.float32, None)
    with weight_pipeline(source, frozen, plan, torch.device("cpu"), torch.float32) as pipe:
        return generate_prompt_images(pipe, plan, 0, output_type="np")


def _plan(tiny_assets, trained, *extra: str):
    cfg = load_config(REPO / "cfg/default.json", overrides(tiny_assets, trained, "sample.num_images_per_prompt=1", *extra))
    return cfg, SamplePlan.from_config(cfg)


def test_lora_scale_zero_equals_baseline_and_loras_combine_linearly(tiny_assets, trained):
    cfg, plan = _plan(tiny_assets, trained, 'sample.weights=["lora"]', "sample.lora_scale=0")
    baseline = _images(*_plan(tiny_assets, trained, 'sample.weights=["baseline"]'))
    assert np.abs(_images(cfg, plan) - baseline).max() <= 1e-6
    full = _images(*_plan(tiny_assets, trained, 'sample.weights=["lora"]'))
    assert np.abs(full - baseline).max() > 1e-2, "the LoRA file had no effect: the test would prove nothing"
    # Two adapters at 0.5 each sum to the one adapter at 1.0 (peft adapters add their outputs).
    halves = json.dumps([{"path": str(trained), "weight": 0.5}, {"path": str(trained / "pytorch_lora_weights.safetensors"), "weight": 0.5}])
    combined = _images(*_plan(tiny_assets, trained, 'sample.weights=["lora"]', f"sample.loras={halves}"))
    assert np.abs(combined - full).max() <= 1e-4


@pytest.mark.parametrize("scheduler", get_args(SchedulerName))
def test_every_scheduler_name_samples(tiny_assets, trained, scheduler):
    assert set(SCHEDULERS) == set(get_args(SchedulerName))
    cfg, plan = _plan(tiny_assets, trained, 'sample.weights=["baseline"]', f"sample.scheduler={scheduler}",
                      "sample.num_inference_steps=2")
    images = _images(cfg, plan)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_tuned_is_what_the_training_run_exported(tiny_assets, trained):
    from ds_diffusers.export import LORA_WEIGHTS
    from ds_diffusers.sampling.plan import LoraFile
    from ds_diffusers.sampling.weights import resolve_weights

    baseline, tuned = resolve_weights(*_plan(tiny_assets, trained))
    assert baseline.unet_dir == str(tiny_assets.model_dir / "unet") and tuned.unet_dir == str(trained / "unet")
    assert tuned.loras == ()
    baseline, tuned = resolve_weights(*_plan(tiny_assets, trained, "use_lora.action=true"))
    assert tuned.unet_dir == baseline.unet_dir and tuned.loras == (LoraFile(str(trained / LORA_WEIGHTS), 1.0),)


def prepare_error(tiny_assets, output_dir: Path, *extra: str) -> ConfigError:
    from ds_diffusers.sample import prepare

    with pytest.raises(ConfigError) as caught:
        prepare(load_config(REPO / "cfg/default.json", overrides(tiny_assets, output_dir, *extra)))
    return caught.value


def test_validation_grid_and_sampled_baseline_are_the_same_images(tiny_assets, tmp_path):
    """Training's validation and `ds_diffusers.sample` draw image i of prompt p from the same
    (seed, p, i) noise with the same sampler: the base UNet gives pixel-equal images on both paths."""
    from ds_diffusers import validation
    from ds_diffusers.models import load_frozen_components
    from ds_diffusers.sampling.generate import generate_prompt_images
    from ds_diffusers.sampling.pipeline import load_unet, weight_pipeline
    from ds_diffusers.sampling.weights import WeightSource

    cpu = torch.device("cpu")
    frozen = load_frozen_components(str(tiny_assets.model_dir), cpu, torch.float32, None)
    unet_dir = str(tiny_assets.model_dir / "unet")
    plan = SamplePlan(prompts=tuple(PROMPTS[:2]), negative_prompt="", num_images_per_prompt=2, num_inference_steps=3,
                      guidance_scale=5.0, scheduler="dpmsolver++", clip_skip=None, seed=11, resolution=32,
                      weights=("baseline",), lora_scale=1.0, loras=(), output_dir=str(tmp_path))
    rows = validation.generate(frozen, load_unet(unet_dir, cpu, torch.float32).train(), plan.prompts,
                               num_images=plan.num_images_per_prompt, seed=plan.seed, resolution=plan.resolution,
                               num_inference_steps=plan.num_inference_steps, guidance_scale=plan.guidance_scale)
    with weight_pipeline(WeightSource("baseline", unet_dir), frozen, plan, cpu, torch.float32) as pipe:
        sampled = [generate_prompt_images(pipe, plan, prompt_index) for prompt_index in range(len(plan.prompts))]
    as_arrays = lambda images: [[np.asarray(image) for image in row] for row in images]  # noqa: E731
    for validation_row, sampled_row in zip(as_arrays(rows), as_arrays(sampled), strict=True):
        for validation_image, sampled_image in zip(validation_row, sampled_row, strict=True):
            assert np.array_equal(validation_image, sampled_image)
    # Distinct noise per image and per prompt, or the equality above would hold for a constant.
    flat = [image.tobytes() for row in as_arrays(sampled) for image in row]
    assert len(set(flat)) == len(flat)


def test_missing_weights_name_every_place_looked(tiny_assets, tmp_path):
    empty = tmp_path / "never_trained"
    error = prepare_error(tiny_assets, empty)
    assert error.field == "sample.weights" and error.value == "tuned"
    for place in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin",
                  "pytorch_lora_weights.safetensors"):
        assert str(empty / place) in str(error)
    error = prepare_error(tiny_assets, empty, 'sample.weights=["ema"]')
    assert str(empty / "unet_ema" / "diffusion_pytorch_model.safetensors") in str(error)
    error = prepare_error(tiny_assets, empty, 'sample.weights=["lora"]', f'sample.loras=[{{"path": "{tmp_path / "x"}"}}]')
    assert error.field == "sample.loras[0].path"
    assert str(tmp_path / "x") in str(error) and str(tmp_path / "x" / "pytorch_lora_weights.safetensors") in str(error)
    assert not (empty / "samples").exists()


@pytest.mark.parametrize("override, field", [
    ("sample.num_inference_steps=0", "sample.num_inference_steps"),
    ("sample.scheduler=dpm-fast", "sample.scheduler"),
    ('sample.weights=["baseline", "finetuned"]', "sample.weights.1"),
    ('sample.weights=["baseline", "baseline"]', "sample.weights"),
    ("sample.weights=[]", "sample.weights"),
    ("sample.resolution=60", "sample.resolution"),
    ("sample.prompts=[]", "sample.prompts"),
    ("sample.guidance_scale=-1", "sample.guidance_scale"),
    ("sample.lora_scale=0.5", "sample.lora_scale"),
    ('sample.loras=[{"path": "a.safetensors", "weight": 1}]', "sample.loras"),
    ('sample.loras=[{"file": "a.safetensors"}]', "sample.loras.0"),
    ("sample.clip_skip=2", "sample.clip_skip"),  # the tiny text encoder has 2 layers
    ("sample.num_images=2", "sample.num_images"),
])
def test_bad_sample_values_name_the_field(tiny_assets, trained, override, field):
    error_field = prepare_error(tiny_assets, trained, override).field
    assert error_field == field or error_field.startswith(field + ".")


def test_entrypoint_config_error_is_one_line_exit_2(tiny_assets, tmp_path, capsys):
    from ds_diffusers.sample import main

    code = main(["--cfg", str(REPO / "cfg/default.json"), "--set", *overrides(tiny_assets, tmp_path / "none", "sample.seed=-1")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("ds-diffusers: config error: sample.seed=-1:")


def test_prompts_split_across_ranks_cover_each_prompt_once(tiny_assets, trained):
    _, plan = _plan(tiny_assets, trained, f"sample.prompts={json.dumps([str(n) for n in range(7)])}")
    for world_size in (1, 2, 3, 8):
        shares = [plan.prompt_indices(rank, world_size) for rank in range(world_size)]
        assert sorted(p for share in shares for p in share) == list(range(7))


def test_clip_skip_samples_with_the_embeddings_of_a_shorter_encoder(tiny_assets):
    """diffusers' SD pipeline reads `text_encoder.text_model`, which transformers 5 removed, so
    clip_skip crashed there; our embeddings must equal an encoder with its last layer cut off."""
    import copy

    from ds_diffusers.generation import build_pipeline, clip_skip_embeddings, generate_images
    from ds_diffusers.models import load_frozen_components
    from ds_diffusers.sampling.pipeline import load_unet

    cpu = torch.device("cpu")
    frozen = load_frozen_components(str(tiny_assets.model_dir), cpu, torch.float32, None)
    pipe = build_pipeline(frozen, load_unet(str(tiny_assets.model_dir / "unet"), cpu, torch.float32))
    shorter = copy.deepcopy(frozen.text_encoder)
    del shorter.encoder.layers[-1]  # 2 layers -> 1: its output is the full encoder's clip_skip=1
    ids = frozen.tokenizer(PROMPTS[0], padding="max_length", max_length=frozen.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(clip_skip_embeddings(pipe, PROMPTS[0], 1), shorter(ids).last_hidden_state)
    common = dict(prompt_index=0, seed=3, num_images=1, resolution=32, num_inference_steps=2, guidance_scale=5.0,
                  output_type="np")
    skipped = generate_images(pipe, PROMPTS[0], clip_skip=1, **common)
    assert skipped.shape == (1, 32, 32, 3) and not np.array_equal(skipped, generate_images(pipe, PROMPTS[0], **common))
