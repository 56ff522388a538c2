"""Ray Data preprocessing: raw videos + captions -> the latent dataset of `pusa_ray.data.latents`.

    ray job submit --working-dir . -- python jobs/preprocess.py --config jobs/configs/preprocess.tiny.yaml

Three steps:

1. **Plan** (the driver, no Ray). List the clips (a JSONL/CSV manifest, a folder with DiffSynth's
   ``metadata.csv``, or a folder of videos with sidecar ``.txt`` captions), stat each source (size
   and ETag on S3, size and mtime locally) and derive its key from its content identity and the
   encoding settings. Read what the output already holds: every complete shard's keys (from the
   sidecars) and the previous errors report. Clips already encoded are not redone; clips that
   failed for a reason their bytes determine (corrupt, too short, too wide) are not retried unless
   ``retry_skipped``. A bad config or a missing input fails here, before Ray starts, and a rerun
   with nothing left to do never starts Ray at all.
2. **Encode** (Ray Data, streaming, order irrelevant). Rows ``(key, uri, caption, start)`` flow
   through a decode actor pool (fetch, decode, sample at the target fps from ``start``, centre-crop
   and resize; a bad clip is written to an errors part file and dropped), a VAE actor pool (``[-1,
   1]`` pixels -> normalised latents), a text-encoder actor pool (prompt embeddings, unpadded; the
   UMT5 encoder lives only there) and a writer actor pool (one parquet shard + sidecar per
   ``shard_records`` records). The driver only receives one small row per shard written.
3. **Commit** (the driver). Index every clip of this input found in a complete shard, each key once
   (first shard by name wins), write the errors report, and commit the manifest last. The previous
   manifest stays valid until the new one replaces it.

A clip's key is ``sha256(format version, uri, size, ETag or mtime, start, caption, encoding
fingerprint)``; the fingerprint covers the model's VAE and text encoder (not the DiT), frames, fps,
size and storage dtypes. Shards are never overwritten (names carry the run id and a random part),
so a run killed at any point leaves only complete shards with sidecars, or debris without one that
the next commit deletes. One job per output prefix at a time.

Driver memory grows with the number of clips (their URIs, captions and keys), not with their
latents; a worker holds at most one batch of decoded pixels per actor plus Ray Data's buffers.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import inspect
import io
import json
import logging
import math
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field, field_validator, model_validator

from pusa_ray import storage, video
from pusa_ray.conditioning import latents_for_frames
from pusa_ray.config import (
    PRESETS,
    TEXT_LENGTH,
    ModelSpec,
    StorageUri,
    StrictModel,
    get_preset,
    validate_config,
)
from pusa_ray.config import load_config as load_yaml_config
from pusa_ray.data.latents import (
    DATASET_KIND,
    ERRORS_NAME,
    FORMAT_VERSION,
    INDEX_SCHEMA,
    SHARD_DIR,
    SIDECAR_SUFFIX,
    ShardInfo,
    encode_prompts_unpadded,
    read_sidecar,
    tensor_to_bytes,
    write_shard,
)
from pusa_ray.errors import UserInputError
from pusa_ray.storage import CorruptDataError, FileEntry

__all__ = [
    "ClipError",
    "DecodeClips",
    "EncodeLatents",
    "EncodeText",
    "WriteShards",
    "ModelDescription",
    "PreprocessConfig",
    "Summary",
    "build_pipeline",
    "describe_model",
    "load_config",
    "main",
    "parse_config",
    "plan",
    "prepare_clip",
    "run",
    "source_frame_indices",
]

logger = logging.getLogger(__name__)

WORK_DIR = "_work"  # per-run scratch under the output (errors part files); removed at commit
INDEX_PREFIX = "index-"
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
MAX_INPUT_BLOCKS = 4096
# Frame times are multiplied by the source rate and floored; this absorbs float error in t * fps.
_FRAME_TIME_EPSILON = 1e-6

TensorDtype = Literal["float32", "float16", "bfloat16"]


# ----------------------------------------------------------------------------------------------
# Configuration


class PoolResources(StrictModel):
    """One actor pool: how many actors, what each reserves, how many clips per call."""

    actors: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, gt=0, description="logical CPUs per actor (fractions allowed)")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per actor; > 0 runs the model on CUDA")
    batch_size: int = Field(default=1, ge=1, description="clips per call")
    torch_threads: int | None = Field(default=None, ge=1, description="default: max(1, floor(num_cpus))")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom resources per actor, e.g. {train_node: 0.001} to pick nodes"
    )

    def threads(self) -> int:
        return self.torch_threads or max(1, math.floor(self.num_cpus))


class WriterResources(StrictModel):
    """The shard writers: long-lived actors, so no task pays the imports again (I/O bound)."""

    actors: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=0.5, gt=0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom resources per actor")


class Resources(StrictModel):
    decode: PoolResources = PoolResources()
    vae: PoolResources = PoolResources()
    text: PoolResources = PoolResources(batch_size=8)
    writer: WriterResources = WriterResources()
    io_threads: int = Field(default=32, ge=1, description="driver threads for stat and listing calls")

    @field_validator("decode")
    @classmethod
    def _decode_on_cpu(cls, value: PoolResources) -> PoolResources:
        if value.num_gpus:
            raise ValueError("decoding runs on CPUs: resources.decode.num_gpus must be 0")
        return value


class InputConfig(StrictModel):
    """Where the clips are: a manifest file or a folder, local or s3://."""

    uri: StorageUri
    format: Literal["auto", "manifest", "metadata_csv", "sidecar"] = Field(
        default="auto",
        description="auto: *.jsonl/*.json/*.csv is a manifest; a folder with metadata.csv is "
        "metadata_csv; any other folder is sidecar (videos with .txt captions)",
    )
    video_extensions: tuple[str, ...] = VIDEO_EXTENSIONS


