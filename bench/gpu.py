"""The GPU check for the day a GPU is lent: one H100 or H200, 8 minutes, no network, random weights.

Rows, each with its wall time and peak GPU memory (`torch.cuda.max_memory_allocated`, reset
between rows), in the order they run:

  forward      bf16 forward of a Wan2.1-14B-shaped DiT (dim 5120, 40 heads x 128, ffn 13824,
               text_dim 4096, patch 1x2x2) at 832x480x81 (latents [1, 16, 21, 60, 104], 32760
               tokens, 512 text tokens), built with `--layers` of its 40 blocks; the time is also
               scaled to 40 layers by the FLOP ratio. Against the FLOP floor: the forward's matmul
               FLOPs (`forward_flops`) over the card's dense bf16 peak (`--peak-tflops`).
  vta          per-frame timesteps ([1, 21], all different) / scalar timestep forward time.
  sampler      `pusa_ray.sampler.sample`, `--steps` steps with CFG (guidance 3) over the same DiT on
               random prompt embeddings, step cache off and "first-block" (reused steps reported).
  attention    one forward per attention backend that runs (`models.speed.set_attention_backend`);
               refused ones are listed with their reason. They run before the compiled rows:
               `compile_blocks` changes the model for the rest of the process.
  compiled     the sampler again after `model.compile_blocks()`: the first call (which compiles)
               and the steady run apart, then with the step cache.
  train        one ZeRO-2 LoRA step (forward, backward, optimizer) of a 1.3B-shaped DiT, random
               weights, at `--train-video` (default 480p, 81 frames) in a single-process NCCL group,
               through the training job's own model, loss and DeepSpeed set-up.
  gpus         how many GPUs are visible (a multi-GPU row comes later).

A row that fails (out of memory, a missing package) shows its error and the next row runs; a row
that would start after `--budget-s` is skipped. The exit code is 0 only if no row failed.

The default of 10 layers keeps the whole run near 4-5 minutes on an H100 (a 10-layer forward is
about 1 s; five sampler runs of 10 CFG steps and a compile fit with room to spare); all 40 layers
fit in memory (28 GiB of bf16 weights) but not in the time.

    python bench/gpu.py [--layers 10] [--out out/gpu.json] [--peak-tflops 989]
    python bench/gpu.py --smoke     # the same code paths at a tiny shape, on any device (CPU: float32, gloo)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel

from pusa_ray.conditioning import ConditionPlan
from pusa_ray.config import PRESETS
from pusa_ray.data.latents import LatentRecord
from pusa_ray.errors import UserInputError
from pusa_ray.models.loading import cast_parameters
from pusa_ray.models.speed import attention_backends, set_attention_backend
from pusa_ray.models.vta import VTAWanTransformer
from pusa_ray.names import SCHEDULES
from pusa_ray.parallel_launch import free_port
from pusa_ray.sampler import guided_denoiser, initial_noise, sample
from pusa_ray.step_cache import make_cache
from pusa_ray.timesteps import frame_schedule, sigma_to_timestep
from pusa_ray.training.config import LoraSettings, TrainConfig
from pusa_ray.training.data import collate
from pusa_ray.training.model import build_training_model, trainable_parameters
from pusa_ray.training.objective import batch_loss

REPO = Path(__file__).resolve().parents[1]
WAN_14B = "wan2.1-t2v-14b"
WAN_1_3B = "wan2.1-t2v-1.3b"
FULL_VIDEO = "81x480x832"  # frames x height x width: Wan2.1's 480p clip
# Dense bf16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s), matched in order against
# torch.cuda.get_device_name: the H100 SXM and the H200 share the same chip clocks.
BF16_DENSE_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0))
# Backends that hold the [B, H, L, L] scores in memory (torch's math SDPA; flex attention, which
# diffusers calls without torch.compile): at 32760 tokens they need far more than the card holds.
MATERIALISING_BACKENDS = ("_native_math", "flex")
# Wan's VAE: 4x in time (plus the first frame), 8x in space, 16 channels.
TEMPORAL_FACTOR, SPATIAL_FACTOR, LATENT_CHANNELS = 4, 8, 16
SMOKE_DIT = {
    **PRESETS[WAN_14B].transformer,
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "ffn_dim": 128,
    "text_dim": 64,
    "num_layers": 2,
}

log = functools.partial(print, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# What to run


@dataclass(frozen=True)
class Plan:
    """Shapes, steps and device of one run, from the flags (`make_plan`)."""

    smoke: bool
    device: torch.device
    dtype: torch.dtype
    dit: dict[str, Any]  # WanTransformer3DModel config, with the layers that are built
    reference_layers: int  # the layers of the real model that times are scaled to
    video: tuple[int, int, int]  # frames, height, width
    text_tokens: int
    steps: int
    schedule: str
    repeats: int
    compile_skip: str | None  # why the compiled rows are skipped, or None
    train_base: str  # a preset: the trained DiT's shape
    train_video: tuple[int, int, int]
    lora_rank: int
    peak_tflops: float | None
    budget_s: float
    guidance: float = 3.0
    shift: float = 5.0

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        return latent_shape(self.video)


def latent_shape(video: tuple[int, int, int]) -> tuple[int, int, int, int, int]:
    """[1, C, F_lat, h, w] of Wan's VAE for a (frames, height, width) video."""
    frames, height, width = video
    return (
        1,
        LATENT_CHANNELS,
        (frames - 1) // TEMPORAL_FACTOR + 1,
        height // SPATIAL_FACTOR,
        width // SPATIAL_FACTOR,
    )


