"""The training objective and schedule: frame-aware flow matching on a batch, the probe loss, warm-up.

The math is `pusa_ray.flow` (noising, velocity target, loss) and `pusa_ray.timesteps`
(sigma -> model timestep); nothing is re-derived here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pusa_ray.flow import add_noise, flow_matching_loss, velocity_target
from pusa_ray.timesteps import sigma_to_timestep
from pusa_ray.training.data import Batch

__all__ = ["batch_loss", "probe_loss_sum", "warmup_factor"]

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def batch_loss(model: Denoiser, batch: Batch, weighted: bool = True) -> torch.Tensor:
    """Mean velocity MSE of `model` on `batch` over the generated frames: each noised to its sigma.

    A frame at sigma 0 is given, not generated (a conditioned layout): its velocity is never used
    by the sampler and its target holds noise it cannot see, so it is left out of the mean.
    """
    noisy = add_noise(batch.latents, batch.noise, batch.sigmas)  # [B, C, F, h, w]
    velocity = model(noisy, sigma_to_timestep(batch.sigmas), batch.context)  # [B, C, F, h, w]
    target = velocity_target(batch.latents, batch.noise)
    generated = (batch.sigmas > 0).float()  # [B, F]
    if bool(generated.all()):
        return flow_matching_loss(velocity, target, batch.weights if weighted else None)
    weights = (batch.weights if weighted else torch.ones_like(generated)) * generated
    return flow_matching_loss(velocity, target, weights / generated.mean())


@torch.no_grad()
def probe_loss_sum(model: Denoiser, batch: Batch | None, chunk: int) -> tuple[float, int]:
    """(sum of per-sample unweighted losses, sample count) over `batch`, `chunk` samples at a time."""
    if batch is None:
        return 0.0, 0
    total = 0.0
    for start in range(0, len(batch), chunk):
        rows = slice(start, start + chunk)
        part = Batch(
            batch.latents[rows],
            batch.context[rows],
            batch.noise[rows],
            batch.sigmas[rows],
            batch.weights[rows],
        )
        total += float(batch_loss(model, part, weighted=False)) * len(part)
    return total, len(batch)


def warmup_factor(warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier for `torch.optim.lr_scheduler.LambdaLR`: linear from 1/(w+1) to 1 over `w` steps.

    The scheduler is stepped once per optimizer step, so the n-th update (n = 0, 1, ...) uses
    `lr * min(1, (n + 1) / (w + 1))`.
    """

    def factor(updates: int) -> float:
        return min(1.0, (updates + 1) / (warmup_steps + 1))

    return factor
