"""One small storage interface over local paths and ``s3://bucket/key`` URIs.

Every function takes a URI string: a plain local path, a ``file://`` URI or ``s3://bucket/key``.
Anything else (``gs://``, ``s3://`` without a bucket) is a ``ValueError`` naming the URI; a missing
file or object is a ``FileNotFoundError`` naming it.

S3 goes through one boto3 client per process, built from the standard AWS configuration chain
(environment, config files, instance roles). S3-compatible stores are reached with
``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3``, which botocore reads itself; nothing here names an
endpoint or a credential. Transient failures are retried by botocore's ``standard`` retry mode and,
for the body of a download, by s3transfer. Tunables live in :class:`StorageSettings`.

Key safety. Paths built from user-supplied relative parts (:func:`join`, the files of a directory
being uploaded, downloaded or listed in a manifest) must pass :func:`safe_relative_path`:
``/``-separated segments made only of ``[A-Za-z0-9._-=+@ ]``, no empty, ``.`` or ``..`` segment, no
leading ``/``, no backslash or control character, no segment starting or ending with a space,
segments of at most 255 and paths of at most 1024 characters. That set covers checkpoint, parquet
and Hive-partition names (``step=100``, ``part-0000.parquet``) and keeps keys identical on every
filesystem; ``:``, ``%``, ``*``, ``?``, quotes, ``#`` and non-ASCII are refused rather than escaped.

Commit protocol. A directory written to S3 has no atomicity, so a directory is *committed* by writing
``_MANIFEST.json`` last::

    {"format": "pusa_ray.dir_manifest", "format_version": 1,
     "created": "2025-01-01T00:00:00.000000+00:00", "extra": {...},
     "files": [{"path": "a/b.bin", "size": 123, "sha256": "<hex or null>"}, ...]}

Readers trust only committed directories and only the files the manifest lists. Re-writing a
directory removes its manifest first, so a reader never pairs an old manifest with new files.

Download cache. :func:`cached_path` and :func:`cached_dir` keep S3 data under ``$PUSA_RAY_CACHE``
(default ``~/.cache/pusa_ray``): ``objects/<sha(uri)>/<sha(etag, size)>/<name>`` for a file,
``dirs/<sha(uri)>/<sha(manifest)>/`` for a committed directory. Entries appear by an atomic rename
of a complete temporary copy, so a crash never leaves something that looks complete, and two
processes racing for the same entry both end up with a correct one. Nothing is evicted.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple
from urllib.parse import unquote

import boto3
import botocore.config
from boto3.s3.transfer import (
    BaseSubscriber,
    OSUtils,
    TransferConfig,
    TransferManager,
    create_transfer_manager,
)
from botocore.client import BaseClient
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.exceptions import RetriesExceededError as S3TransferRetriesExceededError
from s3transfer.exceptions import S3DownloadFailedError

from pusa_ray.errors import UserInputError

__all__ = [
    "MANIFEST_NAME",
    "CorruptDataError",
    "FileEntry",
    "Manifest",
    "StorageSettings",
    "UncommittedError",
    "cache_root",
    "cached_dir",
    "cached_path",
    "commit_dir",
    "configure",
    "delete",
    "delete_prefix",
    "download_dir",
    "download_file",
    "exists",
    "get_settings",
    "join",
    "list_files",
    "read_bytes",
    "read_manifest",
    "reset_client",
    "s3_client",
    "safe_relative_path",
    "upload_dir",
    "upload_file",
    "verify_dir",
    "write_bytes",
]

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
MANIFEST_NAME = "_MANIFEST.json"
MANIFEST_FORMAT = "pusa_ray.dir_manifest"
MANIFEST_VERSION = 1
_CHUNK = MiB  # read size for copying and hashing: whole files never sit in memory
_CACHE_FETCH_ATTEMPTS = 3
_TEMP_SUFFIX = ".pusa-tmp"
_TEMP_NAME = re.compile(r"\..*\.[0-9a-f]{16}\.pusa-tmp")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9._\-=+@ ]")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NotFound"})
_DENIED_CODES = frozenset({"403", "AccessDenied"})


# ----------------------------------------------------------------------------------------------
# Settings and the per-process client


@dataclass(frozen=True)
class StorageSettings:
    """Process-wide S3 tunables.

    ``max_attempts`` counts every try of a request, the first included (botocore's
    ``total_max_attempts``). Objects of at least ``multipart_threshold`` bytes move in parts of
    ``multipart_chunksize`` bytes, ``max_concurrency`` at a time (S3 needs parts of at least 5 MiB;
    s3transfer raises smaller upload parts to that).
    """

    max_attempts: int = 8
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    multipart_threshold: int = 64 * MiB
    multipart_chunksize: int = 16 * MiB
    max_concurrency: int = 10

    def __post_init__(self) -> None:
        for name in ("max_attempts", "multipart_threshold", "multipart_chunksize", "max_concurrency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StorageSettings.{name} must be a positive integer, got {value!r}")
        for name in ("connect_timeout", "read_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(
                    f"StorageSettings.{name} must be a positive number of seconds, got {value!r}"
                )


_lock = threading.Lock()
_settings = StorageSettings()
_client: BaseClient | None = None
_client_pid: int | None = None


def get_settings() -> StorageSettings:
    """Return the settings in force in this process."""
    return _settings


def configure(settings: StorageSettings) -> StorageSettings:
    """Replace the process-wide settings and drop the cached client; return the previous settings."""
    global _settings, _client
    if not isinstance(settings, StorageSettings):
        raise TypeError(f"configure() takes a StorageSettings, got {settings!r}")
    with _lock:
        previous, _settings, _client = _settings, settings, None
    return previous


def reset_client() -> None:
    """Forget the cached S3 client, so the next call re-reads credentials and endpoint from the env."""
    global _client
    with _lock:
        _client = None


def s3_client() -> BaseClient:
    """Return this process's S3 client, creating it on first use (thread-safe, fork-aware)."""
    global _client, _client_pid
    with _lock:
        # A client inherited through fork() shares connection pools with the parent: make a new one.
        if _client is None or _client_pid != os.getpid():
            _client = _make_client(_settings)
            _client_pid = os.getpid()
        return _client


