"""Aspect-ratio buckets (ds_diffusers/data/buckets.py): the table, the assignment and its crop, tiny-bucket
merging, the per-epoch schedule (a pure function of seed and epoch, the same bucket on every rank,
exact resume), header-only size reading, the start-up histogram, and SDXL's per-image conditioning.
The mixed-aspect training run with resume is in tests/test_buckets_integration.py."""

from __future__ import annotations

import io
import random

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ds_diffusers.config.checks import check_bucket_step, check_consistency

from ds_diffusers.data import CaptionedImageDataset, build_train_dataloader
from ds_diffusers.data.buckets import (MAX_ASPECT_RATIO, Bucket, BucketBatchSampler, bucket_table, crop_fraction,
                                       global_batches, nearest_bucket, plan_buckets, read_image_sizes)
from ds_diffusers.data.transforms import preprocess_image_to_size, resize_shorter_side, resize_to_cover
from ds_diffusers.errors import ConfigError
from tests.helpers import error_of, with_changes


@pytest.mark.parametrize("sides, step", [([512, 1024], 64), ([96], 32), ([1024], 32)])
def test_table_edges_are_step_multiples_near_the_target_area(sides, step):
    table = bucket_table(sides, step)
    for side, buckets in table.items():
        assert Bucket(side, side) in buckets and len(buckets) >= 3
        for bucket in buckets:
            assert bucket.height % step == 0 and bucket.width % step == 0
            # The rounded edge is within step/2 of area/other edge.
            assert abs(bucket.height * bucket.width - side * side) <= max(bucket.height, bucket.width) * step / 2
            assert max(bucket.width / bucket.height, bucket.height / bucket.width) <= MAX_ASPECT_RATIO
            assert Bucket(bucket.width, bucket.height) in buckets  # portrait and landscape alike


def test_assignment_crops_least_and_never_more_than_rounding():
    table = bucket_table([128, 256], 16)
    rng = random.Random(0)
    for _ in range(300):
        height, width = rng.randint(40, 900), rng.randint(40, 900)
        bucket = nearest_bucket(height, width, table)
        side = 256 if height * width >= 256 * 256 else 128
        assert bucket in table[side]
        # No other bucket at that area crops less.
        assert crop_fraction(height, width, bucket) <= min(crop_fraction(height, width, other) for other in table[side]) + 1e-12
        # What the pixels show: resized to cover, then at most the aspect mismatch (+1 px of rounding) is cut.
        resized_width, resized_height = resize_to_cover(Image.new("RGB", (width, height)), bucket.height, bucket.width).size
        assert resized_width >= bucket.width and resized_height >= bucket.height
        assert min(resized_width - bucket.width, resized_height - bucket.height) == 0
        cut = 1 - bucket.width * bucket.height / (resized_width * resized_height)
        assert cut <= crop_fraction(height, width, bucket) + 2 / min(bucket.width, bucket.height)
    # An image of a bucket's own aspect ratio is not cropped at all.
    table = bucket_table([512, 1024], 64)
    assert nearest_bucket(1344 * 2, 768 * 2, table) == Bucket(1344, 768)
    assert resize_to_cover(Image.new("RGB", (768 * 2, 1344 * 2)), 1344, 768).size == (768, 1344)
    # Multi-resolution: the largest area the image covers, else the smallest.
    assert nearest_bucket(600, 600, table) == Bucket(512, 512) and nearest_bucket(300, 300, table) == Bucket(512, 512)
    assert nearest_bucket(1100, 1100, table) == Bucket(1024, 1024)


def test_cover_resize_of_a_square_target_is_the_shorter_side_resize():
    for size in ((30, 10), (10, 30), (17, 17), (33, 21)):
        image = Image.new("RGB", size)
        assert resize_to_cover(image, 8, 8).size == resize_shorter_side(image, 8).size


def _sizes(*groups: tuple[int, int, int]) -> np.ndarray:
    """(count, height, width) groups -> [rows, 2] sizes."""
    return np.array([(height, width) for count, height, width in groups for _ in range(count)], dtype=np.int32)


