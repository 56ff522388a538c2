"""Behaviour of pusa_ray.storage on local paths and on a real S3 endpoint (moto, on loopback)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
from botocore.exceptions import BotoCoreError

from pusa_ray import storage
from pusa_ray.errors import UserInputError
from pusa_ray.storage import MANIFEST_NAME, CorruptDataError, StorageSettings, UncommittedError

MiB = 1024 * 1024

# Multipart from 5 MiB (S3's smallest part) so a 6 MiB file really goes up and down in two parts;
# short timeouts so a stalled server is retried within a second.
TEST_SETTINGS = StorageSettings(
    max_attempts=8,
    connect_timeout=0.5,
    read_timeout=0.5,
    multipart_threshold=5 * MiB,
    multipart_chunksize=5 * MiB,
    max_concurrency=4,
)
BIG_SIZE = 6 * MiB + 123


@pytest.fixture(autouse=True)
def small_transfers_and_short_timeouts() -> Iterator[None]:
    previous = storage.configure(TEST_SETTINGS)
    yield
    storage.configure(previous)


pytestmark = pytest.mark.usefixtures("cache_dir")  # a fresh download cache per test


def _payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def _make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"dim": 16}',
        "empty.txt": b"",
        "weights/model.safetensors": _payload(BIG_SIZE),
        "weights/step=100/optim-rank_0.pt": _payload(1000, seed=1),
        "logs/a b@host+1.txt": b"spaces and friends",
    }
    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return files


def _read_tree(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()
    }


@contextlib.contextmanager
def s3_requests(event: str) -> Iterator[list[str]]:
    """Record botocore events on the cached client: 'before-call.s3.GetObject' counts API calls,
    'before-send.s3' counts HTTP attempts (retries included)."""
    seen: list[str] = []

    def record(event_name: str, **kwargs: object) -> None:
        seen.append(event_name)

    events = storage.s3_client().meta.events
    events.register(event, record)
    try:
        yield seen
    finally:
        events.unregister(event, record)


def run_in_thread(work: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = work()
        except BaseException as error:  # handed back to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


# ---------------------------------------------------------------------------------------------
# Files and directories, on both backends


def test_bytes_exists_and_delete(store: str) -> None:
    uri = storage.join(store, "dir", "blob.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"first")
    storage.write_bytes(uri, b"second")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"second"
    assert not storage.exists(storage.join(store, "dir"))  # a directory is not a file
    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)  # idempotent by default
    with pytest.raises(FileNotFoundError, match="blob.bin"):
        storage.delete(uri, missing_ok=False)
    with pytest.raises(FileNotFoundError, match="blob.bin"):
        storage.read_bytes(uri)


def test_directory_round_trip_with_multipart_file(store: str, tmp_path: Path) -> None:
    source, copy = tmp_path / "source", tmp_path / "copy"
    files = _make_tree(source)
    uri = storage.join(store, "runs/exp1/checkpoint_000003")

    manifest = storage.upload_dir(source, uri, commit=True, extra={"step": 3, "epoch": 0})

    assert storage.list_files(uri) == sorted([*files, MANIFEST_NAME])
    assert manifest is not None and manifest.extra == {"step": 3, "epoch": 0}
    assert {entry.path: entry.size for entry in manifest.files} == {k: len(v) for k, v in files.items()}
    assert storage.download_dir(uri, copy) == manifest
    assert _read_tree(copy) == {**files, MANIFEST_NAME: storage.read_bytes(storage.join(uri, MANIFEST_NAME))}
    storage.verify_dir(str(copy), hashes=True)  # the local copy is itself committed
    if uri.startswith("s3://"):
        bucket, key = uri[len("s3://") :].split("/", 1)
        head = storage.s3_client().head_object(Bucket=bucket, Key=f"{key}/weights/model.safetensors")
        assert head["ETag"].strip('"').endswith("-2"), "the big file should have gone up in two parts"


def test_single_large_file_round_trip(store: str, tmp_path: Path) -> None:
    data = _payload(BIG_SIZE, seed=7)
    (tmp_path / "big.bin").write_bytes(data)
    uri = storage.join(store, "models", "big.bin")

    storage.upload_file(tmp_path / "big.bin", uri)
    local = storage.download_file(uri, tmp_path / "out" / "big.bin")

    assert local.read_bytes() == data
    assert storage.read_bytes(uri) == data
    assert sorted(p.name for p in local.parent.iterdir()) == ["big.bin"]  # no temporary left over


@pytest.mark.s3
def test_downloads_in_flight_are_invisible_to_listing(s3_bucket: str, tmp_path: Path) -> None:
    storage.write_bytes(f"{s3_bucket}/big.bin", _payload(BIG_SIZE))
    storage.configure(dataclasses.replace(TEST_SETTINGS, max_concurrency=1))  # one range after the other
    out = tmp_path / "out"
    seen: list[tuple[list[str], list[str]]] = []
    gets: list[object] = []

    def look_before_second_range(**kwargs: object) -> None:
        gets.append(kwargs)
        if len(gets) != 2:
            return
        deadline = time.monotonic() + 2
        while not any(out.iterdir()) and time.monotonic() < deadline:  # the first range's bytes land
            time.sleep(0.01)
        seen.append((sorted(p.name for p in out.iterdir()), storage.list_files(str(out))))

    storage.s3_client().meta.events.register("before-call.s3.GetObject", look_before_second_range)
    storage.download_file(f"{s3_bucket}/big.bin", out / "big.bin")

    [(on_disk, listed)] = seen
    assert len(on_disk) == 1 and on_disk[0].startswith(".big.bin.") and on_disk[0].endswith(".pusa-tmp")
    assert listed == []
    assert storage.list_files(str(out)) == ["big.bin"]


def test_list_and_delete_prefix_are_directory_scoped(store: str) -> None:
    for relative in ["run/step1/a.pt", "run/step1/sub/b.pt", "run/step10/a.pt", "run/step1.txt"]:
        storage.write_bytes(storage.join(store, relative), b"x")

    assert storage.list_files(storage.join(store, "run/step1")) == ["a.pt", "sub/b.pt"]
    assert storage.list_files(storage.join(store, "nothing/here")) == []
    assert storage.delete_prefix(storage.join(store, "run/step1")) == 2

    assert storage.list_files(storage.join(store, "run")) == ["step1.txt", "step10/a.pt"]
    assert storage.delete_prefix(storage.join(store, "run/step1")) == 0


def test_uncommitted_directory_is_refused(store: str, tmp_path: Path) -> None:
    files = _make_tree(tmp_path / "source")
    uri = storage.join(store, "half-written")
    assert storage.upload_dir(tmp_path / "source", uri) is None

    with pytest.raises(UncommittedError, match="half-written"):
        storage.read_manifest(uri)
    with pytest.raises(UncommittedError, match="half-written"):
        storage.download_dir(uri, tmp_path / "copy")
    with pytest.raises(UncommittedError, match="half-written"):
        storage.cached_dir(uri)
    with pytest.raises(UncommittedError):
        storage.verify_dir(uri)
    assert not (tmp_path / "copy").exists()

    assert storage.download_dir(uri, tmp_path / "copy", require_commit=False) is None
    assert _read_tree(tmp_path / "copy") == files


def test_commit_dir_writes_manifest_last_with_hashes(store: str) -> None:
    uri = storage.join(store, "ckpt")
    storage.write_bytes(storage.join(uri, "a.bin"), b"abc")
    storage.write_bytes(storage.join(uri, "b/c.bin"), b"")

    manifest = storage.commit_dir(uri, extra={"note": "by hand"})

    document = json.loads(storage.read_bytes(storage.join(uri, MANIFEST_NAME)))
    assert document["format"] == "pusa_ray.dir_manifest" and document["format_version"] == 1
    assert datetime.fromisoformat(document["created"]).tzinfo is not None
    assert document["extra"] == {"note": "by hand"}
    assert document["files"] == [
        {"path": "a.bin", "size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()},
        {"path": "b/c.bin", "size": 0, "sha256": hashlib.sha256(b"").hexdigest()},
    ]
    assert storage.read_manifest(uri) == manifest

    storage.commit_dir(uri, files=["a.bin"], hashes=False)
    assert [entry.sha256 for entry in storage.verify_dir(uri).files] == [None]
    with pytest.raises(ValueError, match="no sha256"):
        storage.verify_dir(uri, hashes=True)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        storage.commit_dir(uri, files=["missing.bin"])


def test_truncated_file_is_detected_by_size(store: str, tmp_path: Path) -> None:
    _make_tree(tmp_path / "source")
    uri = storage.join(store, "ckpt")
    storage.upload_dir(tmp_path / "source", uri, commit=True)
    victim = storage.join(uri, "weights/step=100/optim-rank_0.pt")
    storage.write_bytes(victim, storage.read_bytes(victim)[:-10])

    with pytest.raises(CorruptDataError, match="optim-rank_0.pt") as caught:
        storage.verify_dir(uri)
    assert "990" in str(caught.value) and "1000" in str(caught.value)
    with pytest.raises(CorruptDataError, match="optim-rank_0.pt"):
        storage.download_dir(uri, tmp_path / "copy")
    assert not (tmp_path / "copy" / MANIFEST_NAME).exists()

    storage.delete(victim)
    with pytest.raises(CorruptDataError, match="optim-rank_0.pt.*missing"):
        storage.verify_dir(uri)


def test_same_size_corruption_is_detected_by_hash(store: str, tmp_path: Path) -> None:
    files = _make_tree(tmp_path / "source")
    uri = storage.join(store, "ckpt")
    storage.upload_dir(tmp_path / "source", uri, commit=True)
    victim = storage.join(uri, "config.json")
    storage.write_bytes(victim, files["config.json"].upper())

    storage.verify_dir(uri)  # sizes still match
    with pytest.raises(CorruptDataError, match="config.json.*sha256"):
        storage.verify_dir(uri, hashes=True)
    with pytest.raises(CorruptDataError, match="config.json.*sha256"):
        storage.download_dir(uri, tmp_path / "copy", verify_hashes=True)
    assert not (tmp_path / "copy" / MANIFEST_NAME).exists()


def test_rewriting_a_directory_uncommits_it_first(store: str, tmp_path: Path) -> None:
    _make_tree(tmp_path / "source")
    uri = storage.join(store, "ckpt")
    storage.upload_dir(tmp_path / "source", uri, commit=True)
    (tmp_path / "source" / "config.json").write_bytes(b"{}")
    (tmp_path / "source" / "weights" / "model.safetensors").unlink()

    # A rewrite that fails half way leaves the directory uncommitted, never stale-committed.
    (tmp_path / "source" / "bad:name").write_bytes(b"")
    with pytest.raises(ValueError, match="bad:name"):
        storage.upload_dir(tmp_path / "source", uri, commit=True)
    (tmp_path / "source" / "bad:name").unlink()
    storage.upload_dir(tmp_path / "source", uri, commit=True)
    assert storage.read_manifest(uri).files[0] == storage.FileEntry(
        "config.json", 2, hashlib.sha256(b"{}").hexdigest()
    )

    storage.upload_dir(tmp_path / "source", uri)  # an uncommitted rewrite uncommits too
    with pytest.raises(UncommittedError):
        storage.read_manifest(uri)

    storage.upload_dir(tmp_path / "source", uri, commit=True)
    assert "weights/model.safetensors" in storage.list_files(uri)  # left over, but not committed
    assert storage.download_dir(uri, tmp_path / "copy") is not None
    assert not (tmp_path / "copy" / "weights" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# URIs and key safety

UNSAFE_PARTS = ["..", "/abs", "a/../../b", "a\\b", "a\x00b", "", "a//b", "./a", "a/", "x:y", "é", " lead"]


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("s3://bucket/base", "s3://bucket/base/a/b=1/c d.txt"),
        ("s3://bucket/base/", "s3://bucket/base/a/b=1/c d.txt"),
        ("s3://bucket", "s3://bucket/a/b=1/c d.txt"),
        ("/tmp/base", "/tmp/base/a/b=1/c d.txt"),
        ("relative/base", "relative/base/a/b=1/c d.txt"),
        ("file:///tmp/base", "file:///tmp/base/a/b%3D1/c%20d.txt"),
    ],
)
def test_join(base: str, expected: str) -> None:
    joined = storage.join(base, "a", "b=1/c d.txt")
    assert joined == expected
    assert storage.join(base) == base


@pytest.mark.parametrize("part", UNSAFE_PARTS)
def test_join_rejects_unsafe_parts(part: str) -> None:
    with pytest.raises(ValueError, match="unsafe relative path") as caught:
        storage.join("s3://bucket/base", "ok", part)
    assert repr(part) in str(caught.value)
    assert isinstance(caught.value, UserInputError)  # the CLI and Serve report it as bad input


BAD_URIS = ["s3://", "s3:///key", "s3://bad bucket/k", "gs://bucket/key", "http://h/x", ""]


@pytest.mark.parametrize("uri", BAD_URIS)
def test_bad_uris_are_value_errors_naming_them(uri: str) -> None:
    with pytest.raises(ValueError) as caught:
        storage.read_bytes(uri)
    assert repr(uri) in str(caught.value) or uri == ""
    with pytest.raises(ValueError):
        storage.list_files(uri)


def test_refuses_to_delete_a_bucket_or_an_object_named_by_a_bucket() -> None:
    with pytest.raises(ValueError, match="whole bucket"):
        storage.delete_prefix("s3://bucket")
    with pytest.raises(ValueError, match="names a bucket"):
        storage.write_bytes("s3://bucket/", b"")


@pytest.mark.parametrize("name", ["a\\b", "bad:name", "tab\there", "ünï"])
def test_upload_dir_rejects_unsafe_local_names(store: str, tmp_path: Path, name: str) -> None:
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "fine.txt").write_bytes(b"x")
    (tmp_path / "source" / name).write_bytes(b"x")
    with pytest.raises(ValueError, match="unsafe relative path"):
        storage.upload_dir(tmp_path / "source", storage.join(store, "up"))
    assert storage.list_files(storage.join(store, "up")) == []


@pytest.mark.s3
@pytest.mark.parametrize("key", ["up/../../escaped", "up/a/../../../escaped", "up/a\\..\\b", "up//abs"])
def test_download_dir_rejects_traversal_keys(s3_bucket: str, tmp_path: Path, key: str) -> None:
    bucket = s3_bucket[len("s3://") :]
    storage.s3_client().put_object(Bucket=bucket, Key="up/fine.txt", Body=b"x")
    storage.s3_client().put_object(Bucket=bucket, Key=key, Body=b"x")  # S3 keeps '..' literally
    destination = tmp_path / "deep" / "down"
    with pytest.raises(ValueError, match="unsafe relative path"):
        storage.download_dir(f"{s3_bucket}/up", destination, require_commit=False)
    assert not any(p.is_file() for p in tmp_path.rglob("*") if "cache" not in p.parts)


def test_download_does_not_follow_a_symlink_out_of_the_destination(tmp_path: Path) -> None:
    (tmp_path / "source" / "link").mkdir(parents=True)
    (tmp_path / "source" / "link" / "x.txt").write_bytes(b"x")
    (tmp_path / "outside").mkdir()
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError, match="outside"):
        storage.download_dir(str(tmp_path / "source"), tmp_path / "dest", require_commit=False)
    assert list((tmp_path / "outside").iterdir()) == []


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="read_timeout.*-1"):
        StorageSettings(read_timeout=-1)
    with pytest.raises(ValueError, match="max_attempts.*0"):
        StorageSettings(max_attempts=0)


def test_manifest_listing_a_traversal_path_is_refused(store: str, tmp_path: Path) -> None:
    uri = storage.join(store, "evil")
    storage.write_bytes(storage.join(uri, "a.txt"), b"x")
    manifest = json.loads(storage.commit_dir(uri).to_json())
    manifest["files"][0]["path"] = "../../outside.txt"
    storage.write_bytes(storage.join(uri, MANIFEST_NAME), json.dumps(manifest).encode())

    for attempt in (storage.read_manifest, storage.verify_dir, storage.cached_dir):
        with pytest.raises(CorruptDataError, match="outside.txt"):
            attempt(uri)
    with pytest.raises(CorruptDataError, match="outside.txt"):
        storage.download_dir(uri, tmp_path / "copy")
    assert not (tmp_path / "outside.txt").exists()


def test_local_uri_forms_agree(tmp_path: Path) -> None:
    storage.write_bytes((tmp_path / "x" / "f.bin").as_uri(), b"via file uri")
    assert storage.read_bytes(str(tmp_path / "x" / "f.bin")) == b"via file uri"
    assert storage.list_files(f"file://{tmp_path}/x") == ["f.bin"]
    with pytest.raises(ValueError, match="file://"):
        storage.read_bytes("file://remotehost/x")


def test_failed_local_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out" / "f.bin"
    storage.write_bytes(str(target), b"old")
    with pytest.raises(TypeError):
        storage.write_bytes(str(target), "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


# ---------------------------------------------------------------------------------------------
# The S3 client: endpoint from the environment, retries, bounded failure


@pytest.mark.s3
def test_endpoint_comes_from_the_environment(s3_server, s3_bucket: str) -> None:
    assert storage.s3_client().meta.endpoint_url == s3_server.endpoint_url
    assert storage.s3_client() is storage.s3_client()
    try:
        with pytest.MonkeyPatch.context() as env:
            # The service-specific variable wins over the global one, as botocore documents.
            env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
            env.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
            storage.reset_client()
            storage.write_bytes(f"{s3_bucket}/k", b"v")
            assert storage.read_bytes(f"{s3_bucket}/k") == b"v"
    finally:
        storage.reset_client()


@pytest.mark.s3
def test_client_is_shared_across_threads(s3_server) -> None:
    storage.reset_client()
    clients: list[object] = []
    threads = [threading.Thread(target=lambda: clients.append(storage.s3_client())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(client) for client in clients}) == 1


@pytest.mark.s3
@pytest.mark.parametrize("operation", ["read", "upload"])
def test_transient_stall_is_retried(s3_server, s3_bucket: str, tmp_path: Path, operation: str) -> None:
    uri = f"{s3_bucket}/stall/blob.bin"
    data = _payload(BIG_SIZE, seed=3)
    (tmp_path / "blob.bin").write_bytes(data)
    storage.write_bytes(uri, b"small object")
    work = {
        "read": lambda: storage.read_bytes(uri),
        "upload": lambda: storage.upload_file(tmp_path / "blob.bin", uri),
    }[operation]

    with s3_requests("before-send.s3") as baseline:
        work()
    with s3_requests("before-send.s3") as attempts:
        started = time.monotonic()
        with s3_server.paused():
            thread, outcome = run_in_thread(work)
            time.sleep(1.5)
            assert thread.is_alive(), f"finished while the server was frozen: {outcome}"
        thread.join(timeout=15)
        elapsed = time.monotonic() - started

    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert 1.5 <= elapsed < 10
    assert len(attempts) > len(baseline)  # the stalled requests really were sent again
    assert storage.read_bytes(uri) == (b"small object" if operation == "read" else data)


@pytest.mark.s3
def test_endpoint_that_stays_down_fails_fast(s3_server, s3_bucket: str) -> None:
    storage.write_bytes(f"{s3_bucket}/k", b"v")
    storage.configure(dataclasses.replace(TEST_SETTINGS, max_attempts=2, read_timeout=0.3))
    started = time.monotonic()
    with s3_server.paused(), pytest.raises(BotoCoreError):
        storage.read_bytes(f"{s3_bucket}/k")
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------------------------------------
# Download cache


@pytest.mark.s3
def test_cached_path_downloads_once_and_refetches_changes(s3_bucket: str, cache_dir: Path) -> None:
    uri = f"{s3_bucket}/models/lora.safetensors"
    storage.write_bytes(uri, b"version one")

    with s3_requests("before-call.s3.GetObject") as gets:
        first = storage.cached_path(uri)
        first_stat = first.stat()
        again = storage.cached_path(uri)
    assert len(gets) == 1
    assert again == first and again.stat().st_ino == first_stat.st_ino
    assert again.stat().st_mtime_ns == first_stat.st_mtime_ns
    assert first.read_bytes() == b"version one" and first.name == "lora.safetensors"
    assert first.is_relative_to(cache_dir)

    storage.write_bytes(uri, b"version two")  # same size, new ETag
    with s3_requests("before-call.s3.GetObject") as gets:
        changed = storage.cached_path(uri)
    assert len(gets) == 1 and changed != first
    assert changed.read_bytes() == b"version two"


@pytest.mark.s3
def test_cached_path_of_a_multipart_object(s3_bucket: str, tmp_path: Path) -> None:
    data = _payload(BIG_SIZE, seed=5)
    (tmp_path / "big.bin").write_bytes(data)
    storage.upload_file(tmp_path / "big.bin", f"{s3_bucket}/big.bin")
    assert storage.cached_path(f"{s3_bucket}/big.bin").read_bytes() == data


@pytest.mark.s3
def test_concurrent_cache_fills_agree(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/shared.bin"
    data = _payload(100_000)
    storage.write_bytes(uri, data)
    barrier = threading.Barrier(4)

    def fill() -> Path:
        barrier.wait()
        return storage.cached_path(uri)

    runs = [run_in_thread(fill) for _ in range(4)]
    for thread, _ in runs:
        thread.join(timeout=15)
    paths = {outcome["result"] for _, outcome in runs}
    assert len(paths) == 1
    path = paths.pop()
    assert path.read_bytes() == data
    assert [p.name for p in path.parent.iterdir()] == ["shared.bin"]  # no temporaries left


@pytest.mark.s3
def test_interrupted_download_leaves_no_cache_entry(s3_server, s3_bucket: str, cache_dir: Path) -> None:
    uri = f"{s3_bucket}/never.bin"
    storage.write_bytes(uri, _payload(BIG_SIZE))
    # One range at a time, so the second one is surely asked for after the server froze.
    storage.configure(dataclasses.replace(TEST_SETTINGS, max_attempts=1, read_timeout=0.2, max_concurrency=1))
    on_disk_during_stall: list[list[str]] = []

    def freeze_after_first_range(**kwargs: object) -> None:
        s3_server.pause()  # the first ranged GET has its answer; every later one stalls

    def look_at_cache(**kwargs: object) -> None:
        on_disk_during_stall.append([p.name for p in cache_dir.rglob("*") if p.is_file()])

    events = storage.s3_client().meta.events
    events.register("after-call.s3.GetObject", freeze_after_first_range)
    events.register("before-call.s3.GetObject", look_at_cache)
    try:
        with pytest.raises(OSError, match="never.bin"):
            storage.cached_path(uri)
    finally:
        s3_server.resume()
    partial = {name for names in on_disk_during_stall for name in names}
    assert partial and all(name.endswith(".pusa-tmp") for name in partial), partial
    assert [p for p in cache_dir.rglob("*") if p.is_file()] == []


def test_cached_path_and_dir_return_local_paths_as_they_are(tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(b"x")
    assert storage.cached_path(str(tmp_path / "f.bin")) == tmp_path / "f.bin"
    with pytest.raises(FileNotFoundError):
        storage.cached_path(str(tmp_path / "missing.bin"))
    _make_tree(tmp_path / "d")
    storage.commit_dir(str(tmp_path / "d"))
    assert storage.cached_dir(str(tmp_path / "d")) == tmp_path / "d"


@pytest.mark.s3
def test_cached_dir_downloads_a_committed_version_once(s3_bucket: str, tmp_path: Path) -> None:
    files = _make_tree(tmp_path / "source")
    uri = f"{s3_bucket}/ckpt"
    storage.upload_dir(tmp_path / "source", uri, commit=True)

    local = storage.cached_dir(uri, verify_hashes=True)
    with s3_requests("before-call.s3.GetObject") as gets:
        assert storage.cached_dir(uri) == local
    assert len(gets) == 1  # the manifest only
    assert {k: v for k, v in _read_tree(local).items() if k != MANIFEST_NAME} == files

    (tmp_path / "source" / "config.json").write_bytes(b"{}")
    storage.upload_dir(tmp_path / "source", uri, commit=True)
    updated = storage.cached_dir(uri)
    assert updated != local and (updated / "config.json").read_bytes() == b"{}"
