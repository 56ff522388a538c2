"""Video and image I/O: decode and encode through ffmpeg (imageio-ffmpeg) and Pillow, resize to the
model's frame size, and convert between uint8 frames and model tensors.

Layouts used throughout:
  frames  uint8 numpy [F, H, W, 3], RGB (an image is [H, W, 3])
  video   float32 torch [3, F, H, W] in [-1, 1], the layout the VAE encodes

Errors name the offending file ('<bytes>' for in-memory sources) so the CLI and the serve layer can
print them as one line: a missing file is FileNotFoundError, anything unreadable is ValueError.
"""

from __future__ import annotations

import io
import math
import os
import re
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch
from PIL import Image, ImageOps

Frames = np.ndarray  # uint8 [F, H, W, 3] RGB

BYTES_NAME = "<bytes>"

# libx264 constant rate factor: 0 is lossless, 23 is ffmpeg's default. 12 keeps read-back pixels
# within about 1-2 levels of the input while files stay a few hundred kB per second at 480p.
X264_CRF = 12

# Frames resized per interpolate call: bounds the float32 working copy (16 frames of 1080p is
# about 400 MB) instead of converting a whole clip at once.
RESIZE_CHUNK_FRAMES = 16

# read_frames' default output is constant-frame-rate, so ffmpeg duplicates or drops frames of a
# variable-frame-rate file; passthrough hands over every stored frame exactly once. The first video
# stream is read, the same one count_frames_and_secs counts.
_DECODE_PARAMS = ["-map", "0:v:0", "-fps_mode", "passthrough"]

# An ffmpeg log line starts with its context, e.g. "[in#0 @ 0x55a9...] moov atom not found".
_FFMPEG_LOG_CONTEXT = re.compile(r"^\[[^\]]*\]\s*")
_FFMPEG_OPENING_ERROR = "Error opening input: "

# Pillow's decoders report bad data through all of these (SyntaxError from some format parsers).
_PILLOW_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _existing_file(source: str | Path, kind: str) -> Path:
    """The path of a non-empty regular file, or the error a caller should see for it."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{kind} file not found: '{path}'")
    if not path.is_file():
        raise ValueError(f"cannot read {kind} '{path}': not a regular file")
    if path.stat().st_size == 0:
        raise ValueError(f"cannot read {kind} '{path}': file is empty")
    return path


def _rgb_array(image: Image.Image) -> np.ndarray:
    """Pillow image in any mode -> uint8 [H, W, 3] RGB."""
    if image.mode.startswith("I;16"):
        # 16-bit greyscale: Pillow's convert("RGB") clips to 255 instead of scaling.
        grey = np.clip(np.round(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)  # [H, W, 3]
    return np.asarray(image.convert("RGB"), dtype=np.uint8)  # [H, W, 3]


def read_image(source: str | Path | bytes) -> np.ndarray:
    """Read an image (anything Pillow reads: PNG, JPEG, WebP, ...) as uint8 [H, W, 3] RGB.

    Alpha is dropped, greyscale and palette images are expanded to RGB, and an EXIF orientation tag is
    applied so the pixels are the way the image is displayed. Multi-frame files give their first frame.
    """
    if isinstance(source, (bytes, bytearray)):
        name = BYTES_NAME
        if not source:
            raise ValueError(f"cannot read image '{name}': no data")
        stream: io.BytesIO | Path = io.BytesIO(source)
    else:
        stream = _existing_file(source, "image")
        name = str(stream)
    try:
        with Image.open(stream) as image:
            image.load()
            return _rgb_array(ImageOps.exif_transpose(image))
    except _PILLOW_ERRORS as error:
        raise ValueError(f"cannot read image '{name}': {error}") from error


@contextmanager
def _video_file(source: str | Path | bytes) -> Iterator[tuple[Path, str]]:
    """Yield (a path ffmpeg can open, the name to use in messages); bytes go to a temporary file."""
    if not isinstance(source, (bytes, bytearray)):
        path = _existing_file(source, "video")
        yield path, str(path)
        return
    if not source:
        raise ValueError(f"cannot read video '{BYTES_NAME}': no data")
    # No suffix: ffmpeg recognises containers by their content, and a suffix would bias its guess.
    handle = tempfile.NamedTemporaryFile(prefix="pusa_ray_video_", delete=False)
    path = Path(handle.name)
    try:
        with handle:
            handle.write(source)
        yield path, BYTES_NAME
    finally:
        path.unlink(missing_ok=True)


def _ffmpeg_reason(error: Exception, path: Path, name: str) -> str:
    """One line saying why ffmpeg failed, from imageio-ffmpeg's multi-line error (banner + log)."""
    text = str(error).replace(str(path), name)
    head, marker, stderr = text.partition("=== stderr ===")
    log = stderr if marker else text
    # Banner and stream descriptions are indented; errors are log lines that start with a context.
    messages = [
        _FFMPEG_LOG_CONTEXT.sub("", line).strip() for line in log.splitlines() if line.startswith("[")
    ]
    opening = [m.removeprefix(_FFMPEG_OPENING_ERROR) for m in messages if m.startswith(_FFMPEG_OPENING_ERROR)]
    details = [m for m in messages if m and not m.startswith(_FFMPEG_OPENING_ERROR)]
    parts = details[-1:] + [m for m in opening[-1:] if m not in details[-1:]]
    if not parts:  # no ffmpeg log: imageio-ffmpeg's own message, e.g. "Could not read frame 3: ..."
        parts = [" ".join(line.strip() for line in (head if marker else text).splitlines() if line.strip())]
    return "; ".join(parts)


