"""A synthetic action dataset in the UCF-101 layout, where only motion tells the classes apart.

Why it exists: a newcomer must be able to run the whole road (extract-flow, build-rgbf, train, evaluate) in minutes
on a laptop, and a reviewer must be able to check the paper's claim -- motion information (flow, RGBF) helps a 3D
CNN -- on data anyone can regenerate. So the classes are built to be separable *only* through motion:

- every video shows a smooth-noise background (one per group ``gXX``, the "scene", shared by all classes), 2-3
  large random textured polygons, each dark or bright against the mid-tone scene, a small random camera jitter and
  per-frame pixel noise;
- the classes differ only in how the objects move (:data:`MOTIONS`): translation up/down/right/left (wrapping around
  the frame, so the direction stays constant and objects stay visible), zoom in/out (the size wraps around its
  range, like the translations' positions), oscillation, none, or rotation clockwise/counter-clockwise;
- every random draw that shapes a single frame (object position, angle, size, colour, texture) has the same
  distribution in every class: positions live on a torus, angles and log-sizes on circles, and each motion is a
  shift along one of them, so the frame at any time t is statistically identical across classes. A network must use
  several frames to beat chance.

Layout written under ``out`` (what the ``ucf101`` indexer reads)::

    out/videos/<Class>/v_<Class>_gXX_cYY.avi     MPEG-4 part 2 in AVI, like UCF-101's own files
    out/splits/classInd.txt                      "<1-based label> <Class>", CRLF line ends like the real files
    out/splits/trainlist0{1,2,3}.txt             "<Class>/v_<Class>_gXX_cYY.avi <label>"
    out/splits/testlist0{1,2,3}.txt              "<Class>/v_<Class>_gXX_cYY.avi"
    out/demo.json                                the generation parameters (lets a rerun resume safely)

Split N puts the N-th third of the groups in test, the rest in train, as UCF-101 does with its 25 groups (7 or 8 per
split); so no group is in both train and test of a split and every class is in each train and test list.

Determinism: the frames are a pure function of the parameters (``render_video`` returns identical bytes for a seed).
ffmpeg's mpeg4 encoder runs single-threaded with ``bitexact`` flags, and gave byte-identical files across runs here;
a different ffmpeg build may encode the same frames to different bytes.
"""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

import cv2
import ffmpeg
import numpy as np

from pipeline.decode import ffmpeg_exe
from pipeline.errors import Asym3dError
from pipeline.store import atomic_output, write_bytes_atomic, write_text_atomic

__all__ = [
    "CLASS_NAMES",
    "MOTIONS",
    "DemoDataError",
    "DemoSummary",
    "VideoSpec",
    "held_out_groups",
    "make_demo_dataset",
    "plan_videos",
    "render_video",
]

# The motions, in the order `classes=K` takes them. The first six look like themselves in a mirror; the last four
# are two mirror pairs (right/left, cw/ccw). The paper's horizontal-flip augmentation (and its mirrored test crops)
# turns one of a mirror pair into the other, so those pairs come last: up to K=6 every class stays learnable.
# Class names are CamelCase without "_" or "-" because UCF-101 file names `v_<Class>_gXX_cYY` are split on "_".
MOTIONS: tuple[str, ...] = (
    "translate-up",
    "translate-down",
    "static",
    "oscillate",
    "zoom-in",
    "zoom-out",
    "translate-right",
    "translate-left",
    "rotate-cw",
    "rotate-ccw",
)
CLASS_NAMES: tuple[str, ...] = (
    "TranslateUp",
    "TranslateDown",
    "Static",
    "Oscillate",
    "ZoomIn",
    "ZoomOut",
    "TranslateRight",
    "TranslateLeft",
    "RotateCW",
    "RotateCCW",
)
NUM_SPLITS = 3
MAX_FRAMES = 3000  # a cap on memory: one video's frames are held in RAM before encoding
ENCODE_TIMEOUT_S = 120.0

