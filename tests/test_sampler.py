"""The sampler against closed forms on a denoiser with a known velocity."""

import pytest
import torch

from pusa_ray.conditioning import ConditionPlan
from pusa_ray.errors import UserInputError
from pusa_ray.sampler import (
    GenerationCancelled,
    combine_guidance,
    guided_denoiser,
    initial_noise,
    sample,
    start_latents,
)
from pusa_ray.timesteps import frame_schedule, sampling_sigmas

SHAPE = (1, 4, 5, 3, 3)  # [B, C, F, h, w]


class ExactVelocity:
    """Returns the true velocity noise - clean for every frame and records its inputs."""

    def __init__(self, clean: torch.Tensor, noise: torch.Tensor) -> None:
        self.clean, self.noise = clean, noise
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.calls.append((latents.clone(), timesteps.clone()))
        return self.noise - self.clean


def assert_closed_form(calls, schedule, multipliers, clean, noise) -> None:
    """Call i saw timesteps 1000 s and latents (1 - s) clean + s noise, s = schedule[i] * m per frame."""
    assert len(calls) == len(schedule) - 1
    for i, (latents, timesteps) in enumerate(calls):
        effective = (schedule[i] * multipliers).view(1, 1, -1, 1, 1)  # [1, 1, F, 1, 1]
        torch.testing.assert_close(timesteps, 1000 * effective.view(1, -1), rtol=0, atol=1e-4)
        torch.testing.assert_close(latents, (1 - effective) * clean + effective * noise, rtol=1e-5, atol=1e-5)


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

    assert_closed_form(denoiser.calls, sigmas, multipliers, clean, noise)
    torch.testing.assert_close(result, clean, rtol=1e-5, atol=1e-5)
    assert torch.equal(result[:, :, 3], given[:, 1][None])  # m = 0: frozen bit for bit


def test_sync_schedule_is_one_column_per_frame():
    table = frame_schedule(6, 5.0, 5, "sync")
    assert table.shape == (7, 5) and table.dtype == torch.float32
    assert torch.equal(table, sampling_sigmas(6, 5.0)[:, None].expand(7, 5))


@pytest.mark.parametrize("steps", [2, 5, 10])
def test_lead_schedule_generates_frame_0_first_then_the_rest(steps):
    table = frame_schedule(steps, 3.0, 4, "lead")
    lead = steps // 2
    assert table.shape == (steps + 1, 4)
    # Frame 0: its own schedule over the first steps // 2 steps, then clean and fixed.
    assert torch.equal(table[: lead + 1, 0], sampling_sigmas(lead, 3.0))
    assert torch.equal(table[lead:, 0], torch.zeros(steps - lead + 1))
    # The others wait at pure noise, then follow the remaining steps together.
    assert torch.equal(table[: lead + 1, 1:], torch.ones(lead + 1, 3))
    assert torch.equal(table[lead:, 1:], sampling_sigmas(steps - lead, 3.0)[:, None].expand(-1, 3))
    # Every step moves exactly one phase: never frame 0 and the others together.
    moving = table[1:] != table[:-1]  # [N, F]
    assert torch.equal(moving[:, 0], torch.arange(steps) < lead)
    assert torch.equal(moving[:, 1:].all(dim=1), torch.arange(steps) >= lead)


def test_lead_schedule_bad_input_and_a_one_frame_video():
    assert torch.equal(frame_schedule(4, 5.0, 1, "lead"), frame_schedule(4, 5.0, 1, "sync"))
    with pytest.raises(UserInputError, match="needs steps >= 2"):
        frame_schedule(1, 5.0, 5, "lead")
    with pytest.raises(UserInputError, match="unknown schedule 'late'.*sync, lead"):
        frame_schedule(4, 5.0, 5, "late")


def test_a_per_frame_table_drives_each_frame_along_its_own_column():
    clean, noise = torch.randn(SHAPE), initial_noise(SHAPE, 4)
    given = torch.randn(4, 1, 3, 3)
    clean[:, :, 2] = given[:, 0][None]
    plan = ConditionPlan((2,), given, (0.5,))
    multipliers = torch.tensor([1.0, 1.0, 0.5, 1.0, 1.0])
    table = frame_schedule(6, 3.0, 5, "lead")  # frame 0 leads; the given frame 2 is scaled by 0.5
    denoiser = ExactVelocity(clean, noise)
    result = sample(denoiser, noise, plan, table)

    assert_closed_form(denoiser.calls, table, multipliers, clean, noise)
    for latents, _ in denoiser.calls[:4]:  # frames 1, 3, 4 wait at sigma 1: untouched noise, bit for bit
        assert torch.equal(latents[:, :, [1, 3, 4]], noise[:, :, [1, 3, 4]])
    torch.testing.assert_close(result, clean, rtol=1e-5, atol=1e-5)


def test_a_one_column_schedule_and_its_table_are_the_same_run():
    noise = initial_noise(SHAPE, 5)
    sigmas = sampling_sigmas(5, 5.0)
    model = lambda x, t: torch.sin(x) + t[:, None, :, None, None] / 1000  # noqa: E731
    plan = ConditionPlan((0,), torch.randn(4, 1, 3, 3), (0.2,))
    table = frame_schedule(5, 5.0, 5)
    assert torch.equal(sample(model, noise, plan, sigmas), sample(model, noise, plan, table))
    with pytest.raises(ValueError, match=r"\[N\+1, 5\]"):
        sample(model, noise, plan, frame_schedule(5, 5.0, 4))


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
