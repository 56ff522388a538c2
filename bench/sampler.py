"""Sampler benchmarks, printed side by side as ratios from one run (CPU figures mean nothing alone).

(a) our denoise loop / the same DiT forwards timed bare             (tiny preset; goal <= 1.05)
(b) our T2V pipeline / diffusers' WanPipeline, same weights & steps (tiny preset; goal <= 1.0)
(c) VTA per-frame forward / scalar forward at equal shapes          (4 layers, dim 512; goal <= 1.03)
    plus diffusers' per-token path, and the peak memory of each forward.

    python bench/sampler.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

from pusa_ray.conditioning import ConditionPlan
from pusa_ray.models.loading import load_components
from pusa_ray.models.text import encode_prompts
from pusa_ray.models.vta import VTAWanTransformer
from pusa_ray.pipeline import default_settings, generate
from pusa_ray.sampler import guided_denoiser, initial_noise, sample
from pusa_ray.timesteps import frame_schedule, sampling_sigmas, sigma_to_timestep

MID_CONFIG = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 4,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 512,
    "freq_dim": 256,
    "ffn_dim": 1536,
    "num_layers": 4,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
}
MID_LATENT = (1, 16, 6, 16, 24)  # 6 frames of 8 x 12 patches = 576 tokens


def median_time(function: Callable[[], object], repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in alternation so drift hits all alike."""
    for function in functions.values():
        function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


class FixedSigmaScheduler(FlowMatchEulerDiscreteScheduler):
    """diffusers' Euler flow scheduler on Pusa's sigma schedule."""

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        base = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]
        super().set_timesteps(sigmas=base.tolist(), device=device)


@torch.no_grad()
def bench_loop_and_pipeline(repeats: int) -> None:
    tiny = load_components("tiny", device="cpu")
    steps, guidance = 4, 3.0
    settings = default_settings(tiny, frames=9, height=32, width=32, steps=steps, guidance=guidance)
    prompts = [settings.negative_prompt]
    context = encode_prompts(tiny.tokenizer, tiny.text_encoder, ["a red circle moves right"])
    negative = encode_prompts(tiny.tokenizer, tiny.text_encoder, prompts)
    noise = initial_noise((1, *tiny.codec.latent_shape(9, 32, 32)), 0)
    sigmas = sampling_sigmas(steps, 5.0)
    denoiser = guided_denoiser(tiny.model, context, negative, guidance)

    batch_latents = torch.cat([noise, noise])
    batch_context = torch.cat([context, negative])
    timesteps = [sigma_to_timestep(sigmas[i].expand(2, noise.shape[2])) for i in range(steps)]

    def bare() -> None:
        for t in timesteps:
            tiny.model(batch_latents, t, batch_context)

    def loop() -> None:
        sample(denoiser, noise, ConditionPlan(), sigmas)

    lead_table = frame_schedule(steps, 5.0, noise.shape[2], "lead")

    def lead() -> None:
        sample(denoiser, noise, ConditionPlan(), lead_table)

    pipeline = WanPipeline(
        tokenizer=tiny.tokenizer,
        text_encoder=tiny.text_encoder,
        vae=tiny.codec.vae,
        scheduler=FixedSigmaScheduler(shift=5.0),
        transformer=tiny.model.transformer,
    )
    pipeline.set_progress_bar_config(disable=True)

    def ours() -> None:
        generate(tiny, "a red circle moves right", [], settings)

    def theirs() -> None:
        pipeline(
            prompt="a red circle moves right",
            negative_prompt=settings.negative_prompt,
            height=32,
            width=32,
            num_frames=9,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        )

    loop_times = interleaved({"loop": loop, "lead": lead, "bare": bare}, repeats * 3)
    pipe_times = interleaved({"ours": ours, "diffusers": theirs}, repeats)
    loop_ms, bare_ms, lead_ms = loop_times["loop"] * 1e3, loop_times["bare"] * 1e3, loop_times["lead"] * 1e3
    ours_ms, theirs_ms = pipe_times["ours"] * 1e3, pipe_times["diffusers"] * 1e3
    print(
        f"(a) denoise loop {loop_ms:.1f} ms / bare forwards {bare_ms:.1f} ms = {loop_ms / bare_ms:.3f}"
        f"   (tiny, 9x32x32, {steps} steps, CFG; goal <= 1.05)"
    )
    print(f"    the lead schedule's loop {lead_ms:.1f} ms / bare forwards = {lead_ms / bare_ms:.3f}")
    print(
        f"(b) our T2V {ours_ms:.1f} ms / diffusers WanPipeline {theirs_ms:.1f} ms = {ours_ms / theirs_ms:.3f}"
        "   (same weights, size, steps, CFG; goal <= 1.0)"
    )


def mid_model() -> tuple[VTAWanTransformer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = VTAWanTransformer(WanTransformer3DModel(**MID_CONFIG).eval().requires_grad_(False))
    latents = torch.randn(MID_LATENT)
    context = torch.randn(1, 512, MID_CONFIG["text_dim"])
    return model, latents, context


def forwards(model: VTAWanTransformer, latents: torch.Tensor, context: torch.Tensor) -> dict[str, Callable]:
    frames = latents.shape[2]
    tokens_per_frame = (latents.shape[3] // 2) * (latents.shape[4] // 2)
    scalar_t = torch.tensor([500.0])
    frame_t = torch.linspace(0, 1000, frames)[None]  # [1, F], all different
    token_t = frame_t.repeat_interleave(tokens_per_frame, dim=1)  # [1, L]
    return {
        "scalar": lambda: model.transformer(latents, scalar_t, context, return_dict=False),
        "vta": lambda: model(latents, frame_t, context),
        "per-token": lambda: model.transformer(latents, token_t, context, return_dict=False),
    }


def peak_memory_of(variant: str) -> float:
    """Peak RSS growth (MiB) of one forward, measured in a fresh process."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # large buffers mmapped: RSS tracks frees
    done = subprocess.run(
        [sys.executable, __file__, "--memory-probe", variant],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


@torch.no_grad()
def memory_probe(variant: str) -> None:
    model, latents, context = mid_model()
    forward = forwards(model, latents, context)[variant]
    forward()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak RSS mark
    base = _status_kib("VmRSS")
    forward()
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - base) / 1024}))


@torch.no_grad()
def bench_vta_forward(repeats: int) -> None:
    model, latents, context = mid_model()
    times = interleaved(forwards(model, latents, context), repeats)
    memory = {name: peak_memory_of(name) for name in times}
    tokens = latents.shape[2] * (latents.shape[3] // 2) * (latents.shape[4] // 2)
    print(f"(c) mid-size DiT (4 layers, dim 512, {tokens} tokens), one forward:")
    for name in times:
        print(
            f"      {name:9s} {times[name] * 1e3:7.1f} ms  ratio {times[name] / times['scalar']:.3f}"
            f"   peak +{memory[name]:.1f} MiB"
        )
    print(f"    VTA / scalar = {times['vta'] / times['scalar']:.3f} (goal <= 1.03)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args.memory_probe)
        return
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} interleaved runs")
    bench_loop_and_pipeline(args.repeats)
    bench_vta_forward(args.repeats)


if __name__ == "__main__":
    main()
