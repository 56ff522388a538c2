"""One generation: prompt + conditions -> latents -> video, for every task.

Used by the CLI, the Serve generator and batch jobs. Holds no state between calls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pusa_ray.conditioning import MediaCondition, encode_plan, latents_for_frames
from pusa_ray.config import DEFAULT_NEGATIVE_PROMPT
from pusa_ray.errors import UserInputError
from pusa_ray.models.loading import Components
from pusa_ray.models.text import encode_prompts
from pusa_ray.names import SCHEDULES, parse_cache
from pusa_ray.sampler import ProgressCallback, guided_denoiser, initial_noise, sample
from pusa_ray.step_cache import make_cache
from pusa_ray.timesteps import frame_schedule

if TYPE_CHECKING:
    from pusa_ray.sequence_parallel import SequenceParallel


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample: size, steps, guidance, shift, seed and the frames' schedule."""

    frames: int
    height: int
    width: int
    steps: int
    guidance: float
    shift: float
    seed: int
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    # "sync" or "lead" (`timesteps.frame_schedule`); "lead" applies where no frame is given (T2V):
    # with given frames the video already grows from them, and every frame shares the steps.
    schedule: str = "sync"
    # step caching (`pusa_ray.step_cache`): "off", "first-block" or "first-block:THRESHOLD"
    cache: str = "off"


@dataclass(frozen=True)
class Generation:
    """Final latents `[1, C, F_lat, h, w]` (normalised) and the decoded video `[3, F, H, W]` in [-1, 1]."""

    latents: torch.Tensor
    video: torch.Tensor
    reused_steps: int = 0  # steps that the step cache answered without running every block


def default_settings(components: Components, **overrides: object) -> SamplingSettings:
    """The preset's defaults, with the given non-None values replacing them."""
    spec = components.spec
    values = {"frames": spec.frames, "height": spec.height, "width": spec.width, "seed": 0}
    values.update(spec.sampling_defaults())
    del values["fps"]
    values.update({key: value for key, value in overrides.items() if value is not None})
    return SamplingSettings(**values)  # type: ignore[arg-type]


SETTING_FIELDS = (
    "frames", "height", "width", "steps", "guidance", "shift", "seed", "negative_prompt", "schedule", "cache"
)  # fmt: skip


def settings_from(components: Components, source: object) -> SamplingSettings:
    """Settings from any object with the generation fields (CLI args, a request); defaults fill gaps."""
    return default_settings(components, **{name: getattr(source, name) for name in SETTING_FIELDS})


def validate_settings(components: Components, settings: SamplingSettings) -> int:
    """Check sizes and numbers against the model; returns the latent frame count."""
    codec = components.codec
    multiple = codec.spatial_factor * components.model.transformer.config.patch_size[1]
    for name in ("height", "width"):
        value = getattr(settings, name)
        if value <= 0 or value % multiple:
            raise UserInputError(f"{name} must be a positive multiple of {multiple}, got {value}")
    if settings.steps < 1:
        raise UserInputError(f"steps must be >= 1, got {settings.steps}")
    if settings.guidance < 0:
        raise UserInputError(f"guidance must be >= 0, got {settings.guidance}")
    if settings.shift <= 0:
        raise UserInputError(f"shift must be > 0, got {settings.shift}")
    if settings.schedule not in SCHEDULES:
        raise UserInputError(f"unknown schedule {settings.schedule!r} (known: {', '.join(SCHEDULES)})")
    try:
        parse_cache(settings.cache)
    except ValueError as error:
        raise UserInputError(str(error)) from None
    return latents_for_frames(settings.frames, codec.temporal_factor)


def _encode(components: Components, prompts: list[str]) -> torch.Tensor:
    """Prompt embeddings; an offloaded text encoder visits the device for this call only."""
    encoder, offloaded = components.text_encoder, components.offload_text_encoder
    if offloaded:
        encoder.to(components.device)
    try:
        return encode_prompts(components.tokenizer, encoder, prompts, components.spec.text_length)
    finally:
        if offloaded:
            encoder.to("cpu")


@torch.no_grad()
def generate(
    components: Components,
    prompt: str,
    conditions: list[MediaCondition],
    settings: SamplingSettings,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    parallel: SequenceParallel | None = None,
) -> Generation:
    """Sample one video for `prompt` under the given conditions; with `parallel`, this process is
    one rank of a sequence-parallel group that runs the same call (`pusa_ray.sequence_parallel`)."""
    if not prompt.strip():
        raise UserInputError("prompt is empty")
    num_latents = validate_settings(components, settings)
    codec, device = components.codec, components.device
    plan = encode_plan(conditions, codec, num_latents)

    prompts = [prompt] if settings.guidance == 1.0 else [prompt, settings.negative_prompt]
    embeddings = _encode(components, prompts)
    negative = embeddings[1:] if len(prompts) == 2 else None
    cache = make_cache(settings.cache)  # one per video: it holds this video's residuals
    if parallel is not None and parallel.world > 1:
        if cache is not None:
            raise UserInputError("cache: the step cache does not run sequence parallel yet; use cache off")
        model = functools.partial(parallel.forward, components.model)
    else:
        model = components.model if cache is None else functools.partial(components.model, cache=cache)
    denoiser = guided_denoiser(model, embeddings[:1], negative, settings.guidance)

    shape = (1, *codec.latent_shape(settings.frames, settings.height, settings.width))
    noise = initial_noise(shape, settings.seed).to(device)  # [1, C, F_lat, h, w]
    schedule = settings.schedule if plan.latents is None else "sync"
    sigmas = frame_schedule(settings.steps, settings.shift, num_latents, schedule)  # [N+1, F]
    latents = sample(denoiser, noise, plan, sigmas, progress, should_cancel)
    video = codec.decode(latents)[0]  # [3, F, H, W]
    reused = cache.reused if cache is not None else 0
    return Generation(latents=latents.cpu(), video=video.cpu(), reused_steps=reused)
