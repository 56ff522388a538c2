"""Plans map pixel positions and clip lengths to the right latents, with the right multipliers."""

import pytest
import torch

from pusa_ray import conditioning as plans
from pusa_ray.errors import UserInputError


def clip(frames: int) -> torch.Tensor:
    """A clip whose pixel value at frame i is i/100, so slices can be identified."""
    return torch.arange(frames, dtype=torch.float32).div(100).view(1, frames, 1, 1).expand(3, frames, 4, 4)


def test_latent_counts():
    assert plans.latents_for_frames(81) == 21
    assert plans.latents_for_frames(9) == 3
    assert plans.latents_for_frames(1) == 1
    for bad in (0, 80, 82):
        with pytest.raises(UserInputError, match=f"got {bad}"):
            plans.latents_for_frames(bad)


@pytest.mark.parametrize("pixel,latent", [(0, 0), (1, 1), (4, 1), (5, 2), (40, 10), (80, 20)])
def test_pixel_to_latent(pixel, latent):
    assert plans.pixel_to_latent(pixel) == latent


@pytest.mark.parametrize(
    "text,expected", [("0", 0), ("10", 10), ("-1", 20), ("-21", 0), ("f:0", 0), ("f:40", 10), ("f:-1", 20)]
)
def test_parse_position(text, expected):
    assert plans.parse_position(text, num_latents=21, num_frames=81) == expected


@pytest.mark.parametrize("text", ["21", "-22", "f:81", "x", "f:a", ""])
def test_parse_position_errors_name_the_value(text):
    with pytest.raises(UserInputError, match=repr(text).replace("'", "'?")):
        plans.parse_position(text, num_latents=21, num_frames=81)


def test_segment_latents():
    assert plans.segment_latents(13, trailing=False) == 4
    assert plans.segment_latents(1, trailing=False) == 1
    assert plans.segment_latents(12, trailing=True) == 3
    with pytest.raises(UserInputError, match="1 \\+ 4\\*k"):
        plans.segment_latents(12, trailing=False)
    with pytest.raises(UserInputError, match="multiple of 4"):
        plans.segment_latents(13, trailing=True)


def test_clip_noise_defaults():
    assert plans.clip_noise(4, 0) == (0.0, 0.3, 0.4, 0.5)
    assert plans.clip_noise(6, 0) == (0.0, 0.0, 0.0, 0.3, 0.4, 0.5)
    assert plans.clip_noise(1, 0) == (0.0,)
    assert plans.clip_noise(2, 3) == (0.0, 0.5, 0.5, 0.4, 0.0)


def test_expand_noise():
    assert plans.expand_noise([0.3], 3, (), "x") == (0.3, 0.3, 0.3)
    assert plans.expand_noise(None, 2, (0.2, 0.5), "x") == (0.2, 0.5)
    with pytest.raises(UserInputError, match="got 2 noise multipliers for 3"):
        plans.expand_noise([0.1, 0.2], 3, (), "x")
    with pytest.raises(UserInputError, match="1.5"):
        plans.expand_noise([1.5], 1, (), "x")
    with pytest.raises(UserInputError, match="-0.1"):
        plans.expand_noise([-0.1], 1, (), "x")


def test_i2v_and_start_end_positions():
    image = torch.zeros(3, 4, 4)
    (first,) = plans.image_to_video(image)
    assert first.latent_indices == (0,) and first.noise_multipliers == (0.2,) and first.pixels.shape[1] == 1
    start, end = plans.start_end(image, image, num_latents=21)
    assert start.latent_indices == (0,) and end.latent_indices == (20,)
    assert (start.noise_multipliers, end.noise_multipliers) == ((0.2,), (0.5,))


