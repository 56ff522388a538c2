"""Noise schedules and per-frame timesteps, as pure functions of their arguments.

Conventions: `sigma` is flow-matching progress in [0, 1] (0 = data, 1 = noise); the model is fed
`timestep = 1000 * sigma` as float32. Per-frame tensors are `[B, F]` over latent frames.
"""

from __future__ import annotations

import torch

from pusa_ray.config import NUM_TRAIN_TIMESTEPS
from pusa_ray.errors import UserInputError
from pusa_ray.names import SCHEDULES


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's timestep shift: sigma' = shift*s / (1 + (shift-1)*s); shift 1 is the identity."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def sampling_sigmas(steps: int, shift: float) -> torch.Tensor:
    """The N+1 sigmas of an N-step sampler, float32: shifted linspace(1, 0, N+1)[:-1], then 0."""
    if steps < 1:
        raise UserInputError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise UserInputError(f"shift must be > 0, got {shift}")
    base = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    sigmas = shift_sigmas(base, shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)  # [N+1]


def frame_schedule(steps: int, shift: float, num_latents: int, schedule: str = "sync") -> torch.Tensor:
    """Per-step, per-frame sigmas `[N+1, F]` of an N-step sampler (float32); the sampler scales
    each given frame's column by its noise multiplier.

    `sync`: every frame follows `sampling_sigmas(steps, shift)`. `lead`: latent frame 0 is
    generated first and the others from it, as image-to-video generates them from a given frame:
    over the first N // 2 steps frame 0 follows `sampling_sigmas(N // 2, shift)` while the others
    wait at pure noise (sigma 1, untouched), then they follow `sampling_sigmas(N - N // 2, shift)`
    with frame 0 clean and fixed. The same N model calls either way.
    """
    if schedule not in SCHEDULES:
        raise UserInputError(f"unknown schedule {schedule!r} (known: {', '.join(SCHEDULES)})")
    if schedule == "sync" or num_latents < 2:
        return sampling_sigmas(steps, shift)[:, None].expand(-1, num_latents).contiguous()
    if steps < 2:
        raise UserInputError(f"schedule 'lead' needs steps >= 2 (frame 0's, then the rest's), got {steps}")
    lead = steps // 2
    first, rest = sampling_sigmas(lead, shift), sampling_sigmas(steps - lead, shift)  # [lead+1], [N-lead+1]
    table = torch.ones(steps + 1, num_latents, dtype=torch.float32)
    table[: lead + 1, 0] = first
    table[lead:, 0] = 0.0
    table[lead:, 1:] = rest[:, None]
    return table


def sigma_to_timestep(sigmas: torch.Tensor) -> torch.Tensor:
    """Model timestep (continuous, float32) for a sigma tensor of any shape."""
    return (sigmas * NUM_TRAIN_TIMESTEPS).to(torch.float32)