def _make_client(settings: StorageSettings) -> BaseClient:
    config = botocore.config.Config(
        retries={"mode": "standard", "total_max_attempts": settings.max_attempts},
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        # One connection per concurrent part, plus a little room for callers sharing the client.
        max_pool_connections=settings.max_concurrency + 4,
    )
    # A fresh Session per client: boto3's default session is not thread-safe to create clients from.
    return boto3.session.Session().client("s3", config=config)


def _transfer_config() -> TransferConfig:
    settings = _settings
    return TransferConfig(
        multipart_threshold=settings.multipart_threshold,
        multipart_chunksize=settings.multipart_chunksize,
        max_concurrency=settings.max_concurrency,
        # Never the CRT client (picked automatically when awscrt is installed on some instance
        # types): it does its own networking, outside the botocore retries and timeouts above.
        preferred_transfer_client="classic",
    )


class _OSUtils(OSUtils):
    """s3transfer's file helpers, naming a download in flight as this module does (see _list)."""

    def get_temp_filename(self, filename: str) -> str:
        return str(_temp_sibling(Path(filename)))


@contextmanager
def _transfer_manager() -> Iterator[TransferManager]:
    with create_transfer_manager(s3_client(), _transfer_config(), osutil=_OSUtils()) as manager:
        yield manager


# ----------------------------------------------------------------------------------------------
# URIs and key safety


@dataclass(frozen=True)
class _S3Path:
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def dir_prefix(self) -> str:
        """The key prefix of this location seen as a directory: '' for the bucket root, else 'key/'."""
        key = self.key.rstrip("/")
        return f"{key}/" if key else ""

    def child(self, relative_path: str) -> _S3Path:
        return _S3Path(self.bucket, self.dir_prefix() + safe_relative_path(relative_path))


_Location = Path | _S3Path


def _parse(uri: str | os.PathLike[str]) -> _Location:
    if not isinstance(uri, (str, os.PathLike)):
        raise TypeError(f"expected a URI string or local path, got {uri!r}")
    text = os.fspath(uri)
    if not isinstance(text, str):
        raise TypeError(f"expected a URI string or local path, got {uri!r}")
    if not text:
        raise UserInputError("empty URI")
    if _CONTROL.search(text):
        raise UserInputError(f"URI {text!r} contains control characters")
    match = _SCHEME.fullmatch(text)
    if match is None:
        return Path(text)
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not _BUCKET.fullmatch(bucket):
            raise UserInputError(
                f"{text!r} is not a valid s3:// URI: bucket name {bucket!r} is missing or invalid"
            )
        return _S3Path(bucket, key)
    if scheme == "file":
        host, slash, path = rest.partition("/")
        if host not in ("", "localhost") or not slash:
            raise UserInputError(f"{text!r} is not a local file:// URI (expected file:///absolute/path)")
        return Path("/" + unquote(path))
    raise UserInputError(
        f"unsupported URI scheme {scheme!r} in {text!r}: expected s3://, file:// or a local path"
    )


