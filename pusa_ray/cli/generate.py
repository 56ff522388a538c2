"""`pusa-ray generate`: one video on this machine, for any task."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pusa_ray.cli.flags import TASK_HELP, add_generation_flags, lora_pairs, parse_cond
from pusa_ray.errors import UserInputError
from pusa_ray.models.speed import SpeedSettings


def add_parser(commands: argparse._SubParsersAction) -> None:
    gen = commands.add_parser(
        "generate",
        help="generate a video for any Pusa task",
        epilog=TASK_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_generation_flags(gen)


def speed_settings(args: argparse.Namespace) -> SpeedSettings:
    """The speed and memory flags as the settings a service or batch job takes."""
    from pydantic import ValidationError

    try:
        return SpeedSettings(
            compile=args.compile,
            attention_backend=args.attention_backend,
            offload_text_encoder=args.offload_text_encoder,
            vae_tiling=args.vae_tiling,
        )
    except ValidationError as error:
        first = error.errors()[0]
        raise UserInputError(
            f"--{'-'.join(map(str, first['loc'])).replace('_', '-')}: {first['msg']}"
        ) from None


def run_generate(args: argparse.Namespace) -> None:
    if args.out.suffix.lower() != ".mp4":
        raise UserInputError(f"--out {str(args.out)!r} must end in .mp4")
    lora_pairs(args.lora, args.lora_alpha)
    speed_settings(args)
    if args.gpus == 1:
        _generate(args, args.device, None)
        return
    from pusa_ray import parallel_launch

    parallel_launch.check(args.model, args.gpus, args.device, args.cache)
    parallel_launch.launch(_rank_main, args.gpus, args.device, args)


def _rank_main(parallel: Any, device: str, args: argparse.Namespace) -> None:
    """One rank of a sequence-parallel `generate` (`parallel_launch.launch`); rank 0 writes."""
    _generate(args, device, parallel)


def _generate(args: argparse.Namespace, device: str | None, parallel: Any) -> None:
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from pusa_ray import video
    from pusa_ray.models.loading import apply_adapters, load_components
    from pusa_ray.models.speed import apply_speed_settings
    from pusa_ray.pipeline import generate, settings_from
    from pusa_ray.tasks import TaskInputs, VideoShape, build_conditions

    writer = parallel is None or parallel.rank == 0
    components = load_components(args.model, device=device)
    apply_adapters(components, lora_pairs(args.lora, args.lora_alpha))
    apply_speed_settings(components, speed_settings(args))
    settings = settings_from(components, args)
    shape = VideoShape(settings.frames, settings.height, settings.width, components.codec.temporal_factor)
    inputs = TaskInputs(
        task=args.task,
        image=args.image,
        end_image=args.end_image,
        keyframes=tuple(parse_cond(text) for text in args.cond),
        video=args.video,
        end_video=args.end_video,
        cond_frames=args.cond_frames,
        end_frames=args.end_frames,
        noise=args.noise,
    )
    conditions = build_conditions(inputs, shape)
    with tqdm(
        total=settings.steps, desc="denoising", file=sys.stderr, disable=args.quiet or not writer
    ) as bar:
        result = generate(
            components,
            args.prompt,
            conditions,
            settings,
            progress=lambda done, total: bar.update(1),
            parallel=parallel,
        )
    if not writer:
        return
    fps = args.fps or components.spec.fps
    video.write_mp4(args.out, video.tensor_to_frames(result.video), fps)
    if args.save_latents:
        args.save_latents.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "model": components.model_id,
            "settings": json.dumps(settings.__dict__),
            "task": args.task,
        }
        save_file(
            {"latents": result.latents.to(torch.float32).contiguous()}, str(args.save_latents), metadata
        )
    cached = (
        f"; cache reused {result.reused_steps} of {settings.steps} steps" if settings.cache != "off" else ""
    )
    size = f"{settings.frames} frames, {settings.width}x{settings.height}, {fps:g} fps"
    print(f"wrote {args.out} ({size}{cached})")
