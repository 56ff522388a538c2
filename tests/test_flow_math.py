"""Schedules, training timesteps and the flow-matching functions against their closed forms."""

import pytest
import torch

from pusa_ray import flow, timesteps
from pusa_ray.errors import UserInputError


def test_sampling_sigmas_closed_form():
    sigmas = timesteps.sampling_sigmas(10, 5.0)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (11,)
    base = torch.linspace(1, 0, 11, dtype=torch.float64)[:-1]
    expected = 5.0 * base / (1 + 4.0 * base)
    torch.testing.assert_close(sigmas[:-1], expected.float(), rtol=0, atol=1e-7)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert torch.all(sigmas[1:] < sigmas[:-1])


def test_shift_one_is_linear():
    torch.testing.assert_close(timesteps.sampling_sigmas(4, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


@pytest.mark.parametrize("steps,shift", [(0, 5.0), (4, 0.0), (4, -1.0)])
def test_bad_schedule_arguments(steps, shift):
    with pytest.raises(UserInputError):
        timesteps.sampling_sigmas(steps, shift)


def test_training_grid_weights():
    sigmas, weights = timesteps.training_grid(shift=5.0)
    assert sigmas.shape == weights.shape == (1000,)
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert weights.min().item() == pytest.approx(0.0, abs=1e-6)
    peak = (sigmas[weights.argmax()] * 1000).item()
    assert abs(peak - 500) < 5  # the bump is centred on timestep 500


def test_p_async_zero_shares_and_one_splits():
    generator = torch.Generator().manual_seed(0)
    shared, weights = timesteps.sample_training_sigmas(64, 5, 0.0, generator)
    assert torch.all(shared == shared[:, :1]) and torch.all(weights == 1)
    independent, _ = timesteps.sample_training_sigmas(64, 5, 1.0, generator)
    assert torch.all(independent.std(dim=1) > 0)
    assert independent.min() >= 0 and independent.max() <= 1


def test_shifted_grid_draws_grid_points_with_their_weights():
    generator = torch.Generator().manual_seed(1)
    grid_sigmas, grid_weights = timesteps.training_grid(5.0)
    sigmas, weights = timesteps.sample_training_sigmas(8, 4, 1.0, generator, mode="shifted-grid")
    for sigma, weight in zip(sigmas.flatten(), weights.flatten(), strict=True):
        index = torch.nonzero(grid_sigmas == sigma)[0, 0]
        assert grid_weights[index] == weight


def test_bad_training_sampling():
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(UserInputError, match="p_async"):
        timesteps.sample_training_sigmas(2, 2, 1.5, generator)
    with pytest.raises(UserInputError, match="mode"):
        timesteps.sample_training_sigmas(2, 2, 1.0, generator, mode="cosine")
    with pytest.raises(UserInputError, match="p_condition"):
        timesteps.sample_training_sigmas(2, 2, 1.0, generator, p_condition=-0.1)
    with pytest.raises(UserInputError, match="p_lead"):
        timesteps.sample_training_sigmas(2, 2, 1.0, generator, p_lead=1.5)


@pytest.mark.parametrize("mode", ["uniform", "shifted-grid"])
def test_conditioned_samples_give_some_frames_and_share_one_sigma_on_the_rest(mode):
    generator = torch.Generator().manual_seed(3)
    sigmas, weights = timesteps.sample_training_sigmas(4000, 5, 1.0, generator, mode, 5.0, p_condition=1.0)
    given = sigmas == 0
    assert given.any(dim=1).all() and not given.all(dim=1).any()  # something given, something left
    for row, mask in zip(sigmas, given, strict=True):
        assert len(set(row[~mask].tolist())) == 1  # the generated frames share one sigma
    first_only = given[:, 0] & (given.sum(dim=1) == 1)
    expected_first = timesteps.FIRST_FRAME_GIVEN * (1 - timesteps.END_FRAME_ADDED)
    assert abs(first_only.float().mean() - expected_first) < 0.03
    two = (given.sum(dim=1) == 2) & given[:, -1]  # another frame and the last
    expected_two = timesteps.END_FRAME_ADDED * (1 - (1 - timesteps.FIRST_FRAME_GIVEN) / 4)
    assert abs(two.float().mean() - expected_two) < 0.03
    assert given.sum(dim=1).max() == 2
    if mode == "shifted-grid":  # the weights are the grid's for the shared sigma
        grid_sigmas, grid_weights = timesteps.training_grid(5.0)
        index = torch.searchsorted(-grid_sigmas, -sigmas[:, -1:].clamp(min=grid_sigmas[-1]))
        free = ~given[:, -1]
        torch.testing.assert_close(weights[free], grid_weights[index[free]].expand(-1, 5))
    else:
        assert torch.all(weights == 1)
    mixed, _ = timesteps.sample_training_sigmas(4000, 5, 1.0, generator, mode, 5.0, p_condition=0.3)
    share = (mixed == 0).any(dim=1).float().mean()  # only conditioned rows have given frames
    assert abs(share - 0.3) < 0.03
    assert not timesteps.conditioning_layouts(4, 1, generator).any()  # one frame: nothing to give


@pytest.mark.parametrize("mode", ["uniform", "shifted-grid"])
def test_lead_samples_put_frame_0_ahead_and_the_rest_at_pure_noise(mode):
    shift = 5.0 if mode == "uniform" else 1.0
    draw = lambda **kw: timesteps.sample_training_sigmas(  # noqa: E731
        4000, 5, 1.0, torch.Generator().manual_seed(4), mode, 5.0, 0.3, shift, **kw
    )
    sigmas, weights = draw(p_lead=1.0)
    assert torch.all(sigmas[:, 1:] == 1.0)
    assert sigmas[:, 0].min() >= 0 and sigmas[:, 0].max() <= 1 and len(set(sigmas[:, 0].tolist())) > 500
    if mode == "uniform":  # frame 0 at the conditioned draw: U[0, 1] shifted by condition_shift 5
        assert torch.all(weights == 1)
        median = timesteps.shift_sigmas(torch.tensor(0.5), 5.0)
        assert abs(sigmas[:, 0].median() - median) < 0.02
    else:  # every frame weighted as the grid weights frame 0's sigma
        assert torch.all(weights == weights[:, :1])
    # Lead rows replace the others; every other row is the draw without p_lead, value for value.
    without, _ = draw()
    mixed, _ = draw(p_lead=0.2)
    led = (mixed[:, 1:] == 1.0).all(dim=1) & ~(without[:, 1:] == 1.0).all(dim=1)
    assert abs(led.float().mean() - 0.2) < 0.03
    kept = ~(mixed[:, 1:] == 1.0).all(dim=1)
    assert torch.equal(mixed[kept], without[kept])


def test_per_frame_noising_and_target():
    clean, noise = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    sigmas = torch.tensor([[0.0, 0.25, 0.5, 1.0], [1.0, 0.0, 0.1, 0.9]])
    noisy = flow.add_noise(clean, noise, sigmas)
    for b in range(2):
        for f in range(4):
            s = sigmas[b, f]
            torch.testing.assert_close(noisy[b, :, f], (1 - s) * clean[b, :, f] + s * noise[b, :, f])
    assert torch.equal(noisy[0, :, 0], clean[0, :, 0]) and torch.equal(noisy[0, :, 3], noise[0, :, 3])
    torch.testing.assert_close(flow.velocity_target(clean, noise), noise - clean)


def test_euler_step_moves_along_the_velocity_and_freezes_zero_steps():
    latents, velocity = torch.randn(1, 2, 3, 2, 2), torch.full((1, 2, 3, 2, 2), float("inf"))
    velocity[:, :, 1:] = 2.0
    stepped = flow.euler_step(latents, velocity, torch.tensor([[0.0, -0.5, -0.25]]))
    assert torch.equal(stepped[:, :, 0], latents[:, :, 0])  # frozen even against an inf velocity
    torch.testing.assert_close(stepped[:, :, 1], latents[:, :, 1] - 1.0)
    torch.testing.assert_close(stepped[:, :, 2], latents[:, :, 2] - 0.5)


def test_loss_is_mse_and_weights_apply_per_frame():
    prediction, target = torch.zeros(1, 2, 2, 1, 1), torch.ones(1, 2, 2, 1, 1)
    target[:, :, 1] = 3.0
    assert flow.flow_matching_loss(prediction, target).item() == pytest.approx((1 + 9) / 2)
    weighted = flow.flow_matching_loss(prediction, target, torch.tensor([[2.0, 0.0]]))
    assert weighted.item() == pytest.approx((2 * 1 + 0 * 9) / 2)


def test_per_frame_shape_error_names_shapes():
    with pytest.raises(ValueError, match="3 frames"):
        flow.per_frame(torch.zeros(1, 3), torch.zeros(1, 2, 4, 2, 2))