def _describe(location: _Location) -> str:
    return location.uri if isinstance(location, _S3Path) else str(location)


def _require_object_key(location: _Location) -> None:
    if isinstance(location, _S3Path) and not location.key:
        raise UserInputError(f"{location.uri!r} names a bucket, not an object")


def _path_problem(path: str) -> str | None:
    if not path:
        return "it is empty"
    if _CONTROL.search(path):
        return "control characters are not allowed"
    if "\\" in path:
        return "backslashes are not allowed"
    if path.startswith("/"):
        return "absolute paths are not allowed"
    for segment in path.split("/"):
        if not segment:
            return "empty segments ('//' or a leading or trailing '/') are not allowed"
        if segment in (".", ".."):
            return f"{segment!r} segments are not allowed"
        unsafe = _UNSAFE_CHAR.search(segment)
        if unsafe:
            return f"character {unsafe.group()!r} is outside the allowed set [A-Za-z0-9._-=+@ /]"
        if segment != segment.strip(" "):
            return f"segment {segment!r} starts or ends with a space"
        if len(segment) > 255:
            return f"a segment is {len(segment)} characters long (at most 255)"
    if len(path) > 1024:
        return f"it is {len(path)} characters long (at most 1024)"
    return None


def safe_relative_path(path: str) -> str:
    """Return ``path`` unchanged if it is a safe relative path (see the module docstring).

    Raises ``ValueError`` naming the path and the rule it breaks, so that no path built from it
    can leave the directory it is joined to.
    """
    if not isinstance(path, str):
        raise TypeError(f"a relative path must be a str, got {path!r}")
    problem = _path_problem(path)
    if problem is not None:
        raise UserInputError(f"unsafe relative path {path!r}: {problem}")
    return path


def join(base_uri: str, *parts: str) -> str:
    """Join validated relative ``parts`` (each may contain ``/``) onto ``base_uri``.

    The result keeps the form of the base: ``s3://``, ``file://`` or a plain path.
    """
    location = _parse(base_uri)
    relative = "/".join(safe_relative_path(part) for part in parts)
    if not parts:
        return os.fspath(base_uri)
    if isinstance(location, _S3Path):
        return location.child(relative).uri
    text = os.fspath(base_uri)
    if _SCHEME.fullmatch(text):
        return (location.absolute() / relative).as_uri()
    return os.path.join(text, relative)


def _local_child(root: Path, relative_path: str) -> Path:
    """``root / relative_path`` after checking it stays under root, symlinks included."""
    child = root / safe_relative_path(relative_path)
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(child)]) != real_root:
        raise UserInputError(f"relative path {relative_path!r} leads outside {str(root)!r} through a symlink")
    return child


def _child(location: _Location, relative_path: str) -> _Location:
    if isinstance(location, _S3Path):
        return location.child(relative_path)
    return _local_child(location, relative_path)


# ----------------------------------------------------------------------------------------------
# Errors


class UncommittedError(FileNotFoundError):
    """A directory has no ``_MANIFEST.json``: it was never committed, or is being rewritten."""


class CorruptDataError(ValueError):
    """A committed directory does not match its manifest (missing file, wrong size or sha256)."""

    def __init__(self, uri: str, problem: str) -> None:
        super().__init__(f"{uri}: {problem}")
        self.uri = uri


def unreachable(error: BaseException) -> bool:
    """Whether `error` says storage could not be reached or did not answer (worth retrying later).

    Timeouts, refused or broken connections, S3's 5xx and throttling answers, and failures after
    botocore's own retries; not a missing object, a denied access or a bad URI.
    """
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = str(error.response.get("Error", {}).get("Code", ""))
        return status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout")
    return isinstance(error, (TimeoutError, ConnectionError, BotoCoreError, OSError))


@contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Turn S3's 'not found' and 'access denied' into the matching OSError naming ``uri``."""
    try:
        yield
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _MISSING_CODES or status == 404:
            raise FileNotFoundError(errno.ENOENT, f"no such S3 object ({code})", uri) from error
        if code in _DENIED_CODES or status == 403:
            raise PermissionError(errno.EACCES, f"S3 access denied ({code})", uri) from error
        raise
    except S3TransferRetriesExceededError as error:  # s3transfer's own, not an OSError: name the URI
        raise OSError(
            errno.EIO, f"S3 download failed after retries ({error.last_exception!r})", uri
        ) from error


# ----------------------------------------------------------------------------------------------
# Single objects


