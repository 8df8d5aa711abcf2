"""Hub ids in the path keys, resolved once to a local snapshot in the Hugging Face cache.

`pretrained_model_name_or_path`, `vae_path` and `dataset_dir` may name a hub repo (`org/name`)
instead of a local folder; a local folder that exists always wins. `resolve_hub_ids` turns each id
into its snapshot folder (`<HF_HUB_CACHE>/models--org--name/snapshots/<commit>`), downloading
only what loading reads, and returns the config with those paths: everything after it is
path-based. `revision` and `variant` apply to the model, `dataset_revision` to the dataset; the
VAE repo is read at its default branch without a variant.

The cache, offline mode and token are huggingface_hub's: HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE,
HF_TOKEN or the token stored by `hf auth login` (never passed, printed or written here). The
processes of a node take one file lock per repo in the cache, so the first downloads and the
others find the files there. Every failure is a `ConfigError` naming the key, the id and the fix.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ds_diffusers.config.schema import Config
from ds_diffusers.errors import ConfigError

Kind = Literal["pipeline", "vae", "dataset"]
_FIELDS: tuple[tuple[str, Kind], ...] = (("pretrained_model_name_or_path", "pipeline"), ("vae_path", "vae"),
                                          ("dataset_dir", "dataset"))
# The parts of a diffusers pipeline repo the trainer and the sampler read (the denoiser is `unet/` or, for
# FLUX.1 and SD 3.x, `transformer/`; not the safety checker, feature extractor or image encoder, never loaded).
_WEIGHT_FOLDERS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
_OTHER_FOLDERS = ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler")
# Weight files as diffusers and transformers name them: base name, optional variant, optional shard
# number, format; their shard indexes carry the variant before `.json`.
_WEIGHT_FILE = re.compile(r"^(diffusion_pytorch_model|model|pytorch_model)(?:\.(?P<variant>[A-Za-z0-9_]+))?"
                          r"(?:-\d+-of-\d+)?\.(?P<format>safetensors|bin)$")
_WEIGHT_INDEX = re.compile(r"^(diffusion_pytorch_model|model|pytorch_model)\.(?P<format>safetensors|bin)\.index"
                           r"(?:\.(?P<variant>[A-Za-z0-9_]+))?\.json$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".onnx_data", ".h5", ".pb")


@dataclass(frozen=True)
class HubSource:
    """One path key that names a hub repo."""

    field: str
    repo_id: str
    kind: Kind
    revision: str | None
    revision_field: str | None  # the key that sets `revision`, for error messages
    variant: str | None

    @property
    def repo_type(self) -> str:
        return "dataset" if self.kind == "dataset" else "model"


def _offline() -> bool:
    # Read when called, not at import (as huggingface_hub's constants are): a process that imported
    # it earlier still honours the environment it runs in.
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return constants.HF_HUB_OFFLINE or (value or "").upper() in ("1", "ON", "YES", "TRUE")


def cache_dir() -> Path:
    """huggingface_hub's cache folder, from the environment as it is now."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _source(cfg: Config, field: str, kind: Kind) -> HubSource | None:
    """The hub repo `field` names, or None for a local path (existing or not: a path with more or
    fewer than one `/` never names a repo; its absence is reported by the environment checks)."""
    value = getattr(cfg, field)
    revision_field = {"pipeline": "revision", "dataset": "dataset_revision"}.get(kind)
    revision = getattr(cfg, revision_field) if revision_field else None
    local = value is None or Path(value).expanduser().exists() or value.count("/") != 1 or value.startswith((".", "/", "~"))
    if local:
        if revision is not None and value is not None:
            raise ConfigError(revision_field, revision, f"{field} is the local folder {value}, which has no revisions; "
                              f"remove {revision_field} or set {field} to a hub id (org/name)")
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as err:
        raise ConfigError(field, value, f"no such local folder, and not a valid hub id ({err}); give an existing folder "
                          "or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5") from None
    return HubSource(field, value, kind, revision, revision_field, cfg.variant if kind == "pipeline" else None)


def hub_sources(cfg: Config) -> list[HubSource]:
    """The path keys of `cfg` that name hub repos (reads no network)."""
    return [source for field, kind in _FIELDS if (source := _source(cfg, field, kind)) is not None]


