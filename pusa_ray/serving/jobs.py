"""Durable job records in object storage (local dir or s3://), so jobs outlive every process.

Layout under `storage_root`, one writer per file:

    jobs/{id}/request.json   the validated request, media replaced by refs     (ingress, once)
    jobs/{id}/record.json    created_at, attempts, cancellation, ingress error  (ingress)
    jobs/{id}/state.json     status, progress, heartbeat, timings, error        (generator)
    jobs/{id}/inputs/...     uploaded media                                     (ingress)
    jobs/{id}/outputs/video.mp4, latents.safetensors                           (generator)
    idempotency/{sha256(key)}.json -> job id                                    (ingress)

A job's status is derived from the three files, so no two processes ever write the same object.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from pusa_ray import storage

OUTPUTS = {"video": "video.mp4", "latents": "latents.safetensors"}
TERMINAL_STATES = ("completed", "failed", "cancelled")


@dataclass
class Record:
    """What the ingress knows of a job."""

    id: str
    task: str
    created_at: float
    attempts: int = 0
    cancelled: bool = False
    error: str | None = None  # set when the ingress gives up (attempts exhausted)
    adapter: str | None = None  # the adapter's weights URI
    adapter_alpha: float = 1.4
    idempotency_key: str | None = None


@dataclass
class State:
    """What the generator reports of a job."""

    status: str = "queued"  # in_progress | completed | failed
    progress: float = 0.0
    heartbeat_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    attempt: int = 0
    replica: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)  # the resolved sampling settings
    outputs: dict[str, str] = field(default_factory=dict)


def new_job_id() -> str:
    return "vid_" + uuid.uuid4().hex


class JobStore:
    """Reads and writes job files under one root."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")

    def path(self, job_id: str, *parts: str) -> str:
        if not job_id.startswith("vid_") or not job_id[4:].isalnum():
            raise KeyError(job_id)
        return storage.join(self.root, "jobs", job_id, *parts)

    def _write_json(self, uri: str, value: Any) -> None:
        storage.write_bytes(uri, json.dumps(value, sort_keys=True).encode())

    def _read_json(self, uri: str) -> Any | None:
        try:
            return json.loads(storage.read_bytes(uri))
        except FileNotFoundError:
            return None

    # requests and inputs
    def put_request(self, job_id: str, request: dict[str, Any]) -> None:
        self._write_json(self.path(job_id, "request.json"), request)

    def get_request(self, job_id: str) -> dict[str, Any] | None:
        return self._read_json(self.path(job_id, "request.json"))

    def put_input(self, job_id: str, name: str, data: bytes) -> str:
        uri = self.path(job_id, "inputs", name)
        storage.write_bytes(uri, data)
        return uri

    # records (ingress) and states (generator)
    def put_record(self, record: Record) -> None:
        self._write_json(self.path(record.id, "record.json"), asdict(record))

    def get_record(self, job_id: str) -> Record | None:
        value = self._read_json(self.path(job_id, "record.json"))
        return Record(**value) if value is not None else None

    def put_state(self, job_id: str, state: State) -> None:
        self._write_json(self.path(job_id, "state.json"), asdict(state))

    def get_state(self, job_id: str) -> State:
        value = self._read_json(self.path(job_id, "state.json"))
        return State(**value) if value is not None else State()

    def output_uri(self, job_id: str, variant: str) -> str:
        return self.path(job_id, "outputs", OUTPUTS[variant])

    def delete_job(self, job_id: str) -> None:
        storage.delete_prefix(self.path(job_id))

    def job_ids(self) -> list[str]:
        """Ids of every job that has a record (unordered: sort by the records' created_at)."""
        prefix = storage.join(self.root, "jobs")
        return sorted(
            {path.split("/", 1)[0] for path in storage.list_files(prefix) if path.endswith("/record.json")}
        )

    # idempotency
    def _idempotency_uri(self, key: str) -> str:
        return storage.join(self.root, "idempotency", hashlib.sha256(key.encode()).hexdigest() + ".json")

    def find_idempotent(self, key: str) -> str | None:
        value = self._read_json(self._idempotency_uri(key))
        return value["id"] if value else None

    def remember_idempotent(self, key: str, job_id: str) -> None:
        self._write_json(self._idempotency_uri(key), {"id": job_id, "at": time.time()})

    def forget_idempotent(self, key: str) -> None:
        storage.delete(self._idempotency_uri(key))


def job_status(record: Record, state: State, now: float, lease_s: float) -> str:
    """The public status from what the ingress and the generator wrote."""
    if record.cancelled:
        return "cancelled"
    if state.status in ("completed", "failed"):
        return state.status
    if record.error is not None:
        return "failed"
    if (
        state.status == "in_progress"
        and state.heartbeat_at is not None
        and now - state.heartbeat_at < lease_s
    ):
        return "in_progress"
    return "queued"