class _ObjectInfo(NamedTuple):
    size: int
    etag: str | None  # None for local files


class _KnownObject(BaseSubscriber):
    """Hands s3transfer a size and ETag we already know: it then skips its HEAD request and pins
    every ranged GET of a multipart download to that ETag (If-Match)."""

    def __init__(self, info: _ObjectInfo) -> None:
        self._info = info

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        future.meta.provide_transfer_size(self._info.size)
        if self._info.etag is not None:
            future.meta.provide_object_etag(self._info.etag)


def _temp_sibling(path: Path) -> Path:
    return path.parent / f".{path.name[:100]}.{secrets.token_hex(8)}{_TEMP_SUFFIX}"


@contextmanager
def _atomic_file(destination: Path) -> Iterator[BinaryIO]:
    """Open a temporary sibling of ``destination`` for writing; rename it into place on success."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_sibling(destination)
    try:
        with open(temp, "xb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, destination)
    finally:
        temp.unlink(missing_ok=True)


def _copy_local(source: Path, destination: Path) -> None:
    with open(source, "rb") as reader, _atomic_file(destination) as writer:
        shutil.copyfileobj(reader, writer, _CHUNK)


def _head(location: _S3Path) -> _ObjectInfo:
    with _s3_errors(location.uri):
        response = s3_client().head_object(Bucket=location.bucket, Key=location.key)
    return _ObjectInfo(response["ContentLength"], response.get("ETag"))


def _read(location: _Location) -> bytes:
    if isinstance(location, Path):
        return location.read_bytes()
    _require_object_key(location)
    buffer = io.BytesIO()
    # Through the transfer manager rather than get_object: it also retries a body that stalls.
    with _s3_errors(location.uri), _transfer_manager() as manager:
        manager.download(location.bucket, location.key, buffer).result()
    return buffer.getvalue()


def _write(location: _Location, data: bytes) -> None:
    if isinstance(location, Path):
        with _atomic_file(location) as handle:
            handle.write(data)
        return
    _require_object_key(location)
    with _s3_errors(location.uri), _transfer_manager() as manager:
        manager.upload(io.BytesIO(data), location.bucket, location.key).result()


def read_bytes(uri: str) -> bytes:
    """Return the whole content of the file or object at ``uri``."""
    return _read(_parse(uri))


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri``, replacing it atomically (a local file is renamed into place)."""
    _write(_parse(uri), data)


def exists(uri: str) -> bool:
    """Whether a file (not a directory or prefix) exists at ``uri``."""
    location = _parse(uri)
    if isinstance(location, Path):
        return location.is_file()
    _require_object_key(location)
    try:
        _head(location)
    except FileNotFoundError:
        return False
    return True


def delete(uri: str, missing_ok: bool = True) -> None:
    """Delete the file or object at ``uri``; a missing one is an error only if not ``missing_ok``."""
    location = _parse(uri)
    if isinstance(location, Path):
        location.unlink(missing_ok=missing_ok)
        return
    _require_object_key(location)
    if not missing_ok:
        _head(location)  # S3 deletes missing keys silently
    with _s3_errors(location.uri):
        s3_client().delete_object(Bucket=location.bucket, Key=location.key)


def upload_file(local_path: str | os.PathLike[str], uri: str) -> None:
    """Copy one local file to ``uri``; large files go up in parallel multipart chunks."""
    source = Path(local_path)
    if not source.is_file():
        raise FileNotFoundError(errno.ENOENT, "no such local file", str(source))
    destination = _parse(uri)
    if isinstance(destination, Path):
        _copy_local(source, destination)
        return
    _require_object_key(destination)
    with _s3_errors(destination.uri), _transfer_manager() as manager:
        manager.upload(str(source), destination.bucket, destination.key).result()


def download_file(uri: str, local_path: str | os.PathLike[str]) -> Path:
    """Copy the file or object at ``uri`` to ``local_path`` atomically; return the local path."""
    source = _parse(uri)
    destination = Path(local_path)
    if isinstance(source, Path):
        _copy_local(source, destination)
        return destination
    _require_object_key(source)
    destination.parent.mkdir(parents=True, exist_ok=True)
    # s3transfer writes to a temporary sibling (our naming, see _OSUtils) and renames it at the end.
    with _s3_errors(source.uri), _transfer_manager() as manager:
        manager.download(source.bucket, source.key, str(destination)).result()
    return destination


# ----------------------------------------------------------------------------------------------
# Directories