def parse_video(text: str) -> tuple[int, int, int]:
    """A video size flag, FRAMESxHEIGHTxWIDTH (e.g. 81x480x832): 4k+1 frames, sides multiples of 16."""
    try:
        frames, height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FRAMESxHEIGHTxWIDTH, e.g. 81x480x832") from None
    if frames < 1 or (frames - 1) % TEMPORAL_FACTOR or height <= 0 or width <= 0 or height % 16 or width % 16:
        raise argparse.ArgumentTypeError(f"{text!r}: frames must be 4k+1 and the sides multiples of 16")
    return frames, height, width


def bf16_peak_tflops(device: torch.device) -> float | None:
    """The card's dense bf16 peak, or None when the card is not in `BF16_DENSE_TFLOPS`."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for marker, tflops in BF16_DENSE_TFLOPS if marker in name), None)


def compile_skip_reason(requested: bool | None, device: torch.device) -> str | None:
    if requested is None:  # torch.compile takes ~30 s on a 2-core CPU: only asked for there
        return "cpu" if device.type == "cpu" else None
    return None if requested else "--no-compile"


def make_plan(args: argparse.Namespace) -> Plan:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke
    dit = dict(SMOKE_DIT) if smoke else dict(PRESETS[WAN_14B].transformer)
    reference_layers = dit["num_layers"]
    dit["num_layers"] = args.layers or (reference_layers if smoke else 10)
    if dit["num_layers"] > reference_layers:
        raise UserInputError(f"--layers {dit['num_layers']}: the model has {reference_layers}")
    return Plan(
        smoke=smoke,
        device=device,
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        dit=dit,
        reference_layers=reference_layers,
        video=args.video or parse_video("9x64x64" if smoke else FULL_VIDEO),
        text_tokens=16 if smoke else PRESETS[WAN_14B].text_length,
        steps=args.steps or (2 if smoke else 10),
        schedule=args.schedule,
        repeats=args.repeats or (2 if smoke else 3),
        compile_skip=compile_skip_reason(args.compile, device),
        train_base="tiny" if smoke else WAN_1_3B,
        train_video=args.train_video or parse_video("9x32x32" if smoke else FULL_VIDEO),
        lora_rank=args.lora_rank or (4 if smoke else LoraSettings().rank),
        peak_tflops=args.peak_tflops or bf16_peak_tflops(device),
        budget_s=args.budget_s,
    )


# ----------------------------------------------------------------------------------------------
# FLOPs


def forward_flops(
    config: Mapping[str, Any], latents: Sequence[int], text_tokens: int, timesteps_per_row: int = 1
) -> int:
    """Matmul FLOPs (2 per multiply-add) of one DiT forward on latents `[B, C, F, H, W]`.

    Per block: self-attention Q, K, V, O projections and its scores and values over the L video
    tokens; cross-attention Q, O on the video tokens, K, V on the text tokens and its scores and
    values; the two FFN linears. Once per forward: the patch embedding, the text embedder (two
    linears on the text tokens), the time embedder and projection, and the output head. Norms,
    RoPE, softmax and the modulation are elementwise and left out.
    """
    batch, channels, frames, height, width = latents
    patch_t, patch_h, patch_w = config["patch_size"]
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    tokens = (frames // patch_t) * (height // patch_h) * (width // patch_w)
    patch = patch_t * patch_h * patch_w
    self_attention = 4 * 2 * tokens * dim**2 + 2 * 2 * tokens**2 * dim
    cross_attention = (
        2 * 2 * tokens * dim**2 + 2 * 2 * text_tokens * dim**2 + 2 * 2 * tokens * text_tokens * dim
    )
    ffn = 2 * 2 * tokens * dim * config["ffn_dim"]
    block = self_attention + cross_attention + ffn
    embeddings = (
        2 * tokens * channels * patch * dim  # patch embedding (a strided Conv3d)
        + 2 * text_tokens * (config["text_dim"] * dim + dim * dim)  # text embedder
        + 2 * timesteps_per_row * (config["freq_dim"] * dim + dim * dim + dim * 6 * dim)  # time
        + 2 * tokens * dim * config["out_channels"] * patch  # output head
    )
    return batch * (config["num_layers"] * block + embeddings)


def reference_flops() -> int:
    """FLOPs of the Wan2.1-14B forward at 832x480x81 (batch 1, scalar timestep)."""
    return forward_flops(PRESETS[WAN_14B].transformer, latent_shape(parse_video(FULL_VIDEO)), 512)


# ----------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call, the device's queue drained on both sides."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def median_time(function: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    function()
    return statistics.median(timed(function, device)[0] for _ in range(repeats))


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# The rows


@dataclass
class Result:
    """What a row measured: its wall time, one line for the table and numbers for the JSON."""

    wall_s: float | None
    detail: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    name: str
    status: str  # "ok", "refused", "error" or "skipped (why)"
    wall_s: float | None = None
    peak_gib: float | None = None
    detail: str = ""
    values: dict[str, Any] = field(default_factory=dict)


class Skipped(Exception):
    """The row does not apply in this run; the message says why."""


class Refused(Exception):
    """The thing measured does not run here (an attention backend); not a failure of the check."""


@dataclass
class Bench:
    """The state the rows share: the DiT, its inputs, and times that later rows compare with."""

    plan: Plan
    model: VTAWanTransformer | None = None
    build_error: str | None = None
    build_s: float = 0.0
    forward_s: float | None = None  # the forward row's time: the attention rows' baseline
    sampler_s: float | None = None  # the uncached eager sampler run: the other runs' baseline
    compiled: bool = False  # `compile_blocks` has been applied
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def dit(self) -> VTAWanTransformer:
        """The benchmarked DiT, built on first use (a failed build fails every row that needs it)."""
        if self.model is None and self.build_error is None:
            try:
                self.build_s, self.model = timed(lambda: build_dit(self.plan), self.plan.device)
            except Exception as error:
                self.build_error = describe_error(error)
            if self.model is None:
                free_memory(self.plan.device)
        if self.model is None:
            raise RuntimeError(f"the DiT could not be built: {self.build_error}")
        if not self.inputs:
            self.inputs = make_inputs(self.plan)
        return self.model

    def release(self) -> None:
        self.model, self.inputs = None, {}
        if self.compiled:
            torch.compiler.reset()  # compiled graphs may hold the blocks' weights
        free_memory(self.plan.device)


def build_dit(plan: Plan) -> VTAWanTransformer:
    """A random DiT of `plan.dit`, created on the device in its dtype (no float32 copy of 14B-sized
    weights), with diffusers' fp32 modules cast back to float32 as a loaded checkpoint has them."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(plan.dtype)
    try:
        with torch.device(plan.device):
            transformer = WanTransformer3DModel(**plan.dit)
    finally:
        torch.set_default_dtype(default)
    transformer = cast_parameters(transformer, plan.dtype).eval().requires_grad_(False)
    return VTAWanTransformer(transformer)


