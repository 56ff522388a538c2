"""Evaluation: generate videos for a held-out set of shape clips with one or more models and score them.

    ray job submit --working-dir . -- python jobs/evaluate.py \\
        --model base=pusa-mini-base --model pusa-mini=pusa-mini --steps 2,5,10,20 --out out/eval

Plain Python (no Ray needed). For every model, task, step count and held-out clip one video is
generated through the same path as `pusa-ray generate` (load_components, apply_adapters,
build_conditions, generate) and scored with `pusa_ray.mini.metrics`: caption following from the
tracked object, first/end-frame fidelity to the condition images, first-frame jump, dynamic degree
and jitter. The held-out clips themselves are scored too, as the "ground-truth" row: what a
perfect model would get.

Tasks take their inputs from the held-out clip: t2v its caption; i2v also its frame 0 (as a PNG);
start-end its frame 0 and last frame. Noise multipliers are the task defaults (i2v 0.2, start-end
0.2,0.5). The generation seed of clip i is `--seed + i`, the same for every model, task and step
count, so models are compared on the same noise.

Writes to --out: results.jsonl (one row per model, task, steps and clip), summary.json (means per
model, task and steps) and summary.md (the same as tables). Bad input ends with one line on stderr
and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pusa_ray.errors import UserInputError
from pusa_ray.mini import metrics
from pusa_ray.mini.shapes import STARTS, ClipTruth, DomainSettings, read_truth, write_dataset
from pusa_ray.names import parse_cache

DEFAULT_MODELS = ("base=pusa-mini-base", "pusa-mini=pusa-mini")
TASKS = ("t2v", "i2v", "start-end")
HELDOUT_SEED = 10_000  # training sets use small seeds; this one is never trained on
HELDOUT_RECORD = "heldout.json"  # how this job generated a held-out set, so it can be extended
REFERENCE = "ground-truth"  # the held-out clips scored as if a model had made them


@dataclass(frozen=True)
class ModelEntry:
    """One `--model NAME=MODEL[,lora=PATH[:ALPHA]]...[,schedule=S]`."""

    name: str
    model: str
    adapters: tuple[tuple[str, float], ...] = ()
    schedule: str | None = None  # sync / lead for T2V; None: the model's default


@dataclass(frozen=True)
class HeldoutClip:
    """A held-out clip: its ground truth, decoded frames [F, H, W, 3] and the condition images."""

    index: int
    name: str
    truth: ClipTruth
    frames: np.ndarray
    first_image: Path
    last_image: Path


# (clip, task, steps) -> uint8 video [F, H, W, 3]
VideoSource = Callable[[HeldoutClip, str, "int | None"], np.ndarray]


def parse_model(text: str) -> ModelEntry:
    """NAME=MODEL[,lora=PATH[:ALPHA]]...[,schedule=S]; without NAME= the model names itself."""
    from pusa_ray.cli.flags import DEFAULT_LORA_ALPHA
    from pusa_ray.config import check_plain_name
    from pusa_ray.names import SCHEDULES as SCHEDULE_NAMES

    head, *options = text.split(",")
    name, separator, model = head.partition("=")
    if not separator:
        name, model = Path(head).name or head, head
    if not model:
        raise UserInputError(f"--model {text!r} names no model (NAME=MODEL[,lora=PATH[:ALPHA]])")
    check_plain_name(name, "--model name")
    adapters, schedule = [], None
    for option in options:
        key, _, value = option.partition("=")
        if key == "schedule" and value in SCHEDULE_NAMES:
            schedule = value
            continue
        if key != "lora" or not value:
            schedules = "|".join(SCHEDULE_NAMES)
            raise UserInputError(
                f"--model {text!r}: {option!r} is not lora=PATH[:ALPHA] or schedule={schedules}"
            )
        path, _, alpha = value.rpartition(":")
        try:
            adapters.append((path, float(alpha)) if path else (value, DEFAULT_LORA_ALPHA))
        except ValueError:  # a colon that belongs to the path, as in s3://...
            adapters.append((value, DEFAULT_LORA_ALPHA))
    return ModelEntry(name, model, tuple(adapters), schedule)


def parse_list(text: str, flag: str, allowed: Sequence[str] | None = None) -> tuple[str, ...]:
    items = tuple(part.strip() for part in text.split(",") if part.strip())
    if not items:
        raise UserInputError(f"{flag} {text!r} is empty")
    unknown = [item for item in items if allowed is not None and item not in allowed]
    if unknown:
        raise UserInputError(f"{flag}: unknown {unknown[0]!r} (known: {', '.join(allowed or ())})")
    return items


def parse_steps(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(part) for part in parse_list(text, "--steps"))
    except ValueError:
        raise UserInputError(f"--steps {text!r} is not a comma list of integers") from None
    if min(steps) < 1:
        raise UserInputError(f"--steps must be >= 1, got {text!r}")
    return steps


# --- the held-out set -----------------------------------------------------------------------------


def _read_record(directory: Path) -> dict | None:
    path = directory / HELDOUT_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def _settings_from(record: dict) -> DomainSettings:
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in record.items()}
    return DomainSettings(**values)


def ensure_heldout(directory: Path, count: int, settings: DomainSettings, seed: int) -> None:
    """Write the held-out set if `directory` has none, or extend one this job wrote; never touch others."""
    record = _read_record(directory)
    if (directory / "manifest.jsonl").is_file():
        have = len(read_truth(directory / "truth.jsonl"))
        if have >= count:
            return
        if record is None:
            raise UserInputError(
                f"held-out set {str(directory)!r} has {have} clips, fewer than --count {count}"
            )
        settings, seed = _settings_from(record["settings"]), int(record["seed"])
    print(f"writing {count} held-out clips to {directory} (seed {seed})", flush=True)
    write_dataset(directory, settings, count, seed)
    record_heldout(directory, settings, seed)


def record_heldout(directory: Path, settings: DomainSettings, seed: int) -> None:
    """Say how the set in `directory` was generated: what sizes the motion scores by, and how to extend it."""
    record = {"seed": seed, "settings": dataclasses.asdict(settings)}
    (directory / HELDOUT_RECORD).write_text(json.dumps(record, indent=1) + "\n")


def load_heldout(directory: Path, count: int, image_dir: Path) -> list[HeldoutClip]:
    """The first `count` clips, decoded, with frame 0 and the last frame written as PNGs to `image_dir`."""
    from PIL import Image

    from pusa_ray import video

    if not (directory / "manifest.jsonl").is_file():
        raise UserInputError(f"--heldout {str(directory)!r} has no manifest.jsonl")
    truths = list(read_truth(directory / "truth.jsonl").items())[:count]
    image_dir.mkdir(parents=True, exist_ok=True)
    clips = []
    for index, (name, truth) in enumerate(truths):
        frames, _fps = video.read_video(directory / name)
        if len(frames) != len(truth.centres):
            raise UserInputError(
                f"held-out clip {name!r} has {len(frames)} frames, its truth {len(truth.centres)}"
            )
        first, last = image_dir / f"{index:06d}_first.png", image_dir / f"{index:06d}_last.png"
        Image.fromarray(frames[0]).save(first)
        Image.fromarray(frames[-1]).save(last)
        clips.append(HeldoutClip(index, name, truth, frames, first, last))
    if len(clips) < count:
        raise UserInputError(
            f"held-out set {str(directory)!r} has {len(clips)} clips, fewer than --count {count}"
        )
    return clips


# --- generation -----------------------------------------------------------------------------------


def task_inputs(task: str, clip: HeldoutClip) -> Any:
    """The task's media from a held-out clip: nothing (t2v), frame 0 (i2v), frame 0 and last frame."""
    from pusa_ray.tasks import TaskInputs

    if task == "t2v":
        return TaskInputs(task="t2v")
    if task == "i2v":
        return TaskInputs(task="i2v", image=str(clip.first_image))
    return TaskInputs(task="start-end", image=str(clip.first_image), end_image=str(clip.last_image))