def _list(location: _Location) -> dict[str, _ObjectInfo]:
    """Every file under ``location`` seen as a directory, by relative path."""
    found: dict[str, _ObjectInfo] = {}
    if isinstance(location, Path):
        if not location.is_dir():
            return found
        for directory, _, names in os.walk(location):
            for name in names:
                if _TEMP_NAME.fullmatch(name):
                    continue  # a write in flight, or the debris of a crashed one
                path = Path(directory, name)
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue  # removed while walking, or a dangling symlink
                found[path.relative_to(location).as_posix()] = _ObjectInfo(size, None)
        return found
    prefix = location.dir_prefix()
    paginator = s3_client().get_paginator("list_objects_v2")
    with _s3_errors(location.uri):
        for page in paginator.paginate(Bucket=location.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):  # "folder" placeholder objects are not files
                    found[item["Key"][len(prefix) :]] = _ObjectInfo(item["Size"], item.get("ETag"))
    return found


def list_files(prefix_uri: str) -> list[str]:
    """Sorted relative paths of every file under the directory ``prefix_uri`` (``[]`` if none).

    ``s3://b/run/step1`` lists ``run/step1/...`` only, never ``run/step10/...``.
    """
    return sorted(_list(_parse(prefix_uri)))


def delete_prefix(prefix_uri: str) -> int:
    """Delete every file under the directory ``prefix_uri``; return how many were deleted."""
    location = _parse(prefix_uri)
    if isinstance(location, Path):
        if location.resolve() == Path(location.resolve().anchor):
            raise UserInputError(f"refusing to delete the filesystem root {prefix_uri!r}")
        count = len(_list(location))
        if location.is_dir():
            shutil.rmtree(location)
        return count
    if not location.dir_prefix():
        raise UserInputError(f"refusing to delete a whole bucket: {prefix_uri!r}")
    keys = [location.dir_prefix() + relative for relative in _list(location)]
    for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
        batch = [{"Key": key} for key in keys[start : start + 1000]]
        with _s3_errors(location.uri):
            response = s3_client().delete_objects(
                Bucket=location.bucket, Delete={"Objects": batch, "Quiet": True}
            )
        if response.get("Errors"):
            first = response["Errors"][0]
            raise OSError(
                errno.EIO,
                f"could not delete {len(response['Errors'])} objects, e.g. {first.get('Key')!r}: "
                f"{first.get('Code')} {first.get('Message')}",
                location.uri,
            )
    return len(keys)


def _put_tree(source: Path, relative_paths: Sequence[str], destination: _Location) -> None:
    if isinstance(destination, Path):
        for relative in relative_paths:
            _copy_local(source / relative, _local_child(destination, relative))
        return
    with _transfer_manager() as manager:
        futures = [
            (
                relative,
                manager.upload(str(source / relative), destination.bucket, destination.child(relative).key),
            )
            for relative in relative_paths
        ]
        for relative, future in futures:
            with _s3_errors(destination.child(relative).uri):
                future.result()


def _get_tree(source: _Location, files: Mapping[str, _ObjectInfo], destination: Path) -> None:
    targets = {relative: _local_child(destination, relative) for relative in files}  # check all first
    if isinstance(source, Path):
        for relative, target in targets.items():
            _copy_local(_local_child(source, relative), target)
        return
    with _transfer_manager() as manager:
        futures = []
        for relative, target in targets.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            key = source.child(relative).key
            subscribers = [_KnownObject(files[relative])]
            futures.append(
                (relative, manager.download(source.bucket, key, str(target), subscribers=subscribers))
            )
        for relative, future in futures:
            with _s3_errors(source.child(relative).uri):
                future.result()


def _local_tree(source: Path) -> dict[str, _ObjectInfo]:
    """The files of a local directory to upload: safe names only, its own manifest excluded."""
    if not source.is_dir():
        if not source.exists():
            raise FileNotFoundError(errno.ENOENT, "no such local directory", str(source))
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(source))
    files = _list(source)
    files.pop(MANIFEST_NAME, None)  # a fresh one is written by the commit, never copied
    for relative in files:
        safe_relative_path(relative)
    return dict(sorted(files.items()))