class PreprocessConfig(StrictModel):
    """The job's YAML: inputs, output, model and encoding settings, resources. Unknown keys are errors."""

    input: InputConfig
    output: StorageUri = Field(description="dataset directory, local or s3://")
    model: str = Field(default="tiny", description="preset name, model directory or s3:// URI")
    frames: int = Field(default=81, description="pixel frames per clip, 1 + 4k for Wan's VAE")
    fps: float = Field(default=16.0, gt=0, description="frames are sampled at this rate from `start`")
    height: int = 480
    width: int = 832
    max_crop_discard: float = Field(
        default=0.5, ge=0, le=1, description="skip clips whose centre crop drops more of the frame"
    )
    latents_dtype: TensorDtype = "float32"
    context_dtype: TensorDtype = "float32"
    shard_records: int = Field(default=64, ge=1, description="records per shard (the last may hold fewer)")
    retry_skipped: bool = Field(default=False, description="retry clips an earlier run skipped for good")
    resources: Resources = Resources()

    @field_validator("input", mode="before")
    @classmethod
    def _input_shorthand(cls, value: Any) -> Any:
        return {"uri": value} if isinstance(value, str) else value

    @field_validator("frames", "height", "width")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:  # the model's own rules (1 + 4k frames, multiples of 16 for Wan) come later
            raise ValueError(f"must be positive, got {value}")
        return value

    @model_validator(mode="after")
    def _output_outside_input(self) -> PreprocessConfig:
        if self.output.rstrip("/") == self.input.uri.rstrip("/"):
            raise ValueError(f"output {self.output!r} must not be the input folder")
        return self

    def encoding_settings(self) -> dict[str, Any]:
        """The fields that change the bytes of a record (and so a clip's key)."""
        return {
            "frames": self.frames,
            "fps": self.fps,
            "height": self.height,
            "width": self.width,
            "latents_dtype": self.latents_dtype,
            "context_dtype": self.context_dtype,
        }


def parse_config(data: Any, source: str = "config") -> PreprocessConfig:
    """Validate a config mapping; every problem is listed in one UserInputError."""
    return validate_config(PreprocessConfig, data, source, "preprocess")


def load_config(path: str | os.PathLike[str]) -> PreprocessConfig:
    """Read and validate a YAML config file."""
    return load_yaml_config(PreprocessConfig, path, "preprocess")


