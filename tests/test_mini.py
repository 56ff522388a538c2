"""pusa-mini's parts: the space-to-depth codec, the word-level tokenizer, the shapes domain, presets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from pusa_ray.config import PRESETS
from pusa_ray.errors import UserInputError
from pusa_ray.mini import shapes
from pusa_ray.models import loading
from pusa_ray.models.codec import SpaceToDepthCodec, make_codec
from pusa_ray.models.text import word_tokenizer
from pusa_ray.pipeline import default_settings, generate
from pusa_ray.video import read_video

MINI_CODEC = PRESETS["pusa-mini-scratch"].vae


def test_space_to_depth_is_exactly_invertible_and_lays_out_blocks_as_documented() -> None:
    codec = make_codec(dict(MINI_CODEC))
    assert isinstance(codec, SpaceToDepthCodec)
    pixels = torch.rand(2, 3, 5, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = codec.encode(pixels)
    assert latents.shape == (2, 48, 5, 4, 6) == (2, *codec.latent_shape(5, 16, 24))
    torch.testing.assert_close(codec.decode(latents), pixels, atol=1e-6, rtol=0)
    # channel c*16 + dy*4 + dx of latent (h, w) is colour c of pixel (4h + dy, 4w + dx), normalised
    raw = latents * 0.30 - 0.65
    for c, dy, dx, h, w in [(0, 0, 0, 0, 0), (1, 2, 3, 3, 5), (2, 3, 1, 1, 2)]:
        assert raw[1, c * 16 + dy * 4 + dx, 4, h, w].item() == pytest.approx(
            pixels[1, c, 4, 4 * h + dy, 4 * w + dx].item(), abs=1e-6
        )
    # every frame is its own latent: leading and trailing segments encode the same way
    torch.testing.assert_close(codec.encode_segment(pixels, trailing=True), latents)
    with pytest.raises(ValueError, match="multiples of 4"):
        codec.encode(pixels[..., :15, :])


def test_space_to_depth_config_must_be_consistent() -> None:
    with pytest.raises(ValueError, match="z_dim must be 3"):
        SpaceToDepthCodec({**MINI_CODEC, "z_dim": 16})
    with pytest.raises(ValueError, match="48 values"):
        SpaceToDepthCodec({**MINI_CODEC, "latents_mean": [0.0] * 3})
    with pytest.raises(ValueError, match="unknown codec"):
        make_codec({"_class_name": "Nope"})


def test_word_tokenizer_maps_each_domain_word_to_one_token(tmp_path: Path) -> None:
    tokenizer = word_tokenizer(shapes.VOCABULARY, 16)
    ids = tokenizer(["A red circle, moves RIGHT.", "a purple blob"]).input_ids
    vocab = tokenizer.get_vocab()
    assert ids[0] == [vocab["a"], vocab["red"], vocab["circle"], vocab["moves"], vocab["right"], 1]
    assert ids[1] == [vocab["a"], 2, 2, 1]  # unknown words: <unk>; end of sequence 1
    assert (
        len(tokenizer)
        == 3 + len(shapes.VOCABULARY)
        <= PRESETS["pusa-mini-scratch"].text_encoder["vocab_size"]
    )
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(["a blue square moves up"]).input_ids == tokenizer(["a blue square moves up"]).input_ids


def test_the_model_vocabulary_is_the_domain_vocabulary() -> None:
    assert PRESETS["pusa-mini-scratch"].vocabulary == shapes.VOCABULARY
    for truth, _ in shapes.clips(
        shapes.DomainSettings(motions=shapes.MOTIONS, backgrounds=shapes.BACKGROUNDS), 40, 3
    ):
        assert set(truth.caption.split()) <= set(shapes.VOCABULARY)


@pytest.mark.parametrize("direction", list(shapes.DIRECTIONS))
def test_moving_clips_move_as_their_caption_says_and_stay_in_frame(direction: str) -> None:
    settings = shapes.DomainSettings()
    found = 0
    for truth, frames in shapes.clips(settings, 64, 7):
        if truth.direction != direction:
            continue
        found += 1
        assert truth.caption.split()[-1] == direction
        start, end = np.array(truth.centres[0]), np.array(truth.centres[-1])
        step = np.array(shapes.DIRECTIONS[direction]) * settings.travel * settings.width
        np.testing.assert_allclose(end - start, step, atol=1e-9)
        radius = truth.radii[0]
        for x, y in truth.centres:
            assert radius <= x <= settings.width - radius and radius <= y <= settings.height - radius
        assert frames.shape == (9, 32, 32, 3) and frames.dtype == np.uint8
    assert found >= 8


def test_a_centre_start_does_not_give_the_direction_away() -> None:
    """pusa-mini's domain: every direction starts from the same range, so frame 0 alone cannot tell it."""
    settings = shapes.DomainSettings(frames=5, travel=0.25, start="centre")
    travel = settings.travel * settings.width
    starts: dict[str, list[float]] = {direction: [] for direction in shapes.DIRECTIONS}
    for truth, _ in shapes.clips(settings, 200, 2):
        dx, dy = shapes.DIRECTIONS[truth.direction]
        start, end = np.array(truth.centres[0]), np.array(truth.centres[-1])
        np.testing.assert_allclose(end - start, np.array([dx, dy]) * travel, atol=1e-9)
        along = start[0] if dx else start[1]
        radius = truth.radii[0]
        assert radius + travel <= along <= settings.width - radius - travel  # room to go either way
        for x, y in truth.centres:
            assert radius <= x <= settings.width - radius and radius <= y <= settings.height - radius
        starts[truth.direction].append(along)
    # the same start range both ways: opposite directions' mean starts agree within a pixel
    for one, other in (("right", "left"), ("down", "up")):
        assert len(starts[one]) >= 30 and len(starts[other]) >= 30
        assert abs(np.mean(starts[one]) - np.mean(starts[other])) < 1.0


