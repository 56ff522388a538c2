"""Decoding one clip (pure: no Ray): fetch, sample frames at the target rate from its start,
centre-crop and resize."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pusa_ray import storage, video
from pusa_ray.preprocessing.config import PreprocessConfig

logger = logging.getLogger(__name__)
# Frame times are multiplied by the source rate and floored; this absorbs float error in t * fps.
_FRAME_TIME_EPSILON = 1e-6

# ----------------------------------------------------------------------------------------------
# Decoding one clip (pure: no Ray)


class ClipError(Exception):
    """A clip that cannot be used; `permanent` when its bytes determine it (retrying cannot help)."""

    def __init__(self, kind: str, reason: str, permanent: bool = True, **details: Any) -> None:
        super().__init__(reason)
        self.kind, self.reason, self.permanent, self.details = kind, reason, permanent, details


def source_frame_indices(start: float, frames: int, fps: float, source_fps: float) -> np.ndarray:
    """Source frame shown at each target time ``start + i / fps`` (i < frames): ``[frames]`` int64.

    A frame is on screen from ``k / source_fps`` until the next, so time t shows frame
    ``floor(t * source_fps)``. Equal rates from 0 give 0, 1, 2, ...; a slower source repeats frames.
    """
    if source_fps <= 0 or fps <= 0:
        raise ValueError(f"frame rates must be positive, got fps={fps}, source_fps={source_fps}")
    times = start + np.arange(frames, dtype=np.float64) / fps  # [frames] seconds
    return np.floor(times * source_fps + _FRAME_TIME_EPSILON).astype(np.int64)


def prepare_clip(
    source: str | Path,
    start: float,
    frames: int,
    fps: float,
    height: int,
    width: int,
    max_crop_discard: float,
) -> np.ndarray:
    """Decode, sample and centre-crop/resize one clip -> uint8 ``[frames, height, width, 3]``.

    Raises ClipError naming why a clip is unusable: unreadable (not a video, corrupt, truncated),
    crop (the centre crop would discard more than ``max_crop_discard`` of the frame), too_short.
    """
    try:
        first, source_fps = video.read_video(source, max_frames=1)  # [1, H, W, 3]: size and rate
    except ValueError as error:
        raise ClipError("unreadable", str(error)) from None
    source_height, source_width = first.shape[1:3]
    discard = video.crop_discard_fraction(source_height, source_width, height, width)
    if discard > max_crop_discard + 1e-9:
        raise ClipError(
            "crop",
            f"centre crop of the {source_width}x{source_height} frame to {width}x{height} would discard "
            f"{discard:.0%} of it (max_crop_discard {max_crop_discard:g})",
            crop_discard=round(discard, 6),
        )
    indices = source_frame_indices(start, frames, fps, source_fps)  # [frames]
    needed = int(indices[-1]) + 1
    try:
        decoded, _ = video.read_video(source, max_frames=needed)  # [<= needed, H, W, 3]
    except ValueError as error:
        raise ClipError("unreadable", str(error)) from None
    if len(decoded) < needed:
        raise ClipError(
            "too_short",
            f"{frames} frames at {fps:g} fps from {start:g} s need {needed} frames at {source_fps:g} fps; "
            f"the video has {len(decoded)}",
        )
    return video.resize_center_crop(decoded[indices], height, width)  # [frames, height, width, 3]


def _fetch(uri: str, size: int, scratch: Path) -> Path:
    """A local path with the clip's bytes: local files in place, S3 objects downloaded to scratch."""
    if not uri.startswith("s3://"):
        path = Path(uri.removeprefix("file://"))
        if not path.is_file():
            raise ClipError("missing", f"no such file: {path}", permanent=False)
        return path
    local = scratch / "video"
    try:
        storage.download_file(uri, local)
    except FileNotFoundError:
        raise ClipError("missing", f"no such object: {uri}", permanent=False) from None
    except OSError as error:
        raise ClipError("unreadable", f"cannot download {uri}: {error}", permanent=False) from None
    if local.stat().st_size != size:
        raise ClipError("changed", f"{uri} changed since it was listed ({size} bytes then)", permanent=False)
    return local


def decode_row(row: Mapping[str, Any], config: PreprocessConfig) -> np.ndarray:
    """One planned clip -> uint8 [F, H, W, 3]; every failure is a ClipError naming the reason."""
    try:
        with tempfile.TemporaryDirectory(prefix="pusa_ray_clip_") as scratch:
            source = _fetch(str(row["uri"]), int(row["size"]), Path(scratch))
            return prepare_clip(
                source,
                float(row["start"]),
                config.frames,
                config.fps,
                config.height,
                config.width,
                config.max_crop_discard,
            )
    except ClipError:
        raise
    except Exception as error:  # one odd file must not end a long job; it is reported, and retried
        logger.exception("decoding %s failed", row["uri"])
        raise ClipError("decode_failed", f"{type(error).__name__}: {error}", permanent=False) from error