def make_inputs(plan: Plan) -> dict[str, torch.Tensor]:
    """Noise `[1, C, F, h, w]` and random prompt embeddings `[1, L_text, text_dim]`, seeded."""
    generator = torch.Generator().manual_seed(1)
    text = (1, plan.text_tokens, plan.dit["text_dim"])
    return {
        "noise": initial_noise(plan.latent_shape, 0).to(plan.device),
        "context": torch.randn(text, generator=generator).to(plan.device, plan.dtype),
        "negative": torch.randn(text, generator=generator).to(plan.device, plan.dtype),
    }


def scalar_timestep(plan: Plan) -> torch.Tensor:
    return torch.tensor([500.0], device=plan.device)  # [B]


def frame_timesteps(plan: Plan) -> torch.Tensor:
    frames = plan.latent_shape[2]
    return torch.linspace(999.0, 100.0, frames, device=plan.device)[None]  # [B, F], all different


def describe_dit(plan: Plan) -> str:
    _, _, frames, height, width = plan.latent_shape
    tokens = frames * (height // 2) * (width // 2)
    return f"{plan.dit['num_layers']} of {plan.reference_layers} layers, {tokens} tokens"


def forward_row(bench: Bench) -> Result:
    plan = bench.plan
    model, inputs = bench.dit(), bench.inputs
    timestep = scalar_timestep(plan)
    with torch.no_grad():
        seconds = median_time(
            lambda: model(inputs["noise"], timestep, inputs["context"]), plan.repeats, plan.device
        )
    bench.forward_s = seconds
    flops = forward_flops(plan.dit, plan.latent_shape, plan.text_tokens)
    whole = forward_flops(
        {**plan.dit, "num_layers": plan.reference_layers}, plan.latent_shape, plan.text_tokens
    )
    achieved = flops / seconds / 1e12
    scaled = seconds * whole / flops
    values = {
        "layers": plan.dit["num_layers"],
        "flops": flops,
        "flops_all_layers": whole,
        "achieved_tflops": achieved,
        "scaled_all_layers_s": scaled,
        "build_s": bench.build_s,
    }
    detail = (
        f"{describe_dit(plan)}; {achieved:.3g} TFLOP/s; {plan.reference_layers} layers "
        f"~ {scaled:.3g} s (time x FLOP ratio, {whole / 1e12:.4g} TFLOP)"
    )
    if plan.peak_tflops:
        floor = whole / (plan.peak_tflops * 1e12)
        values.update(
            peak_tflops=plan.peak_tflops, fraction_of_peak=achieved / plan.peak_tflops, floor_s=floor
        )
        fraction = achieved / plan.peak_tflops
        detail += f"; {fraction:.2f} of the {plan.peak_tflops:.0f} TFLOP/s peak, floor {floor:.3g} s"
    else:
        detail += "; no bf16 peak known for this device (--peak-tflops)"
    return Result(seconds, detail, values)


def vta_row(bench: Bench) -> Result:
    plan = bench.plan
    model, inputs = bench.dit(), bench.inputs
    calls = {
        "scalar": functools.partial(model, inputs["noise"], scalar_timestep(plan), inputs["context"]),
        "per_frame": functools.partial(model, inputs["noise"], frame_timesteps(plan), inputs["context"]),
    }
    peaks, times = {}, {name: [] for name in calls}
    with torch.no_grad():
        for name, call in calls.items():  # warm-up, and each variant's own peak
            reset_peak(plan.device)
            call()
            peaks[name] = peak_gib(plan.device)
        for _ in range(plan.repeats):  # in alternation, so drift hits both alike
            for name, call in calls.items():
                times[name].append(timed(call, plan.device)[0])
    scalar, per_frame = (statistics.median(times[name]) for name in calls)
    values = {"scalar_s": scalar, "per_frame_s": per_frame, "ratio": per_frame / scalar}
    detail = f"per-frame {per_frame:.3g} s / scalar {scalar:.3g} s = {per_frame / scalar:.3f} (goal <= 1.03)"
    if plan.device.type == "cuda":
        values.update(scalar_peak_gib=peaks["scalar"], per_frame_peak_gib=peaks["per_frame"])
        detail += f"; peak {peaks['per_frame']:.2f} vs {peaks['scalar']:.2f} GiB"
    return Result(per_frame, detail, values)


def run_sampler(bench: Bench, cache: bool, warm_up: bool = False) -> tuple[float, int]:
    """(seconds, reused steps) of one guided `sample` over the DiT, after one untimed guided call
    if `warm_up` (the first call at the [cond, uncond] batch shape picks kernels and grows the pool)."""
    plan = bench.plan
    model, inputs = bench.dit(), bench.inputs
    step_cache = make_cache("first-block") if cache else None
    denoiser_model = model if step_cache is None else functools.partial(model, cache=step_cache)
    denoiser = guided_denoiser(denoiser_model, inputs["context"], inputs["negative"], plan.guidance)
    sigmas = frame_schedule(plan.steps, plan.shift, plan.latent_shape[2], plan.schedule)  # [N+1, F]
    with torch.no_grad():
        if warm_up:
            warm = guided_denoiser(model, inputs["context"], inputs["negative"], plan.guidance)
            warm(inputs["noise"], sigma_to_timestep(sigmas[:1]))  # [1, F]
        seconds, _ = timed(lambda: sample(denoiser, inputs["noise"], ConditionPlan(), sigmas), plan.device)
    return seconds, step_cache.reused if step_cache is not None else 0


def describe_sampler(plan: Plan) -> str:
    return f"{plan.steps} steps, CFG {plan.guidance:g}, {plan.schedule}, {describe_dit(plan)}"


def sampler_row(bench: Bench, cache: bool, compiled: bool = False) -> Result:
    plan = bench.plan
    if compiled and plan.compile_skip:
        raise Skipped(plan.compile_skip)
    values: dict[str, Any] = {}
    if compiled and not bench.compiled:
        bench.dit().compile_blocks()
        bench.compiled = True
        values["first_call_s"], _ = run_sampler(bench, cache)  # this call compiles
    seconds, reused = run_sampler(bench, cache, warm_up=not compiled and not cache)
    values.update(steps=plan.steps, reused_steps=reused)
    baseline = bench.sampler_s
    if not cache and not compiled:
        bench.sampler_s = seconds
    parts = [describe_sampler(plan)]
    if "first_call_s" in values:
        values["compile_s"] = values["first_call_s"] - seconds
        parts.append(f"first call {values['first_call_s']:.3g} s: compile ~ {values['compile_s']:.3g} s")
    if cache:
        parts.append(f"reused {reused} of {plan.steps} steps")
    if baseline is not None:
        values["vs_uncached_eager"] = seconds / baseline
        parts.append(f"{seconds / baseline:.3f} of the uncached eager run")
    return Result(seconds, "; ".join(parts), values)


def attention_row(bench: Bench, backend: str) -> Result:
    plan = bench.plan
    model, inputs = bench.dit(), bench.inputs
    if backend in MATERIALISING_BACKENDS and plan.device.type == "cuda":
        batch, _, frames, height, width = plan.latent_shape
        tokens = frames * (height // 2) * (width // 2)
        heads = plan.dit["num_attention_heads"]
        scores = 2 * batch * heads * tokens**2 * plan.dtype.itemsize  # the scores and their softmax
        if scores > torch.cuda.mem_get_info(plan.device)[0]:
            raise Skipped(f"its L x L scores need ~{scores / 2**30:.0f} GiB")
    try:
        set_attention_backend(model, backend, plan.device)
    except UserInputError as error:
        raise Refused(str(error).partition("): ")[2] or str(error)) from None  # the device is in the caption
    try:
        timestep = scalar_timestep(plan)
        with torch.no_grad():
            seconds = median_time(lambda: model(inputs["noise"], timestep, inputs["context"]), 1, plan.device)
    finally:
        # reset_attention_backend would leave diffusers' process-wide active backend at this one
        model.transformer.set_attention_backend("native")
    values: dict[str, Any] = {"backend": backend}
    detail = f"one forward, {describe_dit(plan)}"
    if bench.forward_s:
        values["vs_default"] = seconds / bench.forward_s
        detail += f"; {seconds / bench.forward_s:.3f} of the default backend's"
    return Result(seconds, detail, values)


# ----------------------------------------------------------------------------------------------
# The training step


@contextlib.contextmanager
def single_process_group(backend: str, device: torch.device) -> Iterator[None]:
    """A torch.distributed group of one rank on this host (what a 1-worker Ray Train job has)."""
    import torch.distributed as dist

    settings = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0"}
    settings.update(WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def train_config(plan: Plan) -> TrainConfig:
    """The job's config for a random-weight LoRA run of `plan.train_base` (no data is read)."""
    return TrainConfig.model_validate(
        {
            "latents": "unused",
            "model": {"base": plan.train_base, "init": "random"},
            "lora": {"rank": plan.lora_rank, "alpha": float(plan.lora_rank)},
            "run": {"name": "bench-gpu", "storage_path": str(REPO / "out" / "bench-gpu")},
        }
    )


def random_batch(plan: Plan, config: TrainConfig) -> Any:
    """One batch of random latents and prompt embeddings, noised by the job's own `collate`."""
    generator = torch.Generator().manual_seed(2)
    text_dim = PRESETS[plan.train_base].transformer["text_dim"]
    record = LatentRecord(
        key="random",
        uri="",
        caption="",
        start=0.0,
        latents=torch.randn(latent_shape(plan.train_video)[1:], generator=generator),  # [C, F, h, w]
        context=torch.randn(plan.text_tokens, text_dim, generator=generator),  # [L_text, D]
        context_length=plan.text_tokens,
    )
    return collate([record], [3], config.timesteps).to(plan.device)


def train_step(engine: Any, batch: Any) -> float:
    """Forward, backward and optimizer step as the job's `_train_step` does them; the loss."""
    loss = batch_loss(engine, batch)
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


def train_row(bench: Bench) -> Result:
    plan = bench.plan
    bench.release()  # the card to the training step
    from pusa_ray.distributed.train import initialize_engine  # imports Ray and DeepSpeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    config = train_config(plan)
    bf16 = plan.dtype == torch.bfloat16
    with single_process_group("nccl" if plan.device.type == "cuda" else "gloo", plan.device):
        built_s, model = timed(lambda: build_training_model(config, plan.dtype), plan.device)
        engine = initialize_engine(config, model.to(plan.device), world_size=1, bf16=bf16)
        batch = random_batch(plan, config)
        first, _ = timed(lambda: train_step(engine, batch), plan.device)  # allocates the optimizer state
        seconds, loss = timed(lambda: train_step(engine, batch), plan.device)
        values = {
            "first_step_s": first,
            "build_s": built_s,
            "loss": loss,
            "trainable_params": sum(p.numel() for p in trainable_parameters(model)),
            "zero_stage": engine.zero_optimization_stage(),
            "latents": list(latent_shape(plan.train_video)),
        }
    frames, height, width = plan.train_video
    detail = (
        f"{plan.train_base} random, LoRA rank {plan.lora_rank} ({values['trainable_params'] / 1e6:.4g}M "
        f"trainable), ZeRO-{values['zero_stage']} {'bf16' if bf16 else 'fp32'}, {width}x{height}x{frames}; "
        f"first step {first:.3g} s, loss {loss:.3f}"
    )
    return Result(seconds, detail, values)


def gpus_row(bench: Bench) -> Result:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = [torch.cuda.get_device_name(index) for index in range(count)]
    detail = f"{count} visible" + (f" ({', '.join(sorted(set(names)))})" if names else "")
    if count > 1:
        detail += ": a multi-GPU row comes later"
    return Result(None, detail, {"count": count, "names": names})


def rows_to_run() -> list[tuple[str, Callable[[Bench], Result]]]:
    steps: list[tuple[str, Callable[[Bench], Result]]] = [
        ("forward", forward_row),
        ("vta", vta_row),
        ("sampler, cache off", functools.partial(sampler_row, cache=False)),
        ("sampler, first-block cache", functools.partial(sampler_row, cache=True)),
    ]
    steps += [
        (f"attention {name}", functools.partial(attention_row, backend=name)) for name in attention_backends()
    ]
    steps += [
        ("sampler compiled, cache off", functools.partial(sampler_row, cache=False, compiled=True)),
        ("sampler compiled, first-block cache", functools.partial(sampler_row, cache=True, compiled=True)),
        ("train ZeRO-2 LoRA step", train_row),
        ("gpus", gpus_row),
    ]
    return steps


# ----------------------------------------------------------------------------------------------
# Running and reporting


def describe_error(error: BaseException) -> str:
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0][:300]}" if message else type(error).__name__


def run_row(bench: Bench, name: str, function: Callable[[Bench], Result]) -> Row:
    """One row, its failure caught: the next row runs whatever happened here."""
    device = bench.plan.device
    reset_peak(device)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # libraries' prints: stdout is for the table
            result = function(bench)
    except Skipped as skipped:
        return Row(name, f"skipped ({skipped})")
    except Refused as refused:
        return Row(name, "refused", detail=str(refused))
    except Exception as error:
        failure = describe_error(error)
    else:
        return Row(name, "ok", result.wall_s, peak_gib(device), result.detail, result.values)
    peak = peak_gib(device)
    free_memory(device)  # after the except block: its traceback held the failed row's tensors
    return Row(name, "error", peak_gib=peak, detail=failure)


def run_all(bench: Bench, steps: Sequence[tuple[str, Callable[[Bench], Result]]]) -> list[Row]:
    started = time.perf_counter()
    rows = []
    for name, function in steps:
        if time.perf_counter() - started > bench.plan.budget_s:
            row = Row(name, "skipped (budget)")
        else:
            row = run_row(bench, name, function)
        wall = f" {row.wall_s:.3g} s" if row.wall_s is not None else ""
        log(f"[{time.perf_counter() - started:6.1f} s] {name}: {row.status}{wall}")
        rows.append(row)
    return rows


def caption(plan: Plan) -> str:
    device = torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else "cpu"
    frames, height, width = plan.video
    mode = "smoke, " if plan.smoke else ""
    dtype = str(plan.dtype).removeprefix("torch.")
    return (
        f"bench/gpu.py ({mode}{device}, torch {torch.__version__}, {dtype}): "
        f"{width}x{height}x{frames}, latents {list(plan.latent_shape)}, {plan.text_tokens} text tokens"
    )


def markdown(plan: Plan, rows: Sequence[Row]) -> str:
    lines = [
        caption(plan),
        "",
        "| row | status | wall | peak GPU mem | detail |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        wall = f"{row.wall_s:.3g} s" if row.wall_s is not None else "-"
        peak = f"{row.peak_gib:.2f} GiB" if row.peak_gib is not None else "-"
        detail = row.detail.replace("|", "/")
        lines.append(f"| {row.name} | {row.status} | {wall} | {peak} | {detail} |")
    return "\n".join(lines)


def report(plan: Plan, rows: Sequence[Row], wall_s: float, exit_code: int) -> dict[str, Any]:
    return {
        "caption": caption(plan),
        "smoke": plan.smoke,
        "device": str(plan.device),
        "device_name": torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(plan.dtype).removeprefix("torch."),
        "dit": plan.dit,
        "reference_layers": plan.reference_layers,
        "latent_shape": list(plan.latent_shape),
        "text_tokens": plan.text_tokens,
        "peak_tflops": plan.peak_tflops,
        "budget_s": plan.budget_s,
        "reference_flops": {
            "model": WAN_14B,
            "video": FULL_VIDEO,
            "text_tokens": 512,
            "forward": reference_flops(),
        },
        "rows": [dataclasses.asdict(row) for row in rows],
        "wall_s": wall_s,
        "exit_code": exit_code,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device (CPU: float32, gloo)")
    parser.add_argument(
        "--out", type=Path, help="the JSON report (default out/gpu.json; --smoke: out/gpu-smoke.json)"
    )
    parser.add_argument("--layers", type=int, help="DiT blocks to build (default 10 of 40; --smoke 2)")
    parser.add_argument("--video", type=parse_video, help=f"FRAMESxHEIGHTxWIDTH (default {FULL_VIDEO})")
    parser.add_argument("--steps", type=int, help="sampler steps (default 10; --smoke 2)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="sync", help="the sampler's frame schedule")
    parser.add_argument("--repeats", type=int, help="timed forwards per measurement (default 3; --smoke 2)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="the compiled rows (default: on, off on a CPU)",
    )
    parser.add_argument(
        "--train-video", type=parse_video, help=f"the training step's clip (default {FULL_VIDEO})"
    )
    parser.add_argument("--lora-rank", type=int, help="default: the recipe's 512 (--smoke 4)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak (default: from the device name)")
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="rows that would start later are skipped"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: the full check needs a GPU (--smoke runs anywhere)")
    try:
        plan = make_plan(args)
    except UserInputError as error:
        parser.error(str(error))
    if plan.device.type == "cpu" and (REPO / ".venv").is_dir():
        # DeepSpeed JIT-builds a CPU comm op (~40 s): share the build cache the tests use
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    logging.getLogger("diffusers").setLevel(logging.ERROR)  # "attention backends are experimental", per call
    log(caption(plan))
    rows = run_all(Bench(plan), rows_to_run())
    exit_code = 1 if any(row.status == "error" for row in rows) else 0
    out = args.out or REPO / "out" / ("gpu-smoke.json" if plan.smoke else "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    wall_s = time.perf_counter() - started
    out.write_text(json.dumps(report(plan, rows, wall_s, exit_code), indent=1))
    print(markdown(plan, rows))
    log(f"{wall_s:.1f} s after imports; wrote {out}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
