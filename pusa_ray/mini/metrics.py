"""Metrics on uint8 videos `[F, H, W, 3]` of the shapes domain that need no learned network.

Fidelity: PSNR and SSIM of a generated frame against a condition image. Caption following: the
one object is tracked frame by frame with a chroma mask (the domain's backgrounds are grey, its
shapes saturated colours), and its colour, shape and motion are compared with what the caption
names. Motion quality: centroid jitter, frame-difference dynamic degree, centroid speed and the
jump between the first two frames (an I2V failure mode: the video starts from the image and then
leaps to where the model would have put the object).

Thresholds (each justified where it is defined):
  CHROMA_THRESHOLD 40      a pixel is part of the object when max - min channel exceeds it
  MIN_TRAVEL_FRACTION 0.25 of the domain's expected travel: less net motion is "static"
  GROWTH_RATIO 1.5         last / first area for "grows"
  SQUARE_FILL 0.89         fill ratio above which the object is a square, below a circle
  PSNR_CAP_DB 100          identical images have infinite PSNR; means use this value instead
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from pusa_ray.mini.shapes import COLOURS, DIRECTIONS, DomainSettings, parse_caption

# Rendered backgrounds have chroma (max - min channel) 4 (plain) or 6 (stripes, checks); after an
# H.264 round trip (yuv420p) up to about 12. The least saturated named colour, green, has chroma
# 160. 40 sits 3x above the backgrounds and counts an edge pixel once about a quarter of it is
# covered. Every colour a "turns" clip passes through stays above it except the middle of a
# blue <-> yellow turn (chroma 15: that frame's colour is a pale grey), which reads as absent.
CHROMA_THRESHOLD = 40.0

# An object needs this many mask pixels to be present: a "grows" clip starts at radius 2.25 px
# (about 16 px of area), while codec noise never makes more than a stray pixel or two.
MIN_OBJECT_PIXELS = 4

# The domain moves an object `travel` (0.5) of the frame's side over a clip: 16 px at 32x32. A net
# displacement under a quarter of that (4 px) is no direction at all, so a static clip (centroid
# noise well under 1 px) never counts as moving, while a true "moves" clip (16 px) and both legs of
# a bounce (each at least 0.4 of the travel, 6.4 px) clear it with margin.
MIN_TRAVEL_FRACTION = 0.25

# "grows" doubles the radius (area x4); a static object's area changes by a few percent.
GROWTH_RATIO = 1.5

# Area / (widest row x tallest column), measured on soft coverage: pi/4 = 0.785 for a circle,
# 1.0 for a square, at any sub-pixel position. The threshold is the midpoint.
SQUARE_FILL = 0.89

# PSNR of identical images is infinite. Metric functions return inf; rows and means report this
# cap instead (well above the ~48 dB of a one-level error everywhere, so it still reads as exact).
PSNR_CAP_DB = 100.0

# SSIM (Wang et al. 2004): Gaussian window, sigma 1.5, 11 taps (fewer for tiny images), on luma.
SSIM_SIGMA = 1.5
SSIM_WINDOW = 11
SSIM_K1, SSIM_K2 = 0.01, 0.03
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as MATLAB's rgb2gray

CORE_COVERAGE = 0.75  # pixels at least this covered give the object's colour (no background mixed in)


def _check_video(video: np.ndarray, name: str = "video") -> None:
    if not isinstance(video, np.ndarray) or video.dtype != np.uint8 or video.ndim != 4 or video.shape[3] != 3:
        shape, dtype = getattr(video, "shape", None), getattr(video, "dtype", type(video).__name__)
        raise ValueError(f"{name} must be uint8 [F, H, W, 3], got {dtype} of shape {shape}")
    if min(video.shape[:3]) < 1:
        raise ValueError(f"{name} is empty: shape {video.shape}")


# --- fidelity -------------------------------------------------------------------------------------


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 arrays of one shape (peak 255, MSE over every value); identical -> inf."""
    if a.shape != b.shape:
        raise ValueError(f"psnr of different shapes {a.shape} and {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)


def capped_psnr(value: float) -> float:
    """A PSNR fit for JSON and means: inf (an exact copy) becomes PSNR_CAP_DB."""
    return min(value, PSNR_CAP_DB)


def _luma(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) @ LUMA_WEIGHTS  # [..., H, W]


def _gaussian_window(size: int) -> np.ndarray:
    offsets = np.arange(size) - (size - 1) / 2
    weights = np.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    return weights / weights.sum()


def _filter_valid(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of [..., H, W] by the 1-D window along both axes."""
    size = len(window)
    rows = np.lib.stride_tricks.sliding_window_view(image, size, axis=-1) @ window  # [..., H, W-s+1]
    return np.lib.stride_tricks.sliding_window_view(rows, size, axis=-2) @ window  # [..., H-s+1, W-s+1]


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of the luma of two uint8 images [H, W, 3] (or videos [F, H, W, 3], mean over frames).

    Gaussian window sigma 1.5 and 11 taps, or the largest odd size that fits an image smaller than
    11 px; 'valid' positions only; C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2. Identical inputs give 1.
    """
    if a.shape != b.shape or a.ndim not in (3, 4) or a.shape[-1] != 3:
        raise ValueError(
            f"ssim needs two [H, W, 3] or [F, H, W, 3] arrays of one shape, got {a.shape}, {b.shape}"
        )
    size = min(SSIM_WINDOW, *a.shape[-3:-1])
    size -= 1 - size % 2
    window = _gaussian_window(size)
    x, y = _luma(a), _luma(b)  # [..., H, W]
    mean_x, mean_y = _filter_valid(x, window), _filter_valid(y, window)
    var_x = _filter_valid(x * x, window) - mean_x**2
    var_y = _filter_valid(y * y, window) - mean_y**2
    cov = _filter_valid(x * y, window) - mean_x * mean_y
    c1, c2 = (SSIM_K1 * 255) ** 2, (SSIM_K2 * 255) ** 2
    index = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / (
        (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
    )
    return float(index.mean())


@dataclass(frozen=True)
class Fidelity:
    """How close a generated frame is to the image it was conditioned on."""

    psnr: float  # dB, inf for an exact copy
    ssim: float


def _frame_fidelity(frame: np.ndarray, image: np.ndarray) -> Fidelity:
    if frame.shape != image.shape:
        raise ValueError(f"frame {frame.shape} and image {image.shape} differ in size")
    return Fidelity(psnr(frame, image), ssim(frame, image))


def first_frame_fidelity(video: np.ndarray, image: np.ndarray) -> Fidelity:
    """PSNR/SSIM of frame 0 of `video` against the condition `image` [H, W, 3]."""
    _check_video(video)
    return _frame_fidelity(video[0], image)


def end_frame_fidelity(video: np.ndarray, image: np.ndarray) -> Fidelity:
    """PSNR/SSIM of the last frame of `video` against the end condition `image` [H, W, 3]."""
    _check_video(video)
    return _frame_fidelity(video[-1], image)


# --- tracking -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Track:
    """The object in each frame; absent frames hold NaN and None."""

    present: np.ndarray  # [F] bool
    centres: np.ndarray  # [F, 2] (x, y) px, coverage-weighted centroid
    areas: np.ndarray  # [F] px, soft (sum of estimated coverage)
    fill_ratios: np.ndarray  # [F] area / (widest row * tallest column)
    rgb: np.ndarray  # [F, 3] mean colour of the object's core
    colours: tuple[str | None, ...]  # nearest named colour per frame
    shapes: tuple[str | None, ...]  # circle / square per frame

    def majority(self, attribute: str) -> str | None:
        """The most common non-None colour or shape over frames (first seen wins a tie)."""
        seen = [value for value in getattr(self, attribute) if value is not None]
        return Counter(seen).most_common(1)[0][0] if seen else None

    def first_present(self) -> int | None:
        indices = np.flatnonzero(self.present)
        return int(indices[0]) if len(indices) else None

    def last_present(self) -> int | None:
        indices = np.flatnonzero(self.present)
        return int(indices[-1]) if len(indices) else None


def chroma(frames: np.ndarray) -> np.ndarray:
    """max - min channel per pixel, float [..., H, W]: 0 for any grey."""
    pixels = frames.astype(np.float32)
    return pixels.max(axis=-1) - pixels.min(axis=-1)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation of [H, W]."""
    padded = np.pad(mask, 1)
    height, width = mask.shape
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + height, dx : dx + width]
    return out


def nearest_colour(rgb: np.ndarray) -> str:
    """The named colour closest to `rgb` (Euclidean in RGB)."""
    names = list(COLOURS)
    palette = np.array([COLOURS[name] for name in names], dtype=np.float64)  # [K, 3]
    return names[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))]


def _coverage(frame: np.ndarray) -> np.ndarray | None:
    """Estimated coverage [H, W] in [0, 1] of the object by each pixel, or None when it is absent.

    Coverage is chroma rescaled between the background's (median outside the mask) and the
    object's (90th percentile inside), over the mask grown by one pixel so partly covered rim
    pixels below the threshold still count: the centroid and area are then unbiased sub-pixel.
    """
    saturation = chroma(frame)  # [H, W]
    mask = saturation > CHROMA_THRESHOLD
    if mask.sum() < MIN_OBJECT_PIXELS:
        return None
    floor = float(np.median(saturation[~mask])) if (~mask).any() else 0.0
    top = float(np.percentile(saturation[mask], 90))
    coverage = np.clip((saturation - floor) / max(top - floor, 1.0), 0.0, 1.0)
    return np.where(_dilate(mask), coverage, 0.0)


def _frame_object(frame: np.ndarray) -> tuple[tuple[float, float], float, float, np.ndarray] | None:
    """(centroid, area, fill ratio, core colour) of the object in `frame`, or None."""
    coverage = _coverage(frame)
    if coverage is None:
        return None
    area = float(coverage.sum())
    ys, xs = np.mgrid[0 : frame.shape[0], 0 : frame.shape[1]]
    centre = (float((coverage * (xs + 0.5)).sum() / area), float((coverage * (ys + 0.5)).sum() / area))
    fill = area / max(float(coverage.sum(axis=1).max() * coverage.sum(axis=0).max()), 1e-9)
    core = coverage >= CORE_COVERAGE
    weights = np.where(core, 1.0, 0.0) if core.any() else coverage
    rgb = (frame.astype(np.float64) * weights[..., None]).sum(axis=(0, 1)) / weights.sum()
    return centre, area, fill, rgb


def track(video: np.ndarray) -> Track:
    """Find the object in every frame of a uint8 video [F, H, W, 3] by its chroma.

    Centroids are in pixel coordinates with pixel centres at +0.5, the convention `shapes` renders
    with, so a rendered clip's centroids equal its `ClipTruth.centres`.
    """
    _check_video(video)
    count = video.shape[0]
    present = np.zeros(count, dtype=bool)
    centres = np.full((count, 2), np.nan)
    areas, fills = np.full(count, np.nan), np.full(count, np.nan)
    rgb = np.full((count, 3), np.nan)
    colours: list[str | None] = [None] * count
    shapes: list[str | None] = [None] * count
    for index, frame in enumerate(video):
        found = _frame_object(frame)
        if found is None:
            continue
        present[index] = True
        centres[index], areas[index], fills[index], rgb[index] = found
        colours[index] = nearest_colour(rgb[index])
        shapes[index] = "square" if fills[index] >= SQUARE_FILL else "circle"
    return Track(present, centres, areas, fills, rgb, tuple(colours), tuple(shapes))


# --- motion ---------------------------------------------------------------------------------------


def min_travel_px(height: int, width: int, travel: float = DomainSettings.travel) -> float:
    """The smallest net displacement that counts as motion: MIN_TRAVEL_FRACTION of the expected travel."""
    return MIN_TRAVEL_FRACTION * travel * min(height, width)


def direction_of(track: Track, min_travel: float) -> str | None:
    """right / left / down / up from the first-to-last centroid displacement along its dominant
    axis, or None when that is under `min_travel` px (or the object is seen in fewer than 2 frames)."""
    first, last = track.first_present(), track.last_present()
    if first is None or first == last:
        return None
    dx, dy = track.centres[last] - track.centres[first]
    if max(abs(dx), abs(dy)) < min_travel:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def bounced(track: Track, direction: str, min_travel: float) -> bool:
    """The object first goes `direction` by at least `min_travel` px, then comes back as far."""
    along = track.centres[track.present] @ np.array(DIRECTIONS[direction])  # [F_present]
    if len(along) < 3:
        return False
    peak = float(along.max())
    return bool(peak - along[0] >= min_travel and peak - along[-1] >= min_travel)


def grew(track: Track) -> bool:
    """The object's area at its last frame is at least GROWTH_RATIO times that at its first."""
    first, last = track.first_present(), track.last_present()
    if first is None or first == last:
        return False
    return bool(track.areas[last] >= GROWTH_RATIO * track.areas[first])


def turned(track: Track) -> bool:
    """The named colour of the last frame differs from that of the first."""
    first, last = track.first_present(), track.last_present()
    if first is None or first == last:
        return False
    return track.colours[first] != track.colours[last]


@dataclass(frozen=True)
class CaptionScore:
    """Per-attribute checks of a video against its caption; `observed` says what was seen."""

    checks: dict[str, bool]  # colour, shape, motion (and end_colour for "turns"), as named
    observed: dict[str, object]

    @property
    def all_correct(self) -> bool:
        return bool(self.checks) and all(self.checks.values())

    @property
    def direction_correct(self) -> bool | None:
        """Motion correct for a caption that names a direction (moves / bounces), else None."""
        return self.checks.get("motion") if "direction" in self.observed else None


def caption_following(video: np.ndarray, caption: str, min_travel: float | None = None) -> CaptionScore:
    """Check every attribute the caption names against the object tracked in `video` [F, H, W, 3].

    `min_travel` (px) defaults to `min_travel_px` of the video's size; see `score_caption`.
    """
    _check_video(video)
    if min_travel is None:
        min_travel = min_travel_px(video.shape[1], video.shape[2])
    return score_caption(track(video), caption, min_travel)


def score_caption(found: Track, caption: str, min_travel: float) -> CaptionScore:
    """Check every attribute the caption names (see `parse_caption`) against a track.

    colour: the majority colour over frames ("turns": the first frame's colour, and end_colour the
    last frame's); shape: the majority shape; motion: "moves D" the net motion's direction is D,
    "bounces D" the object goes D then comes back, "grows" the area rises by GROWTH_RATIO, "turns"
    the first and last colours differ.
    """
    named = parse_caption(caption)
    first, last = found.first_present(), found.last_present()
    first_colour = found.colours[first] if first is not None else None
    last_colour = found.colours[last] if last is not None else None
    observed: dict[str, object] = {
        "colour": first_colour if named["motion"] == "turns" else found.majority("colours"),
        "shape": found.majority("shapes"),
        "frames_present": int(found.present.sum()),
    }
    checks: dict[str, bool] = {}
    if named["colour"]:
        checks["colour"] = observed["colour"] == named["colour"]
    if named["end_colour"]:
        observed["end_colour"] = last_colour
        checks["end_colour"] = last_colour == named["end_colour"]
    if named["shape"]:
        checks["shape"] = observed["shape"] == named["shape"]
    motion = named["motion"]
    if motion in ("moves", "bounces") and named["direction"]:
        observed["direction"] = direction_of(found, min_travel)
        if motion == "moves":
            checks["motion"] = observed["direction"] == named["direction"]
        else:
            observed["bounced"] = bounced(found, named["direction"], min_travel)
            checks["motion"] = bool(observed["bounced"])
    elif motion == "grows":
        observed["growth"] = _growth(found)
        checks["motion"] = grew(found)
    elif motion == "turns":
        checks["motion"] = turned(found)
    return CaptionScore(checks, observed)


def _growth(found: Track) -> float | None:
    first, last = found.first_present(), found.last_present()
    if first is None or first == last:
        return None
    return float(found.areas[last] / found.areas[first])


# --- temporal quality -----------------------------------------------------------------------------


def centroid_jitter(track: Track) -> float:
    """Mean |c[t+1] - 2 c[t] + c[t-1]| (px, Euclidean) over triples of frames where the object is
    seen: 0 for uniform motion, large for a shaking object. NaN when no triple exists."""
    second = track.centres[2:] - 2 * track.centres[1:-1] + track.centres[:-2]  # [F-2, 2]
    norms = np.linalg.norm(second, axis=1)
    norms = norms[np.isfinite(norms)]
    return float(norms.mean()) if len(norms) else math.nan


def centroid_speed(track: Track) -> float:
    """Mean |c[t+1] - c[t]| in px per frame over consecutive frames where the object is seen."""
    steps = np.linalg.norm(np.diff(track.centres, axis=0), axis=1)
    steps = steps[np.isfinite(steps)]
    return float(steps.mean()) if len(steps) else math.nan


def first_frame_jump(track: Track) -> float:
    """|c[1] - c[0]| in px: compare with the ground truth's step (a clip of `moves` covers
    travel / (F - 1) per frame). NaN when the object is missing from either frame."""
    if len(track.centres) < 2:
        return math.nan
    return float(np.linalg.norm(track.centres[1] - track.centres[0]))


def frame_difference(video: np.ndarray) -> float:
    """Dynamic degree: mean |x[t+1] - x[t]| over pixels and channels, in 0-255 levels."""
    _check_video(video)
    if video.shape[0] < 2:
        return 0.0
    return float(np.abs(np.diff(video.astype(np.float32), axis=0)).mean())


def pixel_jitter(video: np.ndarray) -> float:
    """Mean |x[t+1] - 2 x[t] + x[t-1]| over pixels and channels, in 0-255 levels (flicker)."""
    _check_video(video)
    if video.shape[0] < 3:
        return 0.0
    return float(np.abs(np.diff(video.astype(np.float32), n=2, axis=0)).mean())
