"""Video and image I/O against real files written to tmp_path: round trips, resizing and errors."""

import subprocess
import tempfile
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

from pusa_ray.video import (
    crop_discard_fraction,
    frames_to_tensor,
    probe_video,
    read_image,
    read_video,
    resize_center_crop,
    tensor_to_frames,
    write_mp4,
)

# Mean absolute error (0..255) of an H.264 round trip of moving_square_clip; measured at about 1.9
# (yuv420p halves the chroma resolution, so the square's edges carry most of it).
MAX_MEAN_ROUND_TRIP_ERROR = 4.0


def moving_square_clip(num_frames: int, height: int = 48, width: int = 64) -> np.ndarray:
    """uint8 [F, H, W, 3]: smooth gradients with a yellow square moving 3 pixels right per frame."""
    rows, cols = np.mgrid[0:height, 0:width]
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    frames[..., 0] = 40
    frames[..., 1] = rows * 3
    frames[..., 2] = cols * 2
    for index in range(num_frames):
        frames[index, 8:24, 3 * index : 3 * index + 16] = (250, 200, 30)
    return frames


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture
def clip_path(tmp_path: Path) -> Path:
    path = tmp_path / "clip.mp4"
    write_mp4(path, moving_square_clip(9), fps=16)
    return path


@pytest.mark.parametrize(("num_frames", "fps"), [(9, 16), (13, 25), (1, 16)])
def test_mp4_round_trip_keeps_frame_count_size_fps_and_pixels(tmp_path: Path, num_frames: int, fps: float):
    frames = moving_square_clip(num_frames)
    path = tmp_path / "clip.mp4"
    write_mp4(path, frames, fps)

    decoded, decoded_fps = read_video(path)

    assert decoded.dtype == np.uint8
    assert decoded.shape == frames.shape
    assert decoded_fps == fps
    assert mean_abs_error(decoded, frames) < MAX_MEAN_ROUND_TRIP_ERROR
    assert probe_video(path) == {"frames": num_frames, "height": 48, "width": 64, "fps": float(fps)}


def test_ntsc_frame_rate_reads_back_to_two_decimals(tmp_path: Path):
    path = tmp_path / "ntsc.mp4"
    write_mp4(path, moving_square_clip(5), fps=24000 / 1001)

    assert read_video(path)[1] == pytest.approx(24000 / 1001, abs=0.005)
    assert probe_video(path)["frames"] == 5


def test_read_video_from_bytes_equals_read_from_path(clip_path: Path):
    from_path, fps_from_path = read_video(clip_path)
    from_bytes, fps_from_bytes = read_video(clip_path.read_bytes())

    np.testing.assert_array_equal(from_bytes, from_path)
    assert fps_from_bytes == fps_from_path


