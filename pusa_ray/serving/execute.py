"""Run one stored job with the core pipeline: no Ray here, so it is testable on its own.

The generator deployment calls `execute_job` in a worker thread. Progress and a heartbeat go to
the job's state file; cancellation is read from the job's record between steps.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save as save_safetensors

from pusa_ray import storage, video
from pusa_ray.errors import UserInputError
from pusa_ray.models.loading import Components
from pusa_ray.pipeline import Generation, SamplingSettings, generate, settings_from
from pusa_ray.sampler import GenerationCancelled, ProgressCallback
from pusa_ray.serving.jobs import JobStore, State
from pusa_ray.serving.schemas import Media, VideoRequest
from pusa_ray.tasks import TaskInputs, VideoShape, build_conditions

logger = logging.getLogger("pusa_ray.serving")


def task_inputs(request: VideoRequest) -> TaskInputs:
    """The request's media as task inputs: s3:// URIs by reference, inline data as bytes."""

    def source(media: Media | None) -> str | bytes | None:
        if media is None:
            return None
        return media.uri if media.uri is not None else media.decoded()

    return TaskInputs(
        task=request.task,
        image=source(request.image),
        end_image=source(request.end_image),
        keyframes=tuple((frame.position, source(frame.image), frame.noise) for frame in request.keyframes),
        video=source(request.video),
        end_video=source(request.end_video),
        cond_frames=request.cond_frames,
        end_frames=request.end_frames,
        noise=tuple(request.noise) if request.noise else None,
    )


def run_request(
    components: Components,
    request: VideoRequest,
    settings: SamplingSettings,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> Generation:
    """Load the request's media, build its conditions and sample: the service's and batch job's core."""
    shape = VideoShape(settings.frames, settings.height, settings.width, components.codec.temporal_factor)
    conditions = build_conditions(task_inputs(request), shape)
    return generate(components, request.prompt, conditions, settings, progress, should_cancel)


def write_outputs(result: Generation, fps: float, video_uri: str, latents_uri: str) -> None:
    """The mp4 and the latents (safetensors, tensor `latents`) to storage."""
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / "video.mp4"
        video.write_mp4(local, video.tensor_to_frames(result.video), fps)
        storage.upload_file(local, video_uri)
    storage.write_bytes(latents_uri, save_safetensors({"latents": result.latents.float().contiguous()}))


class Reporter:
    """Holds a job's state and writes it: on change of phase, and as a heartbeat every `period_s`."""

    def __init__(self, store: JobStore, job_id: str, state: State, period_s: float) -> None:
        self.store, self.job_id, self.state, self.period_s = store, job_id, state, period_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def write(self, **changes: object) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(self.state, key, value)
            self.state.heartbeat_at = time.time()
            self.store.put_state(self.job_id, self.state)

    def progress(self, done: int, total: int) -> None:
        """Sampler callback: in memory every step, written at most every quarter second (and at the end)."""
        self.state.progress = round(100.0 * done / total, 1)
        if done == total or time.time() - (self.state.heartbeat_at or 0.0) >= 0.25:
            self.write()

    def _beat(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.write()
            except OSError as error:  # storage hiccup: the next beat tries again
                logger.warning("heartbeat for %s failed: %s", self.job_id, error)

    def __enter__(self) -> Reporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _cancel_check(store: JobStore, job_id: str, every_s: float = 1.0):
    """True once the job's record is gone or cancelled; reads storage at most every `every_s`."""
    last = {"at": 0.0, "cancelled": False}

    def cancelled() -> bool:
        now = time.time()
        if not last["cancelled"] and now - last["at"] >= every_s:
            record = store.get_record(job_id)
            last.update(at=now, cancelled=record is None or record.cancelled)
        return bool(last["cancelled"])

    return cancelled


def execute_job(
    components: Components, store: JobStore, job_id: str, attempt: int, replica: str, heartbeat_s: float
) -> str:
    """Generate a stored job; returns its final status (completed, failed or cancelled)."""
    started = time.time()
    state = State(status="in_progress", started_at=started, attempt=attempt, replica=replica)
    should_cancel = _cancel_check(store, job_id)
    with Reporter(store, job_id, state, heartbeat_s) as reporter:
        reporter.write()
        try:
            request = VideoRequest.model_validate(store.get_request(job_id))
            settings = settings_from(components, request)
            reporter.write(parameters=asdict(settings))
            prepared = time.time()
            result = run_request(components, request, settings, reporter.progress, should_cancel)
            sampled = time.time()
            if should_cancel():
                raise GenerationCancelled("cancelled before its outputs were written")
            outputs = {variant: store.output_uri(job_id, variant) for variant in ("video", "latents")}
            write_outputs(result, request.fps or components.spec.fps, outputs["video"], outputs["latents"])
        except GenerationCancelled:
            logger.info('{"event": "job_cancelled", "id": "%s"}', job_id)
            return "cancelled"
        except (UserInputError, FileNotFoundError, ValueError) as error:
            reporter.write(status="failed", error=str(error), finished_at=time.time())
            return "failed"
        finished = time.time()
        timings = {
            "prepare_s": prepared - started,
            "sample_s": sampled - prepared,
            "write_s": finished - sampled,
        }
        reporter.write(
            status="completed", progress=100.0, finished_at=finished, timings=timings, outputs=outputs
        )
    if should_cancel():  # cancelled while writing: leave nothing behind
        store.delete_job(job_id)
        return "cancelled"
    return "completed"