def training_grid(shift: float = 5.0, size: int = NUM_TRAIN_TIMESTEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """The public Pusa/DiffSynth training grid: (sigmas [size], loss weights [size]).

    Sigmas are linspace(1, 0.003/1.002, size) shifted; weights are a Gaussian bump over the
    timestep centred at size/2, offset to a zero minimum and scaled to mean 1.
    """
    base = torch.linspace(1.0, 0.003 / 1.002, size, dtype=torch.float64)
    sigmas = shift_sigmas(base, shift)
    timesteps = sigmas * NUM_TRAIN_TIMESTEPS
    bump = torch.exp(-2.0 * ((timesteps - size / 2) / size) ** 2)
    bump = bump - bump.min()
    weights = bump * (size / bump.sum())
    return sigmas.to(torch.float32), weights.to(torch.float32)


def sample_training_sigmas(
    batch: int,
    frames: int,
    p_async: float,
    generator: torch.Generator,
    mode: str = "uniform",
    shift: float = 5.0,
    p_condition: float = 0.0,
    condition_shift: float = 1.0,
    p_lead: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame training sigmas `[B, F]` and loss weights `[B, F]`.

    With probability `p_async` a sample draws an independent sigma per frame (Pusa's vectorized
    timesteps); otherwise all its frames share one. `mode="uniform"` draws sigma ~ U[0, 1] with
    unit weights; `mode="shifted-grid"` draws an index uniformly on the shifted training grid
    and weights the loss with its bump (the public training code).

    With probability `p_condition` a sample instead takes the layout of a conditioned generation
    (`conditioning_layouts`): some frames given (sigma 0), the others sharing one sigma, drawn
    as the mode draws it and, in uniform mode, shifted by `condition_shift` (1: plain U[0, 1];
    more: the high-noise end, where only the caption and the given frames tell what comes).

    With probability `p_lead` a sample takes the first half of the `lead` sampling schedule
    (`frame_schedule`): frame 0 at that same draw, every other frame at pure noise (sigma 1).
    The draws for `p_condition` and `p_lead` are only made when they are above 0, so adding them
    leaves the other draws of a generator unchanged.
    """
    if not 0.0 <= p_async <= 1.0:
        raise UserInputError(f"p_async must be in [0, 1], got {p_async}")
    if not 0.0 <= p_condition <= 1.0:
        raise UserInputError(f"p_condition must be in [0, 1], got {p_condition}")
    if not 0.0 <= p_lead <= 1.0:
        raise UserInputError(f"p_lead must be in [0, 1], got {p_lead}")
    if condition_shift <= 0 or (mode == "shifted-grid" and condition_shift != 1.0):
        raise UserInputError(
            f"condition_shift must be > 0, and 1 with the shifted grid (already shifted); "
            f"got {condition_shift}"
        )
    asynchronous = torch.rand(batch, generator=generator) < p_async  # [B]
    if mode == "uniform":
        independent = torch.rand(batch, frames, generator=generator)
        shared = torch.rand(batch, 1, generator=generator).expand(batch, frames)
        sigmas = torch.where(asynchronous[:, None], independent, shared)
        weights = torch.ones_like(sigmas)
    elif mode == "shifted-grid":
        grid_sigmas, grid_weights = training_grid(shift)
        independent = torch.randint(0, len(grid_sigmas), (batch, frames), generator=generator)
        shared = torch.randint(0, len(grid_sigmas), (batch, 1), generator=generator).expand(batch, frames)
        index = torch.where(asynchronous[:, None], independent, shared)  # [B, F]
        sigmas, weights = grid_sigmas[index], grid_weights[index]
    else:
        raise UserInputError(f"unknown timestep sampling mode {mode!r} (known: uniform, shifted-grid)")
    if p_condition == 0 and p_lead == 0:
        return sigmas, weights
    # A layout sample uses its row's shared draw (`shared`), as the mode weights it.
    if mode == "shifted-grid":
        shared_sigmas, shared_weights = grid_sigmas[shared], grid_weights[shared]
    else:
        shared_sigmas, shared_weights = shift_sigmas(shared, condition_shift), torch.ones_like(shared)
    if p_condition > 0:
        conditioned = torch.rand(batch, generator=generator) < p_condition  # [B]
        given = conditioning_layouts(batch, frames, generator)  # [B, F]
        layout = torch.where(given, torch.zeros_like(sigmas), shared_sigmas)
        sigmas = torch.where(conditioned[:, None], layout, sigmas)
        weights = torch.where(conditioned[:, None], shared_weights, weights)
    if p_lead > 0:
        led = torch.rand(batch, generator=generator) < p_lead  # [B]
        layout = torch.ones_like(sigmas)
        layout[:, 0] = shared_sigmas[:, 0]
        sigmas = torch.where(led[:, None], layout, sigmas)
        weights = torch.where(led[:, None], shared_weights, weights)
    return sigmas, weights


FIRST_FRAME_GIVEN = 0.9  # a conditioned layout's one given frame is the first (I2V, extension) ...
END_FRAME_ADDED = 0.1  # ... and the last frame is given as well 1 time in 10 (start-end, keyframes)


def conditioning_layouts(batch: int, frames: int, generator: torch.Generator) -> torch.Tensor:
    """Which frames a conditioned training sample is given `[B, F]` (bool), as the tasks give them.

    One frame: the first with probability 0.9, else one of the others at random; then the last
    frame too with probability 0.1, never every frame (a 1-frame clip is given nothing). Mostly one
    frame, because that is where the caption alone tells what the others become: with two given
    frames the motion between them is already fixed.
    """
    first = torch.rand(batch, generator=generator) < FIRST_FRAME_GIVEN
    other = torch.randint(1, max(frames, 2), (batch,), generator=generator)
    end = torch.rand(batch, generator=generator) < END_FRAME_ADDED
    given = torch.zeros(batch, frames, dtype=torch.bool)
    if frames < 2:
        return given
    given[torch.arange(batch), torch.where(first, 0, other)] = True
    given[:, -1] |= end
    given[given.all(dim=1), -1] = False
    return given
