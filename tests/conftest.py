"""Shared fixtures: small synthetic frames with known motion and real encoded videos (generators in media.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from media import make_video, moving_square, translating_texture

# The known motion of the `texture_frames` / `lossless_video` fixtures, pixels per frame (u right, v down).
TEXTURE_DX, TEXTURE_DY = 2, -1


@dataclass(frozen=True)
class EncodedVideo:
    """A video file written by a test and the exact frames it holds (lossless codec, stored size)."""

    path: Path
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    dx: int
    dy: int


@pytest.fixture
def moving_square_frames() -> np.ndarray:
    """6 frames, 64x80: a 16 px textured square moving (+2, +1) px per frame over flat grey."""
    return moving_square(6, 64, 80, size=16, dx=2, dy=1)


@pytest.fixture
def texture_frames() -> np.ndarray:
    """6 frames, 64x80, of a smooth texture translating (TEXTURE_DX, TEXTURE_DY) px per frame."""
    return translating_texture(6, 64, 80, TEXTURE_DX, TEXTURE_DY, seed=0)


@pytest.fixture
def lossless_video(tmp_path: Path, texture_frames: np.ndarray) -> EncodedVideo:
    """`texture_frames` encoded with ffv1 in .mkv at their own size, so decoding at 64x80 gives them back exactly."""
    path = make_video(tmp_path / "texture.mkv", texture_frames, fps=25, codec="ffv1")
    return EncodedVideo(path, texture_frames, TEXTURE_DX, TEXTURE_DY)
