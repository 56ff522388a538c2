"""Run one stored job with the core pipeline: no Ray here, so it is testable on its own.

The generator deployment calls `execute_job` in a worker thread for one attempt of a job.
Progress and a heartbeat go to that attempt's state file (fenced: see `pusa_ray.serving.jobs`);
a cancellation, or a newer attempt, is read from the job's record and stops the sampler between
steps.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict

from pusa_ray import storage
from pusa_ray.errors import UserInputError
from pusa_ray.models.loading import Components
from pusa_ray.pipeline import settings_from
from pusa_ray.sampler import GenerationCancelled
from pusa_ray.serving.jobs import OUTPUTS, JobStore, State, Superseded
from pusa_ray.video_request import VideoRequest, run_request, write_outputs

logger = logging.getLogger("pusa_ray.serving")


class Reporter:
    """One attempt's state, written (fenced, `JobStore.put_state`) from its own thread.

    The sampler never waits on storage: `progress` only updates memory and wakes the thread (at
    most every quarter second). The thread also beats every `period_s` and, about once a second,
    reads the job's record, so `reason` tells the sampler between steps that the job was
    cancelled or that a newer attempt owns it. A failed beat is retried at the next one; `write`
    (a change of phase) retries until `lease_s` has passed since the last write that landed.
    """

    def __init__(self, store: JobStore, job_id: str, state: State, period_s: float, lease_s: float) -> None:
        self.store, self.job_id, self.state = store, job_id, state
        self.period_s, self.lease_s = period_s, lease_s
        self.reason: str | None = None  # "cancelled" or "superseded", once seen
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._written_at = time.time()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def _put(self) -> None:
        with self._lock:
            self.state.heartbeat_at = time.time()
            try:
                self.store.put_state(self.job_id, self.state)  # fenced: it reads the record too
            except Superseded as error:
                self.reason = error.reason
                raise
            self._written_at = time.time()

    def write(self, **changes: object) -> None:
        """Apply `changes` and write them now, retried within the lease; `Superseded` if fenced off."""
        for key, value in changes.items():
            setattr(self.state, key, value)
        while True:
            try:
                self._put()
                return
            except Superseded:
                raise
            except Exception as error:
                if not storage.unreachable(error) or time.time() - self._written_at >= self.lease_s:
                    raise
                logger.warning("state write for %s failed, retrying: %s", self.job_id, error)
                time.sleep(min(1.0, self.period_s))

    def progress(self, done: int, total: int) -> None:
        """Sampler callback: memory only; the thread writes it."""
        self.state.progress = round(100.0 * done / total, 1)
        self.state.step, self.state.steps = done, total
        if done == total or time.time() - self._written_at >= 0.25:
            self._wake.set()

    def check_record(self) -> None:
        """Read the record: note a cancellation or a newer attempt in `reason`."""
        try:
            self.store.check_owner(self.job_id, self.state.attempt)
        except Superseded as error:
            self.reason = error.reason

    def _beat(self) -> None:
        checked_at = 0.0
        while not self._stop.is_set():
            woken = self._wake.wait(min(self.period_s, 1.0))
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if woken or time.time() - self._written_at >= self.period_s:
                    self._put()  # its fence reads the record: no second read for the check
                    checked_at = time.time()
                elif time.time() - checked_at >= 1.0:
                    self.check_record()
                    checked_at = time.time()
                if self.reason is not None:
                    return
            except Superseded:
                return
            except Exception as error:  # storage hiccup: the next beat tries again
                logger.warning("heartbeat for %s failed: %s", self.job_id, error)

    def __enter__(self) -> Reporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()


def execute_job(
    components: Components,
    store: JobStore,
    job_id: str,
    attempt: int,
    replica: str,
    heartbeat_s: float,
    lease_s: float,
) -> str:
    """Run attempt `attempt` of a stored job: `completed`, `failed`, `cancelled` or `superseded`.

    Everything it writes lies under the attempt's own folder, and every state write is fenced
    (`JobStore.put_state`), so a superseded attempt changes nothing a reader sees.
    """
    started = time.time()
    state = State(status="in_progress", started_at=started, attempt=attempt, replica=replica)
    with Reporter(store, job_id, state, heartbeat_s, lease_s) as reporter:
        try:
            reporter.write()
            request = VideoRequest.model_validate(store.get_request(job_id))
            settings = settings_from(components, request)
            reporter.write(parameters={**asdict(settings), "speed": components.speed})
            prepared = time.time()
            result = run_request(
                components, request, settings, reporter.progress, lambda: reporter.reason is not None
            )
            sampled = time.time()
            if reporter.reason is not None:
                raise GenerationCancelled(f"{reporter.reason} before its outputs were written")
            outputs = {variant: store.output_uri(job_id, attempt, variant) for variant in OUTPUTS}
            write_outputs(
                result,
                request.fps or components.spec.fps,
                outputs["video"],
                outputs["latents"],
                outputs["thumbnail"],
            )
            timings = {
                "reused_steps": result.reused_steps,  # by the step cache, when it is on
                "prepare_s": prepared - started,
                "sample_s": sampled - prepared,
                "write_s": time.time() - sampled,
            }
            reporter.write(
                status="completed", progress=100.0, finished_at=time.time(), timings=timings, outputs=outputs
            )
        except Superseded as error:
            reporter.reason = error.reason
        except GenerationCancelled:
            pass
        except (UserInputError, FileNotFoundError, ValueError) as error:
            try:
                reporter.write(status="failed", error=str(error), finished_at=time.time())
            except Superseded as error:
                reporter.reason = error.reason
            else:
                return "failed"
    if reporter.reason is None:
        reporter.check_record()  # cancelled while its outputs were written?
    if reporter.reason == "cancelled":
        logger.info('{"event": "job_cancelled", "id": "%s"}', job_id)
        store.delete_job(job_id)  # leave nothing behind (a no-op when the ingress deleted it)
        return "cancelled"
    if reporter.reason == "superseded":
        logger.info('{"event": "attempt_superseded", "id": "%s", "attempt": %d}', job_id, attempt)
        return "superseded"
    return "completed"