def test_a_frame_without_room_for_a_centre_start_is_refused() -> None:
    shapes.DomainSettings(travel=0.25, start="centre")  # 32 px: 8 px each way around a 12 px shape
    with pytest.raises(ValueError, match="no room to travel 0.35 of it from a 'centre' start"):
        shapes.DomainSettings(travel=0.35, start="centre")
    with pytest.raises(ValueError, match="start must be"):
        shapes.DomainSettings(start="middle")


def test_clips_depend_only_on_seed_and_index() -> None:
    settings = shapes.DomainSettings(motions=shapes.MOTIONS, backgrounds=shapes.BACKGROUNDS)
    few = list(shapes.clips(settings, 3, 5))
    more = list(shapes.clips(settings, 6, 5))
    for (t1, f1), (t2, f2) in zip(few, more[:3], strict=True):
        assert t1 == t2 and np.array_equal(f1, f2)
    assert few[0][0] != list(shapes.clips(settings, 1, 6))[0][0]


def test_write_dataset_writes_what_the_preprocessing_job_reads(tmp_path: Path) -> None:
    settings = shapes.DomainSettings(frames=5, height=32, width=24, travel=0.25)
    manifest = shapes.write_dataset(tmp_path, settings, 3, seed=1, fps=8)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    truths = shapes.read_truth(tmp_path / "truth.jsonl")
    assert [(row["video"], row["caption"]) for row in rows] == [(v, t.caption) for v, t in truths.items()]
    frames, fps = read_video(tmp_path / rows[0]["video"])
    assert frames.shape == (5, 32, 24, 3) and fps == pytest.approx(8)
    mtime = (tmp_path / rows[0]["video"]).stat().st_mtime_ns
    shapes.write_dataset(tmp_path, settings, 3, seed=1, fps=8)  # a rerun keeps what exists
    assert (tmp_path / rows[0]["video"]).stat().st_mtime_ns == mtime


def test_a_saved_pusa_mini_model_loads_back_to_identical_outputs(tmp_path: Path) -> None:
    components = loading.load_components("pusa-mini-scratch", device="cpu")
    settings = default_settings(components, steps=2)
    first = generate(components, "a red circle moves right", [], settings)
    assert first.video.shape == (3, 5, 32, 32)
    loading.save_model_dir(components, tmp_path / "model")
    assert json.loads((tmp_path / "model" / "vae" / "config.json").read_text()) == MINI_CODEC
    again = loading.load_components(str(tmp_path / "model"), device="cpu")
    assert again.spec.text_length == 16 and again.spec.fps == 4
    torch.testing.assert_close(generate(again, "a red circle moves right", [], settings).video, first.video)


def test_an_embedded_preset_without_its_weights_says_how_to_get_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loading, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(UserInputError, match="make pusa-mini"):
        loading.load_components("pusa-mini", device="cpu")
    with pytest.raises(UserInputError, match=r"use its base \(pusa-mini-base\)"):
        loading.model_source("pusa-mini")


@pytest.mark.parametrize("task", ["i2v", "start-end", "extend", "complete"])
def test_frozen_frames_come_back_exactly_through_the_invertible_codec(task: str, tmp_path: Path) -> None:
    """With noise 0 a given frame is frozen; the codec is exact, so its pixels come back (float rounding)."""
    from pusa_ray.tasks import TaskInputs, VideoShape, build_conditions
    from pusa_ray.video import frames_to_tensor, read_image, write_mp4

    components = loading.load_components("pusa-mini-scratch", device="cpu")
    settings = default_settings(components, steps=2)
    shape = VideoShape(settings.frames, settings.height, settings.width, components.codec.temporal_factor)
    truth, frames = next(iter(shapes.clips(shapes.DomainSettings(), 1, 11)))
    first, last = tmp_path / "first.png", tmp_path / "last.png"
    Image.fromarray(frames[0]).save(first)
    Image.fromarray(frames[-1]).save(last)
    write_mp4(tmp_path / "clip.mp4", frames, 8)
    inputs = {
        "i2v": TaskInputs("i2v", image=str(first), noise=(0.0,)),
        "start-end": TaskInputs("start-end", image=str(first), end_image=str(last), noise=(0.0,)),
        "extend": TaskInputs("extend", video=str(tmp_path / "clip.mp4"), cond_frames=3, noise=(0.0,)),
        "complete": TaskInputs(
            "complete", video=str(tmp_path / "clip.mp4"), cond_frames=2, end_frames=2, noise=(0.0,)
        ),
    }[task]
    conditions = build_conditions(inputs, shape)
    video = generate(components, truth.caption, conditions, settings).video  # [3, F, H, W]
    for condition in conditions:
        for offset, index in enumerate(condition.latent_indices):  # one latent per frame
            torch.testing.assert_close(video[:, index], condition.pixels[:, offset], atol=1e-5, rtol=0)
    if task == "i2v":
        expected = frames_to_tensor(read_image(first)[None])[:, 0]
        torch.testing.assert_close(video[:, 0], expected, atol=1e-5, rtol=0)
