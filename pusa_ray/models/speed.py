"""Speed and memory levers that are load-time choices of a loaded model (`SpeedSettings`):
compiled blocks, the attention backend, the text encoder off the device between requests, and
VAE tiling for large decodes.

The mechanisms are diffusers' and torch's own (`compile_repeated_blocks`, `set_attention_backend`,
`AutoencoderKLWan.enable_tiling`); what is ours is the per-frame block function they must also
cover (`VTAWanTransformer.compile_blocks`) and the check, before any request, that the chosen
attention backend runs on this machine. Step caching is per request (`SamplingSettings.cache`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from pusa_ray.config import StrictModel
from pusa_ray.errors import UserInputError

if TYPE_CHECKING:  # the settings are read by configs that load no model: torch comes when used
    import torch

    from pusa_ray.models.loading import Components
    from pusa_ray.models.vta import VTAWanTransformer


class SpeedSettings(StrictModel):
    """How a replica, a CLI run or a batch actor runs its model (not per request)."""

    compile: bool = Field(default=False, description="torch.compile the repeated DiT block (dynamic shapes)")
    attention_backend: str = Field(default="native", description="diffusers' attention backend")
    offload_text_encoder: bool = Field(
        default=False, description="keep the text encoder in CPU memory, on the device only to encode"
    )
    vae_tiling: bool = Field(default=False, description="decode in tiles (720p and up on small GPUs)")

    @field_validator("attention_backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value != "native" and value not in attention_backends():
            raise ValueError(f"{value!r} is unknown (known: {', '.join(attention_backends())})")
        return value


def attention_backends() -> tuple[str, ...]:
    """The names `attention_backend` takes: diffusers' backends, less those that download kernels."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return tuple(name.value for name in AttentionBackendName if not name.value.endswith("_hub"))


def set_attention_backend(model: VTAWanTransformer, name: str, device: torch.device) -> None:
    """Use attention backend `name` in every attention of the DiT, after one trial call on
    `device` in the model's dtype: a backend whose package is missing or that does not run on this
    device is a UserInputError naming it, at start-up rather than in a request."""
    import torch
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _AttentionBackendRegistry,
        _check_attention_backend_requirements,
        dispatch_attention_fn,
    )

    known = attention_backends()
    if name not in known:
        raise UserInputError(f"attention_backend {name!r} is unknown (known: {', '.join(known)})")
    query = torch.randn(1, 16, 2, 64, device=device, dtype=model.dtype)  # [B, S, H, D]
    try:
        _check_attention_backend_requirements(AttentionBackendName(name))  # its package, by name
        dispatch_attention_fn(query, query, query, backend=name)
    except Exception as error:  # ImportError, RuntimeError, device and dtype checks: one answer
        raise UserInputError(
            f"attention_backend {name!r} does not run on this machine ({device}, {model.dtype}): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from None
    # diffusers names the backend in each of the model's attention processors and also makes it
    # the process-wide default; keep the choice to this model, so that another model in the same
    # process (a test, a batch driver) keeps its own.
    previous = _AttentionBackendRegistry._active_backend
    try:
        model.transformer.set_attention_backend(name)
    finally:
        _AttentionBackendRegistry.set_active_backend(previous)


def apply_speed_settings(components: Components, speed: SpeedSettings) -> None:
    """Apply the load-time levers to loaded components (the defaults change nothing)."""
    if speed.attention_backend != "native":
        set_attention_backend(components.model, speed.attention_backend, components.device)
    if speed.compile:
        components.model.compile_blocks()
    if speed.offload_text_encoder:
        components.text_encoder.to("cpu")
        components.offload_text_encoder = True
    if speed.vae_tiling:
        vae = getattr(components.codec, "vae", None)
        if vae is None:
            raise UserInputError(f"vae_tiling: {components.model_id}'s codec has no VAE to tile")
        vae.enable_tiling()
    components.speed = speed.model_dump()
