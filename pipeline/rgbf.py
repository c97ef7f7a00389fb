"""Per-frame maths of the training inputs: the flow image and RGBF (paper §3.4, eq. 7).

Arrays are ``(N, H, W, C)``: RGB frames uint8 with C=3, flow float32 with C=2 (u right, v down, in pixels, the
motion from frame t to t+1), flow images and RGBF uint8 with C=3.

Flow image (the paper stores flow "in the form of traditional images"; the encoding is ours, as TSN/denseflow do):
channels (u, v, |F|) with a clip bound ``b`` (default 20 px)::

    u, v -> clip(rint(127.5 + x * 127.5 / b), 0, 255)      |F| -> clip(rint(|F| * 255 / b), 0, 255)

``rint`` rounds half to even. The u/v centre is 127.5, not 128, so decoding is antisymmetric: ``255 - c`` decodes
to exactly ``-x``, which is why a horizontal flip of a flow image is ``255 - channel0`` (see ``model.clips``). Values
within the bound decode back within ``b / 255`` px (half a quantisation step); larger ones saturate.

RGBF (eq. 7), per frame: ``RGBF[x,y,c] = RGB[x,y,c] * (|F|[x,y] - min|F|) / (max|F| - min|F|)`` with min/max over
that frame's magnitude, computed in float32 from the stored flow (not from the quantised flow image) and rounded
half to even (``np.rint``) to uint8. A frame whose magnitude range is below ``MIN_MAGNITUDE_RANGE`` (1e-6 px; a
static scene, or a pure pan where every pixel moves alike) has no pixel moving relative to any other, so every
weight is 0 and its RGBF frame is all black; no division happens there, so no NaN and no warning.

Frame pairing: T frames have T-1 flow pairs. Frame t uses the pair t -> t+1; the last frame, which has no following
frame, reuses the last pair (T-2 -> T-1), so it carries the motion that led into it rather than a black RGBF frame.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import Asym3dError

if TYPE_CHECKING:
    from pipeline.store import ShardSet

DEFAULT_FLOW_BOUND = 20.0
MIN_MAGNITUDE_RANGE = 1e-6  # px; below this a frame's magnitude is treated as constant
MODALITIES = ("rgb", "flow", "rgbf")

FLOW_IMAGE_ENCODING = ("channels (u, v, |F|); u,v -> clip(rint(127.5 + x*127.5/bound), 0, 255); "
                       "|F| -> clip(rint(|F|*255/bound), 0, 255); rint rounds half to even")
RGBF_DEFINITION = ("eq. 7: rint(RGB * (|F| - min|F|) / (max|F| - min|F|)), min/max per frame, float32 from the "
                   f"stored flow, rint rounds half to even; frames with max|F| - min|F| < {MIN_MAGNITUDE_RANGE:g} px "
                   "are all black (weight 0)")
LAST_FRAME_PAIRING = "frame t uses flow t->t+1; the last frame reuses the last pair T-2->T-1"


class RGBFError(Asym3dError, ValueError):
    """Frames and flow that cannot make training frames (too short, mismatched, non-finite flow)."""


def magnitude(flow: np.ndarray) -> np.ndarray:
    """|F| of flow ``(N, H, W, 2)``, float32 ``(N, H, W)``."""
    flow = np.asarray(flow, dtype=np.float32)
    return np.hypot(flow[..., 0], flow[..., 1])


def flow_to_image(flow: np.ndarray, bound: float = DEFAULT_FLOW_BOUND) -> np.ndarray:
    """Flow ``(N, H, W, 2)`` in pixels -> flow image ``(N, H, W, 3)`` uint8 (u, v, |F|); see the module docstring."""
    flow = np.asarray(flow, dtype=np.float32)
    return _flow_image(flow, magnitude(flow), bound)


def _flow_image(flow: np.ndarray, mag: np.ndarray, bound: float) -> np.ndarray:
    """:func:`flow_to_image` given float32 flow and its magnitude (computed once for both training images)."""
    image = np.empty(flow.shape[:-1] + (3,), np.uint8)
    image[..., :2] = np.clip(np.rint(127.5 + flow * np.float32(127.5 / bound)), 0, 255)
    image[..., 2] = np.clip(np.rint(mag * np.float32(255.0 / bound)), 0, 255)
    return image


def image_to_flow(image: np.ndarray, bound: float = DEFAULT_FLOW_BOUND) -> np.ndarray:
    """Flow image ``(N, H, W, 3)`` uint8 -> (u, v) float32 ``(N, H, W, 2)``; exact inverse within the bound up to
    ``bound / 255`` px."""
    return (image[..., :2].astype(np.float32) - np.float32(127.5)) * np.float32(bound / 127.5)


def rgbf(rgb: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Eq. 7: RGB ``(N, H, W, 3)`` uint8 weighted by the per-frame normalised magnitude of flow ``(N, H, W, 2)``."""
    _check_pair(rgb, flow)
    return _rgbf(rgb, magnitude(flow))