# Unit direction (dx, dy) of each translation, image coordinates (y grows downwards).
_DIRECTIONS = {
    "translate-right": (1.0, 0.0),
    "translate-left": (-1.0, 0.0),
    "translate-up": (0.0, -1.0),
    "translate-down": (0.0, 1.0),
}
_SPEED_RANGE = (1.0, 3.0)  # object speed, px/frame (rim speed for rotation, peak speed for oscillation)
_LOG_SCALE_HALF_RANGE = math.log(1.6)  # object size varies in [1/1.6, 1.6] x its nominal size
_ZOOM_RATE_PER_SPEED = 0.03  # d(log size)/frame per px/frame of speed: a 1.6x zoom takes 5-16 frames
_NOISE_SIGMA = 4.0  # per-frame pixel noise, grey levels
_JITTER_SIGMA = 0.3  # camera jitter: AR(1) innovations, px (~0.4 px frame to frame, below the objects' 1-3)
_JITTER_PERSISTENCE = 0.8


class DemoDataError(Asym3dError, ValueError):
    """Bad parameters, an output directory that is not ours to write, or an encoder failure (one-line message)."""


@dataclass(frozen=True)
class VideoSpec:
    """One video of the plan: class (0-based), group and clip (1-based, the ``gXX``/``cYY`` of its name)."""

    label: int
    group: int
    clip: int

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.label]

    @property
    def relpath(self) -> str:
        """Path relative to the video root, as the split files write it."""
        name = self.class_name
        return f"{name}/v_{name}_g{self.group:02d}_c{self.clip:02d}.avi"


@dataclass(frozen=True)
class DemoSummary:
    """What :func:`make_demo_dataset` wrote. ``encoded`` counts videos written by this call (a rerun skips those
    already complete); ``num_videos`` is the dataset's total."""

    root: Path
    video_root: Path
    split_dir: Path
    class_names: tuple[str, ...]
    num_videos: int
    encoded: int
    class_index: Path
    train_lists: tuple[Path, ...]
    test_lists: tuple[Path, ...]


def held_out_groups(groups: int, split: int) -> frozenset[int]:
    """The groups (1-based) in the test set of ``split`` (1..3): the split-th third of ``1..groups``."""
    if not 1 <= split <= NUM_SPLITS:
        raise DemoDataError(f"split must be 1..{NUM_SPLITS}, got {split}")
    if groups < NUM_SPLITS:
        raise DemoDataError(f"groups must be at least {NUM_SPLITS} (one per split's test set), got {groups}")
    thirds = np.array_split(np.arange(1, groups + 1), NUM_SPLITS)
    return frozenset(int(g) for g in thirds[split - 1])