def test_read_video_from_bytes_leaves_no_temporary_file(
    clip_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    read_video(clip_path.read_bytes())
    with pytest.raises(ValueError):
        read_video(b"not a video at all")

    assert list(scratch.iterdir()) == []


def test_read_video_max_frames_returns_the_first_frames(clip_path: Path):
    all_frames, _ = read_video(clip_path)

    first_four, fps = read_video(clip_path, max_frames=4)
    more_than_stored, _ = read_video(clip_path, max_frames=100)

    np.testing.assert_array_equal(first_four, all_frames[:4])
    assert fps == 16.0
    np.testing.assert_array_equal(more_than_stored, all_frames)


@pytest.mark.parametrize("max_frames", [0, -3])
def test_read_video_rejects_max_frames_below_one(clip_path: Path, max_frames: int):
    with pytest.raises(ValueError, match=str(max_frames)):
        read_video(clip_path, max_frames=max_frames)


def test_variable_frame_rate_file_gives_each_stored_frame_once(tmp_path: Path):
    # 16 frames with a 0.5 s pause after the fifth; a constant-rate decode would repeat frames.
    path = tmp_path / "vfr.mp4"
    source = ["-f", "lavfi", "-i", "testsrc=size=64x48:rate=16:duration=1"]
    pause = ["-vf", "settb=1/1000,setpts='if(lt(N\\,5)\\,N*62\\,N*62+500)'", "-fps_mode", "vfr"]
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", *source, *pause, str(path)], check=True)

    frames, _ = read_video(path)

    assert frames.shape == (16, 48, 64, 3)
    assert probe_video(path)["frames"] == 16


def test_write_mp4_creates_parents_replaces_existing_and_leaves_no_partial_file(tmp_path: Path):
    path = tmp_path / "nested" / "dir" / "out.mp4"
    write_mp4(path, moving_square_clip(3), fps=16)
    write_mp4(path, moving_square_clip(5), fps=25)

    assert list(path.parent.iterdir()) == [path]
    assert probe_video(path) == {"frames": 5, "height": 48, "width": 64, "fps": 25.0}


def test_write_mp4_keeps_sizes_that_are_not_multiples_of_16(tmp_path: Path):
    path = tmp_path / "odd_blocks.mp4"
    write_mp4(path, np.full((2, 30, 50, 3), 128, dtype=np.uint8), fps=8)

    frames, _ = read_video(path)

    assert frames.shape == (2, 30, 50, 3)


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((3, 48, 64, 3), dtype=np.float32),
        np.zeros((48, 64, 3), dtype=np.uint8),
        np.zeros((3, 48, 64, 4), dtype=np.uint8),
        np.zeros((0, 48, 64, 3), dtype=np.uint8),
        np.zeros((3, 47, 64, 3), dtype=np.uint8),
        np.zeros((3, 48, 63, 3), dtype=np.uint8),
    ],
    ids=["float", "rank3", "rgba", "no-frames", "odd-height", "odd-width"],
)
def test_write_mp4_rejects_bad_frames_naming_the_shape(tmp_path: Path, frames: np.ndarray):
    path = tmp_path / "bad.mp4"
    with pytest.raises(ValueError, match=str(frames.shape).replace("(", r"\(").replace(")", r"\)")):
        write_mp4(path, frames, fps=16)
    assert not path.exists()


@pytest.mark.parametrize("fps", [0, -1.0, float("nan"), float("inf")])
def test_write_mp4_rejects_bad_fps(tmp_path: Path, fps: float):
    with pytest.raises(ValueError, match="fps"):
        write_mp4(tmp_path / "bad.mp4", moving_square_clip(2), fps=fps)


def rgb_pattern(height: int = 12, width: int = 20) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([rows * 20, cols * 12, (rows + cols) * 8], axis=-1).astype(np.uint8)  # [H, W, 3]


@pytest.mark.parametrize(
    ("suffix", "save_options", "max_error"),
    [(".png", {}, 0.0), (".webp", {"lossless": True}, 0.0), (".jpg", {"quality": 95}, 4.0)],
)
def test_read_image_round_trip(tmp_path: Path, suffix: str, save_options: dict, max_error: float):
    pattern = rgb_pattern()
    path = tmp_path / f"image{suffix}"
    Image.fromarray(pattern).save(path, **save_options)

    image = read_image(path)

    assert image.dtype == np.uint8
    assert image.shape == pattern.shape
    assert mean_abs_error(image, pattern) <= max_error
    np.testing.assert_array_equal(read_image(path.read_bytes()), image)


def test_read_image_expands_greyscale_and_drops_alpha(tmp_path: Path):
    grey = rgb_pattern()[..., 1]
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    rgba = np.concatenate([rgb_pattern(), np.full((12, 20, 1), 7, dtype=np.uint8)], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")

    np.testing.assert_array_equal(read_image(tmp_path / "grey.png"), np.repeat(grey[..., None], 3, axis=-1))
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb_pattern())


def test_read_image_scales_16_bit_greyscale(tmp_path: Path):
    Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16)).save(tmp_path / "deep.png")

    image = read_image(tmp_path / "deep.png")

    np.testing.assert_array_equal(image[0, :, 0], [0, 100, 255])
    assert image.shape == (1, 3, 3)


