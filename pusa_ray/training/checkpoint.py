"""Training checkpoints without Ray: their names and files, the state beside the weights, the
manifest that commits a directory written by every rank, and what a rank reads to resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

from pusa_ray import storage
from pusa_ray.storage import FileEntry
from pusa_ray.training.config import TrainConfig

logger = logging.getLogger("pusa_ray.train")

CHECKPOINT_KIND = "pusa_ray.train_checkpoint"
CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
ADAPTER_FILE = "adapter.safetensors"
TRANSFORMER_DIR = "transformer"
DEEPSPEED_DIR = "deepspeed"
SAMPLES_DIR = "samples"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's checkpoint registry in the run dir
_OTHER_RANK_SHARD = re.compile(r"zero_pp_rank_(\d+)_")


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def run_uri(config: TrainConfig) -> str:
    """The run's directory: `{storage_path}/{name}` (local path or s3:// URI)."""
    return storage.join(local_or_s3(config.run.storage_path), config.run.name)


def local_or_s3(uri: str) -> str:
    if uri.startswith("s3://"):
        return uri
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


@dataclasses.dataclass
class TrainerState:
    """What a checkpoint records besides the weights; the step is the count of optimizer steps done."""

    step: int = 0
    restarts: int = 0
    resumed_from: int | None = None
    initial_probe_loss: float | None = None
    probe_loss: float | None = None
    train_seconds: float = 0.0


def describe_files(root: Path, rank: int) -> list[dict[str, Any]]:
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        digest = storage.sha256_file(path)  # hashed locally: committing costs no S3 reads
        entries.append({"path": relative, "size": path.stat().st_size, "sha256": digest, "rank": rank})
    return entries


def commit_checkpoint(uri: str, step: int, gathered: list[Any]) -> None:
    entries = [
        FileEntry(item["path"], item["size"], item["sha256"]) for _, files in gathered for item in files
    ]
    paths = [entry.path for entry in entries]
    if len(set(paths)) != len(paths):
        raise RuntimeError(f"two ranks wrote the same checkpoint file in {uri}: {sorted(paths)}")
    writers = [written for written, _ in gathered]
    storage.commit_dir(uri, entries, extra={"kind": CHECKPOINT_KIND, "step": step, "writers": writers})


def needed_by(rank: int, relative: str) -> bool:
    """Whether `rank` reads this checkpoint file to resume: DeepSpeed's, but no other rank's partition."""
    match = _OTHER_RANK_SHARD.search(relative)
    return relative.startswith(f"{DEEPSPEED_DIR}/") and (match is None or int(match.group(1)) == rank)


def download_checkpoint(uri: str, rank: int, local: Path) -> None:
    """This rank's files: those the manifest lists (sizes checked), or all there are without one."""
    try:
        sizes: dict[str, int] | None = {entry.path: entry.size for entry in storage.read_manifest(uri).files}
    except storage.UncommittedError:
        # Ray registered it, but the run stopped before rank 0 committed it: Ray's registry is the authority.
        logger.warning("%s is in Ray's registry but has no manifest; resuming from it anyway", uri)
        sizes = None
    names = list(sizes) if sizes is not None else storage.list_files(uri)
    for relative in [name for name in names if needed_by(rank, name)] + [STATE_FILE]:
        target = storage.download_file(storage.join(uri, relative), local / relative)
        if sizes is not None and target.stat().st_size != sizes[relative]:
            raise storage.CorruptDataError(storage.join(uri, relative), "size differs from the manifest")


def read_state(checkpoint_uri: str) -> dict[str, Any]:
    """The `trainer_state.json` of a checkpoint directory."""
    return json.loads(storage.read_bytes(storage.join(checkpoint_uri, STATE_FILE)))


def latest_checkpoint(config: TrainConfig) -> str | None:
    """The URI of the latest checkpoint in Ray's registry for this run, or None for a new run."""
    try:
        snapshot = json.loads(storage.read_bytes(storage.join(run_uri(config), RAY_SNAPSHOT)))
    except FileNotFoundError:
        return None
    latest = snapshot.get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name")
    return storage.join(run_uri(config), name) if name else None
