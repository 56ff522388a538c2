"""The HTTP ingress: submit, poll, fetch, list, delete; it owns the dispatch of jobs.

Generation is an asynchronous job. The ingress validates a request, stores it (object storage,
so it outlives every process), answers 202 at once and hands the job to its `Dispatcher`
(`pusa_ray.serving.dispatch`: one pending generator call per job, attempts that supersede,
the janitor).

Every storage access of a request is bounded by `storage_timeout_s`: when storage does not
answer in time, or answers that it is unavailable, the request gets `503` with `Retry-After`
naming storage (never a hang or a 500), and `/healthz` says storage is unreachable.

(No `from __future__ import annotations` here: FastAPI must resolve the route annotations.)
"""

import asyncio
import functools
import hmac
import importlib.resources
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Depends, FastAPI, Header, Query
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.util import metrics

from pusa_ray import storage
from pusa_ray.checkpoints import adapters as published
from pusa_ray.conditioning import latents_for_frames
from pusa_ray.config import PRESETS
from pusa_ray.errors import UserInputError
from pusa_ray.models.description import describe_model, sampling_defaults
from pusa_ray.serving.dispatch import Dispatcher, DispatchSettings, log_event
from pusa_ray.serving.errors import ApiError, field_of, install_error_handlers
from pusa_ray.serving.jobs import TERMINAL_STATES, JobStore, Record, State, job_status, new_job_id
from pusa_ray.serving.schemas import JobList, JobView
from pusa_ray.serving.settings import ServiceSettings
from pusa_ray.tasks import TASK_FIELDS, VideoShape, validate_inputs
from pusa_ray.video_request import Media, VideoRequest, task_inputs

STORAGE_THREADS = 32  # blocking storage calls of one ingress; a stalled endpoint must not starve it
HEALTH_PROBE_S = 2.0  # /healthz waits at most this long on storage
STORAGE_DOWN_S = 1.0  # after storage failed a request, the next ones answer 503 at once for this long
CONTENT_TIMEOUT_S = 120.0  # a whole video is read within this
CONTENT_TYPES = {  # variant -> media type, file suffix, Content-Disposition
    "video": ("video/mp4", ".mp4", "attachment"),
    "latents": ("application/octet-stream", ".safetensors", "attachment"),
    "thumbnail": ("image/png", ".png", "inline"),
}

api = FastAPI(
    title="pusa-ray",
    version="1",
    description="Vectorized-timestep video generation as asynchronous jobs.",
)
install_error_handlers(api)


def _check_limits(
    request: VideoRequest, settings: ServiceSettings, shape_defaults: tuple[int, int, int]
) -> VideoShape:
    """Bounds that depend on the service's configuration; the schema has the hard ones."""
    limits = settings.limits
    frames, height, width = (
        value or default
        for value, default in zip(
            (request.frames, request.height, request.width), shape_defaults, strict=True
        )
    )
    if frames > limits.max_frames:
        raise ApiError(400, f"frames: {frames} exceeds the limit {limits.max_frames}", "frames")
    for name, value in (("height", height), ("width", width)):
        if value % 16:
            raise ApiError(400, f"{name}: {value} is not a multiple of 16", name)
    if height * width > limits.max_pixels:
        raise ApiError(400, f"height*width: {height}x{width} exceeds {limits.max_pixels} pixels", "height")
    if request.steps is not None and request.steps > limits.max_steps:
        raise ApiError(400, f"steps: {request.steps} exceeds the limit {limits.max_steps}", "steps")
    try:
        latents_for_frames(frames)
    except UserInputError as error:
        raise ApiError(400, f"frames: {error}", "frames") from None
    return VideoShape(frames, height, width)


MEDIA_FIELDS = ("image", "end_image", "keyframes", "video", "end_video")


def _set_media_uri(stored: dict, name: str, uri: str) -> None:
    """Replace inline data by the stored input's URI in the request dict (`keyframes.0.image` too)."""
    parts = name.split(".")
    target = stored
    for part in parts:
        target = target[int(part)] if part.isdigit() else target[part]
    target.update(data=None, uri=uri)


def _bearer_key(authorization: str | None = Header(default=None)) -> str | None:
    if not authorization or not authorization.startswith("Bearer "):
        return None
    return authorization[len("Bearer ") :].strip()


