"""pipeline.decode on real files encoded by ffmpeg: exact lossless round trips, resizing, resampling, bad files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import ffmpeg
import numpy as np
import pytest

from media import make_bad_videos, make_video, translating_texture
from pipeline.decode import DecodeConfig, DecodeError, decode_video, ffmpeg_exe


def test_ffmpeg_exe_is_runnable() -> None:
    exe = ffmpeg_exe()
    assert os.path.isfile(exe) and os.access(exe, os.X_OK)


@pytest.mark.parametrize(("codec", "suffix"), [("ffv1", ".mkv"), ("ffv1", ".avi"), ("libx264rgb", ".mkv")])
def test_lossless_video_decodes_exactly(tmp_path: Path, texture_frames: np.ndarray, codec: str, suffix: str) -> None:
    t, h, w, _ = texture_frames.shape
    path = make_video(tmp_path / f"v{suffix}", texture_frames, codec=codec)
    decoded = decode_video(path, DecodeConfig(height=h, width=w))
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, texture_frames)


def test_lossy_video_decodes_close(tmp_path: Path, texture_frames: np.ndarray) -> None:
    path = make_video(tmp_path / "v.avi", texture_frames, codec="mpeg4")
    decoded = decode_video(path, DecodeConfig(height=64, width=80))
    assert decoded.shape == texture_frames.shape
    # 4:2:0 chroma subsampling blurs a fine colour texture's colour; its brightness survives closely.
    bt601_luma = np.array([0.299, 0.587, 0.114])
    assert np.abs(decoded @ bt601_luma - texture_frames @ bt601_luma).mean() < 3


def test_default_config_resizes_to_paper_size(lossless_video) -> None:
    decoded = decode_video(lossless_video.path)
    assert decoded.shape == (len(lossless_video.frames), 128, 171, 3)
    # Upscaling a smooth texture keeps its mean colour.
    np.testing.assert_allclose(decoded.mean(axis=(0, 1, 2)), lossless_video.frames.mean(axis=(0, 1, 2)), atol=3)


def test_fps_resampling_changes_frame_count(tmp_path: Path) -> None:
    path = make_video(tmp_path / "v.mkv", translating_texture(20, 16, 24, 1, 0), fps=20)
    assert len(decode_video(path, DecodeConfig(height=16, width=24))) == 20
    assert len(decode_video(path, DecodeConfig(height=16, width=24, fps=10))) == 10
    assert len(decode_video(path, DecodeConfig(height=16, width=24, fps=40))) == 40


def test_max_frames_caps_decoding(lossless_video) -> None:
    decoded = decode_video(lossless_video.path, DecodeConfig(height=64, width=80, max_frames=3))
    np.testing.assert_array_equal(decoded, lossless_video.frames[:3])


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("empty", "empty file"),
        ("not_video", "Invalid data"),
        ("zero_frames", "no video stream"),
        ("truncated", "File ended prematurely"),
    ],
)
def test_bad_files_raise_decode_error_naming_path(tmp_path: Path, kind: str, reason: str) -> None:
    path = make_bad_videos(tmp_path)[kind]
    with pytest.raises(DecodeError, match=reason) as info:
        decode_video(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert info.value.path == str(path)


def test_truncated_mp4_raises(tmp_path: Path, texture_frames: np.ndarray) -> None:
    data = make_video(tmp_path / "v.mp4", texture_frames, codec="mpeg4").read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError, match=f"^{re.escape(str(cut))}: "):
        decode_video(cut)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match="no such file"):
        decode_video(tmp_path / "nope.avi")
    with pytest.raises(DecodeError, match="not a regular file"):
        decode_video(tmp_path)


def test_audio_only_file_has_no_frames(tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    ffmpeg.input("sine=duration=0.2", f="lavfi").output(str(path)).run(cmd=ffmpeg_exe(), quiet=True)
    with pytest.raises(DecodeError, match=f"^{re.escape(str(path))}: no video stream"):
        decode_video(path)


def test_timeout_is_reported(lossless_video) -> None:
    with pytest.raises(DecodeError, match="timed out"):
        decode_video(lossless_video.path, DecodeConfig(timeout_s=1e-4))


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        DecodeConfig(height=0)
    with pytest.raises(ValueError):
        DecodeConfig(fps=0)