def test_read_image_applies_exif_orientation(tmp_path: Path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: displayed rotated 90 degrees clockwise
    Image.fromarray(rgb_pattern()).save(tmp_path / "phone.png", exif=exif)

    np.testing.assert_array_equal(read_image(tmp_path / "phone.png"), np.rot90(rgb_pattern(), k=-1))


def test_resize_center_crop_of_wide_image_keeps_the_centre():
    frames = np.stack([rgb_pattern(8, 16), rgb_pattern(8, 16)[::-1]])  # [2, 8, 16, 3], aspect 2:1

    square = resize_center_crop(frames, 8, 8)
    single = resize_center_crop(frames[0], 8, 8)

    np.testing.assert_array_equal(square, frames[:, :, 4:12])  # no scaling needed, only the crop
    np.testing.assert_array_equal(single, frames[0, :, 4:12])


def test_resize_center_crop_downscales_tall_image_to_its_middle_band():
    frames = np.zeros((1, 80, 40, 3), dtype=np.uint8)  # 1:2, red top quarter, green middle, blue bottom
    frames[:, :20] = (255, 0, 0)
    frames[:, 20:60] = (0, 255, 0)
    frames[:, 60:] = (0, 0, 255)

    resized = resize_center_crop(frames, 10, 10)

    assert resized.shape == (1, 10, 10, 3)
    # Rows 0 and 9 blend with the neighbouring bands through the antialiasing filter.
    np.testing.assert_array_equal(resized[0, 1:9], np.full((8, 10, 3), (0, 255, 0), dtype=np.uint8))


def test_resize_center_crop_upscales_uniform_image_exactly():
    frames = np.full((3, 6, 8, 3), (12, 130, 250), dtype=np.uint8)

    resized = resize_center_crop(frames, 30, 30)

    np.testing.assert_array_equal(resized, np.full((3, 30, 30, 3), (12, 130, 250), dtype=np.uint8))


def test_resize_center_crop_same_size_is_an_exact_copy():
    frames = moving_square_clip(2)

    resized = resize_center_crop(frames, 48, 64)

    np.testing.assert_array_equal(resized, frames)
    assert not np.shares_memory(resized, frames)


@pytest.mark.parametrize(
    ("frames", "height", "width"),
    [
        (np.zeros((1, 8, 8, 3), dtype=np.uint8), 0, 8),
        (np.zeros((1, 8, 8, 3), dtype=np.uint8), 8, -2),
        (np.zeros((1, 8, 8, 3), dtype=np.float32), 4, 4),
        (np.zeros((1, 8, 8, 4), dtype=np.uint8), 4, 4),
        (np.zeros((8, 8), dtype=np.uint8), 4, 4),
    ],
)
def test_resize_center_crop_rejects_bad_input(frames: np.ndarray, height: int, width: int):
    with pytest.raises(ValueError):
        resize_center_crop(frames, height, width)


@pytest.mark.parametrize(
    ("source", "target", "expected"),
    [
        ((100, 200), (50, 50), 0.5),
        ((200, 100), (50, 50), 0.5),
        ((480, 832), (240, 416), 0.0),
        ((100, 100), (300, 300), 0.0),
        ((1080, 1920), (480, 832), 0.025),
        ((100, 400), (100, 100), 0.75),
    ],
)
def test_crop_discard_fraction(source: tuple[int, int], target: tuple[int, int], expected: float):
    assert crop_discard_fraction(*source, *target) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("sizes", [(0, 10, 5, 5), (10, 10, 0, 5), (10, -1, 5, 5)])
def test_crop_discard_fraction_rejects_non_positive_sizes(sizes: tuple[int, int, int, int]):
    with pytest.raises(ValueError):
        crop_discard_fraction(*sizes)


def test_frames_tensor_round_trip_is_exact_for_every_level():
    frames = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    frames = np.concatenate([frames, frames[:, ::-1]])  # [2, 16, 16, 3]

    video = frames_to_tensor(frames)

    assert video.shape == (3, 2, 16, 16)
    assert video.dtype == torch.float32
    assert video.min().item() == -1.0
    assert video.max().item() == 1.0
    np.testing.assert_array_equal(tensor_to_frames(video), frames)


def test_tensor_to_frames_clamps_and_rounds_to_nearest():
    levels = torch.tensor([-3.0, 10.4, 10.6, 254.6, 400.0])
    video = (levels / 127.5 - 1.0).reshape(1, 1, 1, 5).repeat(3, 1, 1, 1)  # [3, 1, 1, 5]

    frames = tensor_to_frames(video)

    assert frames.shape == (1, 1, 5, 3)
    np.testing.assert_array_equal(frames[0, 0, :, 0], [0, 10, 11, 255, 255])


@pytest.mark.parametrize(
    "video",
    [torch.zeros(4, 1, 2, 2), torch.zeros(3, 2, 2), torch.zeros(3, 1, 2, 2, dtype=torch.uint8)],
    ids=["four-channels", "rank3", "integer"],
)
def test_tensor_to_frames_rejects_bad_tensors(video: torch.Tensor):
    with pytest.raises(ValueError, match="shape"):
        tensor_to_frames(video)


def test_tensor_to_frames_rejects_nan():
    video = torch.zeros(3, 1, 2, 2)
    video[1, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tensor_to_frames(video)


def test_frames_to_tensor_rejects_bad_frames():
    with pytest.raises(ValueError, match=r"\(2, 4, 4\)"):
        frames_to_tensor(np.zeros((2, 4, 4), dtype=np.uint8))


@pytest.mark.parametrize("reader", [read_video, probe_video, read_image])
def test_missing_file_is_file_not_found_naming_the_path(tmp_path: Path, reader):
    path = tmp_path / "nowhere" / "missing.mp4"
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        reader(path)


@pytest.mark.parametrize(
    ("reader", "kind"), [(read_video, "video"), (probe_video, "video"), (read_image, "image")]
)
def test_zero_byte_file_is_value_error_naming_the_path(tmp_path: Path, reader, kind: str):
    path = tmp_path / "empty.mp4"
    path.touch()
    with pytest.raises(ValueError, match=f"cannot read {kind} '.*empty.mp4': file is empty"):
        reader(path)


@pytest.mark.parametrize("reader", [read_video, probe_video])
def test_truncated_mp4_is_value_error(clip_path: Path, tmp_path: Path, reader):
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(clip_path.read_bytes()[: clip_path.stat().st_size // 2])
    with pytest.raises(ValueError, match="cannot read video '.*truncated.mp4': "):
        reader(truncated)


@pytest.mark.parametrize("name", ["notes.txt", "notes.mp4"])
@pytest.mark.parametrize("reader", [read_video, probe_video])
def test_text_file_as_video_is_value_error(tmp_path: Path, name: str, reader):
    path = tmp_path / name
    path.write_text("this is a text file, not a video\n")
    with pytest.raises(ValueError, match=f"cannot read video '.*{name}': .*Invalid data"):
        reader(path)


def test_text_file_as_image_is_value_error(tmp_path: Path):
    path = tmp_path / "notes.png"
    path.write_text("this is a text file, not an image\n")
    with pytest.raises(ValueError, match="cannot read image '.*notes.png': "):
        read_image(path)


def test_truncated_png_is_value_error(tmp_path: Path):
    path = tmp_path / "cut.png"
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)  # incompressible
    Image.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="cannot read image '.*cut.png': "):
        read_image(path)


@pytest.mark.parametrize("data", [b"", b"\x00\x01 not a video"])
@pytest.mark.parametrize("reader", [read_video, read_image])
def test_bad_bytes_are_named_bytes_in_the_error(reader, data: bytes):
    with pytest.raises(ValueError, match="'<bytes>'") as error:
        reader(data)
    assert "tmp" not in str(error.value)


def test_directory_is_not_a_video(tmp_path: Path):
    with pytest.raises(ValueError, match="not a regular file"):
        read_video(tmp_path)