def upload_dir(
    local_dir: str | os.PathLike[str],
    uri: str,
    *,
    commit: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> Manifest | None:
    """Copy the tree under ``local_dir`` to the directory ``uri``.

    With ``commit=True`` the files' sizes and sha256 are computed locally (streamed, alongside the
    upload) and a manifest with ``extra`` is written last; the new manifest is returned. Without
    it ``uri`` is left uncommitted: a manifest already there is removed before anything is copied,
    and a ``_MANIFEST.json`` at the top of ``local_dir`` is never copied. Every file name must
    pass :func:`safe_relative_path`.
    """
    source = Path(local_dir)
    files = _local_tree(source)
    destination = _parse(uri)
    _delete_manifest(destination)  # whatever was committed there is about to change
    if not commit:
        _put_tree(source, list(files), destination)
        return None
    with ThreadPoolExecutor(max_workers=1) as hasher:
        hashing = hasher.submit(_describe_local_files, source, files)
        _put_tree(source, list(files), destination)
        entries = hashing.result()
    return _write_manifest(destination, entries, extra)


def download_dir(
    uri: str,
    local_dir: str | os.PathLike[str],
    require_commit: bool = True,
    verify_hashes: bool = False,
) -> Manifest | None:
    """Copy the directory ``uri`` into ``local_dir``; return its manifest (None if uncommitted).

    A committed directory brings exactly the files its manifest lists, checked for size (and
    sha256 when ``verify_hashes``) after the download; the manifest is written locally last, so
    ``local_dir`` is itself committed once this returns. An uncommitted directory raises
    :class:`UncommittedError` unless ``require_commit`` is False, in which case every file under
    ``uri`` is copied. Files already in ``local_dir`` and not in ``uri`` are left alone.
    """
    source = _parse(uri)
    destination = Path(local_dir)
    try:
        manifest_bytes = _read_manifest_bytes(source)
    except UncommittedError:
        if require_commit:
            raise
        listing = _list(source)
        entries = [FileEntry(relative, info.size) for relative, info in sorted(listing.items())]
        _delete_manifest(destination)
        _get_tree(source, listing, destination)
        _check_local_copy(destination, _describe(source), entries, hashes=False)
        return None
    manifest = Manifest.from_json(manifest_bytes, _describe(_child(source, MANIFEST_NAME)))
    _download_committed(source, destination, manifest, manifest_bytes, verify_hashes)
    return manifest


def _download_committed(
    source: _Location, destination: Path, manifest: Manifest, manifest_bytes: bytes, verify_hashes: bool
) -> None:
    listing = _list(source)
    _check_listing(_describe(source), manifest, listing)  # fail before moving a byte
    _delete_manifest(destination)
    _get_tree(source, {entry.path: listing[entry.path] for entry in manifest.files}, destination)
    _check_local_copy(destination, _describe(source), manifest.files, hashes=verify_hashes)
    _write(destination / MANIFEST_NAME, manifest_bytes)


# ----------------------------------------------------------------------------------------------
# Manifests


@dataclass(frozen=True)
class FileEntry:
    """One file of a committed directory: its relative path, size in bytes and sha256 (hex)."""

    path: str
    size: int
    sha256: str | None = None

    def __post_init__(self) -> None:
        safe_relative_path(self.path)
        if self.path == MANIFEST_NAME:
            raise ValueError(f"{MANIFEST_NAME!r} is reserved for the manifest itself")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise ValueError(f"size of {self.path!r} must be a non-negative integer, got {self.size!r}")
        if self.sha256 is not None and not (
            isinstance(self.sha256, str) and _SHA256_HEX.fullmatch(self.sha256)
        ):
            raise ValueError(f"sha256 of {self.path!r} must be 64 lowercase hex digits, got {self.sha256!r}")


@dataclass(frozen=True)
class Manifest:
    """What ``_MANIFEST.json`` says: the committed files, when, and caller metadata."""

    files: tuple[FileEntry, ...]
    created: str
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = MANIFEST_VERSION

    def to_json(self) -> bytes:
        """Serialise to the JSON stored as ``_MANIFEST.json``."""
        document = {
            "format": MANIFEST_FORMAT,
            "format_version": self.format_version,
            "created": self.created,
            "extra": self.extra,
            "files": [{"path": e.path, "size": e.size, "sha256": e.sha256} for e in self.files],
        }
        try:
            return json.dumps(document, indent=1, sort_keys=True, allow_nan=False).encode()
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"manifest extra metadata is not plain JSON: {self.extra!r} ({error})"
            ) from error

    @classmethod
    def from_json(cls, data: bytes, uri: str) -> Manifest:
        """Parse ``_MANIFEST.json`` read from ``uri``; anything malformed is a CorruptDataError."""
        try:
            document = json.loads(data)
            if document.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format is {document.get('format')!r}, expected {MANIFEST_FORMAT!r}")
            if document.get("format_version") != MANIFEST_VERSION:
                raise ValueError(f"unsupported format_version {document.get('format_version')!r}")
            if not isinstance(document["created"], str) or not isinstance(document["extra"], dict):
                raise ValueError("'created' must be a string and 'extra' an object")
            files = tuple(FileEntry(item["path"], item["size"], item["sha256"]) for item in document["files"])
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise CorruptDataError(uri, f"invalid manifest: {error!r}") from error
        paths = [entry.path for entry in files]
        if len(set(paths)) != len(paths):
            raise CorruptDataError(uri, "invalid manifest: a file is listed twice")
        return cls(files=files, created=document["created"], extra=document["extra"])