def pipeline_source(
    components: Any,
    seed: int,
    guidance: float | None,
    schedule: str | None = None,
    cache: str | None = None,
    reused: list[int] | None = None,
) -> VideoSource:
    """Generate with a loaded model at the held-out clip's size; clip i uses seed `seed + i`.
    `cache` is the step-cache setting (default: the model's); `reused` collects each video's
    reused steps."""
    from pusa_ray import video
    from pusa_ray.pipeline import default_settings, generate
    from pusa_ray.tasks import VideoShape, build_conditions

    def produce(clip: HeldoutClip, task: str, steps: int | None) -> np.ndarray:
        frames, height, width, _ = clip.frames.shape
        settings = default_settings(
            components,
            frames=frames,
            height=height,
            width=width,
            steps=steps,
            guidance=guidance,
            seed=seed + clip.index,
            schedule=schedule,
            cache=cache,
        )
        shape = VideoShape(frames, height, width, components.codec.temporal_factor)
        conditions = build_conditions(task_inputs(task, clip), shape)
        result = generate(components, clip.truth.caption, conditions, settings)
        if reused is not None:
            reused.append(result.reused_steps)
        return video.tensor_to_frames(result.video)

    return produce


def reference_source(clip: HeldoutClip, task: str, steps: int | None) -> np.ndarray:
    """A perfect model: the held-out clip itself."""
    return clip.frames


