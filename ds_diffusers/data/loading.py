"""Load the training split from a local folder and resolve/validate its image and caption columns."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from ds_diffusers.data.metadata import check_metadata_files
from ds_diffusers.data.seeding import seeded_generator
from ds_diffusers.errors import ConfigError

CAPTION_COLUMN_CANDIDATES = ("text", "caption", "captions", "prompt")
HELD_OUT_STREAM = 7301  # the seeded stream that picks `validation_split`'s rows, apart from every epoch's
_TEXT_DTYPES = ("string", "large_string")
# What the datasets loaders raise for unreadable folders: EmptyDatasetError is a FileNotFoundError,
# a corrupt parquet is an ArrowInvalid (ValueError), a broken save_to_disk state a KeyError.
_LOAD_ERRORS = (OSError, ValueError, KeyError, datasets.exceptions.DatasetGenerationError)


@contextmanager
def _offline() -> Iterator[None]:
    # datasets reads HF_HUB_OFFLINE once at import; flipping its config flag is what stops the
    # best-effort download-count request that packaged builders such as imagefolder make.
    previous = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = previous


def _is_saved_to_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file())


def _layout(path: Path, imagefolder: bool) -> str:
    if _is_saved_to_disk(path):
        return "save_to_disk"
    return "imagefolder" if imagefolder else "hub-layout"


def load_train_dataset(dataset_dir: str, imagefolder: bool, cache_dir: str | None = None) -> datasets.Dataset:
    """The "train" split of a local save_to_disk folder, imagefolder, or hub-layout folder.

    Only local paths reach the loaders and the hub is switched off while they run. `cache_dir`
    is where load_dataset writes its Arrow cache (datasets' default cache when None).
    """
    path = Path(dataset_dir).expanduser()
    if not path.is_dir():
        raise ConfigError("dataset_dir", dataset_dir, "no such folder; point it at a local dataset folder "
                          "(save_to_disk, hub-layout parquet/arrow/jsonl, or an imagefolder with imagefolder: true)")
    if not any(path.iterdir()):
        raise ConfigError("dataset_dir", dataset_dir, "the folder is empty; put the dataset files in it")
    layout = _layout(path, imagefolder)
    if layout == "imagefolder" and next(path.rglob("metadata.*"), None) is None:
        raise ConfigError("dataset_dir", dataset_dir, "an imagefolder needs a metadata.jsonl or metadata.csv "
                          "with a file_name column and a caption column next to the images")
    if layout == "imagefolder":
        check_metadata_files(dataset_dir, path)
    try:
        with _offline():
            if layout == "save_to_disk":
                loaded = datasets.load_from_disk(str(path))
            elif layout == "imagefolder":
                loaded = datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
            else:
                loaded = datasets.load_dataset(str(path), split="train", cache_dir=cache_dir)
    except _LOAD_ERRORS as error:
        hint = "" if imagefolder else " (set imagefolder: true for a folder of images with metadata.jsonl/csv)"
        raise ConfigError("dataset_dir", dataset_dir, f"could not read it as a {layout} dataset"
                          f"{hint}: {type(error).__name__}: {error}") from error
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ConfigError("dataset_dir", dataset_dir,
                              f"it has splits {list(loaded)} but no 'train'; name the training split 'train'")
        loaded = loaded["train"]
    if len(loaded) == 0:
        raise ConfigError("dataset_dir", dataset_dir, "the train split has no rows; add images and captions")
    return loaded


def resolve_columns(dataset: datasets.Dataset, image_column: str | None,
                    caption_column: str | None) -> tuple[str, str]:
    """(image_column, caption_column), auto-detected when None, checked to hold images and text."""
    columns = list(dataset.column_names)
    if image_column is None:
        auto = next((name for name in columns if isinstance(dataset.features[name], datasets.Image)), "image")
        if auto not in columns:
            raise ConfigError("image_column", None, f"no column holds images; dataset has columns {columns}; "
                              "set image_column to the one with the images")
        image_column = auto
    elif image_column not in columns:
        raise ConfigError("image_column", image_column,
                          f"dataset has columns {columns}; set image_column to one of them")
    if caption_column is None:
        auto = next((name for name in CAPTION_COLUMN_CANDIDATES if name in columns), None)
        if auto is None:
            raise ConfigError("caption_column", None, f"none of {list(CAPTION_COLUMN_CANDIDATES)} is present; "
                              f"dataset has columns {columns}; set caption_column to one of them")
        caption_column = auto
    elif caption_column not in columns:
        raise ConfigError("caption_column", caption_column,
                          f"dataset has columns {columns}; set caption_column to one of them")
    _check_image_column(dataset, image_column)
    _check_caption_column(dataset, caption_column)
    return image_column, caption_column


def _check_image_column(dataset: datasets.Dataset, image_column: str) -> None:
    feature = dataset.features[image_column]
    if isinstance(feature, datasets.Image) and feature.decode:
        return
    first = dataset.select_columns([image_column])[0][image_column]
    if not isinstance(first, Image.Image):
        raise ConfigError("image_column", image_column, f"column holds {feature} values "
                          f"({type(first).__name__}), not images; set image_column to the column of images")


def _is_text(feature: object) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in _TEXT_DTYPES


def _check_caption_column(dataset: datasets.Dataset, caption_column: str) -> None:
    feature = dataset.features[caption_column]
    is_list = isinstance(feature, (datasets.List, datasets.LargeList)) and _is_text(feature.feature)
    if not (is_list or _is_text(feature)):
        raise ConfigError("caption_column", caption_column, f"column holds {feature}, not text; set "
                          "caption_column to a column of strings or lists of strings")
    # Found here, at start-up, rather than as a crash thousands of steps into training.
    column = dataset.select_columns([caption_column]).with_format("arrow")[:][caption_column]
    bad_row = _first_missing_caption(column, is_list)
    if bad_row is not None:
        raise ConfigError("caption_column", caption_column, f"row {bad_row} has no caption (null or an empty "
                          "list); give every image at least one caption or drop those rows")


def _first_missing_caption(column: pa.ChunkedArray, is_list: bool) -> int | None:
    column = column.combine_chunks()  # so list_parent_indices counts rows from the top
    missing = pc.is_null(column)
    bad_rows = []
    if is_list:
        missing = pc.or_(missing, pc.fill_null(pc.equal(pc.list_value_length(column), 0), True))
        flat = pc.list_flatten(column)
        if flat.null_count:  # a null string inside a caption list
            bad_rows.append(pc.min(pc.filter(pc.list_parent_indices(column), pc.is_null(flat))).as_py())
    bad_rows.append(pc.index(missing, True).as_py())
    bad_rows = [int(row) for row in bad_rows if row >= 0]
    return min(bad_rows) if bad_rows else None


def held_out_count(num_rows: int, validation_split: float) -> int:
    """Rows `validation_split` holds out: a fraction (at least one row) or a whole number of rows."""
    if not validation_split:
        return 0
    return max(1, round(validation_split * num_rows)) if validation_split < 1 else int(validation_split)


def split_held_out(dataset: datasets.Dataset, validation_split: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(training rows, held-out rows or None). The held-out rows are drawn by `seed` alone, so they stay
    the same whatever `max_train_samples` or the process count; both parts keep the dataset's order."""
    count = held_out_count(len(dataset), validation_split)
    if not count:
        return dataset, None
    if count >= len(dataset):
        raise ConfigError("validation_split", validation_split, f"holds out {count} of the dataset's {len(dataset)} rows, "
                          "leaving none to train on; hold out fewer rows")
    order = torch.randperm(len(dataset), generator=seeded_generator(seed, HELD_OUT_STREAM)).tolist()
    held_out, train = sorted(order[:count]), sorted(order[count:])
    # In memory: the indices must not be written as a cache file next to the user's dataset.
    return dataset.select(train, keep_in_memory=True), dataset.select(held_out, keep_in_memory=True)


def select_train_samples(dataset: datasets.Dataset, max_train_samples: int | None, seed: int) -> datasets.Dataset:
    """The first `max_train_samples` rows of a `seed`-shuffled copy (diffusers' `--max_train_samples`:
    the same subset for the same seed), or all rows when None or not fewer."""
    if max_train_samples is None or max_train_samples >= len(dataset):
        return dataset
    # In memory: the indices must not be written as a cache file next to the user's dataset.
    return dataset.shuffle(seed=seed, keep_in_memory=True).select(range(max_train_samples), keep_in_memory=True)
