"""Procedural shape videos with captions: the pusa-mini training and evaluation domain.

Each clip shows one coloured shape on a background doing one thing the caption states: moving in
a direction ("a red circle moves right"), bouncing off a wall ("a blue square bounces left"),
growing ("a green circle grows") or changing colour ("a yellow square turns red"). Everything comes
from a seed; the ground truth of each clip (colour, shape, motion, path) is kept beside it so the
evaluation can score generated videos against the caption without any learned network.

Shapes are drawn 4x supersampled and averaged down, so sub-pixel motion is smooth.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 45, 40),
    "green": (40, 200, 70),
    "blue": (45, 95, 235),
    "yellow": (235, 215, 45),
}
SHAPES = ("circle", "square")
DIRECTIONS: dict[str, tuple[float, float]] = {  # unit (dx, dy) in image coordinates (y down)
    "right": (1.0, 0.0),
    "left": (-1.0, 0.0),
    "down": (0.0, 1.0),
    "up": (0.0, -1.0),
}
MOTIONS = ("moves", "bounces", "grows", "turns")
BACKGROUNDS = ("plain", "stripes", "checks")
STARTS = ("room", "centre")  # see DomainSettings.start

# Every word a caption can contain: the word-level tokenizer's vocabulary.
VOCABULARY = ("a", "and", "on", "background", *COLOURS, *SHAPES, *MOTIONS, *DIRECTIONS, *BACKGROUNDS)

SUPERSAMPLE = 4
PLAIN_BACKGROUND = (24, 24, 28)


@dataclass(frozen=True)
class DomainSettings:
    """What the generator draws: sizes, which motions and backgrounds, how far things move."""

    frames: int = 9
    height: int = 32
    width: int = 32
    motions: tuple[str, ...] = ("moves",)
    backgrounds: tuple[str, ...] = ("plain",)
    radius: tuple[float, float] = (4.5, 6.0)  # half the shape's size, pixels
    travel: float = 0.5  # distance covered over the clip, as a fraction of the frame's side
    # Where a moving shape starts along its direction of motion: "room" anywhere the whole move
    # fits (so it starts near the side it leaves, and frame 0 gives the direction away); "centre"
    # where a move either way would fit, so that only the caption tells the direction.
    start: str = "room"

    def __post_init__(self) -> None:
        unknown = set(self.motions) - set(MOTIONS) or set(self.backgrounds) - set(BACKGROUNDS)
        if unknown:
            raise ValueError(f"unknown motions or backgrounds: {sorted(unknown)}")
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {', '.join(STARTS)}, got {self.start!r}")
        if self.frames < 2 or min(self.height, self.width) < 16 or self.height % 2 or self.width % 2:
            raise ValueError("need >= 2 frames and even sizes >= 16")
        moves = 1 if self.start == "room" else 2  # a centre start leaves room for the move both ways
        room = min(self.height, self.width) * (1 - moves * self.travel)
        if "moves" in self.motions and room < 2 * self.radius[1]:
            raise ValueError(
                f"a {self.height}x{self.width} frame has no room to travel {self.travel:g} of it "
                f"from a {self.start!r} start"
            )


@dataclass(frozen=True)
class ClipTruth:
    """What a clip shows, from which its caption is written and a generated video is scored."""

    caption: str
    colour: str
    shape: str
    motion: str
    direction: str | None  # moves / bounces
    end_colour: str | None  # turns
    background: str
    centres: list[tuple[float, float]]  # (x, y) per frame, pixels
    radii: list[float]  # per frame


def caption_of(truth: ClipTruth) -> str:
    words = ["a", truth.colour, truth.shape, truth.motion]
    if truth.direction:
        words.append(truth.direction)
    if truth.end_colour:
        words.append(truth.end_colour)
    if truth.background != "plain":
        words += ["on", truth.background, "background"]
    return " ".join(words)


def parse_caption(caption: str) -> dict[str, str | None]:
    """colour, shape, motion, direction and end colour named by a caption (None where absent)."""
    words = caption.lower().replace(",", " ").split()
    colours = [word for word in words if word in COLOURS]
    return {
        "colour": colours[0] if colours else None,
        "shape": next((word for word in words if word in SHAPES), None),
        "motion": next((word for word in words if word in MOTIONS), None),
        "direction": next((word for word in words if word in DIRECTIONS), None),
        "end_colour": colours[1] if len(colours) > 1 else None,
    }


def _background(kind: str, settings: DomainSettings, rng: np.random.Generator) -> np.ndarray:
    height, width = settings.height, settings.width
    image = np.empty((height, width, 3), dtype=np.float32)
    image[:] = PLAIN_BACKGROUND
    if kind == "plain":
        return image
    period = int(rng.integers(4, 9))
    ys, xs = np.mgrid[0:height, 0:width]
    if kind == "stripes":
        mask = ((xs if rng.random() < 0.5 else ys) // period) % 2 == 0
    else:
        mask = ((xs // period) + (ys // period)) % 2 == 0
    image[mask] = (60, 60, 66)
    return image


def _coverage(shape: str, centre: tuple[float, float], radius: float, height: int, width: int) -> np.ndarray:
    """Fraction of each pixel the shape covers, from a 4x supersampled grid."""
    step = 1.0 / SUPERSAMPLE
    offsets = (np.arange(SUPERSAMPLE) + 0.5) * step
    ys = (np.arange(height)[:, None] + offsets[None, :]).reshape(-1)
    xs = (np.arange(width)[:, None] + offsets[None, :]).reshape(-1)
    dx = xs[None, :] - centre[0]
    dy = ys[:, None] - centre[1]
    if shape == "circle":
        inside = dx**2 + dy**2 <= radius**2
    else:
        inside = (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    return inside.reshape(height, SUPERSAMPLE, width, SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)


def render(truth: ClipTruth, background: np.ndarray) -> np.ndarray:
    """uint8 frames [F, H, W, 3] of a clip's ground truth over `background` [H, W, 3]."""
    height, width, _ = background.shape
    count = len(truth.centres)
    start = np.array(COLOURS[truth.colour], dtype=np.float32)
    end = np.array(COLOURS[truth.end_colour or truth.colour], dtype=np.float32)
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    for index, (centre, radius) in enumerate(zip(truth.centres, truth.radii, strict=True)):
        mix = index / max(count - 1, 1)
        colour = (1.0 - mix) * start + mix * end
        alpha = _coverage(truth.shape, centre, radius, height, width)[..., None]
        frames[index] = np.round(background * (1.0 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8)
    return frames


def _path(
    motion: str, direction: str | None, settings: DomainSettings, radius: float, rng: np.random.Generator
) -> tuple[list[tuple[float, float]], list[float]]:
    frames, height, width = settings.frames, settings.height, settings.width
    times = np.linspace(0.0, 1.0, frames)
    if motion == "grows":
        low = radius * 0.5
        x = rng.uniform(radius, width - radius)
        y = rng.uniform(radius, height - radius)
        radii = low + (radius - low) * times
        return [(float(x), float(y))] * frames, [float(r) for r in radii]
    if motion == "turns":
        x = rng.uniform(radius, width - radius)
        y = rng.uniform(radius, height - radius)
        return [(float(x), float(y))] * frames, [radius] * frames
    dx, dy = DIRECTIONS[direction or "right"]
    side = width if dx else height
    travel = settings.travel * side
    if motion == "moves" and settings.start == "centre":  # the same start range for every direction
        along = rng.uniform(radius + travel, side - radius - travel) + travel * times
    elif motion == "moves":
        along = rng.uniform(radius, side - radius - travel) + travel * times
    else:  # bounces: towards the wall, off it, back; ends where a third of the way back
        wall = side - radius
        start = wall - rng.uniform(0.4, 0.6) * travel
        unfolded = start + travel * times
        along = np.where(unfolded > wall, 2 * wall - unfolded, unfolded)
    across = rng.uniform(radius, (height if dx else width) - radius)
    if dx < 0 or dy < 0:  # mirror the path for left / up
        along = side - along
    centres = [(float(a), float(across)) if dx else (float(across), float(a)) for a in along]
    return centres, [radius] * frames


def sample_clip(settings: DomainSettings, rng: np.random.Generator) -> tuple[ClipTruth, np.ndarray]:
    """One random clip: its ground truth (with caption) and uint8 frames [F, H, W, 3]."""
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    motion = str(rng.choice(settings.motions))
    kind = str(rng.choice(settings.backgrounds))
    direction = str(rng.choice(list(DIRECTIONS))) if motion in ("moves", "bounces") else None
    if motion == "bounces":
        direction = str(rng.choice(["right", "left"]))
    end_colour = str(rng.choice([c for c in COLOURS if c != colour])) if motion == "turns" else None
    radius = float(rng.uniform(*settings.radius))
    centres, radii = _path(motion, direction, settings, radius, rng)
    background = _background(kind, settings, rng)
    truth = ClipTruth("", colour, shape, motion, direction, end_colour, kind, centres, radii)
    truth = ClipTruth(**{**asdict(truth), "caption": caption_of(truth)})
    return truth, render(truth, background)


def clips(settings: DomainSettings, count: int, seed: int) -> Iterator[tuple[ClipTruth, np.ndarray]]:
    """`count` clips; clip i depends only on (seed, i), so any prefix of a larger set is the same."""
    for index in range(count):
        yield sample_clip(settings, np.random.default_rng([seed, index]))


def write_dataset(
    out_dir: str | Path, settings: DomainSettings, count: int, seed: int, fps: int = 16
) -> Path:
    """mp4 clips + `manifest.jsonl` (video, caption: what the preprocessing job reads) + `truth.jsonl`.

    Clips already written are kept, so an interrupted run is finished by running it again.
    Returns the manifest's path.
    """
    from pusa_ray.video import write_mp4

    out = Path(out_dir)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    manifest, truths = [], []
    for index, (truth, frames) in enumerate(clips(settings, count, seed)):
        name = f"clips/{index:06d}.mp4"
        if not (out / name).is_file():
            write_mp4(out / name, frames, fps)
        manifest.append({"video": name, "caption": truth.caption})
        truths.append({"video": name, **asdict(truth)})
    _write_lines(out / "truth.jsonl", truths)
    _write_lines(out / "manifest.jsonl", manifest)  # last: its presence means the set is complete
    return out / "manifest.jsonl"


def _write_lines(path: Path, rows: Sequence[dict]) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text("".join(json.dumps(row) + "\n" for row in rows))
    partial.replace(path)


def read_truth(path: str | Path) -> dict[str, ClipTruth]:
    """`truth.jsonl` as {video path (relative to the dataset), its ground truth}, in clip order."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return {
        row["video"]: ClipTruth(
            **{
                **{key: row[key] for key in ClipTruth.__dataclass_fields__},
                "centres": [tuple(c) for c in row["centres"]],
            }
        )
        for row in rows
    }