def plan_videos(classes: int, videos_per_class: int, groups: int) -> list[VideoSpec]:
    """Every video of the dataset, class by class: video i of a class is in group ``i % groups + 1``.

    Requiring ``videos_per_class >= groups`` puts every class in every group, hence in every split's train and test.
    """
    if not 2 <= classes <= len(MOTIONS):
        raise DemoDataError(f"classes must be 2..{len(MOTIONS)}, got {classes}")
    if not NUM_SPLITS <= groups <= 99:
        raise DemoDataError(f"groups must be {NUM_SPLITS}..99 (gXX has two digits), got {groups}")
    if videos_per_class < groups:
        raise DemoDataError(
            f"videos_per_class ({videos_per_class}) must be at least groups ({groups}) so that every class is in "
            "every split's train and test sets"
        )
    if math.ceil(videos_per_class / groups) > 99:
        raise DemoDataError(
            f"{videos_per_class} videos per class over {groups} groups is over 99 per group (cYY has two digits); "
            "raise groups"
        )
    return [
        VideoSpec(label=label, group=i % groups + 1, clip=i // groups + 1)
        for label in range(classes)
        for i in range(videos_per_class)
    ]


def _smooth_noise(rng: np.random.Generator, height: int, width: int, sigma: float, channels: int) -> np.ndarray:
    """White noise blurred with a Gaussian of ``sigma`` px, rescaled to unit variance: (H, W, C) float32."""
    noise = rng.standard_normal((height, width, channels), dtype=np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), sigma, borderType=cv2.BORDER_REFLECT).reshape(height, width, channels)
    return smooth / max(float(smooth.std()), 1e-6)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A scene: two octaves of smooth colour noise around a random base colour, (H, W, 3) float32 in 0..255."""
    base = rng.uniform(70, 180, size=3).astype(np.float32)
    coarse = _smooth_noise(rng, height, width, min(height, width) / 10, 3)
    fine = _smooth_noise(rng, height, width, min(height, width) / 40, 3)
    return np.clip(base + 15.0 * coarse + 6.0 * fine, 0, 255)


@dataclass(frozen=True)
class _Sprite:
    """An object drawn at its largest size: premultiplied RGB and alpha, (S, S, 4) float32, centred in the patch."""

    rgba: np.ndarray
    nominal_radius: float


def _sprite(rng: np.random.Generator, min_side: int) -> _Sprite:
    """A random textured polygon (3-7 irregular corners, so rotation is visible), dark or bright."""
    nominal = rng.uniform(0.22, 0.32) * min_side
    r_max = nominal * math.exp(_LOG_SCALE_HALF_RANGE)
    side = 2 * math.ceil(r_max) + 3  # any rotation of the polygon stays inside the patch
    centre = (side - 1) / 2
    corners = int(rng.integers(3, 8))
    # Roughly evenly spread corners: irregular but never a sliver.
    angles = (np.arange(corners) + rng.uniform(-0.3, 0.3, corners)) * (2 * np.pi / corners) + rng.uniform(0, 2 * np.pi)
    radii = rng.uniform(0.6, 1.0, corners) * r_max
    shift = 4  # cv2 fixed-point bits: sub-pixel corner positions for smooth edges
    points = np.stack([centre + radii * np.cos(angles), centre + radii * np.sin(angles)], axis=1)
    mask = np.zeros((side, side), np.uint8)
    cv2.fillPoly(mask, [np.round(points * (1 << shift)).astype(np.int32)], 255, cv2.LINE_AA, shift)
    alpha = mask.astype(np.float32) / 255.0
    # Dark or bright, never mid-tone like the scene: the object stands out in luma, which JPEG keeps at full
    # resolution (4:2:0 halves colour), so RGB alone can see the motion (BENCHMARKS.md, "make demo").
    bright = rng.random() < 0.5
    colour = (rng.uniform(195, 245, size=3) if bright else rng.uniform(10, 60, size=3)).astype(np.float32)
    texture = _smooth_noise(rng, side, side, max(1.0, side / 12), 1)  # texture: motion is visible inside too
    rgb = np.clip(colour * (1.0 + 0.3 * texture), 0, 255)
    return _Sprite(np.dstack([rgb * alpha[..., None], alpha]), nominal)


def _object_track(
    motion: str, rng: np.random.Generator, frames: int, canvas_hw: tuple[int, int], radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame centre x, y on the canvas torus, angle (degrees, counter-clockwise) and log-size of one object.

    Every motion draws the same random numbers in the same order and leaves frame 0 at the drawn start state, so
    for given seeds frame 0 is the same whatever the class. The motion only moves the state along the torus
    (position) or a circle (angle, log-size), so every later frame's distribution is class-independent too.
    """
    t = np.arange(frames, dtype=np.float64)
    ch, cw = canvas_hw
    speed = rng.uniform(*_SPEED_RANGE)
    x = np.full(frames, rng.uniform(0, cw))
    y = np.full(frames, rng.uniform(0, ch))
    angle = np.full(frames, rng.uniform(0, 360))
    log_scale = np.full(frames, rng.uniform(-_LOG_SCALE_HALF_RANGE, _LOG_SCALE_HALF_RANGE))
    period, heading = rng.uniform(8, 16), rng.uniform(0, 2 * np.pi)  # oscillation only, drawn for all
    if motion in _DIRECTIONS:
        dx, dy = _DIRECTIONS[motion]
        x, y = x + dx * speed * t, y + dy * speed * t
    elif motion in ("rotate-cw", "rotate-ccw"):
        # cv2 angles are counter-clockwise on screen; the rim of the nominal-size object moves `speed` px/frame.
        sense = -1.0 if motion == "rotate-cw" else 1.0
        angle = angle + sense * np.degrees(speed / radius) * t
    elif motion in ("zoom-in", "zoom-out"):
        sense = 1.0 if motion == "zoom-in" else -1.0
        span = 2 * _LOG_SCALE_HALF_RANGE
        log_scale = (log_scale + sense * _ZOOM_RATE_PER_SPEED * speed * t + _LOG_SCALE_HALF_RANGE) % span
        log_scale -= _LOG_SCALE_HALF_RANGE
    elif motion == "oscillate":
        amplitude = speed * period / (2 * np.pi)  # peak speed = `speed`
        offset = amplitude * np.sin(2 * np.pi * t / period)
        x, y = x + offset * np.cos(heading), y + offset * np.sin(heading)
    return x % cw, y % ch, angle, log_scale


