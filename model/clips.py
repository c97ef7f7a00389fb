"""Clip sampling, crops and flips shared by the trainer (random views) and the evaluator (the 250-view protocol).

Frames are uint8 arrays ``(T, H, W, C)`` as the training shards store them, and stay uint8 until they reach the
device the network runs on; tensors handed to networks are float ``(C, T, H, W)``, made there by
:func:`network_input` and :func:`protocol_views`. Flow images store u in channel 0 as ``127.5 + u * 127.5 / bound``
(see ``pipeline.rgbf``), so a horizontal flip, which negates horizontal motion, maps channel 0 to ``255 - value``
exactly.
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


def network_input(clips: torch.Tensor, flips: torch.Tensor, modality: str, mean: torch.Tensor,
                  std: torch.Tensor) -> torch.Tensor:
    """uint8 clips ``(B, T, H, W, C)`` -> normalised float32 ``(B, C, T, H, W)``, mirrored where ``flips`` (B,) is set.

    Why here and not in the data workers: the host ships uint8 (a quarter of float32's bytes) and the device, where
    the clips already are, does the per-pixel work in one pass per batch. ``mean``/``std`` are (C,) on the 0..255
    scale, on the clips' device.
    """
    clips = torch.where(flips.view(-1, 1, 1, 1, 1), mirror(clips, modality), clips)
    return normalise(clips, mean, std)


def mirror(clips: torch.Tensor, modality: str) -> torch.Tensor:
    """Left-right mirror of uint8 clips ``(..., H, W, C)``; a flow image also has u (channel 0) negated: ``255 -
    value``, since a mirrored video moves the other way."""
    mirrored = clips.flip(-2)
    if modality in FLOW_MODALITIES:
        mirrored[..., 0] = 255 - mirrored[..., 0]
    return mirrored


def normalise(clips: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, T, H, W, C)`` -> float32 ``(B, C, T, H, W)``, ``(x - mean) / std`` per channel, in one buffer (its
    memory is channels-last, which the bf16 path wants and the float32 path copies once)."""
    x = clips.permute(0, 4, 1, 2, 3).float()
    return x.sub_(mean.view(1, -1, 1, 1, 1)).div_(std.view(1, -1, 1, 1, 1))


def protocol_views(clips: torch.Tensor, positions: list[tuple[int, int]], size: int, mirrored: bool, modality: str,
               mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The evaluation views of whole-frame uint8 clips ``(N, T, H, W, C)``: ``(N * V, C, T, size, size)`` normalised.

    Per clip, in this order: one crop per ``(top, left)`` of ``positions`` (the centre, then the 4 corners), then, when
    ``mirrored``, the same crops mirrored: V = len(positions) * (2 if mirrored else 1), the paper's 10 crops. Crops
    and mirrors are taken on uint8, so the float work is one normalisation of the views.
    """
    crops = torch.stack([clips[:, :, top:top + size, left:left + size] for top, left in positions], dim=1)
    if mirrored:
        crops = torch.cat((crops, mirror(crops, modality)), dim=1)
    return normalise(crops.flatten(0, 1), mean, std)
