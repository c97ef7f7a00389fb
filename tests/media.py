"""Tiny synthetic test media: frame generators with known motion, and real video files encoded with ffmpeg.

Shared by every test that needs a video (decode, flow, extract-flow, the end-to-end CLI test). Frames are
``(T, H, W, 3)`` uint8 RGB. Motion convention (the same as the flow's): a pattern moving by ``(dx, dy)`` pixels per
frame satisfies ``frames[t + 1][y, x] == frames[t][y - dy, x - dx]``, so the flow from frame t to t+1 is
``u = dx`` (horizontal, + is right) and ``v = dy`` (vertical, + is down).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import ffmpeg
import numpy as np

from pipeline.decode import ffmpeg_exe

# codec name -> (ffmpeg encoder options, lossless?). The lossless ones keep RGB planes (no YUV conversion), so decoding
# to rgb24 gives back the exact input bytes.
CODECS: dict[str, tuple[dict[str, object], bool]] = {
    "ffv1": ({"vcodec": "ffv1", "pix_fmt": "bgr0"}, True),
    "libx264rgb": ({"vcodec": "libx264rgb", "qp": 0, "preset": "ultrafast", "pix_fmt": "rgb24"}, True),
    "mpeg4": ({"vcodec": "mpeg4", "q:v": 2, "pix_fmt": "yuv420p"}, False),
}


def smooth_texture(height: int, width: int, seed: int = 0, sigma: float = 2.0) -> np.ndarray:
    """A random colour texture, Gaussian-smoothed so optical flow has gradients at every pixel: (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((height, width, 3)).astype(np.float32)
    blurred = cv2.GaussianBlur(noise, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    lo, hi = blurred.min(axis=(0, 1)), blurred.max(axis=(0, 1))
    return np.round(20 + 215 * (blurred - lo) / (hi - lo)).astype(np.uint8)


def translating_texture(t: int, height: int, width: int, dx: int, dy: int, seed: int = 0) -> np.ndarray:
    """``t`` frames of a texture translating by whole pixels ``(dx, dy)`` per frame: (T, H, W, 3) uint8.

    Each frame is a window on one larger texture, so every pixel of every frame is real texture (no border fill)
    and the motion is exact.
    """
    span_y, span_x = abs(dy) * (t - 1), abs(dx) * (t - 1)
    canvas = smooth_texture(height + span_y, width + span_x, seed)
    row0 = span_y if dy > 0 else 0
    col0 = span_x if dx > 0 else 0
    return np.stack(
        [canvas[row0 - i * dy : row0 - i * dy + height, col0 - i * dx : col0 - i * dx + width] for i in range(t)]
    )


def moving_square(
    t: int, height: int, width: int, size: int = 16, dx: int = 2, dy: int = 1, seed: int = 0
) -> np.ndarray:
    """A textured ``size``-pixel square moving by ``(dx, dy)`` per frame over a flat grey background: (T, H, W, 3).

    Starts near the top-left corner; raises ValueError if the square would leave the frame.
    """
    # Start 2 px from the top/left edge, or far enough in that a leftward/upward square ends 2 px from it.
    y0, x0 = 2 + max(-dy, 0) * (t - 1), 2 + max(-dx, 0) * (t - 1)
    if max(y0, y0 + dy * (t - 1)) + size > height or max(x0, x0 + dx * (t - 1)) + size > width:
        raise ValueError(f"a {size}px square moving ({dx}, {dy}) for {t} frames leaves a {height}x{width} frame")
    patch = smooth_texture(size, size, seed)
    frames = np.full((t, height, width, 3), 60, dtype=np.uint8)
    for i in range(t):
        y, x = y0 + i * dy, x0 + i * dx
        frames[i, y : y + size, x : x + size] = patch
    return frames


def make_video(path: str | Path, frames: np.ndarray, fps: float = 25, codec: str = "ffv1") -> Path:
    """Encode ``frames`` (T, H, W, 3) uint8 RGB to a real video file with ffmpeg; returns the path.

    ``codec``: ``"ffv1"`` (lossless; use .mkv or .avi), ``"libx264rgb"`` (lossless H.264 in RGB; .mkv or .mp4) or
    ``"mpeg4"`` (lossy MPEG-4 part 2 in yuv420p like most real datasets; needs even H and W; .avi or .mp4).
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose from {sorted(CODECS)}")
    options, _ = CODECS[codec]
    t, h, w, _ = frames.shape
    path = Path(path)
    stream = (
        ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", framerate=fps)
        .output(str(path), **options)
        .global_args("-nostdin", "-v", "error")
        .overwrite_output()
    )
    stream.run(cmd=ffmpeg_exe(), input=np.ascontiguousarray(frames).tobytes(), capture_stdout=True, capture_stderr=True)
    return path


def make_bad_videos(directory: str | Path) -> dict[str, Path]:
    """Write the kinds of broken file a real dataset holds; returns ``{kind: path}``.

    ``empty``: a 0-byte .avi; ``not_video``: a text file named .avi; ``zero_frames``: a valid .mp4 container with
    no frames; ``truncated``: a real ffv1 .mkv with its last 40% cut off (ffmpeg decodes part of it and exits 0,
    logging "File ended prematurely").
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    empty = directory / "empty.avi"
    empty.write_bytes(b"")
    not_video = directory / "not_video.avi"
    not_video.write_text("this is a text file, not a video\n" * 20)
    zero_frames = make_video(directory / "zero_frames.mp4", np.zeros((0, 32, 48, 3), np.uint8), codec="mpeg4")
    whole = make_video(directory / "whole.mkv", translating_texture(12, 32, 48, 1, 0), codec="ffv1")
    data = whole.read_bytes()
    whole.unlink()
    truncated = directory / "truncated.mkv"
    truncated.write_bytes(data[: len(data) * 6 // 10])
    return {"empty": empty, "not_video": not_video, "zero_frames": zero_frames, "truncated": truncated}