def _open_reader(path: Path, name: str, output_params: list[str]) -> tuple[Iterator[bytes], dict]:
    """Start ffmpeg on `path`; return the frame generator (raw rgb24 bytes) and its header metadata."""
    reader = imageio_ffmpeg.read_frames(str(path), output_params=_DECODE_PARAMS + output_params)
    try:
        meta = next(reader)
    except (OSError, RuntimeError, IndexError, AttributeError) as error:
        # IndexError/AttributeError: imageio-ffmpeg's header parser on a stream it cannot describe.
        reader.close()
        raise ValueError(f"cannot read video '{name}': {_ffmpeg_reason(error, path, name)}") from error
    if meta["fps"] <= 0:
        reader.close()
        raise ValueError(f"cannot read video '{name}': ffmpeg reports no frame rate")
    return reader, meta


def read_video(source: str | Path | bytes, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode a video (anything ffmpeg reads) into (uint8 [F, H, W, 3] RGB, fps).

    Every frame stored in the file is returned once, in order (no frame-rate conversion), up to
    `max_frames` if given. `fps` is ffmpeg's average frame rate, printed to two decimals (a 24000/1001
    file reads as 23.98). Bytes are written to a temporary file for ffmpeg and deleted afterwards.
    """
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    frame_limit = [] if max_frames is None else ["-frames:v", str(max_frames)]
    with _video_file(source) as (path, name):
        reader, meta = _open_reader(path, name, frame_limit)
        width, height = meta["size"]
        try:
            frames = [np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3) for raw in reader]
        except RuntimeError as error:
            raise ValueError(f"cannot read video '{name}': {_ffmpeg_reason(error, path, name)}") from error
        finally:
            reader.close()
    if not frames:
        raise ValueError(f"cannot read video '{name}': no frames decoded")
    return np.stack(frames[:max_frames]), float(meta["fps"])  # [F, H, W, 3]


def probe_video(source: str | Path | bytes) -> dict:
    """Describe a video without keeping its pixels.

    Returns {'frames': int, 'height': int, 'width': int, 'fps': float}, matching what read_video would
    return. The frame count is exact: ffmpeg decodes the stream to count it (containers' own counts
    are missing or wrong often enough not to trust them).
    """
    with _video_file(source) as (path, name):
        reader, meta = _open_reader(path, name, [])
        reader.close()
        try:
            frame_count, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
        except RuntimeError as error:
            raise ValueError(f"cannot read video '{name}': {_ffmpeg_reason(error, path, name)}") from error
    if not frame_count:
        raise ValueError(f"cannot read video '{name}': no frames decoded")
    width, height = meta["size"]
    return {"frames": int(frame_count), "height": int(height), "width": int(width), "fps": float(meta["fps"])}


def _check_target_size(height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got height={height}, width={width}")


def _covering_size(src_height: int, src_width: int, height: int, width: int) -> tuple[int, int]:
    """Smallest aspect-preserving size of the source that covers (height, width)."""
    scale = max(height / src_height, width / src_width)
    return max(height, round(src_height * scale)), max(width, round(src_width * scale))


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 [F, H, W, 3] (or one [H, W, 3] image) to (height, width), keeping the same rank.

    The frames are scaled, aspect kept, until they cover the target (bilinear with antialiasing, in
    float32), then the centre is cropped. Input already at the target size is returned as a copy.
    """
    _check_target_size(height, width)
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim not in (3, 4):
        raise ValueError(f"expected uint8 [F, H, W, 3] or [H, W, 3] frames, got {_describe(frames)}")
    if frames.shape[-1] != 3 or 0 in frames.shape[-3:-1]:
        raise ValueError(f"expected uint8 [F, H, W, 3] or [H, W, 3] frames, got {_describe(frames)}")
    if frames.ndim == 3:
        return resize_center_crop(frames[None], height, width)[0]
    src_height, src_width = frames.shape[1:3]
    if (src_height, src_width) == (height, width):
        return frames.copy()
    scaled_height, scaled_width = _covering_size(src_height, src_width, height, width)
    top, left = (scaled_height - height) // 2, (scaled_width - width) // 2
    resized = np.empty((frames.shape[0], height, width, 3), dtype=np.uint8)  # [F, height, width, 3]
    for start in range(0, frames.shape[0], RESIZE_CHUNK_FRAMES):
        stop = start + RESIZE_CHUNK_FRAMES
        chunk = torch.tensor(frames[start:stop], dtype=torch.float32).permute(0, 3, 1, 2)  # [f, 3, H, W]
        scaled = torch.nn.functional.interpolate(
            chunk, size=(scaled_height, scaled_width), mode="bilinear", antialias=True, align_corners=False
        )  # [f, 3, scaled_height, scaled_width]
        cropped = scaled[:, :, top : top + height, left : left + width]  # [f, 3, height, width]
        resized[start:stop] = cropped.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return resized


