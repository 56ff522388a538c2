"""Durable job records in object storage (local dir or s3://), so jobs outlive every process.

Layout under `storage_root`, one writer per file:

    jobs/{id}/request.json                 the validated request, media as refs   (ingress, once)
    jobs/{id}/record.json                  created_at, current attempt, failures,  (ingress)
                                           cancellation, ingress error
    jobs/{id}/inputs/...                   uploaded media                          (ingress)
    jobs/{id}/attempts/{k}/state.json      status, progress, heartbeat, timings    (attempt k)
    jobs/{id}/attempts/{k}/outputs/...     video.mp4, latents.safetensors          (attempt k)
    idempotency/{sha256(key)}.json -> job id                                       (ingress)

**Fencing by attempt.** The record names the job's current attempt; the ingress writes a new
attempt number there before it issues the call for it. Attempt k writes only under
`attempts/{k}/`, and every state write first checks that the record still names k
(`Superseded` otherwise). Readers take the state of the record's attempt only. So a late or
zombie attempt (a replica that was slow or cut off) can never change what a user sees once a
newer attempt exists, even if one of its writes slips past the check: it lands in its own
folder, which nothing reads. Outputs are committed manifest-last: the state that says
`completed` (and lists the outputs) is written after them.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from pusa_ray import storage

OUTPUTS = {"video": "video.mp4", "latents": "latents.safetensors", "thumbnail": "thumbnail.png"}
TERMINAL_STATES = ("completed", "failed", "cancelled")


@dataclass
class Record:
    """What the ingress knows of a job."""

    id: str
    task: str
    created_at: float
    attempts: int = 0  # the current attempt's number (0: never dispatched); the fencing token
    failures: list[str] = field(default_factory=list)  # one line per attempt that ran and failed
    cancelled: bool = False
    error: str | None = None  # set when the ingress gives up (max_attempts failures)
    adapter: str | None = None  # the adapter's weights URI
    adapter_alpha: float = 1.4
    idempotency_key: str | None = None
    prompt: str | None = None  # shown in job lists


@dataclass
class State:
    """What the generator reports of a job."""

    status: str = "queued"  # in_progress | completed | failed
    progress: float = 0.0
    step: int | None = None  # sampler steps done of `steps`
    steps: int | None = None
    heartbeat_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    attempt: int = 0
    replica: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)  # the resolved sampling settings
    outputs: dict[str, str] = field(default_factory=dict)


class Superseded(Exception):
    """A write for an attempt that no longer owns its job: `reason` is `superseded` (a newer
    attempt does) or `cancelled` (the job was cancelled or deleted)."""

    def __init__(self, message: str, reason: str = "superseded") -> None:
        super().__init__(message)
        self.reason = reason


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

    def _attempt_path(self, job_id: str, attempt: int, *parts: str) -> str:
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise ValueError(f"attempt must be a positive integer, got {attempt!r}")
        return self.path(job_id, "attempts", str(attempt), *parts)

    def check_owner(self, job_id: str, attempt: int) -> Record:
        """The job's record, if it still names `attempt` as current and is not cancelled;
        `Superseded` otherwise."""
        record = self.get_record(job_id)
        if record is None:
            raise Superseded(f"job {job_id} no longer exists", "cancelled")
        if record.cancelled:
            raise Superseded(f"job {job_id} was cancelled", "cancelled")
        if record.attempts != attempt:
            raise Superseded(f"attempt {attempt} of {job_id} was superseded by attempt {record.attempts}")
        return record

    def put_state(self, job_id: str, state: State) -> None:
        """Write attempt `state.attempt`'s state, fenced: refused once a newer attempt owns the job
        (or it was cancelled)."""
        uri = self._attempt_path(job_id, state.attempt, "state.json")
        self.check_owner(job_id, state.attempt)
        self._write_json(uri, asdict(state))

    def get_state(self, job_id: str, attempt: int) -> State:
        """What attempt `attempt` reported (an empty, queued state before it started)."""
        if attempt < 1:
            return State()
        value = self._read_json(self._attempt_path(job_id, attempt, "state.json"))
        return State(**value) if value is not None else State(attempt=attempt)

    def output_uri(self, job_id: str, attempt: int, variant: str) -> str:
        return self._attempt_path(job_id, attempt, "outputs", OUTPUTS[variant])

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
