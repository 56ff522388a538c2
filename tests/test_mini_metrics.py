"""pusa_ray.mini.metrics on synthetic videos with known answers: shapes rendered by `shapes.render`."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pusa_ray import video
from pusa_ray.mini import metrics
from pusa_ray.mini.shapes import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    MOTIONS,
    PLAIN_BACKGROUND,
    SHAPES,
    ClipTruth,
    DomainSettings,
    clips,
    render,
)

SIZE = 32
# The centroid of a rendered shape equals its true centre to about 0.1 px: 4x supersampling
# quantises each pixel's coverage to 1/16, and the chroma -> coverage estimate is nearly linear.
# Measured over 200 random clips of every motion and background: at most 0.13 px per frame, so
# a displacement (two centroids) is within 0.3 px.
DISPLACEMENT_TOLERANCE_PX = 0.3


def background(kind: str) -> np.ndarray:
    """The domain's backgrounds: dark grey, or grey stripes / checks of period 5."""
    image = np.empty((SIZE, SIZE, 3), dtype=np.float32)
    image[:] = PLAIN_BACKGROUND
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    if kind == "stripes":
        image[(xs // 5) % 2 == 0] = (60, 60, 66)
    elif kind == "checks":
        image[((xs // 5) + (ys // 5)) % 2 == 0] = (60, 60, 66)
    return image


def clip_of(
    centres: list[tuple[float, float]],
    colour: str = "red",
    shape: str = "circle",
    kind: str = "plain",
    radii: list[float] | None = None,
    end_colour: str | None = None,
) -> np.ndarray:
    truth = ClipTruth(
        "", colour, shape, "moves", None, end_colour, kind, centres, radii or [5.0] * len(centres)
    )
    return render(truth, background(kind))


def line(start: tuple[float, float], step: tuple[float, float], frames: int = 9) -> list[tuple[float, float]]:
    return [(start[0] + i * step[0], start[1] + i * step[1]) for i in range(frames)]


def test_a_shape_moved_right_by_a_known_amount_is_measured_to_sub_pixel_accuracy():
    frames = clip_of([(8.3, 15.6), (15.6, 15.6)], kind="stripes")
    tracked = metrics.track(frames)
    dx, dy = tracked.centres[1] - tracked.centres[0]
    assert dx == pytest.approx(7.3, abs=DISPLACEMENT_TOLERANCE_PX)
    assert dy == pytest.approx(0.0, abs=DISPLACEMENT_TOLERANCE_PX)
    assert np.abs(tracked.centres - [(8.3, 15.6), (15.6, 15.6)]).max() < DISPLACEMENT_TOLERANCE_PX / 2
    assert metrics.direction_of(tracked, min_travel=4.0) == "right"
    assert metrics.first_frame_jump(tracked) == pytest.approx(7.3, abs=DISPLACEMENT_TOLERANCE_PX)


@pytest.mark.parametrize("direction", list(DIRECTIONS))
@pytest.mark.parametrize("shape", SHAPES)
def test_each_direction_is_found_from_first_to_last_centroid(direction: str, shape: str):
    dx, dy = DIRECTIONS[direction]
    start = (SIZE / 2 - 7 * dx, SIZE / 2 - 7 * dy)
    frames = clip_of(line(start, (1.75 * dx, 1.75 * dy)), shape=shape, kind="checks")
    tracked = metrics.track(frames)
    assert metrics.direction_of(tracked, metrics.min_travel_px(SIZE, SIZE)) == direction
    displacement = tracked.centres[-1] - tracked.centres[0]
    np.testing.assert_allclose(displacement, (14 * dx, 14 * dy), atol=DISPLACEMENT_TOLERANCE_PX)
    assert metrics.centroid_speed(tracked) == pytest.approx(1.75, abs=DISPLACEMENT_TOLERANCE_PX)
    assert metrics.centroid_jitter(tracked) < 0.2  # uniform motion: no second difference
    score = metrics.caption_following(frames, f"a red {shape} moves {direction}")
    assert score.all_correct and score.direction_correct is True


def test_a_static_clip_has_no_direction_and_does_not_follow_a_motion_caption():
    frames = clip_of([(16.0, 16.0)] * 9, colour="blue", shape="square")
    tracked = metrics.track(frames)
    assert metrics.direction_of(tracked, metrics.min_travel_px(SIZE, SIZE)) is None
    score = metrics.caption_following(frames, "a blue square moves right")
    assert score.checks == {"colour": True, "shape": True, "motion": False}
    assert score.all_correct is False and score.direction_correct is False
    assert metrics.frame_difference(frames) == 0.0 and metrics.pixel_jitter(frames) == 0.0
    assert metrics.centroid_speed(tracked) == 0.0 and metrics.first_frame_jump(tracked) == 0.0


def test_small_motion_below_the_minimum_travel_is_static():
    # 3 px net over the clip: under a quarter of the domain's 16 px travel at 32x32 (4 px)
    frames = clip_of(line((14.0, 16.0), (3 / 8, 0.0)))
    assert metrics.min_travel_px(SIZE, SIZE) == 4.0
    assert metrics.direction_of(metrics.track(frames), 4.0) is None


def test_an_exact_copy_has_infinite_psnr_reported_as_the_cap_and_ssim_one():
    frames = clip_of(line((8.0, 16.0), (2.0, 0.0)), kind="stripes")
    image = frames[0].copy()
    fidelity = metrics.first_frame_fidelity(frames, image)
    assert fidelity.psnr == math.inf and metrics.capped_psnr(fidelity.psnr) == metrics.PSNR_CAP_DB
    assert fidelity.ssim == pytest.approx(1.0, abs=1e-12)
    end = metrics.end_frame_fidelity(frames, frames[-1].copy())
    assert end.psnr == math.inf and end.ssim == pytest.approx(1.0, abs=1e-12)
    assert metrics.end_frame_fidelity(frames, image).psnr < 40  # the object moved 16 px


def test_psnr_of_a_known_perturbation_matches_the_closed_form():
    rng = np.random.default_rng(0)
    image = rng.integers(20, 236, (SIZE, SIZE, 3)).astype(np.uint8)
    noise = rng.integers(-20, 21, image.shape)  # no clipping: values stay in 0..255
    noisy = (image.astype(int) + noise).astype(np.uint8)
    mse = float(np.mean(noise.astype(np.float64) ** 2))
    assert metrics.psnr(image, noisy) == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-6)
    assert metrics.psnr(noisy, image) == metrics.psnr(image, noisy)
    similarity = metrics.ssim(image, noisy)
    assert 0.0 < similarity < 1.0 and similarity == pytest.approx(metrics.ssim(noisy, image), abs=1e-12)
    # more noise, lower SSIM; a tiny image uses a smaller window
    assert metrics.ssim(image, (image.astype(int) + 2 * noise).clip(0, 255).astype(np.uint8)) < similarity
    assert metrics.ssim(image[:6, :8], image[:6, :8]) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("kind", BACKGROUNDS)
def test_colours_and_shapes_are_classified_on_every_background(kind: str):
    for colour in COLOURS:
        for shape in SHAPES:
            for radius in (4.5, 6.0):
                centres = line((9.3, 11.7), (1.6, 1.1))
                tracked = metrics.track(clip_of(centres, colour, shape, kind, [radius] * 9))
                assert tracked.present.all()
                assert set(tracked.colours) == {colour}, (kind, colour, shape, radius)
                assert set(tracked.shapes) == {shape}, (kind, colour, shape, radius, tracked.fill_ratios)


def test_fill_ratios_are_near_pi_over_four_and_one():
    circle = metrics.track(clip_of([(15.4, 16.2)] * 2, shape="circle", radii=[6.0] * 2))
    square = metrics.track(clip_of([(15.4, 16.2)] * 2, shape="square", radii=[6.0] * 2))
    assert circle.fill_ratios[0] == pytest.approx(math.pi / 4, abs=0.03)
    assert square.fill_ratios[0] == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("motion", ["bounces", "grows", "turns"])
def test_bounces_grows_and_turns_are_detected_on_true_clips_and_rejected_on_static_ones(motion: str):
    settings = DomainSettings(motions=(motion,), backgrounds=BACKGROUNDS)
    for truth, frames in clips(settings, 8, seed=5):
        assert metrics.caption_following(frames, truth.caption).all_correct, truth.caption
        static = np.repeat(frames[:1], len(frames), axis=0)
        score = metrics.caption_following(static, truth.caption)
        assert score.checks["motion"] is False, truth.caption
        assert score.checks["shape"] is True


def test_a_bounce_is_not_a_move_and_a_move_is_not_a_bounce():
    there_and_back = [(8.0 + 2 * min(i, 8 - i) * 2, 16.0) for i in range(9)]  # right 16 px, back 16 px
    frames = clip_of(there_and_back)
    assert metrics.caption_following(frames, "a red circle bounces right").all_correct
    assert not metrics.caption_following(frames, "a red circle bounces left").all_correct
    assert not metrics.caption_following(frames, "a red circle moves right").all_correct
    straight = clip_of(line((8.0, 16.0), (2.0, 0.0)))
    assert metrics.caption_following(straight, "a red circle moves right").all_correct
    assert not metrics.caption_following(straight, "a red circle bounces right").all_correct


def test_wrong_colour_shape_and_end_colour_are_each_reported():
    frames = clip_of(line((8.0, 16.0), (2.0, 0.0)), colour="green", shape="square", end_colour="blue")
    score = metrics.caption_following(frames, "a green square turns blue")
    assert score.all_correct and score.checks == {
        "colour": True,
        "end_colour": True,
        "shape": True,
        "motion": True,
    }
    score = metrics.caption_following(frames, "a red circle turns yellow")
    assert score.checks == {"colour": False, "end_colour": False, "shape": False, "motion": True}
    assert score.observed["colour"] == "green" and score.observed["end_colour"] == "blue"


def test_the_generator_scores_full_caption_following_on_every_motion_and_background():
    settings = DomainSettings(motions=MOTIONS, backgrounds=BACKGROUNDS)
    scored = [
        (truth, metrics.caption_following(frames, truth.caption)) for truth, frames in clips(settings, 64, 1)
    ]
    assert {truth.motion for truth, _ in scored} == set(MOTIONS)
    assert {truth.background for truth, _ in scored} == set(BACKGROUNDS)
    assert [truth.caption for truth, score in scored if not score.all_correct] == []
    for truth, frames in clips(settings, 16, 1):
        tracked = metrics.track(frames)
        step = np.hypot(*np.subtract(truth.centres[1], truth.centres[0]))
        assert metrics.first_frame_jump(tracked) == pytest.approx(step, abs=DISPLACEMENT_TOLERANCE_PX)


def test_caption_following_survives_the_mp4_round_trip_of_a_written_dataset(tmp_path):
    # H.264 yuv420p halves chroma resolution (2x2 blocks): the held-out set is read back that way.
    settings = DomainSettings(motions=MOTIONS, backgrounds=BACKGROUNDS)
    for index, (truth, frames) in enumerate(clips(settings, 12, 2)):
        video.write_mp4(tmp_path / f"{index}.mp4", frames, 16)
        decoded, _ = video.read_video(tmp_path / f"{index}.mp4")
        assert metrics.caption_following(decoded, truth.caption).all_correct, truth.caption
        errors = np.abs(metrics.track(decoded).centres - np.array(truth.centres))
        assert np.nanmax(errors) < 0.5  # the chroma blocks move a centroid by at most ~0.45 px


def test_an_absent_object_gives_nan_and_none_not_errors():
    frames = np.full((5, SIZE, SIZE, 3), 40, dtype=np.uint8)
    tracked = metrics.track(frames)
    assert not tracked.present.any() and tracked.colours == (None,) * 5
    assert math.isnan(metrics.centroid_jitter(tracked)) and math.isnan(metrics.first_frame_jump(tracked))
    score = metrics.caption_following(frames, "a red circle moves up")
    assert score.checks == {"colour": False, "shape": False, "motion": False}
    assert metrics.caption_following(frames, "a red circle grows").checks["motion"] is False


def test_bad_input_is_a_value_error_naming_the_shape():
    with pytest.raises(ValueError, match=r"uint8 \[F, H, W, 3\]"):
        metrics.track(np.zeros((4, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="float32"):
        metrics.frame_difference(np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="different shapes"):
        metrics.psnr(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="differ in size"):
        metrics.first_frame_fidelity(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8))