def model_sources(
    entries: Sequence[ModelEntry],
    steps: Sequence[int] | None,
    seed: int,
    guidance: float | None,
    device: str | None,
    cache: str | None = None,
) -> Iterator[tuple[str, VideoSource, tuple[int | None, ...]]]:
    """Load one model at a time (adapters merged): (name, source, step counts; default: the model's)."""
    import gc

    from pusa_ray.models.loading import apply_adapters, load_components
    from pusa_ray.pipeline import default_settings

    for entry in entries:
        print(f"loading {entry.name}: {entry.model} {list(entry.adapters) or ''}".rstrip(), flush=True)
        components = load_components(entry.model, device=device)
        apply_adapters(components, list(entry.adapters))
        yield (
            entry.name,
            pipeline_source(components, seed, guidance, entry.schedule, cache),
            tuple(steps or (default_settings(components).steps,)),
        )
        del components
        gc.collect()


# --- scoring --------------------------------------------------------------------------------------


def _number(value: float | None) -> float | None:
    """JSON-safe: NaN (nothing to measure) becomes None, inf PSNR the cap."""
    if value is None or math.isnan(value):
        return None
    return metrics.capped_psnr(value) if math.isinf(value) else float(value)


def score(clip: HeldoutClip, task: str, frames: np.ndarray, min_travel: float) -> dict[str, Any]:
    """Every metric of one generated video as a JSON-ready dict."""
    tracked = metrics.track(frames)
    caption = metrics.score_caption(tracked, clip.truth.caption, min_travel)
    truth_step = np.hypot(*np.subtract(clip.truth.centres[1], clip.truth.centres[0]))
    row: dict[str, Any] = {
        "caption_correct": caption.all_correct,
        "direction_correct": caption.direction_correct,
        "checks": caption.checks,
        "observed": caption.observed,
        "first_frame_jump": _number(metrics.first_frame_jump(tracked)),
        "truth_first_step": float(truth_step),
        "frame_difference": metrics.frame_difference(frames),
        "centroid_speed": _number(metrics.centroid_speed(tracked)),
        "centroid_jitter": _number(metrics.centroid_jitter(tracked)),
        "pixel_jitter": metrics.pixel_jitter(frames),
    }
    if task in ("i2v", "start-end"):
        first = metrics.first_frame_fidelity(frames, clip.frames[0])
        row["first_frame_psnr"], row["first_frame_ssim"] = _number(first.psnr), first.ssim
    if task == "start-end":
        end = metrics.end_frame_fidelity(frames, clip.frames[-1])
        row["end_frame_psnr"], row["end_frame_ssim"] = _number(end.psnr), end.ssim
    return row


def evaluate(
    sources: Iterable[tuple[str, VideoSource, Sequence[int | None]]],
    clips: Sequence[HeldoutClip],
    tasks: Sequence[str],
    min_travel: float,
    seed: int,
    results: Path,
) -> list[dict[str, Any]]:
    """Generate and score every (source, steps, task, clip); each row is also appended to `results`."""
    rows = []
    with results.open("w") as out:
        for name, source, step_counts in sources:
            for steps, task, clip in itertools.product(step_counts, tasks, clips):
                start = time.perf_counter()
                frames = source(clip, task, steps)
                seconds = time.perf_counter() - start
                row = {
                    "model": name,
                    "task": task,
                    "steps": steps,
                    "clip": clip.name,
                    "caption": clip.truth.caption,
                    "motion": clip.truth.motion,
                    "seed": None if name == REFERENCE else seed + clip.index,
                    "seconds": round(seconds, 4),
                    **score(clip, task, frames, min_travel),
                }
                out.write(json.dumps(row, allow_nan=False) + "\n")
                out.flush()
                rows.append(row)
                print(
                    f"{name} {task} steps={steps or '-'} [{clip.index + 1}/{len(clips)}] "
                    f"{clip.truth.caption!r}: caption {'ok' if row['caption_correct'] else 'missed'} "
                    f"({seconds:.2f}s)",
                    flush=True,
                )
    return rows