def _paste(canvas: np.ndarray, sprite: _Sprite, x: float, y: float, angle: float, log_scale: float) -> None:
    """Draw the sprite centred at (x, y) on the canvas, wrapping around its edges (the canvas is a torus)."""
    side = sprite.rgba.shape[0]
    centre = (side - 1) / 2
    # Sprites are drawn at their largest size, so this only ever shrinks them (no blur from upsampling).
    matrix = cv2.getRotationMatrix2D((centre, centre), angle, math.exp(log_scale - _LOG_SCALE_HALF_RANGE))
    left, top = math.floor(x - centre), math.floor(y - centre)
    matrix[:, 2] += (x - centre - left, y - centre - top)  # the sub-pixel part of the position
    warped = cv2.warpAffine(sprite.rgba, matrix, (side, side), flags=cv2.INTER_LINEAR)
    rows = (top + np.arange(side)) % canvas.shape[0]
    cols = (left + np.arange(side)) % canvas.shape[1]
    index = np.ix_(rows, cols)
    canvas[index] = canvas[index] * (1.0 - warped[..., 3:]) + warped[..., :3]


def render_video(
    motion: str, *, frames: int, height: int, width: int, background_seed: int | tuple[int, ...],
    video_seed: int | tuple[int, ...],
) -> np.ndarray:
    """The frames of one synthetic video, (T, H, W, 3) uint8 RGB; a pure function of its arguments.

    ``background_seed`` picks the scene (shared by a group); ``video_seed`` picks the objects, their speeds, the
    camera jitter and the noise. The scene is drawn on a canvas a few pixels larger than the frame, so the jittering
    camera never sees past its edge.
    """
    if motion not in MOTIONS:
        raise DemoDataError(f"unknown motion {motion!r}; choose from {', '.join(MOTIONS)}")
    margin = max(3, round(0.04 * min(height, width)))
    canvas_hw = (height + 2 * margin, width + 2 * margin)
    background = _background(np.random.default_rng(background_seed), *canvas_hw)
    rng = np.random.default_rng(video_seed)
    sprites = [_sprite(rng, min(height, width)) for _ in range(int(rng.integers(2, 4)))]
    tracks = [_object_track(motion, rng, frames, canvas_hw, s.nominal_radius) for s in sprites]

    jitter = np.zeros((frames, 2))
    innovations = rng.normal(0.0, _JITTER_SIGMA, size=(frames, 2))
    for t in range(1, frames):
        jitter[t] = _JITTER_PERSISTENCE * jitter[t - 1] + innovations[t]
    jitter = np.clip(jitter, -margin + 1, margin - 1)

    out = np.empty((frames, height, width, 3), np.float32)
    for t in range(frames):
        canvas = background.copy()
        for sprite, (xs, ys, angles, log_scales) in zip(sprites, tracks):
            _paste(canvas, sprite, xs[t], ys[t], angles[t], log_scales[t])
        camera = np.float64([[1, 0, -margin - jitter[t, 0]], [0, 1, -margin - jitter[t, 1]]])
        out[t] = cv2.warpAffine(canvas, camera, (width, height), flags=cv2.INTER_LINEAR)
    out += rng.standard_normal(out.shape, dtype=np.float32) * _NOISE_SIGMA
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _encode(frames: np.ndarray, path: Path, fps: int) -> None:
    """Encode frames to ``path`` (MPEG-4 part 2 in AVI at high quality), via a temporary name renamed when done."""
    t, h, w, _ = frames.shape
    with atomic_output(path) as partial:  # the format is named, so the temporary name's suffix does not matter
        stream = (
            ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", framerate=fps)
            .output(str(partial), format="avi", vcodec="mpeg4", pix_fmt="yuv420p", threads=1, flags="+bitexact",
                    fflags="+bitexact", **{"q:v": 2, "frames:v": t})
            .global_args("-nostdin", "-v", "error", "-y")
        )
        try:
            proc = subprocess.run(ffmpeg.compile(stream, cmd=ffmpeg_exe()), input=frames.tobytes(),
                                  capture_output=True, timeout=ENCODE_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise DemoDataError(f"{path}: ffmpeg timed out after {ENCODE_TIMEOUT_S:g} s") from None
        if proc.returncode != 0:
            reason = " ".join(proc.stderr.decode("utf-8", "replace").split())[:240]
            raise DemoDataError(f"{path}: ffmpeg failed (exit {proc.returncode}): {reason}")


def _write_crlf(path: Path, lines: list[str]) -> None:
    """Write lines with CRLF ends, as the official UCF-101 split files have; temporary name, then rename."""
    write_bytes_atomic(path, "".join(line + "\r\n" for line in lines).encode("ascii"))


def _check_output_dir(out: Path, params: dict[str, object]) -> None:
    """Refuse to write into a non-empty directory that is not a demo dataset with these exact parameters.

    A matching ``demo.json`` means an earlier run with the same parameters: its finished videos are reused.
    """
    marker = out / "demo.json"
    if marker.is_file():
        try:
            previous = json.loads(marker.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DemoDataError(f"{marker}: not valid JSON ({err}); delete it or choose another directory") from None
        if not isinstance(previous, dict):
            raise DemoDataError(f"{marker}: not a demo dataset's parameters; delete it or choose another directory")
        if previous != params:
            changed = sorted(k for k in params.keys() | previous.keys() if previous.get(k) != params.get(k))
            raise DemoDataError(
                f"{out}: holds a demo dataset made with other parameters ({', '.join(changed)}); "
                "delete it or choose another directory"
            )
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DemoDataError(f"{out}: exists and is not an empty directory or a demo dataset; choose another one")


def make_demo_dataset(
    out: Path,
    *,
    classes: int = 6,
    videos_per_class: int = 12,
    groups: int = 6,
    frames: int = 32,
    height: int = 128,
    width: int = 171,
    fps: int = 25,
    seed: int = 0,
) -> DemoSummary:
    """Write the synthetic dataset (layout in the module docstring) under ``out``; returns what was written.

    The first ``classes`` entries of :data:`MOTIONS` are the classes. Rerunning with the same parameters finishes
    an interrupted run and re-encodes nothing that is complete; other parameters on the same ``out`` are refused.
    Raises :class:`DemoDataError` for bad parameters, a foreign non-empty ``out``, or an encoder failure.
    """
    out = Path(out)
    if not 2 <= frames <= MAX_FRAMES:
        raise DemoDataError(f"frames must be 2..{MAX_FRAMES}, got {frames}")
    if min(height, width) < 16:
        raise DemoDataError(f"frame size must be at least 16x16, got {height}x{width}")
    if fps < 1:
        raise DemoDataError(f"fps must be positive, got {fps}")
    plan = plan_videos(classes, videos_per_class, groups)
    params: dict[str, object] = dict(classes=classes, videos_per_class=videos_per_class, groups=groups,
                                     frames=frames, height=height, width=width, fps=fps, seed=seed, version=4)
    _check_output_dir(out, params)

    video_root, split_dir = out / "videos", out / "splits"
    for name in CLASS_NAMES[:classes]:
        (video_root / name).mkdir(parents=True, exist_ok=True)
    split_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "demo.json", json.dumps(params, indent=2) + "\n")

    encoded = 0
    for spec in plan:
        path = video_root / spec.relpath
        if path.is_file():  # only complete files carry the final name
            continue
        video = render_video(
            MOTIONS[spec.label], frames=frames, height=height, width=width,
            background_seed=(seed, 1, spec.group), video_seed=(seed, 2, spec.label, spec.group, spec.clip),
        )
        _encode(video, path, fps)
        encoded += 1

    class_index = split_dir / "classInd.txt"
    _write_crlf(class_index, [f"{i + 1} {name}" for i, name in enumerate(CLASS_NAMES[:classes])])
    train_lists, test_lists = [], []
    for split in range(1, NUM_SPLITS + 1):
        held_out = held_out_groups(groups, split)
        train_lists.append(split_dir / f"trainlist0{split}.txt")
        test_lists.append(split_dir / f"testlist0{split}.txt")
        _write_crlf(train_lists[-1], [f"{v.relpath} {v.label + 1}" for v in plan if v.group not in held_out])
        _write_crlf(test_lists[-1], [v.relpath for v in plan if v.group in held_out])

    return DemoSummary(
        root=out, video_root=video_root, split_dir=split_dir, class_names=CLASS_NAMES[:classes],
        num_videos=len(plan), encoded=encoded, class_index=class_index, train_lists=tuple(train_lists),
        test_lists=tuple(test_lists),
    )
