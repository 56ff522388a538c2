"""Attempts that supersede, without Serve: the job store's fencing, one attempt run by the real
`execute_job` on the tiny preset, and the dispatcher's protocol driven by plain asyncio calls.

The calls given to the dispatcher stand in for Serve's handle: they are the boundary the
dispatcher talks to, not what these tests are about. What they check is the protocol: which
attempt owns a job, what counts as a failure, and what users see.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pusa_ray import storage, video
from pusa_ray.serving.dispatch import RUNNING_ELSEWHERE, Dispatcher, DispatchSettings
from pusa_ray.serving.jobs import JobStore, Record, State, Superseded, job_status, new_job_id

SMALL = {"prompt": "a red circle moves right", "frames": 9, "height": 32, "width": 32, "steps": 2}


def settings(**changes: float) -> DispatchSettings:
    values = dict(max_attempts=3, lease_s=5.0, janitor_period_s=0.05, retention_s=3600.0, accept_grace_s=0.0)
    values.update(changes)
    return DispatchSettings(**values)


def new_job(store: JobStore, attempts: int = 0, request: dict | None = None, age_s: float = 60.0) -> Record:
    record = Record(id=new_job_id(), task="t2v", created_at=time.time() - age_s, attempts=attempts)
    store.put_request(record.id, request or {"task": "t2v", **SMALL})
    store.put_record(record)
    return record


def status(store: JobStore, job_id: str) -> str:
    record = store.get_record(job_id)
    return job_status(record, store.get_state(job_id, record.attempts), time.time(), 5.0)


# --- the store's fencing ------------------------------------------------------------------------


def test_a_superseded_attempts_state_writes_are_refused_and_never_read(tmp_path: Path):
    store = JobStore(str(tmp_path))
    record = new_job(store, attempts=1)
    store.put_state(record.id, State(status="in_progress", attempt=1, heartbeat_at=time.time()))
    record.attempts = 2  # the ingress learnt that attempt 1 died
    store.put_record(record)

    late = State(status="completed", attempt=1, outputs={"video": "zombie.mp4"}, heartbeat_at=time.time())
    with pytest.raises(Superseded, match="superseded by attempt 2") as refused:
        store.put_state(record.id, late)
    assert refused.value.reason == "superseded"
    assert store.get_state(record.id, 1).status == "in_progress"  # the refused write left nothing

    # Even a write that slipped past the check (it landed between the check and the bump) lands
    # in attempt 1's own folder, which no reader looks at once the record names attempt 2.
    storage.write_bytes(store._attempt_path(record.id, 1, "state.json"), b'{"status": "completed"}')
    assert status(store, record.id) == "queued"
    store.put_state(record.id, State(status="completed", attempt=2, outputs={"video": "v.mp4"}))
    assert status(store, record.id) == "completed"
    assert store.get_state(record.id, record.attempts).outputs == {"video": "v.mp4"}


def test_a_cancelled_or_deleted_jobs_writes_are_refused(tmp_path: Path):
    store = JobStore(str(tmp_path))
    record = new_job(store, attempts=1)
    record.cancelled = True
    store.put_record(record)
    with pytest.raises(Superseded, match="was cancelled") as cancelled:
        store.put_state(record.id, State(status="in_progress", attempt=1))
    assert cancelled.value.reason == "cancelled" and store.get_state(record.id, 1).status == "queued"
    store.delete_job(record.id)
    with pytest.raises(Superseded, match="no longer exists") as deleted:
        store.put_state(record.id, State(status="in_progress", attempt=1))
    assert deleted.value.reason == "cancelled"
    assert store.job_ids() == []


# --- one attempt, run by execute_job ------------------------------------------------------------


@pytest.fixture(scope="module")
def components():
    from pusa_ray.models.loading import load_components

    return load_components("tiny", device="cpu")


def _execute(components, store: JobStore, job_id: str, attempt: int) -> str:
    from pusa_ray.serving.execute import execute_job

    return execute_job(
        components, store, job_id, attempt, f"replica-{attempt}", heartbeat_s=0.05, lease_s=5.0
    )


def test_an_attempt_that_is_not_current_writes_nothing(tmp_path: Path, components):
    store = JobStore(str(tmp_path))
    record = new_job(store, attempts=2)
    assert _execute(components, store, record.id, 1) == "superseded"
    assert storage.list_files(store.path(record.id, "attempts")) == []


def test_a_zombie_attempt_stops_and_the_new_attempt_completes(tmp_path: Path, components):
    store = JobStore(str(tmp_path))
    record = new_job(store, attempts=1, request={"task": "t2v", **SMALL, "steps": 40})
    outcome: list[str] = []
    zombie = threading.Thread(target=lambda: outcome.append(_execute(components, store, record.id, 1)))
    zombie.start()
    deadline = time.time() + 60
    while store.get_state(record.id, 1).progress == 0 and time.time() < deadline:
        time.sleep(0.01)
    assert store.get_state(record.id, 1).status == "in_progress"
    record.attempts = 2  # attempt 1 was given up on (its call raised) while it was still running
    store.put_record(record)
    zombie.join(timeout=60)

    assert outcome == ["superseded"]
    assert store.get_record(record.id) is not None  # a superseded attempt never deletes the job
    assert store.get_state(record.id, 1).status == "in_progress"  # its state stopped where it was fenced
    assert not storage.exists(store.output_uri(record.id, 1, "video"))

    assert _execute(components, store, record.id, 2) == "completed"
    state = store.get_state(record.id, 2)
    assert status(store, record.id) == "completed" and state.outputs["video"].startswith(
        store.path(record.id, "attempts", "2")
    )
    frames, _fps = video.read_video(storage.read_bytes(state.outputs["video"]))
    assert frames.shape[0] == SMALL["frames"] and frames.dtype == np.uint8
    assert (state.step, state.steps) == (40, 40)  # the progress in steps, as the job view shows it
    # the thumbnail is the first frame (before the mp4's compression: close to it, not equal)
    thumbnail = np.asarray(Image.open(io.BytesIO(storage.read_bytes(state.outputs["thumbnail"]))))
    assert thumbnail.shape == frames.shape[1:]
    assert np.abs(thumbnail.astype(int) - frames[0].astype(int)).mean() < 8


# --- the dispatcher's protocol ------------------------------------------------------------------


class Replicas:
    """Plays the generator deployment: each call runs `script[attempt]` (a coroutine function)."""

    def __init__(self, store: JobStore, script: dict) -> None:
        self.store, self.script, self.calls = store, script, []

    async def __call__(self, job_id: str, attempt: int, adapter: str | None) -> str:
        self.calls.append(attempt)
        return await self.script.get(attempt, self.script.get("default"))(self.store, job_id, attempt)


async def complete(store: JobStore, job_id: str, attempt: int) -> str:
    await asyncio.to_thread(store.put_state, job_id, State(status="completed", attempt=attempt, outputs={}))
    return "completed"


async def start_then_die(store: JobStore, job_id: str, attempt: int) -> str:
    """The replica starts the attempt (a fresh heartbeat) and its process dies."""
    beat = State(status="in_progress", attempt=attempt, heartbeat_at=time.time(), progress=100.0)
    await asyncio.to_thread(store.put_state, job_id, beat)
    raise RuntimeError("ActorDiedError: the replica's process was killed")


async def run_until(dispatcher: Dispatcher, store: JobStore, job_id: str, statuses: tuple, timeout_s=10.0):
    janitor = asyncio.get_running_loop().create_task(dispatcher.janitor())
    try:
        deadline = time.time() + timeout_s
        while status(store, job_id) not in statuses or dispatcher.calls:
            assert time.time() < deadline, f"job is {status(store, job_id)}, calls {list(dispatcher.calls)}"
            await asyncio.sleep(0.02)
    finally:
        janitor.cancel()


def test_a_replica_that_died_mid_attempt_is_superseded_at_once(tmp_path: Path):
    store = JobStore(str(tmp_path))
    replicas = Replicas(store, {1: start_then_die, 2: complete})
    dispatcher = Dispatcher(store, replicas, settings(lease_s=3600.0))  # the lease never expires here
    record = new_job(store, attempts=1)

    async def scenario() -> None:
        dispatcher.issue(record)
        await run_until(dispatcher, store, record.id, ("completed",))

    asyncio.run(scenario())
    final = store.get_record(record.id)
    assert replicas.calls == [1, 2] and final.attempts == 2
    assert final.failures == ["attempt 1: RuntimeError: ActorDiedError: the replica's process was killed"]
    assert status(store, record.id) == "completed"


def test_a_job_fails_after_max_attempts_with_each_failure_named(tmp_path: Path):
    store = JobStore(str(tmp_path))
    replicas = Replicas(store, {"default": start_then_die})
    dispatcher = Dispatcher(store, replicas, settings(max_attempts=3, lease_s=3600.0))
    record = new_job(store, attempts=1)

    async def scenario() -> None:
        dispatcher.issue(record)
        await run_until(dispatcher, store, record.id, ("failed",))

    asyncio.run(scenario())
    final = store.get_record(record.id)
    assert replicas.calls == [1, 2, 3]
    assert final.error.startswith("gave up after 3 failed attempts: attempt 1: RuntimeError")
    assert "attempt 2: RuntimeError" in final.error and "attempt 3: RuntimeError" in final.error


def test_running_elsewhere_consumes_no_attempt_until_its_lease_expires(tmp_path: Path):
    store = JobStore(str(tmp_path))
    replicas = Replicas(store, {2: complete})
    dispatcher = Dispatcher(store, replicas, settings(lease_s=0.5))
    record = new_job(store, attempts=1)  # dispatched by an ingress that has since restarted
    store.put_state(record.id, State(status="in_progress", attempt=1, heartbeat_at=time.time() + 0.3))

    async def scenario() -> None:
        await dispatcher.sweep()  # fresh heartbeat: left to the replica that runs it
        assert replicas.calls == [] and store.get_record(record.id).attempts == 1
        await run_until(dispatcher, store, record.id, ("completed",))  # the beats stop: lease expires

    asyncio.run(scenario())
    final = store.get_record(record.id)
    assert replicas.calls == [2] and final.attempts == 2
    assert len(final.failures) == 1 and "heartbeat stopped" in final.failures[0]


def test_an_elsewhere_answer_is_not_a_failure(tmp_path: Path):
    store = JobStore(str(tmp_path))

    async def elsewhere(store: JobStore, job_id: str, attempt: int) -> str:
        beat = State(status="in_progress", attempt=attempt, heartbeat_at=time.time() + 3600)
        await asyncio.to_thread(store.put_state, job_id, beat)
        return RUNNING_ELSEWHERE

    replicas = Replicas(store, {1: elsewhere})
    dispatcher = Dispatcher(store, replicas, settings())
    record = new_job(store, attempts=1)

    async def scenario() -> None:
        dispatcher.issue(record)
        for _ in range(10):
            await asyncio.sleep(0.02)
            await dispatcher.sweep()

    asyncio.run(scenario())
    final = store.get_record(record.id)
    assert replicas.calls == [1] and final.attempts == 1 and final.failures == []
    assert status(store, record.id) == "in_progress"


def test_an_uncovered_job_gets_a_new_attempt_without_a_failure(tmp_path: Path):
    store = JobStore(str(tmp_path))
    replicas = Replicas(store, {"default": complete})
    dispatcher = Dispatcher(store, replicas, settings(accept_grace_s=30.0))
    queued = new_job(store, attempts=1)  # accepted by an ingress that died before its call ran
    young = new_job(store, attempts=1, age_s=0.0)  # being accepted right now: its call is coming

    async def scenario() -> None:
        await dispatcher.sweep()
        await run_until(dispatcher, store, queued.id, ("completed",))

    asyncio.run(scenario())
    assert replicas.calls == [2]
    final = store.get_record(queued.id)
    assert final.attempts == 2 and final.failures == [] and status(store, queued.id) == "completed"
    assert store.get_record(young.id).attempts == 1 and status(store, young.id) == "queued"


def test_a_finished_call_is_never_dispatched_again(tmp_path: Path):
    store = JobStore(str(tmp_path))
    replicas = Replicas(store, {"default": complete})
    dispatcher = Dispatcher(store, replicas, settings())
    records = [new_job(store, attempts=1) for _ in range(5)]

    async def scenario() -> None:
        for record in records:
            dispatcher.issue(record)
        for _ in range(20):  # sweeps racing the calls as they finish
            await dispatcher.sweep()
            await asyncio.sleep(0)

    asyncio.run(scenario())
    assert replicas.calls == [1] * 5
    assert [status(store, record.id) for record in records] == ["completed"] * 5
