"""Dispatch of stored jobs to generator calls, and their retries: plain asyncio, no Serve here.

The ingress keeps **one pending call per accepted job** (Serve's autoscaler counts them). The
protocol, with the storage layout and fencing of `pusa_ray.serving.jobs`:

1. Before a call for attempt k is issued, the record is written naming k (the fencing token).
2. Attempt k has **failed** when its call raised (its replica died, or Serve gave up on it) or
   its heartbeat is older than `lease_s`. Then attempt k+1 is written and dispatched: it owns the
   job whatever k's heartbeat says, and k's later writes are refused (`Superseded`).
3. `max_attempts` counts failed attempts only. A job that no call covers (the ingress
   restarted) and that no attempt has started gets a new attempt without a failure; one whose
   current attempt is running on a live replica (fresh heartbeat) is left to it and watched.
4. After `max_attempts` failures the record gets an error that names each failed attempt.

A janitor sweeps storage every `janitor_period_s` for the cases no call reports (a lease that
expired, an uncovered job) and deletes jobs past their retention.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

from pusa_ray.serving.jobs import TERMINAL_STATES, JobStore, Record, State, job_status

logger = logging.getLogger("pusa_ray.serving")

# (job id, attempt, adapter URI or None) -> the generator's outcome: completed, failed,
# cancelled, superseded or elsewhere. Raises when the call itself failed (the replica died).
Call = Callable[[str, int, str | None], Awaitable[str]]
RUNNING_ELSEWHERE = "elsewhere"


class JobEvents(Protocol):
    """What the dispatcher reports, for metrics (the ingress gives Ray metrics; tests, nothing)."""

    def active(self, count: int) -> None: ...

    def finished(self, record: Record, state: State) -> None: ...

    def gave_up(self, record: Record) -> None: ...


class NoEvents:
    def active(self, count: int) -> None:
        pass

    def finished(self, record: Record, state: State) -> None:
        pass

    def gave_up(self, record: Record) -> None:
        pass


@dataclass(frozen=True)
class DispatchSettings:
    max_attempts: int
    lease_s: float
    janitor_period_s: float
    retention_s: float
    accept_grace_s: float  # a record younger than this may still be getting its first call


def log_event(event: str, **fields: Any) -> None:
    logger.info(json.dumps({"event": event, **fields}, default=str))


class Dispatcher:
    """Owns the calls of one ingress: dispatch, watch, retry or give up, and the janitor."""

    def __init__(
        self,
        store: JobStore,
        call: Call,
        settings: DispatchSettings,
        executor: Executor | None = None,
        events: JobEvents | None = None,
    ) -> None:
        self.store, self.call, self.settings = store, call, settings
        self.executor = executor  # for blocking storage calls (None: the loop's default)
        self.events = events or NoEvents()
        self.calls: dict[str, asyncio.Task] = {}  # job id -> the task awaiting its current call
        self._locks: dict[str, asyncio.Lock] = {}  # one decision about a job at a time

    def _lock(self, job_id: str) -> asyncio.Lock:
        return self._locks.setdefault(job_id, asyncio.Lock())

    async def _blocking(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    # --- calls ----------------------------------------------------------------------------
    def issue(self, record: Record) -> None:
        """Start the call for the record's current attempt (already written to storage)."""
        previous = self.calls.pop(record.id, None)
        if previous is not None:
            previous.cancel()
        response = self.call(record.id, record.attempts, record.adapter)
        self.calls[record.id] = asyncio.get_running_loop().create_task(
            self._watch(record.id, record.attempts, response)
        )
        self.events.active(len(self.calls))

    async def dispatch(self, record: Record) -> None:
        """Write the next attempt's number to the record, then issue its call."""
        record.attempts += 1
        await self._blocking(self.store.put_record, record)
        self.issue(record)

    def cancel(self, job_id: str) -> None:
        call = self.calls.pop(job_id, None)
        if call is not None:
            call.cancel()
        self.events.active(len(self.calls))

    async def _watch(self, job_id: str, attempt: int, response: Awaitable[str]) -> None:
        failure = outcome = None
        try:
            outcome = await response
        except asyncio.CancelledError:
            cancel = getattr(response, "cancel", None)
            if cancel is not None:
                cancel()
            raise
        except Exception as error:  # the replica died, or Serve gave up on the call
            failure = f"{type(error).__name__}: {error}"
        if self.calls.get(job_id) is asyncio.current_task():
            del self.calls[job_id]
        self.events.active(len(self.calls))
        try:
            await self._settle(job_id, attempt, outcome, failure)
        except Exception as error:  # storage unreachable: the janitor settles it on a later sweep
            logger.warning("settling attempt %d of %s failed: %s", attempt, job_id, error)

    async def _settle(self, job_id: str, attempt: int, outcome: str | None, failure: str | None) -> None:
        """After a call ended: retry a failed attempt, or record how it finished."""
        async with self._lock(job_id):
            record = await self._blocking(self.store.get_record, job_id)
            if record is None or record.cancelled or record.attempts != attempt:
                return  # deleted, cancelled, or a newer attempt owns the job
            if failure is not None:
                await self._attempt_failed(record, failure)
                return
        if outcome == RUNNING_ELSEWHERE:
            return  # this attempt runs on another replica: the janitor watches its lease
        state = await self._blocking(self.store.get_state, job_id, attempt)
        log_event("job_finished", id=job_id, task=record.task, status=state.status, timings=state.timings)
        self.events.finished(record, state)

    async def _attempt_failed(self, record: Record, reason: str) -> None:
        """The record's current attempt ran and failed: dispatch the next, or give up (under its lock)."""
        state = await self._blocking(self.store.get_state, record.id, record.attempts)
        if state.status in ("completed", "failed"):
            return  # it finished before it was lost
        record.failures.append(f"attempt {record.attempts}: {reason}")
        if len(record.failures) < self.settings.max_attempts:
            log_event("job_retry", id=record.id, attempt=record.attempts + 1, reason=reason)
            await self.dispatch(record)
            return
        record.error = f"gave up after {len(record.failures)} failed attempts: " + "; ".join(record.failures)
        await self._blocking(self.store.put_record, record)
        self.events.gave_up(record)
        log_event("job_failed", id=record.id, reason=record.error)

    # --- janitor --------------------------------------------------------------------------
    async def janitor(self) -> None:
        """Sweep forever; a sweep that fails (storage unreachable) is tried again next period."""
        while True:
            try:
                await self.sweep()
            except Exception as error:
                logger.warning("janitor sweep failed: %s", error)
            await asyncio.sleep(self.settings.janitor_period_s)

    async def sweep(self) -> None:
        """One pass: expire old jobs, fail attempts whose lease expired, cover uncovered jobs."""
        for record, state in await self._blocking(self._unfinished):
            if self._needs_action(record, state):
                async with self._lock(record.id):
                    await self._act(record.id)

    def _needs_action(self, record: Record, state: State) -> bool:
        if state.status == "in_progress":
            return time.time() - (state.heartbeat_at or 0.0) >= self.settings.lease_s
        return record.id not in self.calls and time.time() - record.created_at >= self.settings.accept_grace_s

    async def _act(self, job_id: str) -> None:
        """Decide again from fresh reads (a call may have ended since the sweep read the job)."""
        record = await self._blocking(self.store.get_record, job_id)
        if record is None:
            return
        state = await self._blocking(self.store.get_state, job_id, record.attempts)
        if job_status(record, state, 0.0, self.settings.lease_s) in TERMINAL_STATES:
            return
        if not self._needs_action(record, state):
            return
        if state.status == "in_progress":
            self.cancel(job_id)
            lease = self.settings.lease_s
            await self._attempt_failed(record, f"its heartbeat stopped (no beat for {lease:g} s)")
        else:
            log_event("job_uncovered", id=job_id, attempt=record.attempts + 1)
            await self.dispatch(record)  # a new attempt, not a failure

    def _unfinished(self) -> list[tuple[Record, State]]:
        """Blocking. Delete expired jobs; return the others that have not finished, with their state."""
        now = time.time()
        unfinished = []
        for job_id in self.store.job_ids():
            record = self.store.get_record(job_id)
            if record is None:
                continue
            state = self.store.get_state(job_id, record.attempts)
            if job_status(record, state, now, self.settings.lease_s) not in TERMINAL_STATES:
                unfinished.append((record, state))
            elif now - record.created_at > self.settings.retention_s:
                self.delete(record)
        return unfinished

    def delete(self, record: Record) -> None:
        """Blocking: the job's files and its idempotency key."""
        self.store.delete_job(record.id)
        self._locks.pop(record.id, None)
        if record.idempotency_key:
            self.store.forget_idempotent(record.idempotency_key)
        log_event("job_deleted", id=record.id)
