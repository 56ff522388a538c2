"""The Ray Serve application: a light HTTP ingress and an autoscaling GPU generator.

Generation is an asynchronous job. The ingress validates a request, stores it (object storage,
so it outlives every process), answers 202 at once, and keeps **one pending handle call per
accepted job** to the generator deployment. Serve's autoscaler counts those calls (queued at the
handle or running) as ongoing requests, so `target_ongoing_requests: 1` scales generator replicas
with the queue. A call that fails because its replica died is re-issued, up to `max_attempts`;
a janitor re-issues calls for stored jobs that no call covers (after an ingress restart), fails
jobs whose heartbeat stopped, and deletes records past their retention.

(No `from __future__ import annotations` here: FastAPI must resolve the route annotations.)

Entry point for Serve configs: `import_path: pusa_ray.serving.app:build_app`, `args:` = settings.
"""

import asyncio
import hashlib
import hmac
import json
import logging
import re
import threading
import time
from typing import Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from ray.util import metrics

from pusa_ray import storage
from pusa_ray.checkpoints import adapters as published
from pusa_ray.conditioning import latents_for_frames
from pusa_ray.config import PRESETS
from pusa_ray.errors import UserInputError
from pusa_ray.models.loading import describe_model
from pusa_ray.serving.execute import task_inputs
from pusa_ray.serving.jobs import TERMINAL_STATES, JobStore, Record, job_status, new_job_id
from pusa_ray.serving.schemas import JobList, JobView, Media, VideoRequest
from pusa_ray.serving.settings import ServiceSettings
from pusa_ray.tasks import VideoShape, validate_inputs

logger = logging.getLogger("pusa_ray.serving")
MAX_ADAPTERS_PER_REPLICA = 4  # LRU of loaded adapters per generator replica (Serve multiplexing)

api = FastAPI(
    title="pusa-ray",
    version="1",
    description="Vectorized-timestep video generation as asynchronous jobs.",
)


class ApiError(Exception):
    """An HTTP error with a JSON body naming the offending field."""

    def __init__(
        self, status: int, message: str, field: str | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers or {}


def _error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "field": field, "status": status}}
    return JSONResponse(status_code=status, content=body, headers=headers)


