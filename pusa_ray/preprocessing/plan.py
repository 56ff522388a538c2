"""Listing the clips of an input and planning the run: what is there, what the output already
holds, what is left to encode."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pusa_ray import storage
from pusa_ray.data.latents import (
    ERRORS_NAME,
    FORMAT_VERSION,
    SHARD_DIR,
    SIDECAR_SUFFIX,
    ShardInfo,
    read_sidecar,
)
from pusa_ray.errors import UserInputError
from pusa_ray.models.description import ModelDescription, short_digest
from pusa_ray.preprocessing.config import InputConfig, PreprocessConfig

WORK_DIR = "_work"  # per-run scratch under the output (errors part files); removed at commit

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


def error_record(
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
            errors.append(error_record(origin, "bad_manifest_row", f"{origin}: {error}", permanent=True))
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
    return short_digest([FORMAT_VERSION, uri, size, version, round(start, 6), caption, fingerprint])


def _plan_entry(entry: ClipEntry, fingerprint: str) -> PlannedClip | dict[str, Any]:
    """Stat one listed clip and read its sidecar caption; an error record when that fails."""
    try:
        size, version = _stat(entry.uri)
    except FileNotFoundError as error:
        return error_record(entry.uri, "missing", str(error), start=entry.start, caption=entry.caption)
    except OSError as error:
        return error_record(entry.uri, "unreadable", str(error), start=entry.start, caption=entry.caption)
    caption = entry.caption
    if caption is None:
        if entry.caption_uri is None:
            return error_record(entry.uri, "missing_caption", "no caption (.txt sidecar) for this video")
        try:
            caption = storage.read_bytes(entry.caption_uri).decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as error:
            return error_record(entry.uri, "missing_caption", f"cannot read {entry.caption_uri}: {error}")
    caption = caption.strip()
    if not caption:
        return error_record(
            entry.uri, "empty_caption", "the caption is empty", start=entry.start, permanent=True
        )
    key = clip_key(entry.uri, size, version, entry.start, caption, fingerprint)
    if size == 0:
        return error_record(
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
    return short_digest({"model": model.fingerprint, **config.encoding_settings()})


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


def read_jsonl(uri: str) -> list[dict[str, Any]]:
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
    records = read_jsonl(storage.join(output, ERRORS_NAME))
    for relative in storage.list_files(storage.join(output, WORK_DIR)):
        if relative.endswith(".jsonl"):
            records += read_jsonl(storage.join(output, WORK_DIR, relative))
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
