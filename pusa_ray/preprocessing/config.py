"""The preprocessing job's config: typed, unknown keys refused, re-validated on every actor."""

from __future__ import annotations

import math
import os
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pusa_ray.config import (
    StorageUri,
    StrictModel,
    validate_config,
)
from pusa_ray.config import load_config as load_yaml_config

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
TensorDtype = Literal["float32", "float16", "bfloat16"]

# ----------------------------------------------------------------------------------------------
# Configuration


class PoolResources(StrictModel):
    """One actor pool: how many actors, what each reserves, how many clips per call."""

    actors: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, gt=0, description="logical CPUs per actor (fractions allowed)")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per actor; > 0 runs the model on CUDA")
    batch_size: int = Field(default=1, ge=1, description="clips per call")
    torch_threads: int | None = Field(default=None, ge=1, description="default: max(1, floor(num_cpus))")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom resources per actor, e.g. {train_node: 0.001} to pick nodes"
    )

    def threads(self) -> int:
        return self.torch_threads or max(1, math.floor(self.num_cpus))


class WriterResources(StrictModel):
    """The shard writers: long-lived actors, so no task pays the imports again (I/O bound)."""

    actors: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=0.5, gt=0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom resources per actor")


class Resources(StrictModel):
    decode: PoolResources = PoolResources()
    vae: PoolResources = PoolResources()
    text: PoolResources = PoolResources(batch_size=8)
    writer: WriterResources = WriterResources()
    io_threads: int = Field(default=32, ge=1, description="driver threads for stat and listing calls")

    @field_validator("decode")
    @classmethod
    def _decode_on_cpu(cls, value: PoolResources) -> PoolResources:
        if value.num_gpus:
            raise ValueError("decoding runs on CPUs: resources.decode.num_gpus must be 0")
        return value


class InputConfig(StrictModel):
    """Where the clips are: a manifest file or a folder, local or s3://."""

    uri: StorageUri
    format: Literal["auto", "manifest", "metadata_csv", "sidecar"] = Field(
        default="auto",
        description="auto: *.jsonl/*.json/*.csv is a manifest; a folder with metadata.csv is "
        "metadata_csv; any other folder is sidecar (videos with .txt captions)",
    )
    video_extensions: tuple[str, ...] = VIDEO_EXTENSIONS


class PreprocessConfig(StrictModel):
    """The job's YAML: inputs, output, model and encoding settings, resources. Unknown keys are errors."""

    input: InputConfig
    output: StorageUri = Field(description="dataset directory, local or s3://")
    model: str = Field(default="tiny", description="preset name, model directory or s3:// URI")
    frames: int = Field(default=81, description="pixel frames per clip, 1 + 4k for Wan's VAE")
    fps: float = Field(default=16.0, gt=0, description="frames are sampled at this rate from `start`")
    height: int = 480
    width: int = 832
    max_crop_discard: float = Field(
        default=0.5, ge=0, le=1, description="skip clips whose centre crop drops more of the frame"
    )
    latents_dtype: TensorDtype = "float32"
    context_dtype: TensorDtype = "float32"
    shard_records: int = Field(default=64, ge=1, description="records per shard (the last may hold fewer)")
    retry_skipped: bool = Field(default=False, description="retry clips an earlier run skipped for good")
    resources: Resources = Resources()

    @field_validator("input", mode="before")
    @classmethod
    def _input_shorthand(cls, value: Any) -> Any:
        return {"uri": value} if isinstance(value, str) else value

    @field_validator("frames", "height", "width")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:  # the model's own rules (1 + 4k frames, multiples of 16 for Wan) come later
            raise ValueError(f"must be positive, got {value}")
        return value

    @model_validator(mode="after")
    def _output_outside_input(self) -> PreprocessConfig:
        if self.output.rstrip("/") == self.input.uri.rstrip("/"):
            raise ValueError(f"output {self.output!r} must not be the input folder")
        return self

    def encoding_settings(self) -> dict[str, Any]:
        """The fields that change the bytes of a record (and so a clip's key)."""
        return {
            "frames": self.frames,
            "fps": self.fps,
            "height": self.height,
            "width": self.width,
            "latents_dtype": self.latents_dtype,
            "context_dtype": self.context_dtype,
        }


def parse_config(data: Any, source: str = "config") -> PreprocessConfig:
    """Validate a config mapping; every problem is listed in one UserInputError."""
    return validate_config(PreprocessConfig, data, source, "preprocess")


def load_config(path: str | os.PathLike[str]) -> PreprocessConfig:
    """Read and validate a YAML config file."""
    return load_yaml_config(PreprocessConfig, path, "preprocess")
