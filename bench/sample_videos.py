"""The real videos the benchmarks decode, found in a fresh clone too.

Why a helper of its own: the benchmarks were written against ``../shared/data/videos`` (two long sample videos),
which a fresh clone lacks. Falling back to the real UCF-101 clips that ship in ``tests/data/real_clips`` lets every
bench script run anywhere, so the test suite can run each one (tests/test_bench.py) and none can rot.
"""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_VIDEOS = REPO.parent / "shared" / "data" / "videos"
# 79 and 180 frames: long enough for the loader benchmark's 48-frame windows (the shipped HMDB-51 clip has 45)
SHIPPED_CLIPS = [REPO / "tests" / "data" / "real_clips" / "ucf101" / "PushUps" / "v_PushUps_g02_c03.avi",
                 REPO / "tests" / "data" / "real_clips" / "ucf101" / "Basketball" / "v_Basketball_g01_c02.mp4"]


def sample_videos() -> list[Path]:
    """The shared sample videos (``*.mp4``, sorted) when present, else the real clips shipped in tests/data."""
    return sorted(SHARED_VIDEOS.glob("*.mp4")) or SHIPPED_CLIPS