MIXED = _sizes((10, 100, 200), (7, 200, 100), (9, 150, 150), (2, 100, 300), (1, 300, 90))


def test_tiny_buckets_merge_into_their_nearest_neighbour():
    plan = plan_buckets(MIXED, [128], 32, global_batch=4)
    counts = dict(zip(map(str, plan.buckets), plan.counts()))
    # 3:1 (2 images) joins 2:1, the tall 300x90 (1 image) joins 1:2; everything else stays.
    assert counts == {"192x96": 12, "96x192": 8, "128x128": 9}, counts
    assert all(count >= 4 for count in plan.counts()) and sum(plan.counts()) == len(MIXED)
    assert len(plan.merges) == 2 and any("into 192x96" in merge for merge in plan.merges)
    # Big enough buckets are not touched.
    assert len(plan_buckets(MIXED, [128], 32, global_batch=1).buckets) == 5


def test_too_few_readable_images_for_a_global_batch_are_refused():
    with pytest.raises(ConfigError, match="3 readable images.*fewer than one global batch"):
        plan_buckets(_sizes((3, 100, 200), (5, -1, -1)), [128], 32, global_batch=4)


def test_an_undecodable_image_is_replaced_at_its_buckets_shape(tokenizer, tmp_path):
    """skip_bad_images: the next readable row (another aspect ratio) takes the broken row's place, cut to
    the broken row's bucket, so the micro-batch keeps one shape; its original size is its own."""
    buffer = io.BytesIO()
    _gradient(200, 100).save(buffer, format="PNG")
    truncated = buffer.getvalue()[: len(buffer.getvalue()) // 2]  # the header reads, the pixels do not
    square = io.BytesIO()
    _gradient(150, 150).save(square, format="PNG")
    rows = {"image": [{"bytes": truncated, "path": None}, {"bytes": square.getvalue(), "path": None}], "text": ["a", "b"]}
    dataset = datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    plan = plan_buckets(read_image_sizes(dataset, "image", True), [128], 32, global_batch=1)
    assert plan.size_of(0) == (96, 192) and plan.size_of(1) == (128, 128)
    samples = CaptionedImageDataset(dataset, "image", "text", tokenizer, 128, center_crop=True, random_flip=False, seed=0,
                                    skip_bad_images=True, record_crop=True, buckets=plan)
    example = samples[0]
    assert example["pixel_values"].shape == (3, 96, 192) and example["original_size"].tolist() == [150, 150]
    assert samples.bad_rows() == [0]


def test_histogram_line():
    sizes = np.concatenate([MIXED, [[-1, -1]]])
    line = plan_buckets(sizes, [128], 32, global_batch=4).histogram()
    assert line.startswith("buckets: 29 images in 3 bucket(s)")
    assert "128x128: 9" in line and "192x96: 12" in line and "96x192: 8" in line
    assert "1 unreadable image(s) left out" in line and "merged" in line and "(2) into 192x96" in line


def test_schedule_is_a_pure_function_of_seed_and_epoch_with_one_bucket_per_step_on_every_rank():
    plan = plan_buckets(MIXED, [128], 32, global_batch=6)
    bucket_of = plan.bucket_of_row
    first = global_batches(bucket_of, len(plan.buckets), 6, seed=3, epoch=1)
    assert np.array_equal(first, global_batches(bucket_of, len(plan.buckets), 6, seed=3, epoch=1))
    assert not np.array_equal(first, global_batches(bucket_of, len(plan.buckets), 6, seed=3, epoch=2))
    assert not np.array_equal(first, global_batches(bucket_of, len(plan.buckets), 6, seed=4, epoch=1))
    for batch in first:
        assert len({int(bucket_of[row]) for row in batch}) == 1  # one bucket per global batch
        assert len(set(batch.tolist())) == len(batch)  # no image twice in a batch
    assert set(first.flatten().tolist()) == set(range(len(MIXED)))  # every image at least once an epoch
    # Three ranks × micro-batch 2: each step, every rank has the same bucket and together they are the global batch.
    samplers = [BucketBatchSampler(plan, 2, rank, 3, seed=3) for rank in range(3)]
    for sampler in samplers:
        sampler.set_epoch(1)
    steps = list(zip(*samplers))
    assert len(steps) == len(first) == samplers[0].batches_per_epoch
    for step, micro_batches in enumerate(steps):
        assert sum(micro_batches, []) == first[step].tolist()
        assert len({plan.size_of(row) for micro_batch in micro_batches for row in micro_batch}) == 1


def test_resume_mid_epoch_continues_the_same_schedule():
    plan = plan_buckets(MIXED, [128], 32, global_batch=4)
    sampler = BucketBatchSampler(plan, 2, 1, 2, seed=0)
    sampler.set_epoch(5)
    whole = list(sampler)
    sampler.set_epoch(5)
    sampler.set_start(3 * 4)  # the cursor over both ranks: 3 global micro-batches of 2 x 2 consumed
    assert list(sampler) == whole[3:] and len(sampler) == len(whole) - 3
    with pytest.raises(ValueError):
        sampler.set_start(6)  # not a whole global micro-batch


def test_header_sizes_are_read_without_decoding_and_bad_images_refused_or_left_out(tmp_path, monkeypatch):
    path = tmp_path / "tall.png"
    Image.new("RGB", (30, 70)).save(path)
    buffer = io.BytesIO()
    Image.new("RGB", (50, 20)).save(buffer, format="PNG")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows = {"image": [{"bytes": buffer.getvalue(), "path": None}, {"bytes": None, "path": str(path)},
                      {"bytes": None, "path": str(tmp_path / "broken.png")}]}
    dataset = datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image()}))
    from PIL import ImageFile

    Image.init()  # PIL's plugins decode a prototype image when they are first imported
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("an image was decoded"))
    assert read_image_sizes(dataset, "image", skip_bad_images=True).tolist() == [[20, 50], [70, 30], [-1, -1]]
    with pytest.raises(ConfigError, match=r"image\[row 2\].*broken.png.*cannot read the image's header"):
        read_image_sizes(dataset, "image", skip_bad_images=False)

    # Kept under the dataset's fingerprint: the next start reads no header.
    from ds_diffusers.data import buckets

    first = buckets.cached_image_sizes(dataset, "image", True, tmp_path / "cache")
    monkeypatch.setattr(buckets, "read_image_sizes", lambda *args: pytest.fail("headers read again"))
    assert np.array_equal(buckets.cached_image_sizes(dataset, "image", True, tmp_path / "cache"), first)
    assert len(list((tmp_path / "cache").glob("image-sizes-*.npy"))) == 1


