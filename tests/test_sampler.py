"""The sampler against closed forms on a denoiser with a known velocity."""

import pytest
import torch

from pusa_ray.conditioning import ConditionPlan
from pusa_ray.sampler import (
    GenerationCancelled,
    combine_guidance,
    guided_denoiser,
    initial_noise,
    sample,
    start_latents,
)
from pusa_ray.timesteps import sampling_sigmas

SHAPE = (1, 4, 5, 3, 3)  # [B, C, F, h, w]


class ExactVelocity:
    """Returns the true velocity noise - clean for every frame and records its inputs."""

    def __init__(self, clean: torch.Tensor, noise: torch.Tensor) -> None:
        self.clean, self.noise = clean, noise
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.calls.append((latents.clone(), timesteps.clone()))
        return self.noise - self.clean


def test_initial_noise_is_seeded_float32():
    a, b, c = initial_noise(SHAPE, 7), initial_noise(SHAPE, 7), initial_noise(SHAPE, 8)
    assert a.dtype == torch.float32 and a.shape == SHAPE
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(
        a, torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)), rtol=0, atol=0
    )


def test_every_frame_follows_its_closed_form():
    clean, noise = torch.randn(SHAPE), initial_noise(SHAPE, 0)
    given = torch.randn(4, 2, 3, 3)  # the clean latents of frames 0 and 3 (the plan)
    clean[:, :, [0, 3]] = given[None]
    plan = ConditionPlan((0, 3), given, (0.3, 0.0))
    multipliers = torch.tensor([0.3, 1.0, 1.0, 0.0, 1.0])
    denoiser = ExactVelocity(clean, noise)
    sigmas = sampling_sigmas(6, 5.0)
    result = sample(denoiser, noise, plan, sigmas)

    assert len(denoiser.calls) == 6
    for i, (latents, timesteps) in enumerate(denoiser.calls):
        effective = sigmas[i] * multipliers  # [F]
        torch.testing.assert_close(timesteps, (1000 * effective)[None], rtol=0, atol=1e-4)
        expected = (1 - effective.view(1, 1, 5, 1, 1)) * clean + effective.view(1, 1, 5, 1, 1) * noise
        torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result, clean, rtol=1e-5, atol=1e-5)
    assert torch.equal(result[:, :, 3], given[:, 1][None])  # m = 0: frozen bit for bit


def test_frozen_frames_are_exact_whatever_the_model_returns():
    noise = initial_noise(SHAPE, 1)
    given = torch.randn(4, 1, 3, 3)
    plan = ConditionPlan((2,), given, (0.0,))
    result = sample(lambda x, t: torch.randn_like(x) * 1e6, noise, plan, sampling_sigmas(4, 5.0))
    assert torch.equal(result[:, :, 2], given[:, 0][None])


def test_start_latents_mix_with_the_same_noise():
    noise = initial_noise(SHAPE, 2)
    given = torch.randn(4, 1, 3, 3)
    plan = ConditionPlan((4,), given, (0.25,))
    start = start_latents(noise, plan, plan.frame_multipliers(5))
    torch.testing.assert_close(start[:, :, 4], 0.75 * given[:, 0][None] + 0.25 * noise[:, :, 4])
    assert torch.equal(start[:, :, :4], noise[:, :, :4])


def test_progress_and_cancellation():
    noise = initial_noise(SHAPE, 3)
    seen = []
    sample(
        lambda x, t: torch.zeros_like(x),
        noise,
        ConditionPlan(),
        sampling_sigmas(3, 5.0),
        progress=lambda *a: seen.append(a),
    )
    assert seen == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(GenerationCancelled, match="after 2 of 3"):
        sample(
            lambda x, t: torch.zeros_like(x),
            noise,
            ConditionPlan(),
            sampling_sigmas(3, 5.0),
            progress=lambda done, total: None,
            should_cancel=lambda: len(seen) >= 5 or seen.append(None) is not None,
        )


def text_model(latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """A toy conditional model: output depends on the context and the per-frame timestep."""
    return latents * context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1) + timesteps[:, None, :, None, None] / 1000


def test_guidance_one_is_the_conditional_prediction():
    latents, timesteps = torch.randn(SHAPE), torch.rand(1, 5) * 1000
    context, negative = torch.randn(1, 6, 2), torch.randn(1, 6, 2)
    conditional = text_model(latents, timesteps, context)
    assert torch.equal(guided_denoiser(text_model, context, negative, 1.0)(latents, timesteps), conditional)
    unconditional = text_model(latents, timesteps, negative)
    # The formula itself rounds (neg + (pos - neg)), hence the bypass above; to float tolerance:
    torch.testing.assert_close(combine_guidance(conditional, unconditional, 1.0), conditional)


def test_batched_guidance_equals_two_forwards():
    latents, timesteps = torch.randn(SHAPE), torch.rand(1, 5) * 1000
    context, negative = torch.randn(1, 6, 2), torch.randn(1, 6, 2)
    calls = []

    def counting(x, t, c):
        calls.append(x.shape[0])
        return text_model(x, t, c)

    guided = guided_denoiser(counting, context, negative, 3.0)(latents, timesteps)
    positive, unconditional = (
        text_model(latents, timesteps, context),
        text_model(latents, timesteps, negative),
    )
    torch.testing.assert_close(guided, unconditional + 3.0 * (positive - unconditional))
    assert calls == [2]  # one forward on a batch of two
