"""Optical-flow backends: one interface over OpenCV's CPU and CUDA TV-L1, the batched torch TV-L1, DIS and Farneback.

The paper's flow is TV-L1 (§3.4). Users differ in what they can run it on: PyPI OpenCV has no CUDA, building it
with CUDA is the pain point of older tools, and the CPU version is slow (~5 pairs/s at 171x128 on 2 cores). So the
backend is a choice made once per run, by name:

- ``cpu``: OpenCV contrib's Dual TV-L1 (``cv2.optflow.DualTVL1OpticalFlow``), the reference implementation;
- ``cuda``: OpenCV's ``cv2.cuda`` Dual TV-L1, only when OpenCV was built with CUDA and sees a device;
- ``torch``: the same algorithm in batched PyTorch (``pipeline.tvl1_torch``), on a GPU or the CPU;
- ``auto``: ``cuda`` if usable, else ``torch`` if torch sees a GPU, else ``cpu``;
- ``dis``, ``farneback``: fast flows that are NOT TV-L1; they are never chosen by ``auto`` and say so in their
  metadata (``is_tvl1`` False), so shards made with them cannot pass for the paper's input.

Every backend maps ``(T, H, W, 3)`` uint8 RGB frames to ``(T - 1, H, W, 2)`` float32 flow: channel 0 is u
(horizontal, + right), channel 1 is v (vertical, + down), in pixels at the frames' resolution, from frame t to t+1,
i.e. ``frame_t[y, x] ~ frame_t+1[y + v, x + u]``. Frames are converted to grey with ``cv2.COLOR_RGB2GRAY`` first.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any, Iterable, Iterator, Protocol

import cv2
import numpy as np
import torch

from pipeline.devices import check_device
from pipeline.errors import Asym3dError, ConfigError
from pipeline.tvl1_params import TVL1Params
from pipeline.tvl1_torch import SOLVERS, rgb_to_gray, tvl1_flow_frames, tvl1_flow_videos

__all__ = [
    "BACKENDS",
    "FlowBackend",
    "FlowBackendUnavailable",
    "TORCH_SOLVERS",
    "TVL1_BACKENDS",
    "TVL1Params",
    "backend_metadata",
    "backend_record",
    "cuda_available",
    "flow_identity",
    "make_backend",
    "resolve_backend",
]

BACKENDS = ("auto", "cuda", "cpu", "torch", "dis", "farneback")
TVL1_BACKENDS = ("auto", "cpu", "cuda", "torch")  # the backends that compute TV-L1 (auto only ever picks one of them)
TORCH_SOLVERS = ("auto", *SOLVERS)
# Default torch TV-L1 batch on a GPU, in pixels of all its pairs: 1024 pairs at 171x128. The solver is launch-bound
# below that (the device check: 64 pairs took 1.57 s, 1024 pairs 2.37 s on an H200).
TORCH_GPU_BATCH_PIXELS = 1024 * 171 * 128
# The smallest frame side every backend handles: OpenCV's DIS raises on frames of 8 px and has crashed the process
# on 12 px high ones; 16 px is also where TV-L1 stops adding pyramid levels. Far below any real use.
MIN_FRAME_SIDE = 16

# Farneback settings: the values of OpenCV's dense optical flow tutorial, a common choice for video at this size.
_FARNEBACK_SETTINGS = {
    "pyr_scale": 0.5,
    "levels": 3,
    "winsize": 15,
    "iterations": 3,
    "poly_n": 5,
    "poly_sigma": 1.2,
    "flags": 0,
}


class FlowBackendUnavailable(Asym3dError):
    """The requested backend cannot run with this OpenCV/torch installation or hardware."""


class FlowBackend(Protocol):
    """Computes flow between consecutive frames; see the module docstring for the conventions.

    name: the backend name (one of BACKENDS except "auto"). is_tvl1: whether the flow is TV-L1 (the paper's).
    algorithm: "tvl1", "dis" or "farneback". settings: the parameters the algorithm really ran with (stored in shards).
    device: where it runs ("cpu", "cuda", "cuda:1", ...).
    """

    name: str
    is_tvl1: bool
    algorithm: str
    settings: dict[str, Any]
    device: str

    def compute(self, frames: np.ndarray) -> np.ndarray:
        """(T, H, W, 3) uint8 RGB -> (T - 1, H, W, 2) float32 (u, v)."""
        ...

    def compute_videos(self, videos: Iterable[tuple[Any, np.ndarray]]) -> Iterator[tuple[Any, np.ndarray | Exception]]:
        """``(tag, frames)`` in, ``(tag, flow)`` out in the same order; a video that fails gets its exception as flow.
        Batching backends (torch) share batches across videos; the others take one video at a time."""
        ...


def cuda_available() -> bool:
    """True when OpenCV was built with CUDA and sees at least one CUDA device. Never raises.

    PyPI's OpenCV wheels have a ``cv2.cuda`` module whose device count is always 0, so both checks are needed.
    """
    try:
        return cv2.cuda.getCudaEnabledDeviceCount() > 0
    except (AttributeError, cv2.error):
        return False


def resolve_backend(name: str) -> str:
    """The concrete backend ``name`` stands for: ``auto`` becomes cuda, torch (with a GPU) or cpu, in that order."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown flow backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    if cuda_available():
        return "cuda"
    if torch.cuda.is_available():
        return "torch"
    return "cpu"


def _check_frames(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8 RGB, got {frames.shape} {frames.dtype}")
    if frames.shape[0] < 2:
        raise ValueError(f"need at least 2 frames for flow, got {frames.shape[0]}")


class _PairwiseOpenCV:
    """Base for OpenCV backends, which solve one pair at a time: converts to grey once, then calls ``_pair``."""

    name: str
    is_tvl1: bool
    algorithm: str
    settings: dict[str, Any]
    device = "cpu"

    def compute(self, frames: np.ndarray) -> np.ndarray:
        _check_frames(frames)
        gray = rgb_to_gray(frames)
        out = np.empty((len(gray) - 1, *gray.shape[1:], 2), dtype=np.float32)
        for t in range(len(gray) - 1):
            out[t] = self._pair(gray[t], gray[t + 1])
        return out

    def compute_videos(self, videos: Iterable[tuple[Any, np.ndarray]]) -> Iterator[tuple[Any, np.ndarray | Exception]]:
        for tag, frames in videos:
            try:
                yield tag, self.compute(frames)
            except Exception as err:  # noqa: BLE001 - this video fails with the reason; the caller goes on
                yield tag, err

    def _pair(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class _CpuTVL1(_PairwiseOpenCV):
    name, is_tvl1, algorithm = "cpu", True, "tvl1"

    def __init__(self, params: TVL1Params) -> None:
        self.settings = dataclasses.asdict(params)
        self._tvl1 = params.to_opencv()

    def _pair(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        # OpenCV shrinks the object's nscales for an image too small for the pyramid and keeps it shrunk; restoring it
        # makes every pair see the configured parameters whatever came before.
        self._tvl1.setScalesNumber(self.settings["nscales"])
        return self._tvl1.calc(prev, nxt, None)


class _CudaTVL1(_PairwiseOpenCV):
    """OpenCV's CUDA Dual TV-L1. Its parameters differ from the CPU version's: one ``iterations`` count per warp
    (we pass innerIterations * outerIterations, 300 by default as on the CPU) and no median filtering."""

    name, is_tvl1, algorithm, device = "cuda", True, "tvl1", "cuda"

    def __init__(self, params: TVL1Params) -> None:
        self.settings = {
            "tau": params.tau,
            "lambda_": params.lambda_,
            "theta": params.theta,
            "nscales": params.nscales,
            "warps": params.warps,
            "epsilon": params.epsilon,
            "iterations": params.innerIterations * params.outerIterations,
            "scaleStep": params.scaleStep,
            "gamma": params.gamma,
            "useInitialFlow": params.useInitialFlow,
        }
        self._tvl1 = cv2.cuda_OpticalFlowDual_TVL1.create(*self.settings.values())
        # Device buffers reused for every pair.
        self._prev, self._next, self._flow = cv2.cuda_GpuMat(), cv2.cuda_GpuMat(), cv2.cuda_GpuMat()

    def _pair(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        self._prev.upload(prev)
        self._next.upload(nxt)
        self._flow = self._tvl1.calc(self._prev, self._next, self._flow)
        return self._flow.download()


class _Dis(_PairwiseOpenCV):
    name, is_tvl1, algorithm = "dis", False, "dis"

    def __init__(self) -> None:
        self.settings = {"preset": "medium"}
        self._dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)

    def _pair(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        return self._dis.calc(prev, nxt, None)


class _Farneback(_PairwiseOpenCV):
    name, is_tvl1, algorithm = "farneback", False, "farneback"

    def __init__(self) -> None:
        self.settings = dict(_FARNEBACK_SETTINGS)

    def _pair(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        return cv2.calcOpticalFlowFarneback(prev, nxt, None, **self.settings)


class _TorchTVL1:
    """Batched TV-L1 in PyTorch; ``batch_size`` pairs (from one or several videos) are solved at once on ``device``."""

    name, is_tvl1, algorithm = "torch", True, "tvl1"

    def __init__(self, params: TVL1Params, device: str, batch_size: int | None, solver: str) -> None:
        if torch.device(device).type == "cpu":
            # One intra-op thread per worker process: the solver's many small ops lose more to OpenMP's hand-offs
            # than they gain (measured ~30x slower per op with 2 threads on a loaded 2-core machine); the CPU is
            # used in parallel through --jobs processes instead.
            torch.set_num_threads(1)
        self.settings = dataclasses.asdict(params)
        self.device = device
        self.batch_size = batch_size
        # auto: compiled on a GPU, ~2x eager's pairs/s once compiled, for a process that solves many pairs (a run of
        # a few clips finishes sooner eager: BENCHMARKS.md); eager on a CPU, where compiling costs more than it saves.
        self.solver = solver if solver != "auto" else ("compiled" if torch.device(device).type == "cuda" else "eager")
        self._params = params

    def batch_for(self, height: int, width: int) -> int:
        """``batch_size``, or by default what fills the device: 32 pairs on a CPU; on a GPU, pairs of
        ``TORCH_GPU_BATCH_PIXELS`` pixels in all (1024 pairs at 171x128, ~7 GB with the eager solver)."""
        if self.batch_size:
            return self.batch_size
        if torch.device(self.device).type == "cpu":
            return 32
        return max(32, round(TORCH_GPU_BATCH_PIXELS / (height * width)))

    def compute(self, frames: np.ndarray) -> np.ndarray:
        return tvl1_flow_frames(frames, self._params, device=self.device, batch_size=self.batch_for(*frames.shape[1:3]),
                                solver=self.solver)

    def compute_videos(self, videos: Iterable[tuple[Any, np.ndarray]]) -> Iterator[tuple[Any, np.ndarray | Exception]]:
        videos = iter(videos)
        first = next(videos, None)
        if first is None:
            return
        batch = self.batch_for(*first[1].shape[1:3])
        yield from tvl1_flow_videos(itertools.chain([first], videos), self._params, device=self.device,
                                    batch_size=batch, solver=self.solver)


def make_backend(
    name: str, params: TVL1Params = TVL1Params(), *, device: str | None = None, batch_size: int | None = None,
    solver: str = "auto",
) -> FlowBackend:
    """Build the flow backend ``name`` (one of BACKENDS; ``auto`` is resolved with :func:`resolve_backend`).

    params: TV-L1 parameters for cpu, cuda and torch (dis and farneback have their own fixed settings).
    device, batch_size, solver: for the torch backend only (device defaults to "cuda" when torch sees a GPU, else
    "cpu"; batch_size None fills the device, see ``_TorchTVL1.batch_for``; solver one of ``TORCH_SOLVERS``, "auto"
    being "compiled" on a GPU and "eager" on the CPU, where compiling does not pay: BENCHMARKS.md).
    Raises ValueError for an unknown name and FlowBackendUnavailable when the backend cannot run here.
    """
    resolved = resolve_backend(name)
    if resolved == "cpu":
        return _CpuTVL1(params)
    if resolved == "cuda":
        if not cuda_available():
            raise FlowBackendUnavailable(
                f"the cuda flow backend needs OpenCV built with CUDA and a CUDA device; this OpenCV "
                f"({cv2.__version__}) reports no CUDA device (PyPI wheels have no CUDA): use --backend torch "
                "(TV-L1 on a GPU through PyTorch) or --backend cpu"
            )
        return _CudaTVL1(params)
    if resolved == "torch":
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if solver not in TORCH_SOLVERS:
            raise ConfigError(f"unknown solver {solver!r}; valid: {', '.join(TORCH_SOLVERS)}")
        device = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return _TorchTVL1(params, _spread_over_gpus(device), batch_size, solver)
    if resolved == "dis":
        return _Dis()
    return _Farneback()


def _spread_over_gpus(device: str) -> str:
    """``cuda`` on a machine with several GPUs -> ``cuda:N`` picked by this process's id, so that the ``--jobs``
    worker processes of one node (consecutive ids) spread over its GPUs instead of all taking GPU 0. An explicit
    ``cuda:N``, or ``CUDA_VISIBLE_DEVICES`` set per worker, decides instead."""
    count = torch.cuda.device_count() if device == "cuda" else 0
    return f"cuda:{os.getpid() % count}" if count > 1 else device


def backend_metadata(backend: FlowBackend) -> dict[str, Any]:
    """What a flow is: the algorithm (and whether it is TV-L1) and its parameters, the identity a resumed run must
    match, so flow of a non-TV-L1 backend or other parameters is never mistaken for the paper's. Which backend and
    device ran it is :func:`backend_record`."""
    return {"algorithm": backend.algorithm, "is_tvl1": backend.is_tvl1, "params": dict(backend.settings)}


def flow_identity(name: str, params: TVL1Params = TVL1Params()) -> dict[str, Any]:
    """:func:`backend_metadata` of backend ``name`` without building it: every TV-L1 backend (and ``auto``, which
    only ever picks one) computes the same flow, so a planning machine without the worker's GPU states it too."""
    if name in TVL1_BACKENDS:
        return {"algorithm": "tvl1", "is_tvl1": True, "params": dataclasses.asdict(params)}
    return backend_metadata(make_backend(name, params))


def backend_record(backend: FlowBackend) -> dict[str, Any]:
    """What ran a flow (backend, device, torch solver, torch version): recorded with the shards, never compared."""
    return {"backend": backend.name, "device": backend.device, "torch": torch.__version__,
            **({"solver": backend.solver} if isinstance(backend, _TorchTVL1) else {})}
