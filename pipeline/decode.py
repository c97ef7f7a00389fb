"""Video decoding with ffmpeg (through ffmpeg-python) into RGB uint8 frames.

Every stage after this one works on the frames this module returns, so decoding is strict: a file that ffmpeg
cannot read cleanly is refused with a :class:`DecodeError` rather than passed on as a silently shortened or damaged
frame sequence (whose flow would be wrong without anyone noticing).

Error policy (what counts as a bad video):

- the path is missing, not a regular file, or empty -> checked before ffmpeg runs;
- ffmpeg exits with a non-zero status (not a video, unknown format, no video stream or zero frames, ...). ffmpeg
  runs with ``-xerror`` so a decoding error mid-stream stops it with a non-zero status instead of being skipped;
- ffmpeg exits 0 but logged an error (``-v error`` level). Truncated Matroska files do this ("File ended
  prematurely"): ffmpeg returns the frames it could read and exits 0, so the log is the only signal;
- ffmpeg produced zero frames, or a byte count that is not a whole number of frames;
- ffmpeg ran past ``DecodeConfig.timeout_s``.

Untrusted paths stay harmless: the path is passed as ``file:<absolute path>`` with ``protocol_whitelist=file`` so a
file name or a playlist inside a file cannot make ffmpeg open network URLs; the number of frames is capped
(``-frames:v``) and the process has a timeout, so a hostile or huge file costs bounded memory and time.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import ffmpeg
import numpy as np

from pipeline.errors import Asym3dError, ConfigError

__all__ = ["DecodeConfig", "DecodeError", "decode_video", "ffmpeg_exe"]

# How much of ffmpeg's stderr goes into a DecodeError message: enough to name the cause, short enough for one line
# in a failures list.
_MAX_REASON_CHARS = 240
# "[mpeg4 @ 0x55f4979a2cc0] " / "[in#0/avi @ 0x55ed...] " prefixes carry no information for a user.
_LOG_PREFIX = re.compile(r"^\[[^\]]*@ 0x[0-9a-f]+\]\s*")


class DecodeError(Asym3dError):
    """A video could not be decoded; the message is ``"<path>: <reason>"`` on one line."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class DecodeConfig:
    """How to decode a video.

    height, width: output frame size in pixels; the paper resizes every video to 128x171 (HxW) before cropping.
    fps: resample to this frame rate (ffmpeg drops/duplicates frames); None keeps every source frame once, also for
        variable-frame-rate files.
    max_frames: hard cap on decoded frames (memory bound: 20000 frames at 128x171 is 1.3 GB).
    timeout_s: ffmpeg is killed after this many seconds.
    """

    height: int = 128
    width: int = 171
    fps: float | None = None
    max_frames: int = 20000
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise ConfigError(f"frame size must be positive, got {self.height}x{self.width}")
        if self.fps is not None and not self.fps > 0:
            raise ConfigError(f"fps must be positive or None, got {self.fps}")
        if self.max_frames <= 0:
            raise ConfigError(f"max_frames must be positive, got {self.max_frames}")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be positive, got {self.timeout_s}")


@functools.cache
def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary: the system one on PATH if any, else the one the imageio-ffmpeg wheel ships.

    The fallback is what lets a pip-only install decode video; ffprobe is never needed (the wheel has none).
    """
    system = shutil.which("ffmpeg")
    if system:
        return system
    import imageio_ffmpeg  # imported lazily: only needed when there is no system ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _summarise_stderr(stderr: bytes) -> str:
    """One line from ffmpeg's error log: the distinct messages, in order, without the ``[codec @ 0x..]`` noise."""
    lines: list[str] = []
    for raw in stderr.decode("utf-8", errors="replace").splitlines():
        line = _LOG_PREFIX.sub("", raw.strip())
        if line and line not in lines:
            lines.append(line)
    summary = "; ".join(lines)
    if len(summary) > _MAX_REASON_CHARS:
        summary = summary[: _MAX_REASON_CHARS - 3] + "..."
    return summary


def _command(path: Path, cfg: DecodeConfig) -> list[str]:
    stream = ffmpeg.input(f"file:{path}", protocol_whitelist="file")
    timing: dict[str, str] = {}
    if cfg.fps is not None:
        # The fps filter resamples on the output time grid (10 s at 25 -> 10 fps gives 100 frames); the `-r` output
        # option instead pads the end with duplicates (102 frames for the same file).
        stream = stream.filter("fps", fps=cfg.fps)
    else:
        # Every decoded frame exactly once: by default ffmpeg forces a constant rate, duplicating or dropping frames
        # of variable-rate files and of raw MPEG-4 streams without a container (3 of 151 frames). Passthrough keeps
        # them; numbering the frames 0, 1, 2, ... seconds keeps the rawvideo muxer from seeing equal timestamps.
        stream = stream.filter("settb", "1").filter("setpts", "N")
        timing = {"fps_mode": "passthrough"}
    stream = (
        stream.filter("scale", cfg.width, cfg.height)
        .output("pipe:", format="rawvideo", pix_fmt="rgb24", **{"frames:v": cfg.max_frames}, **timing)
        .global_args("-nostdin", "-v", "error", "-xerror")
    )
    return ffmpeg.compile(stream, cmd=ffmpeg_exe())


def decode_video(path: str | os.PathLike[str], cfg: DecodeConfig = DecodeConfig()) -> np.ndarray:
    """Decode a video file to RGB frames of shape ``(T, cfg.height, cfg.width, 3)``, dtype uint8.

    At most ``cfg.max_frames`` frames are returned (the rest of the file is not decoded). Raises
    :class:`DecodeError` ("<path>: <reason>") for any file that does not decode cleanly; see the module docstring.
    """
    shown = os.fspath(path)
    resolved = Path(path).resolve()
    if not resolved.exists():
        raise DecodeError(shown, "no such file")
    if not resolved.is_file():
        raise DecodeError(shown, "not a regular file")
    if resolved.stat().st_size == 0:
        raise DecodeError(shown, "empty file (0 bytes)")

    try:
        proc = subprocess.run(_command(resolved, cfg), capture_output=True, timeout=cfg.timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise DecodeError(shown, f"ffmpeg timed out after {cfg.timeout_s:g} s") from None

    reason = _summarise_stderr(proc.stderr)
    if proc.returncode != 0 and "matches no streams" in reason:
        # ffmpeg's words for a file with no video stream (audio only, or a video container with zero frames).
        raise DecodeError(shown, "no video stream (zero frames)")
    if proc.returncode != 0:
        raise DecodeError(shown, f"ffmpeg failed (exit {proc.returncode}): {reason or 'no error message'}")
    if reason:
        raise DecodeError(shown, f"corrupt or truncated: {reason}")

    frame_bytes = cfg.height * cfg.width * 3
    if len(proc.stdout) == 0:
        raise DecodeError(shown, "zero frames decoded")
    if len(proc.stdout) % frame_bytes:
        raise DecodeError(shown, f"ffmpeg output is not a whole number of {cfg.width}x{cfg.height} frames")
    # A copy, so callers get an ordinary writable array rather than a read-only view of ffmpeg's bytes.
    return np.frombuffer(proc.stdout, dtype=np.uint8).reshape(-1, cfg.height, cfg.width, 3).copy()
