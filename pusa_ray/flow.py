"""Frame-aware flow matching: the math shared by the sampler and the training loop.

Latents are `[B, C, F, H, W]`; per-frame sigmas `[B, F]`. Each frame interpolates on its own:
x_sigma = (1 - sigma) x0 + sigma eps, and the velocity target is eps - x0 for every frame.
"""

from __future__ import annotations

import torch


def per_frame(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast `[B, F]` (or `[F]`) per-frame values against latents `[B, C, F, H, W]`."""
    if values.ndim == 1:
        values = values[None]
    if values.shape[-1] != like.shape[2]:
        raise ValueError(f"per-frame values have {values.shape[-1]} frames, latents {tuple(like.shape)}")
    return values[:, None, :, None, None].to(like.dtype)  # [B, 1, F, 1, 1]


def add_noise(clean: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) * clean + sigma * noise, per frame."""
    sigma = per_frame(sigmas, clean)
    return (1.0 - sigma) * clean + sigma * noise


def velocity_target(clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching velocity d x_sigma / d sigma = noise - clean."""
    return noise - clean


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, delta_sigmas: torch.Tensor) -> torch.Tensor:
    """x + dsigma * v with a per-frame step `[B, F]`; frames whose step is 0 are returned unchanged."""
    delta = per_frame(delta_sigmas, latents)
    stepped = latents + delta * velocity.to(latents.dtype)
    frozen = delta == 0  # [B, 1, F, 1, 1]
    # Frozen frames keep their exact values (even against a non-finite velocity).
    return torch.where(frozen, latents, stepped) if bool(frozen.any()) else stepped


def flow_matching_loss(
    prediction: torch.Tensor, target: torch.Tensor, frame_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared velocity error; each frame's MSE weighted by `frame_weights [B, F]` if given."""
    per_frame_mse = (prediction.float() - target.float()).pow(2).mean(dim=(1, 3, 4))  # [B, F]
    if frame_weights is None:
        return per_frame_mse.mean()
    return (per_frame_mse * frame_weights.to(per_frame_mse)).mean()
