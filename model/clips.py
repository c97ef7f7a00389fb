"""Clip sampling, crops and flips shared by the trainer (random views) and the evaluator (the 250-view protocol).

Frames are uint8 arrays ``(T, H, W, C)`` as the training shards store them, and stay uint8 until they reach the
device the network runs on; tensors handed to networks are float ``(C, T, H, W)``, made there by
:func:`network_input` and :func:`protocol_views`. Flow images store u in channel 0 as ``127.5 + u * 127.5 / bound``
(see ``pipeline.rgbf``), so a horizontal flip, which negates horizontal motion, maps channel 0 to ``255 - value``
exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import ConfigError

FLOW_MODALITIES = ("flow",)
CROP_CHOICES = (1, 10)  # the centre crop; centre + 4 corners, each also mirrored (the paper's 10)


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


def protocol_frames(n_frames: int, clip_len: int, num_clips: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct frames the test clips of an ``n_frames`` video use, increasing, and each clip as a row of
    positions into them: ``(frames (U,), clips (num_clips, clip_len))``, so ``frames[clips[i]]`` are clip i's frames.

    Why: a video's 25 evenly spaced clips overlap (400 frame reads for a 188-frame UCF-101 video when each clip reads
    its own); reading the distinct frames once and cutting the clips by index reads each frame once, and never more
    than ``num_clips * clip_len`` frames however long the video is.
    """
    starts = evenly_spaced_starts(n_frames, clip_len, num_clips)
    index = np.stack([clip_indices(n_frames, int(start), clip_len) for start in starts])
    frames, inverse = np.unique(index, return_inverse=True)
    return frames, inverse.reshape(index.shape)


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


@dataclass(frozen=True)
class ViewProtocol:
    """The paper's test views (§4.3) of one input, as a checkpoint defines them: ``num_clips`` clips of ``clip_len``
    frames at equal intervals, 1 or 10 ``crop_size`` crops of each, normalised with the training's ``mean``/``std``.

    Shared by ``asym3d evaluate`` (frames from the shards), ``predict`` and ``features`` (frames computed from a
    video), so every one of them sees a video through the same views.
    """

    modality: str
    clip_len: int
    num_clips: int
    crop_size: int
    crops: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.crops not in CROP_CHOICES:
            raise ConfigError(f"crops must be one of {CROP_CHOICES}, got {self.crops}")
        if self.num_clips < 1:
            raise ConfigError(f"need at least one clip per video, got {self.num_clips}")

    @property
    def views_per_clip(self) -> int:
        return 10 if self.crops == 10 else 1

    def views(self, clips: torch.Tensor) -> torch.Tensor:
        """Whole-frame uint8 clips ``(N, T, H, W, C)`` -> their views ``(N * V, C, T, S, S)``, on the clips' device."""
        positions = crop_positions(clips.shape[2], clips.shape[3], self.crop_size)[:1 if self.crops == 1 else None]
        mean, std = (torch.tensor(v, dtype=torch.float32, device=clips.device) for v in (self.mean, self.std))
        return protocol_views(clips, positions, self.crop_size, self.crops == 10, self.modality, mean, std)