def _weight_choice(names: list[str], variant: str | None) -> list[str]:
    """The weight files of one folder that loading reads: safetensors when there are any, .bin
    otherwise, of the requested variant (or of none); [] when the folder has no such weights."""
    by_format: dict[str, list[str]] = {"safetensors": [], "bin": []}
    for name in names:
        match = _WEIGHT_FILE.match(name) or _WEIGHT_INDEX.match(name)
        if match and match["variant"] == variant:
            by_format[match["format"]].append(name)
    return by_format["safetensors"] or by_format["bin"]


def _missing_weights(source: HubSource, folder: str, names: list[str]) -> ConfigError:
    present = sorted(name for name in names if name.endswith(_WEIGHT_SUFFIXES)) or ["no weight files"]
    wanted = f"{source.variant} variant " if source.variant else ""
    fix = "set variant to null or to one the repo has" if source.variant else "use a repo in the diffusers layout"
    return ConfigError(source.field, source.repo_id, f"its {folder}/ holds no {wanted}weights that diffusers loads "
                       f"(safetensors or bin; found: {', '.join(present)}); {fix}")


def files_to_download(repo_files: list[str], source: HubSource) -> list[str]:
    """The repo files loading needs: configs, tokenizer and scheduler files, and one format (safetensors
    when there are any) and variant of the weights. A dataset repo is needed whole."""
    if source.kind == "dataset":
        return sorted(name for name in repo_files if name != ".gitattributes")
    if source.kind == "pipeline" and "model_index.json" not in repo_files:
        raise ConfigError(source.field, source.repo_id, "the repo has no model_index.json, so it is not a diffusers "
                          "pipeline; use a diffusers-format repo (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)")
    folders: dict[str, list[str]] = {"": []} if source.kind == "vae" else {name: [] for name in (*_WEIGHT_FOLDERS, *_OTHER_FOLDERS)}
    for path in repo_files:
        folder, _, name = path.rpartition("/")
        if folder in folders:
            folders[folder].append(name)
    wanted = ["model_index.json"] if source.kind == "pipeline" else []
    for folder, names in folders.items():
        prefix = f"{folder}/" if folder else ""
        if folder in _OTHER_FOLDERS:
            wanted += [prefix + name for name in names]
            continue
        if not names:  # e.g. no text_encoder_2 outside SDXL; a missing part is the model check's to report
            continue
        weights = _weight_choice(names, source.variant)
        if not weights:
            raise _missing_weights(source, folder or ".", names)
        wanted += [prefix + name for name in names if name.endswith(".json") and not _WEIGHT_INDEX.match(name)]
        wanted += [prefix + name for name in weights]
    return sorted(wanted)


