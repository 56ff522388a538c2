"""`pusa-ray preprocess|train|batch-generate` (the Ray jobs, with their own parsers),
`pusa-ray sample-data` (inputs for them) and `pusa-ray convert` (models and adapters)."""

from __future__ import annotations

import argparse
from pathlib import Path

# Distributed jobs keep their own argument parsers: `pusa-ray preprocess ...` runs them as they are.
DELEGATED = {
    "preprocess": ("pusa_ray.distributed.preprocess", "videos + captions -> latent dataset (Ray Data)"),
    "train": ("pusa_ray.distributed.train", "LoRA / full fine-tuning (Ray Train + DeepSpeed)"),
    "batch-generate": ("pusa_ray.distributed.batch", "many requests from JSONL through Ray Data actors"),
}


def add_parsers(commands: argparse._SubParsersAction) -> None:
    for name, (_module, summary) in DELEGATED.items():
        commands.add_parser(name, help=f"{summary}; see `pusa-ray {name} --help`", add_help=False)
    _add_sample_data(commands)
    _add_convert(commands)


def _add_sample_data(commands: argparse._SubParsersAction) -> None:
    sample = commands.add_parser(
        "sample-data",
        help="write captioned sample clips (the shapes world) for the preprocessing job",
        description=(
            "Captioned mp4 clips in every layout the preprocessing job reads: DIR (with DiffSynth's "
            "metadata.csv), DIR/manifest.jsonl, DIR/clips (.txt captions beside the videos); plus "
            "DIR/prompts.jsonl for the batch generation job. Seeded; a few seconds on a CPU."
        ),
    )
    sample.add_argument(
        "dir", type=Path, help="where to write (jobs/configs/*.tiny.yaml read /tmp/pusa-ray/raw)"
    )
    sample.add_argument("--count", type=int, default=32, help="good clips (default 32)")
    sample.add_argument("--frames", type=int, default=24, help="frames per clip (default 24)")
    sample.add_argument("--height", type=int, default=64)
    sample.add_argument("--width", type=int, default=64)
    sample.add_argument("--fps", type=float, default=16.0)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument(
        "--with-bad", action="store_true", help="add 4 broken inputs, reported in the job's errors.jsonl"
    )


def _add_convert(commands: argparse._SubParsersAction) -> None:
    conv = commands.add_parser(
        "convert",
        help="convert a model to our layout, or a LoRA adapter between formats",
        description=(
            "A model (preset, diffusers directory, original Wan2.1 release, local or s3://) becomes a "
            "diffusers-layout directory (s3:// destinations are committed with a manifest). An adapter "
            "file (.pt/.pth/.bin/.safetensors in any supported layout) becomes --to FORMAT."
        ),
    )
    conv.add_argument("source")
    conv.add_argument("destination")
    conv.add_argument(
        "--to", default="pusa-ray", help="adapter format: pusa-ray (default), pusa-pt, diffusers"
    )
    conv.add_argument("--base-model", help="model an adapter targets (recorded in the pusa-ray format)")


def run_delegated(argv: list[str]) -> int:
    import importlib

    return importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:])


def run_sample_data(args: argparse.Namespace) -> None:
    from pusa_ray.mini.sample_data import write_sample_data

    written = write_sample_data(
        args.dir, args.count, args.frames, args.height, args.width, args.fps, args.seed, args.with_bad
    )
    print(written.line())


def run_convert(args: argparse.Namespace) -> None:
    from pusa_ray.convert import convert_adapter, convert_model, is_adapter_file

    if is_adapter_file(args.source):
        written = convert_adapter(args.source, args.destination, args.to, args.base_model)
    else:
        written = convert_model(args.source, args.destination)
    print(f"wrote {written}")