def test_config_checks():
    on = {"aspect_ratio_buckets": True}
    assert "center_crop" in error_of(with_changes(**on, cache_latents=True, center_crop=False)).fix
    assert error_of(with_changes(**on, bucket_step=60)).field == "bucket_step"
    assert error_of(with_changes(**on, bucket_resolutions=[96], bucket_step=64)).field == "bucket_resolutions"
    assert error_of(with_changes(bucket_resolutions=[512])).field == "bucket_resolutions"


def test_bucket_step_is_checked_against_the_model(sdxl_model):
    from ds_diffusers.config import load_config
    from tests.helpers import REPO

    def cfg(step: int):
        return load_config(REPO / "cfg/default.json", [f"pretrained_model_name_or_path={sdxl_model}", "aspect_ratio_buckets=true",
                                                       f"bucket_step={step}", "resolution=1024"])

    check_bucket_step(cfg(32))  # SDXL: VAE 8 × UNet 4
    with pytest.raises(ConfigError, match="multiple of 32"):
        check_bucket_step(cfg(16))
    check_consistency(cfg(32))


def _gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                                           np.full((height, width, 1), 60, np.float32)], axis=2).astype(np.uint8))


@pytest.mark.parametrize("center_crop", [True, False])
def test_crop_record_is_the_window_shown_for_any_bucket(center_crop):
    """The recorded original size and crop, mirrored with the flip, are exactly the pixels trained on."""
    from ds_diffusers.data.transforms import to_normalized_tensor

    image = _gradient(211, 97)
    for seed in range(12):
        pixels, record = preprocess_image_to_size(image, (64, 160), center_crop, True, torch.Generator().manual_seed(seed))
        assert pixels.shape == (3, 64, 160) and record.original_size == (97, 211)
        resized = resize_to_cover(image, 64, 160)
        flipped = not torch.equal(pixels, to_normalized_tensor(resized.crop((record.crop_top_left[1], record.crop_top_left[0],
                                                                              record.crop_top_left[1] + 160, record.crop_top_left[0] + 64))))
        shown = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else resized
        top, left = record.crop_top_left
        assert torch.equal(pixels, to_normalized_tensor(shown.crop((left, top, left + 160, top + 64))))


