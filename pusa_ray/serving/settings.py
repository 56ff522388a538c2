"""The service's typed settings: the `args` of the Serve application in serve/config*.yaml."""

from __future__ import annotations

import os

from pydantic import Field, model_validator

from pusa_ray.config import StrictModel
from pusa_ray.models.speed import SpeedSettings
from pusa_ray.names import parse_cache


class Limits(StrictModel):
    """Bounds on what one request may ask for (beyond the schema's hard bounds)."""

    max_frames: int = Field(default=161, ge=1, description="pixel frames of one video")
    max_pixels: int = Field(default=1280 * 720, ge=256, description="height * width")
    max_steps: int = Field(default=100, ge=1, description="denoising steps")
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="one request body")
    max_media_bytes: int = Field(default=32 * 1024 * 1024, ge=1024, description="one image or clip")


class ServiceSettings(StrictModel):
    """Everything the ingress and the generator need; unknown keys are errors."""

    model: str = Field(default="tiny", description="preset, model directory or s3:// URI")
    device: str | None = Field(default=None, description="cpu / cuda; default: cuda if available")
    storage_root: str = Field(description="local dir or s3:// prefix for job records, inputs and outputs")
    adapters_prefix: str | None = Field(default=None, description="where the training job exports adapters")
    allowed_input_prefixes: list[str] = Field(
        default_factory=list, description="s3:// prefixes inputs may use"
    )
    api_key_env: str | None = Field(default=None, description="env var holding the API key; unset = no auth")
    max_queue: int = Field(default=32, ge=1, description="accepted, unfinished jobs before 429")
    max_attempts: int = Field(default=3, ge=1, description="failed attempts of one job before it fails")
    heartbeat_s: float = Field(default=5.0, gt=0, description="a running job's heartbeat period")
    lease_s: float = Field(
        default=120.0, gt=0, description="a running job without heartbeat this long is lost"
    )
    janitor_period_s: float = Field(
        default=30.0, gt=0, description="how often the ingress sweeps stored jobs (leases, retention)"
    )
    retention_s: float = Field(default=7 * 24 * 3600.0, gt=0, description="records and outputs expire after")
    retry_after_s: int = Field(default=10, ge=1, description="the Retry-After of a 429 or 503")
    storage_timeout_s: float = Field(
        default=5.0, gt=0, description="a request that waits on storage longer answers 503"
    )
    cache: str | None = Field(
        default=None, description="step caching of requests that name none (default: the model's)"
    )
    limits: Limits = Field(default_factory=Limits)
    speed: SpeedSettings = Field(default_factory=SpeedSettings, description="each generator replica's")

    @model_validator(mode="after")
    def _check(self) -> ServiceSettings:
        if self.lease_s <= self.heartbeat_s:
            raise ValueError(f"lease_s ({self.lease_s}) must exceed heartbeat_s ({self.heartbeat_s})")
        if self.cache is not None:
            parse_cache(self.cache)
        for prefix in self.allowed_input_prefixes:
            if not prefix.startswith("s3://"):
                raise ValueError(f"allowed_input_prefixes: {prefix!r} is not an s3:// prefix")
        return self

    def api_key(self) -> str | None:
        """The configured key, read from the environment at use (never stored in the config file)."""
        if not self.api_key_env:
            return None
        value = os.environ.get(self.api_key_env)
        if not value:
            raise RuntimeError(f"api_key_env names {self.api_key_env!r}, which is not set")
        return value

    def input_allowed(self, uri: str) -> bool:
        """An s3:// URI may be read when it lies under one of the allowed prefixes."""
        return any(uri.startswith(prefix.rstrip("/") + "/") for prefix in self.allowed_input_prefixes)