class RayJobEvents:
    """The dispatcher's events as Ray metrics (exported by every node's metrics agent)."""

    def __init__(self) -> None:
        self.active_jobs = metrics.Gauge("pusa_jobs_active", description="accepted, unfinished jobs")
        self.failures = metrics.Counter("pusa_jobs_failed_total", description="jobs that ended failed")
        self.latency = metrics.Histogram(
            "pusa_job_latency_s",
            description="submit to completion, seconds",
            boundaries=[1, 5, 15, 30, 60, 120, 300, 600, 1200, 2400],
        )

    def active(self, count: int) -> None:
        self.active_jobs.set(count)

    def finished(self, record: Record, state: State) -> None:
        if state.status == "completed":
            self.latency.observe(time.time() - record.created_at)
        elif state.status == "failed":
            self.failures.inc()

    def gave_up(self, record: Record) -> None:
        self.failures.inc()


STUDIO_FILES = {"index.html": "text/html", "studio.js": "text/javascript", "studio.css": "text/css"}
# The page may load and call this service only (its media are blob: URLs of API responses).
STUDIO_POLICY = "default-src 'self'; img-src 'self' blob:; media-src 'self' blob:; object-src 'none'"


@functools.cache
def _studio_file(name: str) -> bytes:
    return (importlib.resources.files("pusa_ray.serving") / "studio" / name).read_bytes()


def _studio_response(name: str) -> Response:
    """A file of the studio page (`pusa_ray/serving/studio/`): plain HTML, CSS and JS, no build step,
    nothing fetched from outside the service."""
    headers = {"Cache-Control": "no-cache", "Content-Security-Policy": STUDIO_POLICY}
    return Response(_studio_file(name), media_type=STUDIO_FILES[name], headers=headers)