def _mean(values: Iterable[Any]) -> float | None:
    numbers = [float(value) for value in values if value is not None]
    return float(np.mean(numbers)) if numbers else None


SUMMARY_MEANS = (
    "first_frame_psnr",
    "first_frame_ssim",
    "end_frame_psnr",
    "end_frame_ssim",
    "first_frame_jump",
    "truth_first_step",
    "frame_difference",
    "centroid_speed",
    "centroid_jitter",
    "pixel_jitter",
    "seconds",
)


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Means per (model, task, steps), in the order the rows came."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["task"], row["steps"]), []).append(row)
    summary = []
    for (model, task, steps), group in groups.items():
        directional = [row["direction_correct"] for row in group if row["direction_correct"] is not None]
        entry = {
            "model": model,
            "task": task,
            "steps": steps,
            "n": len(group),
            "caption_accuracy": _mean(row["caption_correct"] for row in group),
            "direction_n": len(directional),
            "direction_accuracy": _mean(directional),
        }
        for attribute in ("colour", "shape"):
            entry[f"{attribute}_accuracy"] = _mean(row["checks"].get(attribute) for row in group)
        entry.update({key: _mean(row.get(key) for row in group) for key in SUMMARY_MEANS})
        summary.append(entry)
    return summary


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(summary: Sequence[dict[str, Any]], about: dict[str, Any]) -> str:
    """The summary as tables, with the held-out set, seeds and counts stated."""
    lines = [
        "# Evaluation on the held-out shapes set",
        "",
        f"- held-out set: `{about['heldout']}`, {about['count']} clips of {about['size']} "
        f"(frames x height x width), generator seed {about['heldout_seed']}",
        f"- generation seeds: clip i uses seed {about['seed']} + i (the same for every model, task and "
        f"step count); guidance {about['guidance']}; noise multipliers: task defaults; T2V schedule: "
        f"{_schedules(about)}",
        f"- direction needs a net displacement of at least {about['min_travel_px']:.1f} px; "
        f"PSNR of an exact copy is reported as {metrics.PSNR_CAP_DB:g} dB",
        "",
        "| model | task | steps | n | caption | direction (n) | colour | shape | first PSNR | first SSIM "
        "| end PSNR | jump px (truth) | frame diff | speed px/f | jitter px |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        cells = [
            row["model"],
            row["task"],
            _cell(row["steps"] or "-"),
            str(row["n"]),
            _cell(row["caption_accuracy"]),
            f"{_cell(row['direction_accuracy'])} ({row['direction_n']})",
            _cell(row["colour_accuracy"]),
            _cell(row["shape_accuracy"]),
            _cell(row["first_frame_psnr"], 1),
            _cell(row["first_frame_ssim"], 3),
            _cell(row["end_frame_psnr"], 1),
            f"{_cell(row['first_frame_jump'])} ({_cell(row['truth_first_step'])})",
            _cell(row["frame_difference"]),
            _cell(row["centroid_speed"]),
            _cell(row["centroid_jitter"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_paper_table(summary)]
    return "\n".join(lines) + "\n"


def _schedules(about: dict[str, Any]) -> str:
    """Which T2V schedule each model ran: its entry's, else the model's default."""
    from pusa_ray.config import get_preset

    parts = []
    for entry in about["models"]:
        schedule = entry["schedule"]
        if schedule is None:
            try:
                schedule = f"{get_preset(entry['model']).defaults.get('schedule', 'sync')} (default)"
            except UserInputError:
                schedule = "the model's default"
        parts.append(f"{entry['name']} {schedule}")
    return ", ".join(parts)


def _paper_table(summary: Sequence[dict[str, Any]]) -> list[str]:
    """The issue's table: T2V and I2V caption following, I2V first-frame and start-end end-frame PSNR."""
    by_key = {(row["model"], row["task"], row["steps"]): row for row in summary}
    lines = [
        "| model | steps | T2V caption following | I2V first-frame PSNR | I2V caption following "
        "| start-end end-frame PSNR |",
        "|---|---|---|---|---|---|",
    ]
    for model, steps in dict.fromkeys((row["model"], row["steps"]) for row in summary):
        t2v, i2v, ends = (by_key.get((model, task, steps), {}) for task in TASKS)
        cells = [
            model,
            _cell(steps or "-"),
            _cell(t2v.get("caption_accuracy")),
            _cell(i2v.get("first_frame_psnr"), 1),
            _cell(i2v.get("caption_accuracy")),
            _cell(ends.get("end_frame_psnr"), 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# --- the job --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jobs/evaluate.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=MODEL[,lora=PATH[:ALPHA]]",
        help=f"preset or model directory, LoRA merged; repeatable (default: {' '.join(DEFAULT_MODELS)})",
    )
    parser.add_argument(
        "--heldout", type=Path, help="held-out set (shapes.write_dataset); default OUT/heldout"
    )
    parser.add_argument("--count", type=int, default=32, help="held-out clips to use (default 32)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)}")
    parser.add_argument("--steps", help="denoising steps, a comma list for a sweep (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="clip i is generated with seed SEED + i")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance (default: the model's)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--cache", help="step caching: off, first-block[:T[:R]] (default: the model's)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also score the held-out clips themselves (the ground-truth row)",
    )
    domain = parser.add_argument_group("a held-out set written by this job (when --heldout has none)")
    domain.add_argument("--heldout-seed", type=int, default=HELDOUT_SEED)
    domain.add_argument("--motions", default=",".join(DomainSettings.motions), help="comma list")
    domain.add_argument("--backgrounds", default=",".join(DomainSettings.backgrounds), help="comma list")
    domain.add_argument("--travel", type=float, default=DomainSettings.travel, help="fraction of the side")
    domain.add_argument("--start", choices=STARTS, default=DomainSettings.start)
    return parser


def _domain_settings(args: argparse.Namespace, model: str) -> DomainSettings:
    """The held-out set to write: the first model's frames and size, the domain's other defaults."""
    from pusa_ray.mini.shapes import BACKGROUNDS, MOTIONS
    from pusa_ray.models.description import describe_model

    described = describe_model(model)
    size = {key: getattr(described, key) for key in ("frames", "height", "width") if getattr(described, key)}
    return DomainSettings(
        **size,
        motions=parse_list(args.motions, "--motions", MOTIONS),
        backgrounds=parse_list(args.backgrounds, "--backgrounds", BACKGROUNDS),
        travel=args.travel,
        start=args.start,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    entries = [parse_model(text) for text in (args.model or DEFAULT_MODELS)]
    if len({entry.name for entry in entries}) < len(entries) or REFERENCE in {e.name for e in entries}:
        raise UserInputError(f"--model names must be distinct and not {REFERENCE!r}")
    tasks = parse_list(args.tasks, "--tasks", TASKS)
    steps = parse_steps(args.steps) if args.steps else None
    if args.count < 1:
        raise UserInputError(f"--count must be >= 1, got {args.count}")
    heldout = args.heldout or args.out / "heldout"
    ensure_heldout(heldout, args.count, _domain_settings(args, entries[0].model), args.heldout_seed)
    args.out.mkdir(parents=True, exist_ok=True)
    clips = load_heldout(heldout, args.count, args.out / "inputs")
    record = _read_record(heldout)
    travel = record["settings"]["travel"] if record else DomainSettings.travel
    frames, height, width, _ = clips[0].frames.shape
    min_travel = metrics.min_travel_px(height, width, travel)

    reference = [(REFERENCE, reference_source, (None,))] if args.reference else []
    if args.cache is not None:
        try:
            parse_cache(args.cache)
        except ValueError as error:
            raise UserInputError(f"--cache: {error}") from None
    generated = model_sources(entries, steps, args.seed, args.guidance, args.device, args.cache)
    rows = evaluate(
        itertools.chain(reference, generated), clips, tasks, min_travel, args.seed, args.out / "results.jsonl"
    )
    about = {
        "heldout": str(heldout),
        "heldout_seed": record["seed"] if record else "unknown (set given)",
        "count": len(clips),
        "size": f"{frames}x{height}x{width}",
        "seed": args.seed,
        "guidance": args.guidance if args.guidance is not None else "model default",
        "cache": args.cache or "model default",
        "min_travel_px": min_travel,
        "models": [dataclasses.asdict(entry) for entry in entries],
        "tasks": list(tasks),
    }
    summary = summarise(rows)
    (args.out / "summary.json").write_text(
        json.dumps({**about, "groups": summary}, indent=1, allow_nan=False) + "\n"
    )
    (args.out / "summary.md").write_text(markdown(summary, about))
    print(f"wrote {args.out / 'results.jsonl'} ({len(rows)} rows), summary.json, summary.md", flush=True)
    return {**about, "groups": summary}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (UserInputError, FileNotFoundError, ValueError, OSError) as error:
        print(f"evaluate: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