def _check_pair(rgb: np.ndarray, flow: np.ndarray) -> None:
    if rgb.shape[:-1] != flow.shape[:-1]:
        raise RGBFError(f"RGB frames {rgb.shape[:-1]} and flow {flow.shape[:-1]} differ in count or size")


def _rgbf(rgb: np.ndarray, mag: np.ndarray) -> np.ndarray:
    """:func:`rgbf` given the flow's magnitude."""
    lo = mag.min(axis=(1, 2), keepdims=True)
    span = mag.max(axis=(1, 2), keepdims=True) - lo
    moving = span >= MIN_MAGNITUDE_RANGE
    # Divide only where the range is real; constant-magnitude frames get weight 0 (black) without a 0/0.
    weight = (mag - lo) / np.where(moving, span, np.float32(1)) * moving
    # uint8 times float32 in one pass (the cast is exact): the same numbers as rgb.astype(float32) * weight
    return np.rint(np.multiply(rgb, weight[..., None], dtype=np.float32)).astype(np.uint8)


def paired_flow_index(n_frames: int) -> np.ndarray:
    """For each of ``n_frames`` frames, the index of the flow pair it is paired with (the last frame reuses the last
    pair). Needs at least two frames: one frame has no motion at all."""
    if n_frames < 2:
        raise RGBFError(f"{n_frames} frame(s): at least 2 are needed for any flow")
    return np.minimum(np.arange(n_frames), n_frames - 2)


def training_frames(rgb: np.ndarray, flow: np.ndarray, modalities: tuple[str, ...] = MODALITIES,
                    bound: float = DEFAULT_FLOW_BOUND) -> dict[str, np.ndarray]:
    """The requested training modalities for frames whose flow is already paired (``len(flow) == len(rgb)``).

    Returns ``{name: (N, H, W, 3) uint8}`` for each of ``modalities`` ("rgb", "flow" = flow image, "rgbf").
    Raises :class:`RGBFError` for non-finite flow, which would otherwise turn into silent garbage in every modality.
    """
    if not np.isfinite(flow).all():
        raise RGBFError("flow holds NaN or infinite values")
    if "rgbf" in modalities:
        _check_pair(rgb, flow)
    flow = np.asarray(flow, dtype=np.float32)
    mag = magnitude(flow) if {"flow", "rgbf"} & set(modalities) else None  # once for both images
    makers = {"rgb": lambda: rgb, "flow": lambda: _flow_image(flow, mag, bound), "rgbf": lambda: _rgbf(rgb, mag)}
    return {name: makers[name]() for name in modalities}


def figure_rows(shards: "ShardSet", video_id: str, n: int = 8) -> list[tuple[str, np.ndarray]]:
    """Rows of a Figure-5-like strip for one video of training shards: ``[(title, frames (n, H, W, 3) uint8), ...]``,
    ``n`` evenly spaced frames of each stored "rgb", "flow" and "rgbf" field, in that order. (Flow shards are drawn
    by :func:`pipeline.inspect.strip_rows` as RGB and colour-coded flow.)
    """
    video = shards.video(video_id)
    index = np.unique(np.rint(np.linspace(0, video.n_frames - 1, n)).astype(np.int64))
    titles = {"rgb": "RGB", "flow": "flow image (u, v, |F|)", "rgbf": "RGBF (eq. 7)"}
    return [(titles[name], shards.read(video, name, index=index))
            for name in MODALITIES if name in shards.schema.field_names]