def _storage_unavailable(retry_after_s: int, error: BaseException | None = None) -> ApiError:
    detail = f" ({type(error).__name__}: {error})" if error is not None and str(error) else ""
    return ApiError(
        503, f"storage is unreachable{detail}; retry later", "storage", {"Retry-After": str(retry_after_s)}
    )


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP routes over the job store; hands accepted jobs to its dispatcher."""

    async def __init__(self, generator: DeploymentHandle, settings: dict) -> None:
        self.settings = ServiceSettings.model_validate(settings)
        self.settings.api_key()  # fail at start-up, not per request, when the key is missing
        timeout = self.settings.storage_timeout_s
        # This process answers users: fail fast on storage rather than wait out long retries.
        storage.configure(
            storage.StorageSettings(max_attempts=3, connect_timeout=timeout, read_timeout=max(timeout, 10.0))
        )
        self.store = JobStore(self.settings.storage_root)
        self.generator = generator
        self.executor = ThreadPoolExecutor(STORAGE_THREADS, thread_name_prefix="ingress-storage")
        self.dispatcher = Dispatcher(
            self.store,
            self._call,
            DispatchSettings(
                max_attempts=self.settings.max_attempts,
                lease_s=self.settings.lease_s,
                janitor_period_s=self.settings.janitor_period_s,
                retention_s=self.settings.retention_s,
                accept_grace_s=max(2 * timeout, 5.0),
            ),
            self.executor,
            RayJobEvents(),
        )
        try:
            described = await asyncio.to_thread(describe_model, self.settings.model)
        except UserInputError:  # e.g. an original Wan2.1 release: no configs to read, only weights
            described = None
        self.model_architecture = described.architecture if described else None
        wan = PRESETS["wan2.1-t2v-14b"]
        self.shape_defaults = tuple(
            getattr(described, name, None) or getattr(wan, name) for name in ("frames", "height", "width")
        )
        sampling = await asyncio.to_thread(sampling_defaults, self.settings.model)
        shape = dict(zip(("frames", "height", "width"), self.shape_defaults, strict=True))
        if self.settings.cache is not None:
            sampling["cache"] = self.settings.cache  # the service's default, written into requests
        self.request_defaults = {**shape, **sampling, "seed": 0}  # what a request leaves out
        self._replicas: tuple[float, int | None] = (0.0, None)
        self._storage_down_until = 0.0  # time.monotonic() before which storage counts as down
        self._janitor = asyncio.get_running_loop().create_task(self.dispatcher.janitor())

    def _call(self, job_id: str, attempt: int, adapter: str | None) -> Any:
        return self.generator.options(multiplexed_model_id=adapter or "").run.remote(job_id, attempt)

    async def _io(self, function: Callable[..., Any], *args: Any, timeout_s: float | None = None) -> Any:
        """Run a blocking storage call for a request: bounded in time, 503 when storage is down.

        After a call found storage unreachable, requests for the next `STORAGE_DOWN_S` answer 503
        at once instead of each waiting out the timeout; the first one after that tries again.
        """
        if time.monotonic() < self._storage_down_until:
            raise _storage_unavailable(self.settings.retry_after_s)
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self.executor, functools.partial(function, *args)),
                timeout_s or self.settings.storage_timeout_s,
            )
        except TimeoutError:
            self._storage_down_until = time.monotonic() + STORAGE_DOWN_S
            raise _storage_unavailable(self.settings.retry_after_s) from None
        except Exception as error:
            if isinstance(error, ApiError) or not storage.unreachable(error):
                raise
            self._storage_down_until = time.monotonic() + STORAGE_DOWN_S
            raise _storage_unavailable(self.settings.retry_after_s, error) from None

    # --- auth -----------------------------------------------------------------------------
    def _authorize(self, key: str | None) -> None:
        expected = self.settings.api_key()
        if expected is None:
            return
        if key is None or not hmac.compare_digest(key.encode(), expected.encode()):
            raise ApiError(
                401,
                "missing or wrong API key (Authorization: Bearer KEY)",
                "authorization",
                {"WWW-Authenticate": "Bearer"},
            )

    # --- views ----------------------------------------------------------------------------
    def _view(self, record: Record, state: State | None = None, request: dict | None = None) -> JobView:
        """Blocking (storage reads, unless `state` and `request` are given): run through `_io`."""
        if state is None:
            state = self.store.get_state(record.id, record.attempts)
        status = job_status(record, state, time.time(), self.settings.lease_s)
        parameters = state.parameters
        if not parameters:
            if request is None:
                request = self.store.get_request(record.id) or {}
            parameters = {k: v for k, v in request.items() if k not in MEDIA_FIELDS and v is not None}
        return JobView(
            id=record.id,
            status=status,
            progress=100.0 if status == "completed" else state.progress if status == "in_progress" else 0.0,
            step=state.step if status == "in_progress" else None,
            steps=state.steps if status == "in_progress" else None,
            task=record.task,
            prompt=record.prompt,
            created_at=record.created_at,
            started_at=state.started_at,
            finished_at=state.finished_at if status in ("completed", "failed") else None,
            queue_reason=self._queue_reason() if status == "queued" else None,
            error=(record.error or state.error) if status == "failed" else None,
            attempts=record.attempts,
            parameters=parameters,
            adapter=record.adapter,
            outputs={v: f"/v1/videos/{record.id}/content?variant={v}" for v in state.outputs}
            if status == "completed"
            else {},
        )

    def _queue_reason(self) -> str:
        replicas = self._generator_replicas()
        if replicas == 0:
            return "waiting for a generator replica to start (a GPU node may be starting)"
        running = "" if replicas is None else f"{replicas} generator replicas running, "
        return f"waiting for a free generator replica ({running}{len(self.dispatcher.calls)} unfinished jobs)"

    def _generator_replicas(self) -> int | None:
        at, count = self._replicas
        if time.time() - at < 5:
            return count
        try:
            for app in serve.status().applications.values():
                if "Generator" in app.deployments:
                    count = app.deployments["Generator"].replica_states.get("RUNNING", 0)
        except Exception:  # the controller is busy or restarting: no reason is better than a wrong one
            count = None
        self._replicas = (time.time(), count)
        return count

    def _find_record(self, job_id: str) -> Record | None:
        try:
            return self.store.get_record(job_id)
        except (KeyError, UserInputError):
            return None

    async def _record(self, job_id: str) -> Record:
        record = await self._io(self._find_record, job_id)
        if record is None:
            raise ApiError(404, f"no video job {job_id!r}", "id")
        return record

    # --- request checks -------------------------------------------------------------------
    def _check_media(self, name: str, media: Media) -> None:
        if media.uri is not None:
            if not self.settings.input_allowed(media.uri):
                raise ApiError(403, f"{name}.uri: {media.uri!r} is outside the allowed input prefixes", name)
            return
        size = len(media.decoded())
        if size > self.settings.limits.max_media_bytes:
            raise ApiError(413, f"{name}: {size} bytes exceeds {self.settings.limits.max_media_bytes}", name)

    def _resolve_adapter(self, adapter: str) -> str:
        """An adapter id under the adapters prefix, or an allowed s3:// URI -> the weights URI."""
        if adapter.startswith("s3://"):
            if not self.settings.input_allowed(adapter):
                raise ApiError(403, f"adapter: {adapter!r} is outside the allowed input prefixes", "adapter")
            if not storage.exists(adapter):
                raise ApiError(404, f"adapter: {adapter!r} does not exist", "adapter")
            return adapter
        if self.settings.adapters_prefix is None:
            raise ApiError(400, "adapter: this service has no adapters prefix configured", "adapter")
        try:
            metadata = published.adapter_metadata(self.settings.adapters_prefix, adapter)
        except UserInputError as error:
            raise ApiError(400, f"adapter: {error}", "adapter") from None
        except FileNotFoundError:
            raise ApiError(
                404, f"adapter: no published adapter {adapter!r} (see GET /v1/models)", "adapter"
            ) from None
        recorded = metadata.get("architecture")
        if recorded and self.model_architecture and recorded != self.model_architecture:
            raise ApiError(
                400,
                f"adapter: {adapter!r} was trained for architecture {recorded}, the served model is "
                f"{self.model_architecture}",
                "adapter",
            )
        return published.adapter_uri(self.settings.adapters_prefix, adapter)

    def _validate(self, body: VideoRequest) -> str | None:
        """Every check that needs no generation; returns the resolved adapter URI."""
        shape = _check_limits(body, self.settings, self.shape_defaults)
        for name, media in body.media_fields().items():
            self._check_media(name, media)
        try:
            validate_inputs(task_inputs(body), shape)
        except UserInputError as error:
            raise ApiError(400, str(error), field_of(str(error))) from None
        return self._resolve_adapter(body.adapter) if body.adapter else None

    def _accept(self, body: VideoRequest, idempotency_key: str | None) -> tuple[Record, dict]:
        """Store the request (inline media as input files), then its record naming attempt 1; blocking."""
        adapter = self._validate(body)
        job_id = new_job_id()
        stored = body.model_dump(mode="json")
        if body.cache is None and self.settings.cache is not None:
            stored["cache"] = self.settings.cache
        for name, media in body.media_fields().items():
            if media.data is not None:
                uri = self.store.put_input(job_id, name.replace(".", "_"), media.decoded())
                _set_media_uri(stored, name, uri)
        self.store.put_request(job_id, stored)
        if idempotency_key:
            self.store.remember_idempotent(idempotency_key, job_id)
        record = Record(
            id=job_id,
            task=body.task,
            prompt=body.prompt,
            created_at=time.time(),
            attempts=1,
            adapter=adapter,
            adapter_alpha=body.adapter_alpha,
            idempotency_key=idempotency_key,
        )
        self.store.put_record(record)  # last: a job exists once its record does
        return record, stored

    def _existing(self, idempotency_key: str) -> JobView | None:
        existing = self.store.find_idempotent(idempotency_key)
        record = self.store.get_record(existing) if existing else None
        return self._view(record) if record is not None else None

    # --- routes ---------------------------------------------------------------------------
    @api.post("/v1/videos", status_code=202, response_model=JobView)
    async def submit(
        self,
        body: VideoRequest,
        key: str | None = Depends(_bearer_key),
        idempotency_key: str | None = Header(default=None, max_length=255),
    ) -> JSONResponse:
        self._authorize(key)
        if idempotency_key:
            view = await self._io(self._existing, idempotency_key)
            if view is not None:
                return JSONResponse(status_code=202, content=view.model_dump(mode="json"))
        if len(self.dispatcher.calls) >= self.settings.max_queue:
            raise ApiError(
                429,
                f"the queue is full ({self.settings.max_queue} unfinished jobs); retry later",
                None,
                {"Retry-After": str(self.settings.retry_after_s)},
            )
        record, stored = await self._io(self._accept, body, idempotency_key)
        self.dispatcher.issue(record)
        log_event("job_accepted", id=record.id, task=record.task, adapter=record.adapter)
        loop = asyncio.get_running_loop()
        view = await loop.run_in_executor(
            self.executor, self._view, record, State(attempt=record.attempts), stored
        )  # no storage read: an accepted job is answered whatever storage does next
        return JSONResponse(status_code=202, content=view.model_dump(mode="json"))

    @api.get("/v1/videos/{job_id}", response_model=JobView)
    async def status(self, job_id: str, key: str | None = Depends(_bearer_key)) -> JobView:
        self._authorize(key)
        return await self._io(self._view, await self._record(job_id))

    @api.get("/v1/videos/{job_id}/content")
    async def content(
        self,
        job_id: str,
        variant: str = Query(default="video", pattern="^(video|latents|thumbnail)$"),
        key: str | None = Depends(_bearer_key),
    ) -> Response:
        self._authorize(key)
        record = await self._record(job_id)
        state = await self._io(self.store.get_state, job_id, record.attempts)
        status = job_status(record, state, time.time(), self.settings.lease_s)
        if status != "completed":
            raise ApiError(409, f"job {job_id!r} is {status}, not completed", "id")
        if variant not in state.outputs:  # a job finished before the service wrote thumbnails
            raise ApiError(404, f"job {job_id!r} has no {variant} output", "variant")
        data = await self._io(storage.read_bytes, state.outputs[variant], timeout_s=CONTENT_TIMEOUT_S)
        media_type, suffix, disposition = CONTENT_TYPES[variant]
        headers = {"Content-Disposition": f'{disposition}; filename="{job_id}{suffix}"'}
        return Response(data, media_type=media_type, headers=headers)

    @api.get("/v1/videos", response_model=JobList)
    async def list_jobs(
        self,
        limit: int = Query(default=20, ge=1, le=100),
        after: str | None = Query(default=None, max_length=64),
        key: str | None = Depends(_bearer_key),
    ) -> JobList:
        self._authorize(key)

        def page() -> JobList:
            records = [r for r in map(self.store.get_record, self.store.job_ids()) if r is not None]
            records.sort(key=lambda r: (-r.created_at, r.id))
            if after is not None:
                ids = [r.id for r in records]
                if after not in ids:
                    raise ApiError(400, f"after: unknown job id {after!r}", "after")
                records = records[ids.index(after) + 1 :]
            chosen = records[:limit]
            next_after = chosen[-1].id if len(records) > limit else None
            return JobList(data=[self._view(r) for r in chosen], next_after=next_after)

        return await self._io(page)

    @api.delete("/v1/videos/{job_id}")
    async def delete(self, job_id: str, key: str | None = Depends(_bearer_key)) -> dict:
        self._authorize(key)
        record = await self._record(job_id)
        view = await self._io(self._view, record)
        if view.status not in TERMINAL_STATES:
            record.cancelled = True
            await self._io(self.store.put_record, record)  # the generator sees this between steps
            self.dispatcher.cancel(job_id)
        await self._io(self.dispatcher.delete, record)
        return {"id": job_id, "deleted": True, "status": "cancelled" if record.cancelled else view.status}

    @api.get("/v1/models")
    async def models(self, key: str | None = Depends(_bearer_key)) -> dict:
        self._authorize(key)
        prefix = self.settings.adapters_prefix
        listed = await self._io(published.list_adapters, prefix) if prefix else []
        return {
            "model": {"id": self.settings.model, "architecture": self.model_architecture},
            "adapters": listed,
            "defaults": self.request_defaults,
            "limits": self.settings.limits.model_dump(),
            "tasks": {
                task: {"needs": list(need), "optional": list(more)}
                for task, (need, more) in TASK_FIELDS.items()
            },
        }

    # --- the studio page: static files of the package, every action through the API above ---
    @api.get("/", include_in_schema=False)
    async def studio_root(self) -> Response:
        return _studio_response("index.html")

    @api.get("/studio", include_in_schema=False)
    async def studio(self) -> Response:
        return _studio_response("index.html")

    @api.get("/studio/{name}", include_in_schema=False)
    async def studio_asset(self, name: str) -> Response:
        if name not in STUDIO_FILES:
            raise ApiError(404, f"no studio file {name!r}", "name")
        return _studio_response(name)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 when storage answers; 503 (with the reason) when it does not."""
        active = len(self.dispatcher.calls)
        probe = storage.join(self.settings.storage_root, "healthz")
        timeout = min(HEALTH_PROBE_S, self.settings.storage_timeout_s)
        try:
            await self._io(storage.exists, probe, timeout_s=timeout)
        except ApiError as error:
            body = {
                "status": "degraded",
                "storage": "unreachable",
                "error": error.message,
                "active_jobs": active,
            }
            return JSONResponse(status_code=503, content=body, headers=error.headers)
        return JSONResponse(content={"status": "ok", "storage": "ok", "active_jobs": active})
