"""The generator deployment: runs one attempt of a stored job at a time on its model."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

from ray import serve

from pusa_ray.errors import UserInputError
from pusa_ray.serving.dispatch import RUNNING_ELSEWHERE
from pusa_ray.serving.jobs import JobStore, State, Superseded
from pusa_ray.serving.settings import ServiceSettings

MAX_ADAPTERS_PER_REPLICA = 4  # LRU of loaded adapters per generator replica (Serve multiplexing)


@serve.deployment(name="Generator")
class Generator:
    """Runs jobs with the core pipeline; one at a time per replica (max_ongoing_requests: 1)."""

    def __init__(self, settings: dict) -> None:
        from pusa_ray.models.loading import load_components
        from pusa_ray.models.speed import apply_speed_settings

        self.settings = ServiceSettings.model_validate(settings)
        self.store = JobStore(self.settings.storage_root)
        self.components = load_components(self.settings.model, device=self.settings.device)
        apply_speed_settings(self.components, self.settings.speed)
        self.replica = serve.get_replica_context().replica_tag
        self.lock = threading.Lock()  # one generation at a time, whatever the Serve options say

    @serve.multiplexed(max_num_models_per_replica=MAX_ADAPTERS_PER_REPLICA)
    async def adapter(self, uri: str) -> LoadedAdapter:
        """Load an adapter unmerged (peft) into this replica's DiT; evicted LRU by Serve."""
        return await asyncio.to_thread(LoadedAdapter, self, uri)

    async def run(self, job_id: str, attempt: int) -> str:
        """Run attempt `attempt` of a stored job, if it is still the job's current one.

        Returns the outcome: completed, failed, cancelled, superseded (a newer attempt owns the
        job), or elsewhere (this attempt already started on another call).
        """
        record = await asyncio.to_thread(self.store.get_record, job_id)
        if record is None or record.cancelled:
            return "cancelled"
        if record.attempts != attempt:
            return "superseded"
        state = await asyncio.to_thread(self.store.get_state, job_id, attempt)
        if state.status in ("completed", "failed"):
            return state.status
        if state.status == "in_progress":
            return RUNNING_ELSEWHERE
        adapter_uri = serve.get_multiplexed_model_id()
        try:
            loaded = await self.adapter(adapter_uri) if adapter_uri else None
        except (UserInputError, FileNotFoundError, ValueError) as error:
            failed = State(
                status="failed", error=f"adapter: {error}", finished_at=time.time(), attempt=attempt
            )
            try:
                await asyncio.to_thread(self.store.put_state, job_id, failed)
            except Superseded as superseded:  # a newer attempt owns the job, or it was cancelled
                return superseded.reason
            return "failed"
        return await asyncio.to_thread(self._run, job_id, attempt, loaded, record.adapter_alpha)

    def _run(self, job_id: str, attempt: int, loaded: LoadedAdapter | None, alpha: float) -> str:
        from pusa_ray.serving.execute import execute_job

        with self.lock:
            transformer = self.components.model.transformer
            if loaded is not None:
                transformer.enable_adapters()
                transformer.set_adapters([loaded.name], weights=[alpha])
            elif getattr(transformer, "_hf_peft_config_loaded", False):
                transformer.disable_adapters()
            return execute_job(
                self.components,
                self.store,
                job_id,
                attempt,
                self.replica,
                self.settings.heartbeat_s,
                self.settings.lease_s,
            )


class LoadedAdapter:
    """A LoRA adapter attached (unmerged) to a generator's DiT; detached when Serve evicts it."""

    def __init__(self, generator: Generator, uri: str) -> None:
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