def _describe_local_files(root: Path, files: Mapping[str, _ObjectInfo]) -> list[FileEntry]:
    return [FileEntry(relative, info.size, _sha256(root / relative)) for relative, info in files.items()]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex SHA-256 of a local file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256(location: _Location) -> str:
    if isinstance(location, Path):
        return sha256_file(location)
    digest = hashlib.sha256()
    with _s3_errors(location.uri):
        body = s3_client().get_object(Bucket=location.bucket, Key=location.key)["Body"]
        for chunk in body.iter_chunks(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(
    location: _Location, entries: Iterable[FileEntry], extra: Mapping[str, Any] | None
) -> Manifest:
    ordered = tuple(sorted(entries, key=lambda entry: entry.path))
    paths = [entry.path for entry in ordered]
    duplicates = sorted({path for path in paths if paths.count(path) > 1})
    if duplicates:
        raise ValueError(f"files listed more than once: {duplicates}")
    manifest = Manifest(
        files=ordered,
        created=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        extra=dict(extra or {}),
    )
    _write(_child(location, MANIFEST_NAME), manifest.to_json())
    return manifest


def _delete_manifest(location: _Location) -> None:
    manifest = _child(location, MANIFEST_NAME)
    if isinstance(manifest, Path):
        manifest.unlink(missing_ok=True)
        return
    with _s3_errors(manifest.uri):
        s3_client().delete_object(Bucket=manifest.bucket, Key=manifest.key)


def _read_manifest_bytes(location: _Location) -> bytes:
    try:
        return _read(_child(location, MANIFEST_NAME))
    except (FileNotFoundError, NotADirectoryError) as missing:
        raise UncommittedError(
            errno.ENOENT, f"directory is not committed (no {MANIFEST_NAME})", _describe(location)
        ) from missing


def commit_dir(
    uri: str,
    files: Sequence[str | FileEntry] | None = None,
    extra: Mapping[str, Any] | None = None,
    *,
    hashes: bool = True,
) -> Manifest:
    """Commit the directory ``uri`` by writing its manifest last; return the manifest.

    ``files`` defaults to everything under ``uri``. A path given as a string is looked up for its
    size and, with ``hashes``, streamed to compute its sha256 (for a large S3 directory pass
    ``hashes=False`` to record sizes only). A :class:`FileEntry` is recorded as given.
    """
    location = _parse(uri)
    listing = _list(location)
    if files is None:
        files = sorted(relative for relative in listing if relative != MANIFEST_NAME)
    entries = []
    for item in files:
        if isinstance(item, FileEntry):
            entries.append(item)
            continue
        info = listing.get(safe_relative_path(item))
        if info is None:
            raise FileNotFoundError(
                errno.ENOENT, "cannot commit a missing file", _describe(_child(location, item))
            )
        digest = _sha256(_child(location, item)) if hashes else None
        entries.append(FileEntry(item, info.size, digest))
    return _write_manifest(location, entries, extra)


def read_manifest(uri: str) -> Manifest:
    """Return the manifest of the committed directory ``uri``; UncommittedError if there is none."""
    location = _parse(uri)
    return Manifest.from_json(_read_manifest_bytes(location), _describe(_child(location, MANIFEST_NAME)))


def _check_listing(dir_uri: str, manifest: Manifest, listing: Mapping[str, _ObjectInfo]) -> None:
    for entry in manifest.files:
        info = listing.get(entry.path)
        if info is None:
            raise CorruptDataError(join(dir_uri, entry.path), "listed in the manifest but missing")
        if info.size != entry.size:
            raise CorruptDataError(
                join(dir_uri, entry.path), f"size is {info.size} bytes, the manifest says {entry.size}"
            )


def _check_hash(file_uri: str, entry: FileEntry, actual: str) -> None:
    if entry.sha256 is None:
        raise ValueError(
            f"{file_uri}: the manifest records no sha256 to verify (committed with hashes=False)"
        )
    if actual != entry.sha256:
        raise CorruptDataError(file_uri, f"sha256 is {actual}, the manifest says {entry.sha256}")


def _check_local_copy(destination: Path, source_uri: str, entries: Iterable[FileEntry], hashes: bool) -> None:
    for entry in entries:
        path = destination / entry.path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CorruptDataError(str(path), f"copy of {join(source_uri, entry.path)} is missing") from None
        if size != entry.size:
            raise CorruptDataError(str(path), f"downloaded {size} bytes, the manifest says {entry.size}")
        if hashes:
            _check_hash(join(source_uri, entry.path), entry, _sha256(path))


def verify_dir(uri: str, hashes: bool = False) -> Manifest:
    """Check that every file of the committed directory ``uri`` exists with its listed size.

    With ``hashes`` every file is also streamed and its sha256 compared. Raises
    :class:`UncommittedError` without a manifest and :class:`CorruptDataError` naming the first
    file that does not match; returns the manifest otherwise.
    """
    location = _parse(uri)
    manifest = read_manifest(uri)
    _check_listing(_describe(location), manifest, _list(location))
    if hashes:
        for entry in manifest.files:
            child = _child(location, entry.path)
            _check_hash(_describe(child), entry, _sha256(child))
    return manifest


# ----------------------------------------------------------------------------------------------
# Download cache


def cache_root() -> Path:
    """The download cache directory: ``$PUSA_RAY_CACHE``, else ``~/.cache/pusa_ray``."""
    configured = os.environ.get("PUSA_RAY_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "pusa_ray"


def _digest(*parts: str, length: int = 32) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:length]


def cached_path(uri: str) -> Path:
    """A local path holding the file at ``uri``.

    A local URI is returned as it is. An S3 object is downloaded once into the cache, keyed by its
    URI, ETag and size: an unchanged object is never fetched again, a changed one is fetched anew.
    """
    location = _parse(uri)
    if isinstance(location, Path):
        if not location.is_file():
            raise FileNotFoundError(errno.ENOENT, "no such file", str(location))
        return location
    _require_object_key(location)
    name = location.key.rsplit("/", 1)[-1]
    name = name if _path_problem(name) is None else "object"  # keep the extension when we can
    for _ in range(_CACHE_FETCH_ATTEMPTS):
        info = _head(location)
        target = (
            cache_root()
            / "objects"
            / _digest(location.uri)
            / _digest(str(info.etag), str(info.size), length=16)
            / name
        )
        if target.is_file() and target.stat().st_size == info.size:
            return target
        if _fetch_version(location, info, target):
            return target
        logger.info("%s changed while being downloaded; fetching it again", location.uri)
    raise OSError(
        errno.EAGAIN, f"object changed during each of {_CACHE_FETCH_ATTEMPTS} downloads", location.uri
    )


def _fetch_version(location: _S3Path, info: _ObjectInfo, target: Path) -> bool:
    """Download the version ``info`` of an object to ``target``; False if the object changed meanwhile."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_sibling(target)
    try:
        # Into the open temporary file, so that the rename below is the only one.
        with open(temp, "xb") as handle, _s3_errors(location.uri), _transfer_manager() as manager:
            manager.download(location.bucket, location.key, handle, subscribers=[_KnownObject(info)]).result()
        # A ranged download is pinned to the ETag; a single GET is not, so ask again afterwards.
        if temp.stat().st_size != info.size or _head(location).etag != info.etag:
            return False
        os.replace(temp, target)  # atomic: a racing process's rename of identical bytes is harmless
        return True
    except S3DownloadFailedError:  # If-Match failed: the object changed between two ranges
        return False
    finally:
        temp.unlink(missing_ok=True)


def cached_dir(uri: str, verify_hashes: bool = False) -> Path:
    """A local directory holding the committed directory ``uri``.

    A local URI is checked (committed, sizes match) and returned as it is. An S3 directory is
    downloaded once into the cache, keyed by its URI and the bytes of its manifest, and verified as
    :func:`download_dir` does. Uncommitted directories raise :class:`UncommittedError`.
    """
    location = _parse(uri)
    if isinstance(location, Path):
        verify_dir(uri, hashes=verify_hashes)
        return location
    manifest_bytes = _read_manifest_bytes(location)
    manifest = Manifest.from_json(manifest_bytes, _child(location, MANIFEST_NAME).uri)
    target = cache_root() / "dirs" / _digest(location.uri) / hashlib.sha256(manifest_bytes).hexdigest()[:16]
    if (target / MANIFEST_NAME).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _temp_sibling(target)
    try:
        _download_committed(location, staging, manifest, manifest_bytes, verify_hashes)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / MANIFEST_NAME).is_file():
                raise
            # Another process finished the same directory first; its copy is as good as ours.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