def crop_discard_fraction(src_height: int, src_width: int, height: int, width: int) -> float:
    """Fraction of the source frame's area that resize_center_crop throws away (0 for the same aspect).

    For example a 100x200 (HxW) source cropped to 50x50 loses half of its width: 0.5.
    """
    if min(src_height, src_width) <= 0:
        raise ValueError(f"source size must be positive, got height={src_height}, width={src_width}")
    _check_target_size(height, width)
    # Ratio of the source aspect (W/H) to the target aspect; the kept area fraction is its smaller side.
    aspect_ratio = Fraction(src_width * height, src_height * width)
    return float(1 - min(aspect_ratio, 1 / aspect_ratio))


def _describe(value: object) -> str:
    """Shape and dtype of an array or tensor, for error messages."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"shape {tuple(value.shape)} dtype {value.dtype}"
    return f"{type(value).__name__}"


def _check_frames(frames: np.ndarray) -> None:
    """Require uint8 [F, H, W, 3] with at least one frame and a non-empty picture."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {_describe(frames)}")
    if frames.shape[3] != 3 or 0 in frames.shape[:3]:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {_describe(frames)}")


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float32 [3, F, H, W] in [-1, 1] (x / 127.5 - 1)."""
    _check_frames(frames)
    pixels = torch.tensor(frames, dtype=torch.float32)  # [F, H, W, 3], a copy (input may be read-only)
    return (pixels / 127.5 - 1.0).permute(3, 0, 1, 2).contiguous()  # [3, F, H, W]


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """float [3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3], rounding to the nearest level.

    Values outside [-1, 1] are clamped; NaN is an error (it means the model diverged).
    """
    if not isinstance(video, torch.Tensor) or not video.is_floating_point() or video.ndim != 4:
        raise ValueError(f"expected a float video tensor [3, F, H, W], got {_describe(video)}")
    if video.shape[0] != 3:
        raise ValueError(f"expected a float video tensor [3, F, H, W], got {_describe(video)}")
    video = video.detach().to(device="cpu", dtype=torch.float32)
    if torch.isnan(video).any():
        raise ValueError(f"video tensor of shape {tuple(video.shape)} contains NaN")
    levels = ((video.clamp(-1.0, 1.0) + 1.0) * 127.5).round()  # [3, F, H, W] in [0, 255]
    return levels.to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()  # [F, H, W, 3]


def _encode_h264(path: Path, frames: np.ndarray, fps: float, name: str) -> None:
    """Encode frames to an H.264 mp4 at `path` with imageio-ffmpeg; errors call the video `name`."""
    num_frames, height, width, _ = frames.shape
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (width, height),
        fps=float(fps),
        codec="libx264",  # named, so imageio-ffmpeg does not probe every H.264 encoder first
        pix_fmt_out="yuv420p",  # what players expect; it is why sizes must be even
        quality=None,
        macro_block_size=1,  # never rescale: sizes are the caller's
        ffmpeg_log_level="error",
        output_params=["-crf", str(X264_CRF), "-f", "mp4"],  # -f: the temporary name has no .mp4
    )
    try:
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))  # [H, W, 3]
    except OSError as error:
        first_line = str(error).strip().splitlines()[0]
        raise OSError(f"cannot write video '{name}': ffmpeg stopped: {first_line}") from error
    finally:
        writer.close()
    # imageio-ffmpeg does not check ffmpeg's exit status, so count what was written.
    try:
        written, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    except RuntimeError as error:
        raise OSError(f"cannot write video '{name}': {_ffmpeg_reason(error, path, name)}") from error
    if written != num_frames:
        raise OSError(f"cannot write video '{name}': ffmpeg wrote {written} of {num_frames} frames")


def write_mp4(path: str | Path, frames: np.ndarray, fps: float) -> None:
    """Write uint8 [F, H, W, 3] RGB frames to an H.264 (libx264, yuv420p) mp4 at exactly `fps`.

    Every frame is written once and the size is kept, so height and width must be even (yuv420p).
    Parent directories are created. The file is encoded under a temporary name in the same directory
    and renamed into place, so `path` never holds a partly written video.
    """
    _check_frames(frames)
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frame height and width must be even for yuv420p, got shape {frames.shape}")
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        _encode_h264(partial, frames, fps, str(path))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