# ----------------------------------------------------------------------------------------------
# The model, described without loading weights (driver) and loaded part by part (actors)


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    """What the manifest records about the model; read from configs only, never from weights."""

    id: str
    source: str
    architecture: dict[str, Any]
    vae: dict[str, Any]  # latents_mean, latents_std, z_dim, scale factors
    text_encoder: dict[str, Any]  # id, dim, layers, vocab size, max_length
    fingerprint: str  # changes when the VAE or the text encoder (or tokenizer) changes

    def check_video(self, frames: int, height: int, width: int) -> None:
        """The codec's frame rule and the sizes it and the DiT's 2x2 patches divide; else UserInputError."""
        try:
            latents_for_frames(frames, self.vae["scale_factor_temporal"])
        except UserInputError as error:
            raise UserInputError(f"frames: {error}") from None
        multiple = 2 * self.vae["scale_factor_spatial"]  # every Wan DiT patches 2x2 latents
        for name, value in (("height", height), ("width", width)):
            if value % multiple:
                raise UserInputError(
                    f"{name}: must be a multiple of {multiple} for {self.id} "
                    f"(codec {self.vae['scale_factor_spatial']}x, patch 2), got {value}"
                )

    def latent_shape(self, frames: int, height: int, width: int) -> list[int]:
        """[C, F_lat, h, w] for a clip of frames x height x width pixels."""
        temporal, spatial = self.vae["scale_factor_temporal"], self.vae["scale_factor_spatial"]
        return [self.vae["z_dim"], (frames - 1) // temporal + 1, height // spatial, width // spatial]


def _digest(value: Any, length: int = 32) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


def _vae_config(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers' AutoencoderKLWan defaults updated with ``overrides`` (a config.json or preset).

    A space-to-depth codec's config is complete as it is.
    """
    from diffusers import AutoencoderKLWan

    from pusa_ray.models.codec import is_space_to_depth

    if is_space_to_depth(dict(overrides)):
        return dict(overrides)
    parameters = inspect.signature(AutoencoderKLWan.__init__).parameters.values()
    config = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    config.update({key: value for key, value in overrides.items() if not key.startswith("_")})
    return config


def _architecture_keys() -> tuple[str, ...]:
    return tuple(PRESETS["tiny"].architecture)


def _seeded_preset(name: str) -> ModelSpec:
    spec = get_preset(name)
    if spec.weights != "seeded":
        raise UserInputError(
            f"preset {name!r} has no embedded weights: set model to a model directory (diffusers "
            "layout, local or s3://) holding its weights"
        )
    return spec


def _describe(
    model_id: str,
    source: str,
    transformer: Mapping,
    vae: Mapping,
    text: Mapping,
    fingerprint: Any,
    length: int,
) -> ModelDescription:
    vae = _vae_config(vae)
    return ModelDescription(
        id=model_id,
        source=source,
        architecture={key: transformer[key] for key in _architecture_keys()},
        vae={
            "latents_mean": [float(v) for v in vae["latents_mean"]],
            "latents_std": [float(v) for v in vae["latents_std"]],
            "z_dim": int(vae["z_dim"]),
            "scale_factor_spatial": int(vae["scale_factor_spatial"]),
            "scale_factor_temporal": int(vae["scale_factor_temporal"]),
        },
        text_encoder={
            "id": f"{model_id}/text_encoder",
            "dim": int(text["d_model"]),
            "num_layers": int(text["num_layers"]),
            "vocab_size": int(text["vocab_size"]),
            "max_length": length,
        },
        fingerprint=_digest(fingerprint),
    )


def describe_model(model: str) -> ModelDescription:
    """Describe a preset or a model directory (local or s3://) from its config files."""
    from pusa_ray.models.loading import model_source

    if model in PRESETS and PRESETS[model].weights == "embedded":  # a directory in the package
        return dataclasses.replace(describe_model(model_source(model)), id=model, source=model)
    if model in PRESETS:
        spec = _seeded_preset(model)
        identity = {"preset": model, "seed": spec.seed, "vae": spec.vae, "text": spec.text_encoder}
        return _describe(
            spec.name, model, spec.transformer, spec.vae, spec.text_encoder, identity, spec.text_length
        )
    if model.startswith("s3://"):
        manifest = storage.read_manifest(model)  # committed model directories only
        files = [
            (entry.path, entry.size, entry.sha256)
            for entry in manifest.files
            if entry.path.split("/", 1)[0] in ("vae", "text_encoder", "tokenizer")
        ]
    elif Path(model).is_dir():
        root = Path(model)
        files = [
            (path.relative_to(root).as_posix(), path.stat().st_size)
            for part in ("vae", "text_encoder", "tokenizer")
            for path in sorted((root / part).rglob("*"))
            if path.is_file()
        ]
    else:
        known = ", ".join(sorted(PRESETS))
        raise UserInputError(f"model {model!r} is neither a preset ({known}) nor a model directory")

    def config(part: str) -> dict[str, Any]:
        uri = storage.join(model, part)
        try:
            return json.loads(storage.read_bytes(uri))
        except FileNotFoundError:
            raise UserInputError(f"model directory {model!r} has no {part} (diffusers Wan layout)") from None

    transformer, vae, text = (config(f"{p}/config.json") for p in ("transformer", "vae", "text_encoder"))
    saved = _saved_spec(model)
    identity = {"files": files, "vae": vae, "text": text}
    length = int(saved.get("text_length", TEXT_LENGTH))
    return _describe(saved.get("name") or model, model, transformer, vae, text, identity, length)


def _saved_spec(model: str) -> dict[str, Any]:
    """A model directory's `pusa_ray.json` (name, sizes, text length), or {} without one."""
    try:
        return json.loads(storage.read_bytes(storage.join(model, "pusa_ray.json")))
    except FileNotFoundError:
        return {}


def _model_root(model: str, parts: Sequence[str]) -> Path:
    """A local directory holding ``parts`` of the model directory ``model``.

    A local directory is used in place. From a committed s3:// directory only the files under
    ``parts`` are fetched (a VAE actor never downloads the 14B DiT), into the download cache,
    keyed by the manifest, and checked for size.
    """
    if not model.startswith("s3://"):
        return Path(model)
    manifest = storage.read_manifest(model)
    root = storage.cache_root() / "model-parts" / _digest(model) / _digest(manifest.to_json().decode(), 16)
    for part in parts:
        marker = root / f".{part}.complete"
        if marker.is_file():
            continue
        for entry in manifest.files:
            if entry.path.split("/", 1)[0] != part:
                continue
            local = root / entry.path
            if not (local.is_file() and local.stat().st_size == entry.size):
                storage.download_file(storage.join(model, entry.path), local)
            if local.stat().st_size != entry.size:
                raise CorruptDataError(
                    storage.join(model, entry.path), "downloaded size differs from manifest"
                )
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return root


def load_codec(model: str, device: torch.device) -> Any:
    """The model's VAE only, in float32 on ``device``, as `load_components` would load it."""
    from diffusers import AutoencoderKLWan

    from pusa_ray.models.codec import is_space_to_depth, make_codec
    from pusa_ray.models.loading import build_seeded, cast_parameters, model_source

    model = model_source(model)
    if model in PRESETS:
        _, vae, _ = build_seeded(_seeded_preset(model))
    else:
        root = _model_root(model, ["vae"])
        config = json.loads((root / "vae" / "config.json").read_text())
        if is_space_to_depth(config):
            return make_codec(config)
        vae = AutoencoderKLWan.from_pretrained(root, subfolder="vae", torch_dtype=torch.float32)
    if isinstance(vae, torch.nn.Module):
        vae = cast_parameters(vae.to(device), torch.float32).eval().requires_grad_(False)
    return make_codec(vae)


def load_text_encoder(model: str, device: torch.device) -> tuple[Any, torch.nn.Module, int]:
    """(tokenizer, text encoder, max length): as `load_components` loads them, nothing else."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    from pusa_ray.models.loading import (
        build_seeded,
        cast_parameters,
        default_dtype,
        model_source,
        preset_tokenizer,
    )

    model = model_source(model)
    if model in PRESETS:
        spec = _seeded_preset(model)
        _, _, encoder = build_seeded(spec)
        tokenizer, length = preset_tokenizer(spec), spec.text_length
    else:
        root = _model_root(model, ["text_encoder", "tokenizer"])
        encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder", dtype=default_dtype(device))
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        length = int(_saved_spec(model).get("text_length", TEXT_LENGTH))
    encoder = cast_parameters(encoder.to(device), default_dtype(device)).eval().requires_grad_(False)
    return tokenizer, encoder, length


# ----------------------------------------------------------------------------------------------
# Listing clips and planning


@dataclasses.dataclass(frozen=True)
class ClipEntry:
    """A clip as the input lists it; `caption_uri` when the caption sits in a sidecar file."""

    uri: str
    caption: str | None
    start: float
    origin: str  # where it was listed, for error messages
    caption_uri: str | None = None


@dataclasses.dataclass(frozen=True)
class PlannedClip:
    """A clip with its source identity and key, ready to encode."""

    key: str
    uri: str
    caption: str
    start: float
    size: int
    version: str

    def row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _error(
    uri: str,
    kind: str,
    reason: str,
    *,
    key: str | None = None,
    start: float = 0.0,
    caption: str | None = None,
    permanent: bool = False,
    **details: Any,
) -> dict[str, Any]:
    """One line of the errors report."""
    record = {"uri": uri, "start": start, "caption": caption, "key": key, "kind": kind, "reason": reason}
    record.update(permanent=permanent, **details)
    return record


def _parent(uri: str) -> str:
    if uri.startswith("s3://"):
        return uri.rstrip("/").rsplit("/", 1)[0]
    return str(Path(uri.removeprefix("file://")).parent)


def _resolve(base: str, path: str) -> str:
    """A manifest's video path: absolute paths and URIs as given, others relative to the manifest."""
    if "://" in path or path.startswith("/"):
        return path
    return storage.join(base, path)


_VIDEO_COLUMNS = ("video", "file_name")
_CAPTION_COLUMNS = ("caption", "text")


def _manifest_entry(row: Mapping[str, Any], base: str, origin: str) -> ClipEntry:
    """One manifest row -> ClipEntry; ValueError says what is wrong with the row."""
    video_column = next((name for name in _VIDEO_COLUMNS if name in row), None)
    caption_column = next((name for name in _CAPTION_COLUMNS if name in row), None)
    if video_column is None or caption_column is None:
        raise ValueError(
            f"needs a video (video or file_name) and a caption (caption or text), has {list(row)}"
        )
    path, caption, start = row[video_column], row[caption_column], row.get("start")
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{video_column} must be a non-empty string, got {path!r}")
    if caption is not None and not isinstance(caption, str):
        raise ValueError(f"{caption_column} must be a string, got {caption!r}")
    start = 0.0 if start in (None, "") else float(start)
    if not math.isfinite(start) or start < 0:
        raise ValueError(f"start must be a number of seconds >= 0, got {row.get('start')!r}")
    return ClipEntry(_resolve(base, path.strip()), caption, start, origin)


def _read_manifest(uri: str) -> tuple[list[ClipEntry], list[dict[str, Any]]]:
    """Rows of a JSONL or CSV manifest (or metadata.csv); bad rows become error records."""
    try:
        text = storage.read_bytes(uri).decode("utf-8-sig")
    except FileNotFoundError:
        raise UserInputError(f"input manifest {uri!r} does not exist") from None
    except UnicodeDecodeError as error:
        raise UserInputError(f"input manifest {uri!r} is not UTF-8 text: {error}") from None
    base = _parent(uri)
    if uri.lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        header = reader.fieldnames or []
        if not set(header) & set(_VIDEO_COLUMNS) or not set(header) & set(_CAPTION_COLUMNS):
            raise UserInputError(
                f"CSV manifest {uri!r} needs columns video,caption[,start] or file_name,text[,start]; "
                f"its header is {header}"
            )
        rows: Iterable[tuple[int, Any]] = ((number + 2, row) for number, row in enumerate(reader))
    else:
        rows = ((number + 1, line) for number, line in enumerate(text.splitlines()) if line.strip())
    entries, errors = [], []
    for number, row in rows:
        origin = f"{uri}:{number}"
        try:
            if isinstance(row, str):
                row = json.loads(row)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            entries.append(_manifest_entry(row, base, origin))
        except (ValueError, UserInputError) as error:
            errors.append(_error(origin, "bad_manifest_row", f"{origin}: {error}", permanent=True))
    return entries, errors


def _read_sidecar_folder(uri: str, extensions: Sequence[str]) -> list[ClipEntry]:
    files = storage.list_files(uri)
    present = set(files)
    entries = []
    for relative in files:
        stem, dot, extension = relative.rpartition(".")
        if not dot or f".{extension.lower()}" not in extensions:
            continue
        caption = f"{stem}.txt"
        entries.append(
            ClipEntry(
                storage.join(uri, relative),
                None,
                0.0,
                storage.join(uri, relative),
                caption_uri=storage.join(uri, caption) if caption in present else None,
            )
        )
    return entries


def list_clips(config: InputConfig) -> tuple[list[ClipEntry], list[dict[str, Any]]]:
    """The clips an input lists, and error records for the rows that could not be read."""
    uri, kind = config.uri, config.format
    if kind == "auto":
        if uri.lower().endswith((".jsonl", ".json", ".csv")):
            kind = "manifest"
        elif storage.exists(storage.join(uri, "metadata.csv")):
            kind = "metadata_csv"
        else:
            kind = "sidecar"
    if kind == "manifest":
        return _read_manifest(uri)
    if kind == "metadata_csv":
        return _read_manifest(storage.join(uri, "metadata.csv"))
    entries = _read_sidecar_folder(uri, tuple(ext.lower() for ext in config.video_extensions))
    if not entries and not storage.list_files(uri):
        raise UserInputError(f"input folder {uri!r} is empty or does not exist")
    return entries, []


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def _stat(uri: str) -> tuple[int, str]:
    """(size, version) of a source: S3 ETag, or a local file's mtime in nanoseconds."""
    if uri.startswith("s3://"):
        from botocore.exceptions import ClientError

        bucket, key = _split_s3(uri)
        try:
            head = storage.s3_client().head_object(Bucket=bucket, Key=key)
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"no such object: {uri}") from None
            raise OSError(f"cannot stat {uri}: {code} {error}") from None
        return int(head["ContentLength"]), str(head.get("ETag", "")).strip('"')
    path = Path(uri.removeprefix("file://"))
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if not path.is_file():
        raise IsADirectoryError(f"not a regular file: {path}")
    info = path.stat()
    return info.st_size, str(info.st_mtime_ns)


def clip_key(uri: str, size: int, version: str, start: float, caption: str, fingerprint: str) -> str:
    """The stable identity of a clip's record: its source bytes, where it starts, its caption and
    the encoding settings. 32 hex digits."""
    return _digest([FORMAT_VERSION, uri, size, version, round(start, 6), caption, fingerprint])


def _plan_entry(entry: ClipEntry, fingerprint: str) -> PlannedClip | dict[str, Any]:
    """Stat one listed clip and read its sidecar caption; an error record when that fails."""
    try:
        size, version = _stat(entry.uri)
    except FileNotFoundError as error:
        return _error(entry.uri, "missing", str(error), start=entry.start, caption=entry.caption)
    except OSError as error:
        return _error(entry.uri, "unreadable", str(error), start=entry.start, caption=entry.caption)
    caption = entry.caption
    if caption is None:
        if entry.caption_uri is None:
            return _error(entry.uri, "missing_caption", "no caption (.txt sidecar) for this video")
        try:
            caption = storage.read_bytes(entry.caption_uri).decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as error:
            return _error(entry.uri, "missing_caption", f"cannot read {entry.caption_uri}: {error}")
    caption = caption.strip()
    if not caption:
        return _error(entry.uri, "empty_caption", "the caption is empty", start=entry.start, permanent=True)
    key = clip_key(entry.uri, size, version, entry.start, caption, fingerprint)
    if size == 0:
        return _error(
            entry.uri,
            "empty_file",
            "the video file is empty (0 bytes)",
            key=key,
            start=entry.start,
            caption=caption,
            permanent=True,
        )
    return PlannedClip(key, entry.uri, caption, entry.start, size, version)


def encoding_fingerprint(config: PreprocessConfig, model: ModelDescription) -> str:
    """What a clip's key depends on besides its source: the model's encoders and the settings."""
    return _digest({"model": model.fingerprint, **config.encoding_settings()})


def _list_sizes(prefix: str) -> dict[str, int]:
    """Relative path -> size of every file under ``prefix`` ({} if there is none)."""
    if not prefix.startswith("s3://"):
        root = Path(prefix.removeprefix("file://"))
        return {name: (root / name).stat().st_size for name in storage.list_files(prefix)}
    bucket, key = _split_s3(prefix)
    key = key.rstrip("/") + "/"
    sizes = {}
    for page in storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
        for item in page.get("Contents", []):
            sizes[item["Key"][len(key) :]] = int(item["Size"])
    return sizes


def complete_shards(output: str, threads: int = 32) -> tuple[list[ShardInfo], list[str]]:
    """(complete shards sorted by path, paths of debris): a shard is complete when its sidecar
    exists and names its size; a shard without one, or a sidecar without its shard, is debris."""
    sizes = _list_sizes(storage.join(output, SHARD_DIR))
    sidecars = sorted(name for name in sizes if name.endswith(".parquet" + SIDECAR_SUFFIX))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        infos = list(pool.map(lambda name: read_sidecar(storage.join(output, SHARD_DIR, name)), sidecars))
    complete, debris = [], []
    for name, info in zip(sidecars, infos, strict=True):
        shard = name.removesuffix(SIDECAR_SUFFIX)
        if info.path != f"{SHARD_DIR}/{shard}" or sizes.get(shard) != info.size:
            debris.append(f"{SHARD_DIR}/{name}")
            continue
        complete.append(info)
    known = {info.path for info in complete}
    debris += [
        f"{SHARD_DIR}/{name}"
        for name in sizes
        if name.endswith(".parquet") and f"{SHARD_DIR}/{name}" not in known
    ]
    return complete, debris


def _read_jsonl(uri: str) -> list[dict[str, Any]]:
    try:
        text = storage.read_bytes(uri).decode()
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a report line we cannot parse is only a report line
        if isinstance(record, dict):
            records.append(record)
    return records


def previous_errors(output: str) -> list[dict[str, Any]]:
    """The last committed errors report plus the part files of runs that never committed."""
    records = _read_jsonl(storage.join(output, ERRORS_NAME))
    for relative in storage.list_files(storage.join(output, WORK_DIR)):
        if relative.endswith(".jsonl"):
            records += _read_jsonl(storage.join(output, WORK_DIR, relative))
    return records


def _still_fails(record: Mapping[str, Any], config: PreprocessConfig) -> bool:
    """Whether an earlier failure of the same key would happen again under this config."""
    if not record.get("permanent") or config.retry_skipped:
        return False
    if record.get("kind") == "crop":
        return float(record.get("crop_discard", 1.0)) > config.max_crop_discard
    return True


@dataclasses.dataclass
class Plan:
    """What the input holds, what the output already has, and what is left to encode."""

    clips: list[PlannedClip]  # every usable clip of the input, each key once
    todo: list[PlannedClip]
    errors: list[dict[str, Any]]  # known now: listing problems, and earlier failures still valid
    already_present: int
    duplicates: int


def plan(config: PreprocessConfig, model: ModelDescription) -> Plan:
    """List, stat and key the clips; subtract what the output already holds (see module docstring)."""
    entries, errors = list_clips(config.input)
    fingerprint = encoding_fingerprint(config, model)
    with ThreadPoolExecutor(max_workers=config.resources.io_threads) as pool:
        results = list(pool.map(lambda entry: _plan_entry(entry, fingerprint), entries))
    clips: dict[str, PlannedClip] = {}
    duplicates = 0
    for result in results:
        if isinstance(result, dict):
            errors.append(result)
        elif result.key in clips:
            duplicates += 1  # the same source, start and caption listed twice
        else:
            clips[result.key] = result
    shards, _ = complete_shards(config.output, config.resources.io_threads)
    done = {key for info in shards for key in info.keys} & clips.keys()
    failed = {}
    for record in previous_errors(config.output):
        key = record.get("key")
        if key in clips and key not in done and _still_fails(record, config):
            failed[key] = record
    errors += failed.values()
    todo = [clip for key, clip in clips.items() if key not in done and key not in failed]
    return Plan(list(clips.values()), todo, errors, len(done), duplicates)


# ----------------------------------------------------------------------------------------------
# Decoding one clip (pure: no Ray)


class ClipError(Exception):
    """A clip that cannot be used; `permanent` when its bytes determine it (retrying cannot help)."""

    def __init__(self, kind: str, reason: str, permanent: bool = True, **details: Any) -> None:
        super().__init__(reason)
        self.kind, self.reason, self.permanent, self.details = kind, reason, permanent, details


def source_frame_indices(start: float, frames: int, fps: float, source_fps: float) -> np.ndarray:
    """Source frame shown at each target time ``start + i / fps`` (i < frames): ``[frames]`` int64.

    A frame is on screen from ``k / source_fps`` until the next, so time t shows frame
    ``floor(t * source_fps)``. Equal rates from 0 give 0, 1, 2, ...; a slower source repeats frames.
    """
    if source_fps <= 0 or fps <= 0:
        raise ValueError(f"frame rates must be positive, got fps={fps}, source_fps={source_fps}")
    times = start + np.arange(frames, dtype=np.float64) / fps  # [frames] seconds
    return np.floor(times * source_fps + _FRAME_TIME_EPSILON).astype(np.int64)


def prepare_clip(
    source: str | Path,
    start: float,
    frames: int,
    fps: float,
    height: int,
    width: int,
    max_crop_discard: float,
) -> np.ndarray:
    """Decode, sample and centre-crop/resize one clip -> uint8 ``[frames, height, width, 3]``.

    Raises ClipError naming why a clip is unusable: unreadable (not a video, corrupt, truncated),
    crop (the centre crop would discard more than ``max_crop_discard`` of the frame), too_short.
    """
    try:
        first, source_fps = video.read_video(source, max_frames=1)  # [1, H, W, 3]: size and rate
    except ValueError as error:
        raise ClipError("unreadable", str(error)) from None
    source_height, source_width = first.shape[1:3]
    discard = video.crop_discard_fraction(source_height, source_width, height, width)
    if discard > max_crop_discard + 1e-9:
        raise ClipError(
            "crop",
            f"centre crop of the {source_width}x{source_height} frame to {width}x{height} would discard "
            f"{discard:.0%} of it (max_crop_discard {max_crop_discard:g})",
            crop_discard=round(discard, 6),
        )
    indices = source_frame_indices(start, frames, fps, source_fps)  # [frames]
    needed = int(indices[-1]) + 1
    try:
        decoded, _ = video.read_video(source, max_frames=needed)  # [<= needed, H, W, 3]
    except ValueError as error:
        raise ClipError("unreadable", str(error)) from None
    if len(decoded) < needed:
        raise ClipError(
            "too_short",
            f"{frames} frames at {fps:g} fps from {start:g} s need {needed} frames at {source_fps:g} fps; "
            f"the video has {len(decoded)}",
        )
    return video.resize_center_crop(decoded[indices], height, width)  # [frames, height, width, 3]


def _fetch(uri: str, size: int, scratch: Path) -> Path:
    """A local path with the clip's bytes: local files in place, S3 objects downloaded to scratch."""
    if not uri.startswith("s3://"):
        path = Path(uri.removeprefix("file://"))
        if not path.is_file():
            raise ClipError("missing", f"no such file: {path}", permanent=False)
        return path
    local = scratch / "video"
    try:
        storage.download_file(uri, local)
    except FileNotFoundError:
        raise ClipError("missing", f"no such object: {uri}", permanent=False) from None
    except OSError as error:
        raise ClipError("unreadable", f"cannot download {uri}: {error}", permanent=False) from None
    if local.stat().st_size != size:
        raise ClipError("changed", f"{uri} changed since it was listed ({size} bytes then)", permanent=False)
    return local


# ----------------------------------------------------------------------------------------------
# Ray Data UDFs. Configs arrive as plain dicts and are validated again here.


def _device(pool: PoolResources) -> torch.device:
    return torch.device("cuda" if pool.num_gpus > 0 else "cpu")


def _decode_row(row: Mapping[str, Any], config: PreprocessConfig) -> np.ndarray:
    """One planned clip -> uint8 [F, H, W, 3]; every failure is a ClipError naming the reason."""
    try:
        with tempfile.TemporaryDirectory(prefix="pusa_ray_clip_") as scratch:
            source = _fetch(str(row["uri"]), int(row["size"]), Path(scratch))
            return prepare_clip(
                source,
                float(row["start"]),
                config.frames,
                config.fps,
                config.height,
                config.width,
                config.max_crop_discard,
            )
    except ClipError:
        raise
    except Exception as error:  # one odd file must not end a long job; it is reported, and retried
        logger.exception("decoding %s failed", row["uri"])
        raise ClipError("decode_failed", f"{type(error).__name__}: {error}", permanent=False) from error


class DecodeClips:
    """Actor: rows (key, uri, caption, start, ...) -> the same rows with ``pixels`` uint8
    ``[B, F, H, W, 3]``. Bad clips are written to an errors part file under the run's work dir and
    dropped from the batch."""

    def __init__(self, config: dict[str, Any], work_uri: str) -> None:
        self.config = PreprocessConfig.model_validate(config)
        self.work_uri = work_uri
        torch.set_num_threads(self.config.resources.decode.threads())

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        config = self.config
        kept: dict[str, list[Any]] = {
            name: [] for name in ("key", "uri", "caption", "start", "size", "version")
        }
        pixels, errors = [], []
        for row in (dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)):
            try:
                clip = _decode_row(row, config)  # [F, H, W, 3]
            except ClipError as error:
                errors.append(
                    _error(
                        str(row["uri"]),
                        error.kind,
                        error.reason,
                        key=str(row["key"]),
                        start=float(row["start"]),
                        caption=str(row["caption"]),
                        permanent=error.permanent,
                        **error.details,
                    )
                )
                continue
            for name in kept:
                kept[name].append(row[name])
            pixels.append(clip)
        if errors:
            lines = "".join(json.dumps(record) + "\n" for record in errors)
            storage.write_bytes(
                storage.join(self.work_uri, f"errors-{secrets.token_hex(8)}.jsonl"), lines.encode()
            )
        if not pixels:
            return  # nothing usable: no output batch (an empty tensor column has no Arrow type)
        output = {name: np.array(values, dtype=object) for name, values in kept.items()}
        output["start"] = np.array(kept["start"], dtype=np.float64)
        output["size"] = np.array(kept["size"], dtype=np.int64)
        output["pixels"] = np.stack(pixels)  # [B, F, H, W, 3] uint8
        yield output


class EncodeLatents:
    """Actor holding only the VAE: pixels uint8 ``[B, F, H, W, 3]`` -> normalised latents
    ``[B, C, F_lat, h, w]``, stored as bytes in ``latents_dtype``. Returns an Arrow table."""

    def __init__(self, config: dict[str, Any], model: dict[str, Any]) -> None:
        self.config = PreprocessConfig.model_validate(config)
        pool = self.config.resources.vae
        torch.set_num_threads(pool.threads())
        self.codec = load_codec(self.config.model, _device(pool))
        mean = self.codec.latents_mean.flatten().tolist()
        std = (1.0 / self.codec.inverse_std.flatten()).tolist()
        expected = model["vae"]
        if not (
            np.allclose(mean, expected["latents_mean"])
            and np.allclose(std, expected["latents_std"], rtol=1e-5)
        ):
            raise RuntimeError(
                f"the VAE loaded from {self.config.model!r} has latents mean/std {mean}/{std}, "
                f"but its config says {expected['latents_mean']}/{expected['latents_std']}"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        config = self.config
        rows = len(batch["key"])
        if rows:
            pixels = torch.stack(
                [video.frames_to_tensor(clip) for clip in batch["pixels"]]
            )  # [B, 3, F, H, W]
            latents = self.codec.encode(pixels)  # [B, C, F_lat, h, w] float32
        blobs = [tensor_to_bytes(latents[index], config.latents_dtype) for index in range(rows)]
        shapes = [list(latents.shape[1:]) for _ in range(rows)] if rows else []
        return pa.table(
            {
                "key": pa.array(batch["key"].tolist(), pa.string()),
                "uri": pa.array(batch["uri"].tolist(), pa.string()),
                "caption": pa.array(batch["caption"].tolist(), pa.string()),
                "start": pa.array(batch["start"].tolist(), pa.float64()),
                "source_size": pa.array(batch["size"].tolist(), pa.int64()),
                "source_version": pa.array(batch["version"].tolist(), pa.string()),
                "latents": pa.array(blobs, pa.binary()),
                "latents_dtype": pa.array([config.latents_dtype] * rows, pa.string()),
                "latents_shape": pa.array(shapes, pa.list_(pa.int32())),
            }
        )


class EncodeText:
    """Actor holding only the tokenizer and text encoder: captions -> unpadded prompt embeddings
    ``[L_i, D]`` stored as bytes in ``context_dtype``, with their length and width."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = PreprocessConfig.model_validate(config)
        pool = self.config.resources.text
        torch.set_num_threads(pool.threads())
        self.tokenizer, self.encoder, self.max_length = load_text_encoder(self.config.model, _device(pool))

    def __call__(self, table: pa.Table) -> pa.Table:
        captions = table.column("caption").to_pylist()
        contexts = (
            encode_prompts_unpadded(self.tokenizer, self.encoder, captions, self.max_length)
            if captions
            else []
        )  # each [L_i, D]
        dtype = self.config.context_dtype
        return (
            table.append_column(
                "context", pa.array([tensor_to_bytes(c, dtype) for c in contexts], pa.binary())
            )
            .append_column("context_dtype", pa.array([dtype] * len(contexts), pa.string()))
            .append_column("context_length", pa.array([c.shape[0] for c in contexts], pa.int32()))
            .append_column("context_dim", pa.array([c.shape[1] for c in contexts], pa.int32()))
        )


class WriteShards:
    """Actor: each batch of finished records becomes one shard (+ sidecar); returns one summary row."""

    def __init__(self, output: str, run: str) -> None:
        self.output, self.run = output, run

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        if table.num_rows == 0:
            return {"shard": np.array([], dtype=object), "records": np.array([], dtype=np.int64)}
        path = f"{SHARD_DIR}/{self.run}-{secrets.token_hex(8)}.parquet"
        info = write_shard(table, self.output, path, self.run)
        return {"shard": np.array([info.path], dtype=object), "records": np.array([len(info.keys)])}


def build_pipeline(
    config: PreprocessConfig, todo: Sequence[PlannedClip], model: ModelDescription, run: str
) -> Any:
    """The streaming Ray Data pipeline over ``todo``: decode -> VAE -> text -> shard writer."""
    import ray

    resources = config.resources
    plain = config.model_dump(mode="json")  # crosses to the workers as a plain dict
    rows = [clip.row() for clip in todo]
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), MAX_INPUT_BLOCKS)))
    pools = (
        (DecodeClips, resources.decode, {"config": plain, "work_uri": _work_uri(config.output, run)}),
        (EncodeLatents, resources.vae, {"config": plain, "model": dataclasses.asdict(model)}),
        (EncodeText, resources.text, {"config": plain}),
    )
    for udf, pool, arguments in pools:
        dataset = dataset.map_batches(
            udf,
            fn_constructor_kwargs=arguments,
            compute=ray.data.ActorPoolStrategy(size=pool.actors),
            batch_size=pool.batch_size,
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus,
            resources=pool.resources or None,
            batch_format="pyarrow" if udf is EncodeText else "numpy",
        )
    return dataset.map_batches(
        WriteShards,
        fn_constructor_kwargs={"output": config.output, "run": run},
        compute=ray.data.ActorPoolStrategy(size=resources.writer.actors),
        batch_size=config.shard_records,
        num_cpus=resources.writer.num_cpus,
        resources=resources.writer.resources or None,
        batch_format="pyarrow",
    )


# ----------------------------------------------------------------------------------------------
# Committing


def _work_uri(output: str, run: str) -> str:
    return storage.join(output, WORK_DIR, run)


def dataset_metadata(
    config: PreprocessConfig,
    model: ModelDescription,
    index_name: str,
    counts: dict[str, int],
    shards: list[dict],
) -> dict[str, Any]:
    """The manifest's ``extra``: everything a reader needs to know about how the data was made."""
    return {
        "kind": DATASET_KIND,
        "format_version": FORMAT_VERSION,
        "model": {"id": model.id, "source": model.source, "architecture": model.architecture},
        "vae": model.vae,
        "text_encoder": model.text_encoder,
        "video": {"frames": config.frames, "height": config.height, "width": config.width, "fps": config.fps},
        "latents": {
            "dtype": config.latents_dtype,
            "shape": model.latent_shape(config.frames, config.height, config.width),
            "space": "normalised: (z - latents_mean) / latents_std",
        },
        "context": {
            "dtype": config.context_dtype,
            "dim": model.text_encoder["dim"],
            "padded_length": model.text_encoder["max_length"],
            "stored": "unpadded [context_length, dim]",
        },
        "encoding": {"fingerprint": encoding_fingerprint(config, model), **config.encoding_settings()},
        "max_crop_discard": config.max_crop_discard,
        "index": index_name,
        "errors": ERRORS_NAME,
        "counts": counts,
        "shards": shards,
    }


def _index_table(
    clips: Mapping[str, PlannedClip], shards: Sequence[ShardInfo]
) -> tuple[pa.Table, list[ShardInfo]]:
    """One index row per wanted clip found in a shard (the first shard by path wins)."""
    located: dict[str, tuple[str, int]] = {}
    for info in shards:
        for row, key in enumerate(info.keys):
            if key in clips and key not in located:
                located[key] = (info.path, row)
    order = sorted(located, key=lambda key: located[key])
    columns = {
        "key": order,
        "shard": [located[key][0] for key in order],
        "row": [located[key][1] for key in order],
        "uri": [clips[key].uri for key in order],
        "caption": [clips[key].caption for key in order],
        "start": [clips[key].start for key in order],
    }
    used = {path for path, _ in located.values()}
    return pa.table(columns, schema=INDEX_SCHEMA), [info for info in shards if info.path in used]


def _write_parquet(uri: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    storage.write_bytes(uri, buffer.getvalue())


def commit(
    config: PreprocessConfig, model: ModelDescription, planned: Plan, run: str, written: int, seconds: float
) -> Summary:
    """Index, errors report, manifest (last); then remove the debris of this and earlier runs."""
    output, threads = config.output, config.resources.io_threads
    clips = {clip.key: clip for clip in planned.clips}
    shards, debris = complete_shards(output, threads)
    index, used = _index_table(clips, shards)
    new_errors = {}
    for record in _read_parts(_work_uri(output, run)):
        new_errors[record["key"]] = record  # a retried task may report a clip twice
    errors = sorted([*planned.errors, *new_errors.values()], key=lambda r: (r["uri"], r["start"], r["kind"]))
    missing = set(clips) - set(index.column("key").to_pylist()) - {record.get("key") for record in errors}
    if missing:
        raise RuntimeError(
            f"{len(missing)} clips were neither written nor reported, e.g. {sorted(missing)[:3]}"
        )
    errors_bytes = "".join(json.dumps(record) + "\n" for record in errors).encode()
    counts = {"clips": index.num_rows, "shards": len(used), "skipped": len(errors)}
    shard_list = [{"path": s.path, "records": len(s.keys), "size": s.size, "sha256": s.sha256} for s in used]
    index_name = f"{INDEX_PREFIX}{run}.parquet"
    metadata = dataset_metadata(config, model, index_name, counts, shard_list)
    committed = _committed_index_if_unchanged(output, metadata, index, errors_bytes)
    if committed is not None:  # nothing to change: leave the dataset exactly as it is
        index_name = committed
    else:
        _write_parquet(storage.join(output, index_name), index)
        storage.write_bytes(storage.join(output, ERRORS_NAME), errors_bytes)
        files = [FileEntry(s.path, s.size, s.sha256) for s in used] + [index_name]
        storage.commit_dir(output, files, metadata)
    _clean_up(output, index_name, debris)
    return Summary(written, len(errors), planned.already_present, index.num_rows, len(used), seconds, output)


def _committed_index_if_unchanged(
    output: str, metadata: dict[str, Any], index: pa.Table, errors_bytes: bytes
) -> str | None:
    """The committed index's name if the committed dataset already is what we would commit."""
    try:
        manifest = storage.read_manifest(output)
    except storage.UncommittedError:
        return None
    name = manifest.extra.get("index")
    if not isinstance(name, str) or json.loads(json.dumps({**metadata, "index": name})) != manifest.extra:
        return None
    try:
        same_errors = storage.read_bytes(storage.join(output, ERRORS_NAME)) == errors_bytes
        committed = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(output, name))))
    except FileNotFoundError:
        return None
    return name if same_errors and committed.cast(INDEX_SCHEMA).equals(index) else None


