"""Committing a run: index every clip found in a complete shard (each key once), write the errors
report, commit the manifest last, and clean up."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pusa_ray import storage
from pusa_ray.data.latents import (
    DATASET_KIND,
    ERRORS_NAME,
    FORMAT_VERSION,
    INDEX_SCHEMA,
    ShardInfo,
)
from pusa_ray.models.description import ModelDescription
from pusa_ray.preprocessing.config import PreprocessConfig
from pusa_ray.preprocessing.plan import (
    WORK_DIR,
    Plan,
    PlannedClip,
    complete_shards,
    encoding_fingerprint,
    read_jsonl,
)
from pusa_ray.storage import FileEntry

INDEX_PREFIX = "index-"

# ----------------------------------------------------------------------------------------------
# Committing


def run_work_uri(output: str, run: str) -> str:
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
    for record in _read_parts(run_work_uri(output, run)):
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
        for record in read_jsonl(storage.join(work_uri, relative))
    ]


def _clean_up(output: str, index_name: str, debris: Sequence[str]) -> None:
    stale = [name for name in storage.list_files(output) if name.startswith(INDEX_PREFIX) and "/" not in name]
    for name in [*debris, *(name for name in stale if name != index_name)]:
        storage.delete(storage.join(output, name))
    storage.delete_prefix(storage.join(output, WORK_DIR))


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
