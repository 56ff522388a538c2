"""The one sampler: generalised Algorithm 1 of Pusa V1 for every conditioning plan.

A given latent frame k with clean latent z_k and noise multiplier m_k starts at
(1 - m_k) z_k + m_k eps_k, is fed timestep m_k * t_ik and steps by m_k * (sigma_{i+1,k} - sigma_ik);
m_k = 0 keeps it frozen bit for bit. Generated frames are the m = 1 case. The schedule sigma_ik is
one column for every frame (Pusa's algorithm) or a per-frame table (`timesteps.frame_schedule`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pusa_ray.conditioning import ConditionPlan
from pusa_ray.flow import euler_step
from pusa_ray.timesteps import sigma_to_timestep

# (latents [B, C, F, H, W], timesteps [B, F]) -> velocity [B, C, F, H, W]
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (latents, timesteps [B, F], context [B, L, D]) -> velocity
TextModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ProgressCallback = Callable[[int, int], None]  # (steps done, total steps)


class GenerationCancelled(Exception):
    """Raised by the sampler when its cancellation check returns True between steps."""


def initial_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """Float32 noise drawn on the CPU from `seed`, so a seed means the same start on any device."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def combine_guidance(positive: torch.Tensor, negative: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: v = neg + g * (pos - neg)."""
    return negative + guidance * (positive - negative)


def guided_denoiser(
    model: TextModel, context: torch.Tensor, negative_context: torch.Tensor | None, guidance: float
) -> Denoiser:
    """Bind prompt embeddings to a model; with guidance != 1, cond and uncond run as one batch."""
    if guidance == 1.0 or negative_context is None:
        return lambda latents, timesteps: model(latents, timesteps, context)

    def denoise(latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        batch = latents.shape[0]
        velocity = model(
            torch.cat([latents, latents]),  # [2B, C, F, H, W]
            torch.cat([timesteps, timesteps]),  # [2B, F]
            torch.cat([context, negative_context]),  # [2B, L, D]
        )
        return combine_guidance(velocity[:batch], velocity[batch:], guidance)

    return denoise


def start_latents(noise: torch.Tensor, plan: ConditionPlan, multipliers: torch.Tensor) -> torch.Tensor:
    """Noise with each given frame k replaced by (1 - m_k) z_k + m_k eps_k."""
    latents = noise.clone()
    if plan.latents is None:
        return latents
    index = list(plan.latent_indices)
    given = plan.latents.to(noise)[None]  # [1, C, K, h, w]
    m = multipliers[index].to(noise)[None, None, :, None, None]  # [1, 1, K, 1, 1]
    mixed = (1.0 - m) * given + m * noise[:, :, index]
    latents[:, :, index] = torch.where(m == 0, given.expand_as(mixed), mixed)
    return latents


def sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    plan: ConditionPlan,
    sigmas: torch.Tensor,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Denoise `noise [B, C, F, H, W]` along `sigmas` under `plan`; returns clean latents.

    `sigmas` is `[N+1]` (every frame on one schedule) or `[N+1, F]` (a per-frame schedule, see
    `timesteps.frame_schedule`); each frame's column starts at 1 and ends at 0.
    """
    batch, _, num_latents = noise.shape[:3]
    multipliers = plan.frame_multipliers(num_latents).to(noise.device)  # [F]
    sigmas = sigmas.to(device=noise.device, dtype=torch.float32)
    if sigmas.ndim == 1:
        sigmas = sigmas[:, None].expand(-1, num_latents)  # [N+1, F]
    if sigmas.ndim != 2 or sigmas.shape[1] != num_latents or len(sigmas) < 2:
        shape = tuple(sigmas.shape)
        raise ValueError(f"sigmas must be [N+1] or [N+1, {num_latents}] with N >= 1, got {shape}")
    # The whole schedule up front: per-step, per-frame timesteps and Euler steps.
    timesteps = sigma_to_timestep(sigmas[:-1] * multipliers)  # [N, F]
    deltas = (sigmas[1:] - sigmas[:-1]) * multipliers  # [N, F]
    latents = start_latents(noise, plan, multipliers)
    steps = len(sigmas) - 1
    for i in range(steps):
        if should_cancel is not None and should_cancel():
            raise GenerationCancelled(f"cancelled after {i} of {steps} steps")
        velocity = denoiser(latents, timesteps[i].expand(batch, num_latents))
        latents = euler_step(latents, velocity, deltas[i].expand(batch, num_latents))
        if progress is not None:
            progress(i + 1, steps)
    return latents
