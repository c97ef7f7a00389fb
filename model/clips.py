"""Clip sampling, crops and flips shared by the trainer (random views) and the evaluator (the 250-view protocol).

Frames are uint8 arrays ``(T, H, W, C)`` as the training shards store them; tensors handed to networks are float
``(C, T, H, W)``. Flow images store u in channel 0 as ``127.5 + u * 127.5 / bound`` (see ``pipeline.rgbf``), so a
horizontal flip, which negates horizontal motion, maps channel 0 to ``255 - value`` exactly.
"""
from __future__ import annotations

import numpy as np
import torch

FLOW_MODALITIES = ("flow",)


def clip_indices(n_frames: int, start: int, length: int) -> np.ndarray:
    """Frame indices of a ``length``-frame clip starting at ``start``.

    Videos shorter than the clip loop (0, 1, .., n-1, 0, 1, ..), so every video yields full clips; longer videos
    never read past their end.
    """
    if n_frames <= 0:
        raise ValueError("a video with no frames has no clips")
    return (start + np.arange(length)) % n_frames


def evenly_spaced_starts(n_frames: int, length: int, num_clips: int) -> np.ndarray:
    """Start frames of ``num_clips`` clips at equal intervals over the video (the paper's 25 test clips).

    When the video is shorter than the clip every start is 0 (the clips loop, see :func:`clip_indices`), so a short
    video still gives ``num_clips`` clips, all identical.
    """
    last = max(n_frames - length, 0)
    return np.rint(np.linspace(0, last, num_clips)).astype(np.int64)


def crop_positions(height: int, width: int, size: int) -> list[tuple[int, int]]:
    """(top, left) of the centre crop and the four corner crops, in that order."""
    if size > height or size > width:
        raise ValueError(f"crop {size} does not fit frames of {height}x{width}")
    h, w = height - size, width - size
    return [(h // 2, w // 2), (0, 0), (0, w), (h, 0), (h, w)]


def crop(frames: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    return frames[:, top:top + size, left:left + size]


def flip_horizontal(frames: np.ndarray, modality: str) -> np.ndarray:
    """Mirror left-right; for flow images also negate u (channel 0), as a mirrored video moves the other way."""
    flipped = frames[:, :, ::-1]
    if modality in FLOW_MODALITIES:
        flipped = flipped.copy()
        flipped[..., 0] = 255 - flipped[..., 0]
    return np.ascontiguousarray(flipped)


def to_tensor(frames: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """uint8 ``(T, H, W, C)`` -> normalised float32 ``(C, T, H, W)``; mean/std are per channel on the 0..255 scale."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float()
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1, 1)
    return (x - mean_t) / std_t