def _read_parts(work_uri: str) -> list[dict[str, Any]]:
    return [
        record
        for relative in storage.list_files(work_uri)
        if relative.endswith(".jsonl")
        for record in _read_jsonl(storage.join(work_uri, relative))
    ]


def _clean_up(output: str, index_name: str, debris: Sequence[str]) -> None:
    stale = [name for name in storage.list_files(output) if name.startswith(INDEX_PREFIX) and "/" not in name]
    for name in [*debris, *(name for name in stale if name != index_name)]:
        storage.delete(storage.join(output, name))
    storage.delete_prefix(storage.join(output, WORK_DIR))


# ----------------------------------------------------------------------------------------------
# The job


@dataclasses.dataclass(frozen=True)
class Summary:
    """What a run did: clips written and skipped, what was already there, and the rate."""

    written: int
    skipped: int
    already_present: int
    clips: int
    shards: int
    seconds: float
    output: str

    @property
    def clips_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"preprocess: {self.written} clips written, {self.skipped} skipped, "
            f"{self.already_present} already present; {self.clips_per_second:.2f} clips/s over "
            f"{self.seconds:.1f} s; dataset {self.output}: {self.clips} clips in {self.shards} shards"
        )


def new_run_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def run(config: PreprocessConfig, run_id: str | None = None) -> Summary:
    """Plan, encode what is missing on Ray (started with ``ray.init()`` if needed), commit."""
    started = time.perf_counter()
    run_id = run_id or new_run_id()
    model = describe_model(config.model)
    model.check_video(config.frames, config.height, config.width)
    planned = plan(config, model)
    logger.info(
        "plan: %d clips, %d already present, %d to encode, %d skipped, %d duplicate rows ignored",
        len(planned.clips),
        planned.already_present,
        len(planned.todo),
        len(planned.errors),
        planned.duplicates,
    )
    written = 0
    if planned.todo:
        import ray

        if not ray.is_initialized():
            ray.init()  # no arguments: attach to the cluster this job runs on (or start a local one)
        ray.data.DataContext.get_current().execution_options.preserve_order = False  # keys identify records
        for row in build_pipeline(config, planned.todo, model, run_id).iter_rows():
            written += int(row["records"])
            logger.info(
                "wrote %s (%d records, %d/%d clips)", row["shard"], row["records"], written, len(planned.todo)
            )
    return commit(config, model, planned, run_id, written, time.perf_counter() - started)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pusa-ray preprocess",
        description="Encode videos and captions into a latent dataset (Ray Data job).",
    )
    parser.add_argument("--config", required=True, help="YAML config (see jobs/configs/preprocess.*.yaml)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: returns 0 on success, 2 for bad configs or inputs (one line on stderr)."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
        summary = run(config)
    except (UserInputError, storage.UncommittedError) as error:
        if os.environ.get("PUSA_RAY_DEBUG"):
            raise
        print(f"pusa-ray preprocess: error: {error}", file=sys.stderr)
        return 2
    print(summary.line(), flush=True)
    return 0
