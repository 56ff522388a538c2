"""The VTA adapter and encoders against diffusers' own Wan model and pipeline on the same weights."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

from pusa_ray.models.description import sampling_defaults
from pusa_ray.models.loading import load_components, save_model_dir
from pusa_ray.models.text import encode_prompts
from pusa_ray.pipeline import default_settings, generate
from pusa_ray.timesteps import sampling_sigmas


@pytest.fixture(scope="module")
def tiny():
    return load_components("tiny", device="cpu")


def inputs(tiny, frames=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 16, frames, 8, 8, generator=generator)
    context = encode_prompts(tiny.tokenizer, tiny.text_encoder, ["a red circle moves right", "a blue square"])
    return latents, context


def test_equal_per_frame_timesteps_reproduce_the_scalar_path(tiny):
    latents, context = inputs(tiny)
    timesteps = torch.tensor([[700.0] * 3, [125.5] * 3])
    scalar = tiny.model.transformer(latents, timesteps[:, 0], context, return_dict=False)[0]
    per_frame = tiny.model.per_frame_forward(latents, timesteps, context)
    torch.testing.assert_close(per_frame, scalar, rtol=0, atol=1e-5)
    # Uniform timesteps are routed to diffusers' scalar forward: exactly equal.
    assert torch.equal(tiny.model(latents, timesteps, context), scalar)


def test_per_frame_path_matches_diffusers_per_token_path(tiny):
    latents, context = inputs(tiny, frames=5)
    timesteps = torch.tensor([[0.0, 200.0, 999.0, 500.0, 1.5], [1000.0, 0.0, 0.0, 300.0, 700.0]])
    tokens_per_frame = (8 // 2) * (8 // 2)
    native = tiny.model.transformer(
        latents, timesteps.repeat_interleave(tokens_per_frame, dim=1), context, return_dict=False
    )[0]
    ours = tiny.model(latents, timesteps, context)
    torch.testing.assert_close(ours, native, rtol=0, atol=1e-5)
    # and the timesteps matter: another frame order gives another output
    assert not torch.allclose(ours, tiny.model(latents, timesteps.flip(1), context), atol=1e-3)


def test_gradient_checkpointing_gives_the_same_output_and_gradients(tiny):
    latents, context = inputs(tiny)
    timesteps = torch.tensor([[10.0, 500.0, 900.0], [300.0, 300.0, 20.0]])
    model = tiny.model
    weight = model.transformer.blocks[0].attn1.to_q.weight
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.transformer.enable_gradient_checkpointing()
        weight.requires_grad_(True)
        with torch.enable_grad():
            output = model.per_frame_forward(latents, timesteps, context)
            output.square().mean().backward()
        results.append((output.detach(), weight.grad.clone()))
        weight.grad = None
        weight.requires_grad_(False)
    model.transformer.disable_gradient_checkpointing()
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_timestep_shape_mismatch_is_an_error(tiny):
    latents, context = inputs(tiny)
    with pytest.raises(ValueError, match="do not match"):
        tiny.model(latents, torch.zeros(2, 4), context)


class FixedSigmaScheduler(FlowMatchEulerDiscreteScheduler):
    """diffusers' Euler flow scheduler on Pusa's schedule (linspace(1, 0, N+1)[:-1], then shifted)."""

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        base = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]
        super().set_timesteps(sigmas=base.tolist(), device=device)


@pytest.fixture(scope="module")
def diffusers_pipeline(tiny):
    return WanPipeline(
        tokenizer=tiny.tokenizer,
        text_encoder=tiny.text_encoder,
        vae=tiny.codec.vae,
        scheduler=FixedSigmaScheduler(shift=5.0),
        transformer=tiny.model.transformer,
    )


def test_prompt_embeddings_equal_diffusers(tiny, diffusers_pipeline):
    prompts = ["a red  circle <b>moves</b> right ", "un cercle rouge"]
    ours = encode_prompts(tiny.tokenizer, tiny.text_encoder, prompts)
    theirs, _ = diffusers_pipeline.encode_prompt(
        prompts, do_classifier_free_guidance=False, max_sequence_length=512
    )
    assert ours.shape == (2, 512, 32)
    assert torch.equal(ours, theirs)
    assert torch.all(ours[0, 60:] == 0) and torch.all(ours[0, :30].abs().sum(-1) > 0)  # zero past the mask


def test_scheduler_sigmas_match_ours(diffusers_pipeline):
    scheduler = diffusers_pipeline.scheduler
    scheduler.set_timesteps(7)
    torch.testing.assert_close(scheduler.sigmas, sampling_sigmas(7, 5.0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_t2v_equals_diffusers_wan_pipeline(tiny, diffusers_pipeline, guidance):
    settings = default_settings(tiny, frames=9, height=32, width=48, steps=3, guidance=guidance, seed=11)
    ours = generate(tiny, "a red circle moves right", [], settings)
    theirs = diffusers_pipeline(
        prompt="a red circle moves right",
        negative_prompt=settings.negative_prompt,
        height=32,
        width=48,
        num_frames=9,
        num_inference_steps=3,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(11),
        output_type="latent",
    ).frames
    torch.testing.assert_close(ours.latents, theirs, rtol=1e-4, atol=1e-4)
    decoded = tiny.codec.decode(theirs)[0]
    torch.testing.assert_close(ours.video, decoded, rtol=1e-4, atol=1e-4)


def test_codec_normalisation_matches_diffusers_decode(tiny, diffusers_pipeline):
    latents = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    vae = tiny.codec.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        reference = vae.decode(latents / inverse_std + mean, return_dict=False)[0]
    assert torch.equal(tiny.codec.decode(latents), reference)
    pixels = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        mode = vae.encode(pixels).latent_dist.mode()
    assert torch.equal(tiny.codec.encode(pixels), (mode - mean) * inverse_std)


def test_trailing_segment_encoding(tiny):
    pixels = torch.rand(1, 3, 8, 32, 32) * 2 - 1
    trailing = tiny.codec.encode_segment(pixels, trailing=True)
    assert trailing.shape == (1, 16, 2, 4, 4)
    lead_in = torch.cat([pixels[:, :, :1], pixels], dim=2)
    assert torch.equal(trailing, tiny.codec.encode(lead_in)[:, :, 1:])


def test_model_directory_round_trip(tiny, tmp_path):
    save_model_dir(tiny, tmp_path / "model")
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        assert (tmp_path / "model" / part).exists()
    loaded = load_components(str(tmp_path / "model"), device="cpu")
    assert (loaded.spec.frames, loaded.spec.height, loaded.spec.width) == (9, 64, 64)
    settings = default_settings(tiny, steps=2, seed=3)
    a = generate(tiny, "a cat", [], settings)
    b = generate(loaded, "a cat", [], settings)
    assert torch.equal(a.latents, b.latents)
    # the service's advertised defaults (GET /v1/models) are what the loaded model samples with
    advertised = sampling_defaults(str(tmp_path / "model"))
    loaded_defaults = default_settings(loaded)
    for name in ("steps", "guidance", "shift", "schedule", "negative_prompt"):
        assert advertised[name] == getattr(loaded_defaults, name), name
    assert advertised["fps"] == loaded.spec.fps and advertised == sampling_defaults("tiny")