@api.exception_handler(ApiError)
async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
    return _error(error.status, error.message, error.field, error.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    field = ".".join(location) or None
    message = first.get("msg", "invalid request")
    return _error(400, f"{field}: {message}" if field else message, field)


def _log(event: str, **fields: Any) -> None:
    logger.info(json.dumps({"event": event, **fields}, default=str))


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


def _field_of(message: str) -> str | None:
    """The request field an input error is about (`needs --end-image` -> end_image)."""
    flag = re.search(r"--([a-z][a-z-]*)", message)
    if flag and flag.group(1) != "cond":
        return flag.group(1).replace("-", "_")
    for word, field in (("noise", "noise"), ("latent", "keyframes"), ("position", "keyframes")):
        if word in message:
            return field
    return None


def _bearer_key(authorization: str | None = Header(default=None)) -> str | None:
    if not authorization or not authorization.startswith("Bearer "):
        return None
    return authorization[len("Bearer ") :].strip()


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP: submit, poll, fetch, list, delete; owns the dispatch of jobs to the generator."""

    async def __init__(self, generator: DeploymentHandle, settings: dict) -> None:
        self.settings = ServiceSettings.model_validate(settings)
        self.settings.api_key()  # fail at start-up, not per request, when the key is missing
        self.store = JobStore(self.settings.storage_root)
        self.generator = generator
        self.calls: dict[str, asyncio.Task] = {}  # job id -> the task awaiting its generator call
        described = await asyncio.to_thread(describe_model, self.settings.model)
        self.model_architecture = described["architecture"]
        wan = PRESETS["wan2.1-t2v-14b"]
        self.shape_defaults = (
            described["frames"] or wan.frames,
            described["height"] or wan.height,
            described["width"] or wan.width,
        )
        self.active = metrics.Gauge("pusa_jobs_active", description="accepted, unfinished jobs")
        self.failures = metrics.Counter("pusa_jobs_failed_total", description="jobs that ended failed")
        self.latency = metrics.Histogram(
            "pusa_job_latency_s",
            description="submit to completion, seconds",
            boundaries=[1, 5, 15, 30, 60, 120, 300, 600, 1200, 2400],
        )
        self._replicas: tuple[float, int | None] = (0.0, None)
        self._janitor = asyncio.get_running_loop().create_task(self._janitor_loop())

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

    # --- dispatch -------------------------------------------------------------------------
    async def _dispatch(self, record: Record) -> None:
        record.attempts += 1
        await asyncio.to_thread(self.store.put_record, record)
        handle = self.generator.options(multiplexed_model_id=record.adapter or "")
        response = handle.run.remote(record.id, record.attempts)
        self.calls[record.id] = asyncio.get_running_loop().create_task(self._watch(record.id, response))
        self.active.set(len(self.calls))

    async def _watch(self, job_id: str, response: DeploymentResponse) -> None:
        failure = outcome = None
        try:
            outcome = await response
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as error:  # the replica died, or Serve gave up on the call
            failure = f"{type(error).__name__}: {error}"
        if self.calls.get(job_id) is asyncio.current_task():
            del self.calls[job_id]
        self.active.set(len(self.calls))
        record = await asyncio.to_thread(self.store.get_record, job_id)
        if record is None or record.cancelled or outcome == "elsewhere":
            return  # deleted, cancelled, or running on another replica (the janitor watches it)
        if failure is not None:
            await self._retry_or_fail(record, failure)
            return
        state = await asyncio.to_thread(self.store.get_state, job_id)
        _log("job_finished", id=job_id, task=record.task, status=state.status, timings=state.timings)
        if state.status == "completed":
            self.latency.observe(time.time() - record.created_at)
        elif state.status == "failed":
            self.failures.inc()

    async def _retry_or_fail(self, record: Record, reason: str) -> None:
        state = await asyncio.to_thread(self.store.get_state, record.id)
        if state.status in ("completed", "failed"):
            return
        if record.attempts < self.settings.max_attempts:
            _log("job_retry", id=record.id, attempt=record.attempts + 1, reason=reason)
            await self._dispatch(record)
            return
        record.error = f"gave up after {record.attempts} attempts: {reason}"
        await asyncio.to_thread(self.store.put_record, record)
        self.failures.inc()
        _log("job_failed", id=record.id, reason=record.error)

    async def _janitor_loop(self) -> None:
        while True:
            try:
                orphans = await asyncio.to_thread(self._sweep)
                for record, stale in orphans:
                    call = self.calls.pop(record.id, None)
                    if call is not None:
                        call.cancel()
                    if stale or record.attempts >= self.settings.max_attempts:
                        reason = "its heartbeat stopped" if stale else "no call was running for it"
                        await self._retry_or_fail(record, reason)
                    else:
                        await self._dispatch(record)
            except Exception as error:  # keep sweeping; storage may be briefly unreachable
                logger.warning("janitor sweep failed: %s", error)
            await asyncio.sleep(self.settings.janitor_period_s)

    def _sweep(self) -> list[tuple[Record, bool]]:
        """Delete expired jobs; return unfinished ones that no call covers, or whose heartbeat stopped."""
        now = time.time()
        orphans = []
        for job_id in self.store.job_ids():
            record = self.store.get_record(job_id)
            if record is None:
                continue
            state = self.store.get_state(job_id)
            if job_status(record, state, now, self.settings.lease_s) in TERMINAL_STATES:
                if now - record.created_at > self.settings.retention_s:
                    self._delete(record)
                continue
            stale = (
                state.status == "in_progress" and now - (state.heartbeat_at or 0.0) >= self.settings.lease_s
            )
            if stale or job_id not in self.calls:
                orphans.append((record, stale))
        return orphans

    def _delete(self, record: Record) -> None:
        self.store.delete_job(record.id)
        if record.idempotency_key:
            self.store.forget_idempotent(record.idempotency_key)
        _log("job_deleted", id=record.id)

    # --- views ----------------------------------------------------------------------------
    def _view(self, record: Record) -> JobView:
        """Blocking (storage reads): call through asyncio.to_thread."""
        state = self.store.get_state(record.id)
        status = job_status(record, state, time.time(), self.settings.lease_s)
        parameters = state.parameters
        if not parameters:
            request = self.store.get_request(record.id) or {}
            parameters = {k: v for k, v in request.items() if k not in MEDIA_FIELDS and v is not None}
        return JobView(
            id=record.id,
            status=status,
            progress=100.0 if status == "completed" else state.progress if status == "in_progress" else 0.0,
            task=record.task,
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
        return f"waiting for a free generator replica ({running}{len(self.calls)} unfinished jobs)"

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

    async def _record(self, job_id: str) -> Record:
        try:
            record = await asyncio.to_thread(self.store.get_record, job_id)
        except (KeyError, UserInputError):
            record = None
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
            raise ApiError(400, str(error), _field_of(str(error))) from None
        return self._resolve_adapter(body.adapter) if body.adapter else None

    def _accept(self, body: VideoRequest, idempotency_key: str | None) -> Record:
        """Store the request (inline media as input files) and its record; blocking."""
        adapter = self._validate(body)
        job_id = new_job_id()
        stored = body.model_dump(mode="json")
        for name, media in body.media_fields().items():
            if media.data is not None:
                uri = self.store.put_input(job_id, name.replace(".", "_"), media.decoded())
                _set_media_uri(stored, name, uri)
        self.store.put_request(job_id, stored)
        record = Record(
            id=job_id,
            task=body.task,
            created_at=time.time(),
            adapter=adapter,
            adapter_alpha=body.adapter_alpha,
            idempotency_key=idempotency_key,
        )
        self.store.put_record(record)
        if idempotency_key:
            self.store.remember_idempotent(idempotency_key, job_id)
        return record

    # --- routes ---------------------------------------------------------------------------
    @api.post("/v1/videos", status_code=202, response_model=JobView)
    async def submit(
        self,
        body: VideoRequest,
        request: Request,
        key: str | None = Depends(_bearer_key),
        idempotency_key: str | None = Header(default=None, max_length=255),
    ) -> JSONResponse:
        self._authorize(key)
        if idempotency_key:
            existing = await asyncio.to_thread(self.store.find_idempotent, idempotency_key)
            if existing:
                record = await asyncio.to_thread(self.store.get_record, existing)
                if record is not None:
                    view = await asyncio.to_thread(self._view, record)
                    return JSONResponse(status_code=202, content=view.model_dump(mode="json"))
        if len(self.calls) >= self.settings.max_queue:
            raise ApiError(
                429,
                f"the queue is full ({self.settings.max_queue} unfinished jobs); retry later",
                None,
                {"Retry-After": str(self.settings.retry_after_s)},
            )
        record = await asyncio.to_thread(self._accept, body, idempotency_key)
        await self._dispatch(record)
        _log("job_accepted", id=record.id, task=record.task, adapter=record.adapter)
        view = await asyncio.to_thread(self._view, record)
        return JSONResponse(status_code=202, content=view.model_dump(mode="json"))

    @api.get("/v1/videos/{job_id}", response_model=JobView)
    async def status(self, job_id: str, key: str | None = Depends(_bearer_key)) -> JobView:
        self._authorize(key)
        return await asyncio.to_thread(self._view, await self._record(job_id))

    @api.get("/v1/videos/{job_id}/content")
    async def content(
        self,
        job_id: str,
        variant: str = Query(default="video", pattern="^(video|latents)$"),
        key: str | None = Depends(_bearer_key),
    ) -> Response:
        self._authorize(key)
        record = await self._record(job_id)
        view = await asyncio.to_thread(self._view, record)
        if view.status != "completed":
            raise ApiError(409, f"job {job_id!r} is {view.status}, not completed", "id")
        data = await asyncio.to_thread(storage.read_bytes, self.store.output_uri(job_id, variant))
        media_type = "video/mp4" if variant == "video" else "application/octet-stream"
        filename = f"{job_id}.mp4" if variant == "video" else f"{job_id}.safetensors"
        return Response(
            data, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{filename}"'}
        )

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

        return await asyncio.to_thread(page)

    @api.delete("/v1/videos/{job_id}")
    async def delete(self, job_id: str, key: str | None = Depends(_bearer_key)) -> dict:
        self._authorize(key)
        record = await self._record(job_id)
        view = await asyncio.to_thread(self._view, record)
        if view.status not in TERMINAL_STATES:
            record.cancelled = True
            await asyncio.to_thread(self.store.put_record, record)  # the generator sees this between steps
            call = self.calls.pop(job_id, None)
            if call is not None:
                call.cancel()
            self.active.set(len(self.calls))
        await asyncio.to_thread(self._delete, record)
        return {"id": job_id, "deleted": True, "status": "cancelled" if record.cancelled else view.status}

    @api.get("/v1/models")
    async def models(self, key: str | None = Depends(_bearer_key)) -> dict:
        self._authorize(key)
        prefix = self.settings.adapters_prefix
        listed = await asyncio.to_thread(published.list_adapters, prefix) if prefix else []
        return {
            "model": {"id": self.settings.model, "architecture": self.model_architecture},
            "adapters": listed,
        }

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "active_jobs": len(self.calls)}


@serve.deployment(name="Generator")
class Generator:
    """Runs jobs with the core pipeline; one at a time per replica (max_ongoing_requests: 1)."""

    def __init__(self, settings: dict) -> None:
        from pusa_ray.models.loading import load_components

        self.settings = ServiceSettings.model_validate(settings)
        self.store = JobStore(self.settings.storage_root)
        self.components = load_components(self.settings.model, device=self.settings.device)
        self.replica = serve.get_replica_context().replica_tag
        self.lock = threading.Lock()  # one generation at a time, whatever the Serve options say

    @serve.multiplexed(max_num_models_per_replica=MAX_ADAPTERS_PER_REPLICA)
    async def adapter(self, uri: str) -> "LoadedAdapter":
        """Load an adapter unmerged (peft) into this replica's DiT; evicted LRU by Serve."""
        return await asyncio.to_thread(LoadedAdapter, self, uri)

    async def run(self, job_id: str, attempt: int) -> str:
        """Generate a stored job; idempotent by job id. Returns the final status or 'elsewhere'."""
        record = await asyncio.to_thread(self.store.get_record, job_id)
        if record is None or record.cancelled:
            return "cancelled"
        state = await asyncio.to_thread(self.store.get_state, job_id)
        if state.status in ("completed", "failed"):
            return state.status
        fresh = state.heartbeat_at is not None and time.time() - state.heartbeat_at < self.settings.lease_s
        if state.status == "in_progress" and fresh and state.replica != self.replica:
            return "elsewhere"
        adapter_uri = serve.get_multiplexed_model_id()
        try:
            loaded = await self.adapter(adapter_uri) if adapter_uri else None
        except (UserInputError, FileNotFoundError, ValueError) as error:
            from pusa_ray.serving.jobs import State

            failed = State(
                status="failed", error=f"adapter: {error}", finished_at=time.time(), attempt=attempt
            )
            await asyncio.to_thread(self.store.put_state, job_id, failed)
            return "failed"
        return await asyncio.to_thread(self._run, job_id, attempt, loaded, record.adapter_alpha)

    def _run(self, job_id: str, attempt: int, loaded: "LoadedAdapter | None", alpha: float) -> str:
        from pusa_ray.serving.execute import execute_job

        with self.lock:
            transformer = self.components.model.transformer
            if loaded is not None:
                transformer.enable_adapters()
                transformer.set_adapters([loaded.name], weights=[alpha])
            elif getattr(transformer, "_hf_peft_config_loaded", False):
                transformer.disable_adapters()
            return execute_job(
                self.components, self.store, job_id, attempt, self.replica, self.settings.heartbeat_s
            )


class LoadedAdapter:
    """A LoRA adapter attached (unmerged) to a generator's DiT; detached when Serve evicts it."""

    def __init__(self, generator: "Generator", uri: str) -> None:
        from pusa_ray.checkpoints.lora import check_compatible, load_adapter

        self.generator = generator
        self.name = "adapter_" + hashlib.sha256(uri.encode()).hexdigest()[:16]
        adapter = load_adapter(uri)
        transformer = generator.components.model.transformer
        check_compatible(adapter, transformer, generator.components.spec.architecture)
        state = {f"transformer.{key}": value for key, value in adapter.weights.items()}
        with generator.lock:
            transformer.load_lora_adapter(state, adapter_name=self.name, prefix="transformer")

    def __del__(self) -> None:
        generator = getattr(self, "generator", None)
        if generator is None:
            return
        with generator.lock:
            generator.components.model.transformer.delete_adapters(self.name)
        self.generator = None


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder: `args` are the ServiceSettings (validated here and on each replica)."""
    settings = ServiceSettings.model_validate(args).model_dump(mode="json")
    return Ingress.bind(Generator.bind(settings), settings)