def test_keyframes_sorted_and_distinct():
    image = torch.zeros(3, 4, 4)
    conditions = plans.keyframes([(10, image, 0.3), (0, image, 0.0), (20, image, 0.5)])
    assert [c.latent_start for c in conditions] == [0, 10, 20]
    assert [c.noise_multipliers for c in conditions] == [(0.0,), (0.3,), (0.5,)]


def test_extend_takes_the_last_frames():
    (condition,) = plans.extend(clip(20), cond_frames=13, num_latents=21)
    assert condition.latent_indices == (0, 1, 2, 3)
    assert condition.noise_multipliers == (0.0, 0.3, 0.4, 0.5)
    torch.testing.assert_close(condition.pixels[0, :, 0, 0], torch.arange(7, 20).float() / 100)
    with pytest.raises(UserInputError, match="has 9 frames, 13 are needed"):
        plans.extend(clip(9), cond_frames=13, num_latents=21)
    with pytest.raises(UserInputError, match="do not fit"):
        plans.extend(clip(13), cond_frames=13, num_latents=3)


def test_complete_keeps_head_and_tail_in_place():
    lead, tail = plans.complete(clip(40), cond_frames=9, end_frames=12, num_latents=21)
    assert lead.latent_indices == (0, 1, 2) and not lead.trailing
    assert tail.latent_indices == (18, 19, 20) and tail.trailing
    torch.testing.assert_close(lead.pixels[0, :, 0, 0], torch.arange(0, 9).float() / 100)
    torch.testing.assert_close(tail.pixels[0, :, 0, 0], torch.arange(28, 40).float() / 100)
    assert lead.noise_multipliers + tail.noise_multipliers == (0.0, 0.4, 0.5, 0.5, 0.4, 0.0)
    with pytest.raises(UserInputError, match="has 20 frames, 21 are needed"):
        plans.complete(clip(20), cond_frames=9, end_frames=12, num_latents=21)


def test_transition_uses_end_of_first_and_start_of_second():
    lead, tail = plans.transition(clip(30), clip(30) + 1, 5, 8, num_latents=21, noise=[0.1])
    torch.testing.assert_close(lead.pixels[0, :, 0, 0], torch.arange(25, 30).float() / 100)
    torch.testing.assert_close(tail.pixels[0, :, 0, 0], 1 + torch.arange(0, 8).float() / 100)
    assert lead.latent_indices == (0, 1) and tail.latent_indices == (19, 20)
    assert lead.noise_multipliers + tail.noise_multipliers == (0.1,) * 4


class MeanEncoder:
    """A stand-in codec with the real segment rule: latent j = mean of its pixel frames."""

    temporal_factor = 4

    def encode_segment(self, pixels: torch.Tensor, trailing: bool) -> torch.Tensor:
        frames = pixels.shape[2]
        groups = [pixels[:, :, :1]] if not trailing else []
        start = 0 if trailing else 1
        groups += [pixels[:, :, i : i + 4] for i in range(start, frames, 4)]
        return torch.stack([g.mean(dim=2) for g in groups], dim=2)


def test_encode_plan_lays_latents_out_in_order():
    lead, tail = plans.complete(clip(40), cond_frames=5, end_frames=4, num_latents=5)
    plan = plans.encode_plan([lead, tail], MeanEncoder(), num_latents=5)
    assert plan.latent_indices == (0, 1, 4)
    assert plan.latents.shape == (3, 3, 4, 4)
    torch.testing.assert_close(plan.latents[0, :, 0, 0], torch.tensor([0.0, 0.025, 0.375]))
    multipliers = plan.frame_multipliers(5)
    assert multipliers.tolist() == [0.0, 0.5, 1.0, 1.0, 0.0]


def test_two_conditions_on_one_latent_is_an_error():
    image = torch.zeros(3, 4, 4)
    conditions = plans.image_to_video(image) + plans.keyframes([(0, image, 0.0)])
    with pytest.raises(UserInputError, match="two conditions on latent 0"):
        plans.encode_plan(conditions, MeanEncoder(), num_latents=3)