def test_sdxl_time_ids_are_each_images_real_size_and_crop_as_diffusers_computes_them(sdxl_model, tmp_path):
    """diffusers' train_text_to_image_sdxl.py: original_size = (image.height, image.width) before the resize;
    crop_top_left = (y1, x1) = round((resized - target) / 2) of the centre crop; target = the training
    size, here each image's bucket; its `compute_time_ids` concatenates the three (test_sdxl.py checks that
    `add_time_ids` builds them as the SDXL pipeline does)."""
    from ds_diffusers.models import load_frozen_components
    from ds_diffusers.objective import add_time_ids, encode_batch

    sizes = [(97, 211), (211, 97), (150, 150), (80, 170), (170, 80), (100, 165)]
    images = [_gradient(width, height) for height, width in sizes]
    dataset = datasets.Dataset.from_dict({"image": images, "text": ["a red circle"] * len(images)},
                                         features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    plan = plan_buckets(read_image_sizes(dataset, "image", False), [128], 32, global_batch=1)
    frozen = load_frozen_components(str(sdxl_model), torch.device("cpu"), torch.float32, None)
    samples = CaptionedImageDataset(dataset, "image", "text", frozen.tokenizer, 128, center_crop=True, random_flip=False, seed=0,
                                    tokenizer_2=frozen.tokenizer_2, record_crop=True, buckets=plan)
    for row, (height, width) in enumerate(sizes):
        target_height, target_width = plan.size_of(row)
        if width * target_height <= height * target_width:
            resized = (max(target_height, int(target_width * height / width)), target_width)
        else:
            resized = (target_height, max(target_width, int(target_height * width / height)))
        want_crop = (int(round((resized[0] - target_height) / 2.0)), int(round((resized[1] - target_width) / 2.0)))
        example = samples[row]
        assert example["pixel_values"].shape == (3, target_height, target_width)
        assert example["original_size"].tolist() == [height, width] and example["crop_top_left"].tolist() == list(want_crop)
        batch = {name: value[None] for name, value in example.items() if name != "index"}
        want = torch.tensor([[height, width, *want_crop, target_height, target_width]])
        assert torch.equal(add_time_ids(batch, (target_height, target_width)), want)
        if row == 0:  # the training step takes the target size from the latents: the bucket's
            encoded = encode_batch(frozen, batch)
            torch.testing.assert_close(encoded.added_cond_kwargs["time_ids"], want.float())
    assert len({plan.size_of(row) for row in range(len(sizes))}) >= 4  # the images really are in different buckets


def test_loader_batches_are_one_bucket_each(tokenizer):
    images = [Image.new("RGB", (width, height), (row * 7 % 255, 0, 0))
              for row, (height, width) in enumerate(MIXED.tolist())]
    dataset = datasets.Dataset.from_dict({"image": images, "text": ["x"] * len(images)},
                                         features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    plan = plan_buckets(read_image_sizes(dataset, "image", False), [64], 16, global_batch=4)
    loader, sampler, _ = build_train_dataloader(dataset, "image", "text", tokenizer, resolution=64, center_crop=False,
                                                random_flip=True, seed=0, micro_batch_size=2, num_workers=0, rank=1,
                                                world_size=2, buckets=plan)
    sampler.set_epoch(0)
    shapes = [tuple(batch["pixel_values"].shape) for batch in loader]
    assert len(shapes) == sampler.batches_per_epoch and len(set(shapes)) == len(plan.buckets) >= 3
    assert all(shape[0] == 2 for shape in shapes)


def test_latent_cache_stores_each_bucket_at_its_shape_with_the_real_sizes(sdxl_model, tmp_path):
    """A cached bucketed sample equals the uncached one: the posterior of the same bucket-shaped crop
    (mirrored too), the header's original size and the crop; a second start reuses every bucket."""
    from ds_diffusers.config import load_config
    from ds_diffusers.data import prepare_caches
    from ds_diffusers.distributed import DistInfo
    from ds_diffusers.models import load_frozen_components
    from tests.helpers import REPO

    sizes = [(97, 211), (211, 97), (150, 150), (100, 165), (180, 90)]
    images = [_gradient(width, height) for height, width in sizes]
    dataset = datasets.Dataset.from_dict({"image": images, "text": ["a red circle"] * len(images)},
                                         features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    cfg = load_config(REPO / "cfg/default.json", [f"pretrained_model_name_or_path={sdxl_model}", f"dataset_dir={tmp_path}",
                                                   f"cache_dir={tmp_path / 'cache'}", "resolution=128", "aspect_ratio_buckets=true",
                                                   "bucket_step=32", "cache_latents=true", "center_crop=true", "random_flip=true",
                                                   "train_micro_batch_size_per_gpu=2"])
    plan = plan_buckets(read_image_sizes(dataset, "image", False), [128], 32, global_batch=1)
    frozen = load_frozen_components(str(sdxl_model), torch.device("cpu"), torch.float32, None)
    single = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    lines = []
    latent_cache, _ = prepare_caches(cfg, dataset, "image", "text", frozen, single, log=lines.append, buckets=plan)
    assert len(plan.buckets) >= 4 and "encoded" in lines[-1]
    common = dict(hf_dataset=dataset, image_column="image", caption_column="text", tokenizer=frozen.tokenizer, resolution=128,
                  center_crop=True, random_flip=True, seed=5, tokenizer_2=frozen.tokenizer_2, record_crop=True, buckets=plan)
    plain, cached = CaptionedImageDataset(**common), CaptionedImageDataset(**common, latent_cache=latent_cache)
    flipped = set()
    for row in range(len(sizes)):
        want, got = plain[row], cached[row]
        with torch.no_grad():
            want_parameters = frozen.vae.encode(want["pixel_values"][None]).latent_dist.parameters[0]
        assert got["latent_parameters"].shape[-2:] == (plan.size_of(row)[0] // 8, plan.size_of(row)[1] // 8)
        torch.testing.assert_close(got["latent_parameters"], want_parameters, atol=1e-5, rtol=1e-5)
        assert got["original_size"].tolist() == list(sizes[row])
        assert torch.equal(got["crop_top_left"], want["crop_top_left"])
        flipped.add(torch.equal(got["latent_parameters"], latent_cache.parameters(row, True)))
    assert flipped == {True, False}  # seed 5 flips some samples and not others: both orientations checked
    index = np.load(latent_cache.index_path)  # each row's bucket and real size, as the plan and the headers say
    assert index[:, 0].tolist() == plan.bucket_of_row.tolist() and [tuple(r) for r in index[:, 3:5].tolist()] == sizes
    prepare_caches(cfg, dataset, "image", "text", frozen, single, log=lines.append, buckets=plan)
    assert lines[-1].startswith(f"latents cache: reusing {len(plan.buckets)} bucket(s)")
    assert len(list((tmp_path / "cache").glob("latents-buckets-*/latents-*/meta.json"))) == len(plan.buckets)


def test_rank_0_plans_the_buckets_while_it_checks_the_dataset(tmp_path):
    from ds_diffusers.config import load_config
    from ds_diffusers.data.prepare import load_and_check
    from tests.helpers import REPO
    from tests.test_buckets_integration import mixed_aspect_imagefolder

    folder = mixed_aspect_imagefolder(tmp_path / "images")
    cfg = load_config(REPO / "cfg/default.json", [f"pretrained_model_name_or_path={tmp_path}", f"dataset_dir={folder}",
                                                   "imagefolder=true", f"cache_dir={tmp_path / 'cache'}", "resolution=128",
                                                   "aspect_ratio_buckets=true", "bucket_step=32", "train_micro_batch_size_per_gpu=2"])
    plan = load_and_check(cfg, world_size=2).checks.buckets
    assert {str(bucket): count for bucket, count in zip(plan.buckets, plan.counts())} == {"192x96": 8, "96x192": 4, "128x128": 4}
    assert plan.original_size(0) == (100, 200) and len(list((tmp_path / "cache").glob("image-sizes-*.npy"))) == 1
    assert load_and_check(cfg.model_copy(update={"aspect_ratio_buckets": False}), world_size=2).checks.buckets is None


def test_bucket_step_of_a_transformer_family_counts_its_patches(flux_model):
    """FLUX.1 packs 2×2 latent patches (its config says patch_size 1): the multiple is the VAE's
    factor × 2, read from transformer/, not unet/."""
    import json

    from ds_diffusers.config import load_config
    from tests.helpers import REPO

    vae_factor = 2 ** (len(json.loads((flux_model / "vae" / "config.json").read_text())["block_out_channels"]) - 1)

    def cfg(step: int):
        return load_config(REPO / "cfg/default.json", [f"pretrained_model_name_or_path={flux_model}", "aspect_ratio_buckets=true",
                                                       f"bucket_step={step}", "resolution=64"])

    check_bucket_step(cfg(vae_factor * 2))
    with pytest.raises(ConfigError, match=f"multiple of {vae_factor * 2} \\(VAE factor {vae_factor} × transformer 2\\)"):
        check_bucket_step(cfg(vae_factor))


@pytest.mark.parametrize("model", ["tiny_assets", "sdxl_model", "flux_model", "sd3_model", "qwen_image_model"])
def test_vae_downsampling_is_the_pipelines_vae_scale_factor(model, request):
    """Qwen-Image's VAE has no `block_out_channels` (its stages are `temperal_downsample`): the bucket
    step check used to skip it silently, and pre-encoded shards could not read its factor."""
    import json

    from ds_diffusers.families import detect_family, vae_downsampling

    fixture = request.getfixturevalue(model)
    model_dir = getattr(fixture, "model_dir", fixture)
    family = detect_family(model_dir)
    pipeline_class = getattr(__import__("diffusers"), family.pipeline_classes[0])
    vae_class = getattr(__import__("diffusers"), family.vae_class)
    pipe = pipeline_class(**{name: None for name in pipeline_class._get_signature_keys(pipeline_class)[0]
                             if name != "vae"}, vae=vae_class.from_pretrained(model_dir, subfolder="vae"))
    assert vae_downsampling(json.loads((model_dir / "vae" / "config.json").read_text())) == pipe.vae_scale_factor


def test_bucket_step_of_qwen_image_is_checked(qwen_image_model):
    from ds_diffusers.config import load_config
    from tests.helpers import REPO

    def cfg(step: int):
        return load_config(REPO / "cfg/default.json", [f"pretrained_model_name_or_path={qwen_image_model}",
                                                       "aspect_ratio_buckets=true", f"bucket_step={step}", "resolution=64"])

    check_bucket_step(cfg(16))
    with pytest.raises(ConfigError, match="multiple of 16 \\(VAE factor 8 × transformer 2\\)"):
        check_bucket_step(cfg(8))