def weight_variants(names: list[str]) -> set[str | None]:
    """The variants (None: the plain one) of the weight files among `names`."""
    return {match["variant"] for name in names if (match := _WEIGHT_FILE.match(name) or _WEIGHT_INDEX.match(name))}


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def _node_lock(source: HubSource) -> Iterator[None]:
    """One downloader per repo at a time on this cache: huggingface_hub locks each file, but every
    process would still walk the whole list; behind this lock the later ones find it cached."""
    from filelock import FileLock, Timeout

    lock_path = cache_dir() / ".locks" / f"ds-diffusers--{source.repo_type}s--{source.repo_id.replace('/', '--')}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if _is_main_rank():
            print(f"ds-diffusers: waiting for another process to download {source.repo_id} into {cache_dir()}", flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _not_cached(source: HubSource, offline: bool, err: Exception) -> ConfigError:
    cause = err.__cause__ or err
    why = "HF_HUB_OFFLINE is set" if offline else f"the hub could not be reached ({type(cause).__name__})"
    if source.revision is not None:
        return ConfigError(source.revision_field, source.revision, f"{why} and the hub cache {cache_dir()} holds no "
                           f"snapshot of {source.repo_id} at this revision; download it once online, or use a cached revision")
    return ConfigError(source.field, source.repo_id, f"no such local folder; as a hub id: {why} and the hub cache "
                       f"{cache_dir()} holds no snapshot of it; download it once online (without HF_HUB_OFFLINE), "
                       "or give a local folder")


def _download(source: HubSource) -> tuple[Path, str]:
    """(snapshot folder, commit) of `source`, downloaded or read from the cache; hub errors become
    ConfigErrors."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import errors as hub_errors

    offline = _offline()
    api = HfApi()
    try:
        revision = api.resolve_revision(source.repo_id, repo_type=source.repo_type, revision=source.revision,
                                        cache_dir=cache_dir(), local_files_only=offline)
        if offline:
            # Which files the repo has is not known offline: the folder is checked against what loading reads.
            folder = snapshot_download(source.repo_id, repo_type=source.repo_type, revision=revision, cache_dir=cache_dir(),
                                       local_files_only=True, allow_patterns=_OFFLINE_ANCHOR[source.kind])
        else:
            files = api.list_repo_files(source.repo_id, repo_type=source.repo_type, revision=revision.resolved)
            folder = snapshot_download(source.repo_id, repo_type=source.repo_type, revision=revision, cache_dir=cache_dir(),
                                       allow_patterns=files_to_download(files, source))
    except hub_errors.RevisionNotFoundError:
        raise ConfigError(source.revision_field or source.field, source.revision, f"{source.repo_id} has no branch, tag "
                          "or commit of that name; use one it has (e.g. main)") from None
    except hub_errors.GatedRepoError:
        raise ConfigError(source.field, source.repo_id, f"the repo is gated: accept its terms on https://huggingface.co/"
                          f"{source.repo_id} while logged in, then log in here (`hf auth login` or HF_TOKEN)") from None
    except hub_errors.RepositoryNotFoundError:
        raise ConfigError(source.field, source.repo_id, f"no such local folder, and no {source.repo_type} repo of that name "
                          "on the hub (a private one needs a token: `hf auth login` or HF_TOKEN); check the path or the id") from None
    except hub_errors.IncompleteSnapshotError as err:
        raise ConfigError(source.field, source.repo_id, f"the cached snapshot is incomplete ({str(err).splitlines()[0]}); "
                          "download it again online") from None
    except (hub_errors.RevisionResolutionError, hub_errors.LocalEntryNotFoundError) as err:
        raise _not_cached(source, offline, err) from None
    except hub_errors.HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        fix = "check the token (HF_TOKEN or `hf auth login`)" if status in (401, 403) else "try again later or give a local folder"
        raise ConfigError(source.field, source.repo_id, f"the hub answered HTTP {status}; {fix}") from None
    except OSError as err:  # disk full, read-only cache, connection lost mid-download
        raise ConfigError(source.field, source.repo_id, f"could not download into {cache_dir()} ({type(err).__name__}: "
                          f"{err}); free space or set HF_HOME to a writable folder, then start again") from None
    return Path(folder), revision.resolved


# Offline, the one file that says a snapshot of this kind is there at all.
_OFFLINE_ANCHOR: dict[Kind, list[str] | None] = {"pipeline": ["model_index.json"], "vae": ["config.json"], "dataset": None}


def _check_snapshot(source: HubSource, folder: Path, offline: bool) -> None:
    """The snapshot holds what loading reads (offline, files may be missing from the cache)."""
    from ds_diffusers.config.checks import check_model_dir, check_vae_dir

    fix = ("HF_HUB_OFFLINE is set: download the missing files once online" if offline
           else "delete that snapshot folder and start again to download it anew")
    try:
        if source.kind == "pipeline":
            check_model_dir(str(folder), source.variant)
        elif source.kind == "vae":
            check_vae_dir(str(folder))
    except ConfigError as err:
        if err.field != source.field:  # e.g. `variant`: about another key, which the message names
            raise
        raise ConfigError(source.field, source.repo_id, f"the snapshot is incomplete: {err.fix.split('; ')[0]}; {fix}") from None


def resolve_source(source: HubSource) -> Path:
    """All processes (each takes the node lock in turn); the snapshot folder of `source`."""
    offline = _offline()
    with contextlib.nullcontext() if offline else _node_lock(source):
        folder, commit = _download(source)
    _check_snapshot(source, folder, offline)
    if _is_main_rank():
        variant = f", variant {source.variant}" if source.variant else ""
        print(f"ds-diffusers: {source.field} {source.repo_id} (revision {source.revision or 'main'}, commit {commit[:12]}{variant}) "
              f"-> {folder}", flush=True)
    return folder


def resolve_hub_ids(cfg: Config) -> Config:
    """`cfg` with each hub id in a path key replaced by its local snapshot folder. All processes,
    before anything reads the paths; a config without hub ids comes back as it is."""
    sources = hub_sources(cfg)
    if not sources:
        return cfg
    return cfg.model_copy(update={source.field: str(resolve_source(source)) for source in sources})
