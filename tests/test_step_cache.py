"""Step caching with per-frame timesteps (`pusa_ray.step_cache`) and the load-time speed levers
(`pusa_ray.models.speed`), on the tiny preset: exactness where it must be exact, the decision
rule on made-up residuals, and the settings' errors."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pusa_ray.errors import UserInputError
from pusa_ray.models.loading import load_components
from pusa_ray.models.speed import SpeedSettings, apply_speed_settings, set_attention_backend
from pusa_ray.names import parse_cache
from pusa_ray.pipeline import default_settings, generate
from pusa_ray.step_cache import FirstBlockCache, make_cache
from pusa_ray.tasks import TaskInputs, VideoShape, build_conditions

SIZE = {"frames": 9, "height": 32, "width": 32}


@pytest.fixture(scope="module")
def tiny():
    return load_components("tiny", device="cpu")


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def i2v(noise: float):
    shape = VideoShape(SIZE["frames"], SIZE["height"], SIZE["width"], 4)
    return build_conditions(TaskInputs(task="i2v", image=png(1), noise=(noise,)), shape)


CASES = {  # uniform timesteps (diffusers' blocks), per-frame schedules, a conditioned frame with noise
    "t2v sync": ({"schedule": "sync"}, lambda: []),
    "t2v lead": ({"schedule": "lead"}, lambda: []),
    "i2v noise 0.3": ({}, lambda: i2v(0.3)),
}


@pytest.mark.parametrize("name", CASES)
def test_a_threshold_of_zero_reuses_nothing_and_equals_the_uncached_sampler(tiny, name):
    overrides, conditions = CASES[name]
    settings = default_settings(tiny, steps=5, seed=2, **SIZE, **overrides)
    off = generate(tiny, "a cat", conditions(), settings)
    zero = generate(tiny, "a cat", conditions(), dataclasses.replace(settings, cache="first-block:0"))
    assert zero.reused_steps == 0 and off.reused_steps == 0
    assert torch.equal(zero.latents, off.latents)  # bit for bit: the cached path is the same arithmetic
    assert torch.equal(zero.video, off.video)


def test_the_cache_reuses_steps_and_never_moves_a_frozen_frame(tiny):
    settings = default_settings(tiny, steps=8, seed=3, **SIZE)
    off = generate(tiny, "a cat", i2v(0.0), settings)
    on = generate(tiny, "a cat", i2v(0.0), dataclasses.replace(settings, cache="first-block:0.5"))
    assert on.reused_steps > 0
    assert torch.equal(on.latents[:, :, 0], off.latents[:, :, 0])  # the given image's latent, untouched
    assert not torch.equal(on.latents[:, :, 1:], off.latents[:, :, 1:])  # the reuse did change the rest
    # and it stays close to the uncached video at this threshold
    assert (on.video - off.video).abs().mean() < 0.2


def test_a_guided_step_makes_one_decision_for_cond_and_uncond(tiny):
    steps = 6
    settings = default_settings(tiny, steps=steps, seed=1, guidance=3.0, cache="first-block:0.5", **SIZE)
    cache = make_cache(settings.cache)
    calls = []
    original = cache.run

    def counting(hidden, blocks, run_block, frames):
        calls.append(hidden.shape[0])
        return original(hidden, blocks, run_block, frames)

    cache.run = counting
    from pusa_ray import pipeline

    real = pipeline.make_cache
    pipeline.make_cache = lambda spec: cache
    try:
        result = generate(tiny, "a cat", [], settings)
    finally:
        pipeline.make_cache = real
    assert calls == [2] * steps  # one call per step, on the [cond, uncond] batch
    assert cache.computed + cache.reused == steps and result.reused_steps == cache.reused


def residuals(frames: int, tokens: int = 4, dim: int = 3, rows: int = 1) -> torch.Tensor:
    return torch.ones(rows, frames * tokens, dim)


def test_the_decision_is_per_frame_and_per_row():
    cache = FirstBlockCache(threshold=0.1)
    previous = residuals(frames=8, rows=2)
    cache._head, cache._tail = previous, torch.zeros_like(previous)
    assert cache.reusable(previous.clone(), frames=8)
    one_frame = previous.clone()
    one_frame[:, :4] *= 1.5  # frame 0 moved by 50%; the mean over all 8 frames moved by 6%
    assert (one_frame - previous).abs().mean() / previous.abs().mean() < 0.1
    assert not cache.reusable(one_frame, frames=8)
    one_row = previous.clone()
    one_row[1] *= 1.5  # the uncond row moved: the cond row alone would allow a reuse
    assert not cache.reusable(one_row, frames=8)
    assert not FirstBlockCache(threshold=0.0, _head=previous, _tail=previous).reusable(previous, 8)


def test_reuse_is_bounded_and_the_first_step_is_computed():
    cache = FirstBlockCache(threshold=1.0, max_reuse=2)
    blocks = [torch.nn.Identity(), torch.nn.Identity(), torch.nn.Identity()]
    ran = []

    def run_block(block, hidden):
        ran.append(blocks.index(block))
        return hidden + 1.0

    hidden = torch.zeros(1, 8, 2)
    outputs = [cache.run(hidden, blocks, run_block, frames=2) for _ in range(7)]
    # computed, reused, reused, computed, reused, reused, computed
    assert (cache.computed, cache.reused) == (3, 4)
    assert ran.count(1) == 3 and ran.count(0) == 7
    assert all(torch.equal(output, torch.full_like(hidden, 3.0)) for output in outputs)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("off", ("off", 0.0, 0)),
        ("first-block", ("first-block", 0.1, 2)),
        ("first-block:0.2", ("first-block", 0.2, 2)),
        ("first-block:0.2:3", ("first-block", 0.2, 3)),
    ],
)
def test_cache_settings_parse(text, expected):
    assert parse_cache(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "fast",
        "off:0.1",
        "first-block:x",
        "first-block:-1",
        "first-block:1.5",
        "first-block:0.1:0",
        "first-block:0.1:2:3",
    ],
)
def test_bad_cache_settings_are_refused_everywhere(text, tiny):
    from pydantic import ValidationError

    from pusa_ray.distributed.batch import BatchConfig
    from pusa_ray.serving.settings import ServiceSettings
    from pusa_ray.video_request import VideoRequest

    with pytest.raises(ValueError):
        parse_cache(text)
    with pytest.raises(ValidationError, match="cache"):
        VideoRequest(prompt="x", cache=text)
    with pytest.raises(ValidationError, match="cache"):
        ServiceSettings(storage_root="/tmp/x", cache=text)
    with pytest.raises(UserInputError, match="cache"):
        generate(tiny, "a cat", [], default_settings(tiny, steps=2, cache=text, **SIZE))
    assert BatchConfig(input="a.jsonl", output="out").speed == SpeedSettings()


def test_the_attention_backend_is_checked_on_this_machine_and_applied(tiny):
    with pytest.raises(UserInputError, match="'flash' does not run on this machine"):
        set_attention_backend(tiny.model, "flash", tiny.device)
    with pytest.raises(UserInputError, match="unknown"):
        set_attention_backend(tiny.model, "flashy", tiny.device)
    components = load_components("tiny", device="cpu")
    settings = default_settings(components, steps=2, seed=5, **SIZE)
    native = generate(components, "a cat", [], settings)
    apply_speed_settings(components, SpeedSettings(attention_backend="_native_math"))
    backends = {block.attn1.processor._attention_backend for block in components.model.transformer.blocks}
    assert backends == {"_native_math"} and components.speed["attention_backend"] == "_native_math"
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    assert _AttentionBackendRegistry._active_backend == "native"  # other models in the process keep theirs
    math = generate(components, "a cat", [], settings)
    torch.testing.assert_close(math.latents, native.latents, rtol=1e-4, atol=1e-5)


def test_an_offloaded_text_encoder_gives_the_same_video(tiny):
    components = load_components("tiny", device="cpu")
    apply_speed_settings(components, SpeedSettings(offload_text_encoder=True, vae_tiling=True))
    assert components.offload_text_encoder and components.codec.vae.use_tiling
    settings = default_settings(components, steps=2, seed=5, **SIZE)
    assert torch.equal(
        generate(components, "a cat", [], settings).latents, generate(tiny, "a cat", [], settings).latents
    )


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_output(tiny):
    from torch._dynamo.utils import counters

    counters.clear()
    components = load_components("tiny", device="cpu")
    components.model.compile_blocks()
    for schedule in ("sync", "lead"):  # diffusers' compiled blocks, and our compiled per-frame block
        settings = default_settings(components, steps=2, seed=5, schedule=schedule, **SIZE)
        eager = generate(tiny, "a cat", [], settings)
        compiled = generate(components, "a cat", [], settings)
        torch.testing.assert_close(compiled.latents, eager.latents, rtol=0, atol=1e-5)
    assert counters["stats"]["unique_graphs"] >= 2  # both block kinds ran compiled, not eager


def test_a_presets_cache_default_applies_where_a_request_names_none(tiny):
    spec = dataclasses.replace(tiny.spec, defaults={**tiny.spec.defaults, "cache": "first-block:0.5"})
    components = dataclasses.replace(tiny, spec=spec)
    settings = default_settings(components, steps=8, seed=1, **SIZE)
    assert settings.cache == "first-block:0.5" and default_settings(tiny).cache == "off"
    assert generate(components, "a cat", [], settings).reused_steps > 0
    assert default_settings(components, cache="off").cache == "off"  # a request's own choice wins
