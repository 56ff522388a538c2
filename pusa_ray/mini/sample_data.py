"""`pusa-ray sample-data DIR`: captioned clips from the shapes world, in every layout the
preprocessing job reads, so a newcomer's first job has something to read.

    DIR/clips/000000.mp4 ...    the clips, each with its caption beside it as 000000.txt
    DIR/metadata.csv            DiffSynth's layout (file_name,text): read when the input is DIR
    DIR/manifest.jsonl          video, caption: read when the input is DIR/manifest.jsonl
    DIR/truth.jsonl             what each clip shows (pusa_ray.mini.shapes), for evaluation
    DIR/prompts.jsonl           a few requests for the batch generation job

The input `DIR/clips` reads the same clips as a folder of videos with `.txt` sidecars. With
`with_bad`, a few broken inputs join every layout (a truncated file, a file that is no video, a
clip too short, a clip without a caption), so the job's `errors.jsonl` has something to say.
Everything follows from the seed.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pusa_ray.mini.shapes import DomainSettings, clips

BAD = {  # name -> what the preprocessing job reports (errors.jsonl `kind`)
    "bad-truncated.mp4": "unreadable",
    "bad-not-a-video.mp4": "unreadable",
    "bad-too-short.mp4": "too_short",
    "bad-no-caption.mp4": "empty_caption",
}
PROMPTS = 3  # requests in prompts.jsonl


@dataclass(frozen=True)
class SampleData:
    """What `write_sample_data` wrote."""

    root: Path
    clips: int  # good clips
    bad: int  # broken inputs among them

    def line(self) -> str:
        bad = f" and {self.bad} broken inputs" if self.bad else ""
        return (
            f"wrote {self.clips} captioned clips{bad} to {self.root} (inputs: {self.root} with "
            f"metadata.csv, {self.root / 'manifest.jsonl'}, {self.root / 'clips'} with .txt captions)"
        )


def write_sample_data(
    root: str | Path,
    count: int = 32,
    frames: int = 24,
    height: int = 64,
    width: int = 64,
    fps: float = 16.0,
    seed: int = 0,
    with_bad: bool = False,
) -> SampleData:
    """Write `count` clips of the shapes world (moving, bouncing, growing, turning shapes)."""
    from pusa_ray import video

    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    settings = DomainSettings(
        frames=frames, height=height, width=width, motions=("moves", "bounces", "grows", "turns")
    )
    root = Path(root)
    folder = root / "clips"
    folder.mkdir(parents=True, exist_ok=True)
    rows, truths = [], []
    for index, (truth, pixels) in enumerate(clips(settings, count, seed)):
        name = f"{index:06d}.mp4"
        video.write_mp4(folder / name, pixels, fps)
        (folder / name).with_suffix(".txt").write_text(truth.caption + "\n")
        rows.append((f"clips/{name}", truth.caption))
        truths.append({"video": f"clips/{name}", **asdict(truth)})
    if with_bad:
        rows += _write_bad(folder, pixels, fps)
    _write_text(root / "truth.jsonl", "".join(json.dumps(row) + "\n" for row in truths))
    _write_text(root / "prompts.jsonl", "".join(json.dumps(p) + "\n" for p in _prompts(truths)))
    _write_text(
        root / "manifest.jsonl", "".join(json.dumps({"video": v, "caption": c}) + "\n" for v, c in rows)
    )
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file_name", "text"])
    writer.writerows(rows)
    _write_text(root / "metadata.csv", buffer.getvalue())  # last: the preprocessing job looks for it
    return SampleData(root, count, len(BAD) if with_bad else 0)


def _write_bad(folder: Path, pixels, fps: float) -> list[tuple[str, str]]:
    """The broken inputs: (path, caption) rows; the no-caption clip's caption is empty everywhere."""
    from pusa_ray import video

    video.write_mp4(folder / "bad-no-caption.mp4", pixels, fps)
    video.write_mp4(folder / "bad-too-short.mp4", pixels[:3], fps)
    whole = (folder / "bad-no-caption.mp4").read_bytes()
    (folder / "bad-truncated.mp4").write_bytes(whole[: len(whole) // 3])
    (folder / "bad-not-a-video.mp4").write_text("this is not a video\n")
    captions = {
        "bad-truncated.mp4": "a truncated file",
        "bad-not-a-video.mp4": "a text file",
        "bad-too-short.mp4": "a clip of three frames",
        "bad-no-caption.mp4": "",
    }
    for name, caption in captions.items():
        (folder / name).with_suffix(".txt").write_text(caption + "\n")
    return [(f"clips/{name}", captions[name]) for name in BAD]


def _prompts(truths: list[dict]) -> list[dict]:
    """Batch requests from the first clips' captions (T2V, the tiny preset's 64x64 at 17 frames)."""
    return [
        {"name": f"sample-{i}", "prompt": row["caption"], "frames": 17, "height": 64, "width": 64, "seed": i}
        for i, row in enumerate(truths[:PROMPTS])
    ]


def _write_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)
