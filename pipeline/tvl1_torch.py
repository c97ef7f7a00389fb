"""Dual TV-L1 optical flow in batched PyTorch: OpenCV's ``cv2.optflow.DualTVL1OpticalFlow`` for many pairs at once.

Why: OpenCV's TV-L1 runs one pair at a time on the CPU (~5 pairs/s at 171x128 on 2 cores), and its CUDA version
needs OpenCV built from source. This module is the same algorithm written as tensor operations over a batch of frame
pairs, so it runs wherever torch runs (CPU or CUDA) and a GPU can process a whole batch per kernel launch.

The algorithm is Zach, Pock & Bischof's duality-based TV-L1 ("A duality based approach for realtime TV-L1 optical
flow", DAGM 2007) as implemented in OpenCV's ``modules/optflow/src/tvl1flow.cpp`` (after Sánchez, Meinhardt-Llopis &
Facciolo, IPOL 2013), followed step by step:

- pyramid: ``nscales`` levels, each ``cv::resize(INTER_LINEAR)`` of the previous one by ``scaleStep`` (no Gaussian
  pre-blur), sizes rounded as OpenCV rounds them; the pyramid stops early at the first level narrower or shorter than
  16 pixels;
- per scale: centred gradient of I1 (one-sided, halved, at the borders); then ``warps`` times: bicubic remap of I1
  and its gradient by the current flow (zero outside the image), the linearised residual ``rho_c``; then up to
  ``outerIterations`` x ``innerIterations`` iterations of: thresholding step (``lambda * theta``) for ``v``, divergence
  of the dual field (backward differences, zero outside), ``u = v + theta * div p``, forward gradient of ``u``
  (zero at the last row/column), dual update ``p = (p + tau/theta * grad u) / (1 + tau/theta * |grad u|)``;
  a ``medianFiltering`` x ``medianFiltering`` median filter of (u1, u2) (replicated border) at the start of every outer
  iteration; iterations stop when the summed squared change of the flow falls to ``epsilon**2 * H * W``;
- between scales: bilinear ``cv::resize`` of the flow to the finer size, times ``1 / scaleStep``;
- ``gamma != 0`` adds OpenCV's illumination term ``u3`` (regularised like u1, u2, neither median-filtered nor
  rescaled between scales).

Each primitive reproduces OpenCV's: the linear resize uses OpenCV's source-pixel mapping and border clamping (built
as small interpolation matrices, so resizing is two batched matmuls); the remap is ``grid_sample(bicubic,
zeros, align_corners=True)``, whose cubic kernel (a = -0.75) and per-tap zero border are OpenCV's ``INTER_CUBIC`` with
``BORDER_CONSTANT`` 0 (the two agree to ~1e-4 grey levels with OpenCV 5, which samples at float positions; OpenCV
4's remap rounds positions to 1/32 px, which this code does not); the median is an exact 25-neighbour median over a
replicate-padded window, as ``cv::medianBlur`` does for float images (computed with a pruned sorting network of
elementwise min/max, which a GPU runs without sorting). The reference is OpenCV's CPU path; its OpenCL path (used
only for UMat inputs) evaluates the stopping rule only on some iterations.

Differences from OpenCV, and why:

- Stopping rule: OpenCV stops one pair's iterations when *its* summed squared update is <= ``epsilon**2 * H * W``.
  Here the same test is made per sample after every inner iteration; a sample that meets it leaves the working
  batch (its flow and dual variables are frozen) while the others go on, so each pair gets exactly OpenCV's number
  of iterations. How often the host looks depends on the solver (:data:`SOLVERS`): the eager solver reads a (B,)
  boolean back once per inner iteration (on CUDA one synchronisation per iteration, the price of shrinking the
  batch); the fused and compiled solvers keep the flags on the device, freeze stopped pairs with a mask, and read
  them every ``check_every`` iterations (10 on a GPU), so each pair still stops at exactly its own iteration.
- Thresholding step: OpenCV's three cases are computed as ``clamp(-rho / |grad I1|^2, -lambda*theta,
  lambda*theta)`` (0/0 -> 0). This is the same function except where ``0 < |grad I1|^2 <= FLT_EPSILON`` and
  ``|rho| <= lambda * theta * |grad I1|^2``: OpenCV moves by 0 there and this code by at most ``|rho| /
  |grad I1|^2 <= lambda * theta`` along a gradient of norm < 4e-4, i.e. a change of under 2e-5 px.
- Float arithmetic: the same float32 formulas, but sums (the stopping error, the resize matmuls) are accumulated in a
  different order, and the bicubic weights are computed by torch rather than OpenCV; results differ from OpenCV's by
  rounding, which the iterations can amplify into differences of a few hundredths of a pixel (see BENCHMARKS.md).
- OpenCV's ``calc`` overwrites the object's ``nscales`` when the pyramid stops early for a small image, so every
  later call on that object uses fewer scales; here ``params`` is never changed.
- ``useInitialFlow`` is not supported (the API takes no initial flow); ``True`` raises ValueError.
- OpenCV accepts 8-bit images, or float images in [0, 1] that it multiplies by 255. Here inputs are float32 in
  [0, 255], i.e. the 8-bit values, so results match OpenCV run on the 8-bit frames.
- OpenCV's ``medianBlur`` only accepts 3 or 5 for float images; any odd size works here.
"""

from __future__ import annotations

import collections
import functools
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.tvl1_params import TVL1Params

__all__ = ["SOLVERS", "TVL1Params", "known_flow_pair", "rgb_to_gray", "tvl1_flow_frames", "tvl1_flow_torch",
           "tvl1_flow_videos"]

# How the iterations of a batch run. "eager": stopped pairs leave the batch (least arithmetic; one host read per
# inner iteration): the reference. "fused": a fixed batch where stopped pairs are frozen by a mask, stopping flags
# read every few iterations. "compiled": "fused" through torch.compile, each iteration a few fused kernels.
SOLVERS = ("eager", "fused", "compiled")
# OpenCV stops building the pyramid at the first level with a side shorter than this (tvl1flow.cpp).
_MIN_PYRAMID_SIDE = 16


@functools.lru_cache(maxsize=256)
def _linear_resize_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """(n_out, n_in) matrix of ``cv::resize(INTER_LINEAR)`` weights along one axis; ``scale`` = source px per output px.

    OpenCV maps output pixel d to source position (d + 0.5) * scale - 0.5 and clamps it to [0, n_in - 1] (replicated
    border). ``scale`` is 1/fx when OpenCV is given a factor (the pyramid) and n_in/n_out when given a size (the flow
    upsampling), which is why it is passed rather than derived from the sizes.
    """
    pos = ((np.arange(n_out) + 0.5) * scale - 0.5).astype(np.float32)
    left = np.floor(pos).astype(np.int64)
    frac = pos - left
    frac[left < 0] = 0.0
    left[left < 0] = 0
    past_end = left >= n_in - 1
    frac[past_end] = 0.0
    left[past_end] = n_in - 1
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    np.add.at(weights, (rows, left), 1.0 - frac)
    np.add.at(weights, (rows, np.minimum(left + 1, n_in - 1)), frac)
    return weights


def _resize_linear(x: torch.Tensor, size: tuple[int, int], scale_yx: tuple[float, float]) -> torch.Tensor:
    """``cv::resize(INTER_LINEAR)`` of (..., H, W) to (..., h, w) as two matmuls with OpenCV's weights."""
    h_in, w_in = x.shape[-2:]
    ry = torch.from_numpy(_linear_resize_matrix(h_in, size[0], scale_yx[0])).to(x.device)
    rx = torch.from_numpy(_linear_resize_matrix(w_in, size[1], scale_yx[1])).to(x.device)
    return ry @ x @ rx.T


def _pyramid_sizes(height: int, width: int, params: TVL1Params) -> list[tuple[int, int]]:
    """Level sizes, finest first, as OpenCV computes them: each level rounds the previous size times scaleStep."""
    sizes = [(height, width)]
    for _ in range(1, params.nscales):
        prev_h, prev_w = sizes[-1]
        # cv::resize with a factor: saturate_cast<int>(side * factor), i.e. round half to even, like Python's round.
        h, w = round(prev_h * params.scaleStep), round(prev_w * params.scaleStep)
        if h < _MIN_PYRAMID_SIDE or w < _MIN_PYRAMID_SIDE:
            break
        sizes.append((h, w))
    return sizes


def _centred_gradient(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's centredGradient of (B, H, W): half central differences; at the borders half the one-sided difference.

    Replicating the border pixel and taking half the central difference gives exactly OpenCV's border formulas.
    """
    padded = F.pad(img[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    dx = 0.5 * (padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2])
    dy = 0.5 * (padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1])
    return dx, dy


def _forward_gradient(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's forwardGradient of (B, C, H, W): forward differences, 0 on the last column (dx) / last row (dy)."""
    dx = torch.empty_like(u)
    dy = torch.empty_like(u)
    torch.sub(u[..., :, 1:], u[..., :, :-1], out=dx[..., :, :-1])
    torch.sub(u[..., 1:, :], u[..., :-1, :], out=dy[..., :-1, :])
    dx[..., :, -1] = 0.0
    dy[..., -1, :] = 0.0
    return dx, dy


def _divergence(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """OpenCV's divergence of the dual field (B, C, H, W): backward differences with zero outside the image."""
    div = px + py
    div[..., :, 1:] -= px[..., :, :-1]
    div[..., 1:, :] -= py[..., :-1, :]
    return div


@functools.lru_cache(maxsize=8)
def _median_network(n: int) -> tuple[tuple[int, int, bool, bool], ...]:
    """Compare-exchange steps that leave the median of n values on wire n // 2: ``(i, j, keep_min, keep_max)``.

    Batcher's odd-even merge sort on the next power of two, with the comparators that touch the (implicitly +inf)
    padding wires dropped, then pruned backwards to those the median depends on. For n = 25 that is 113
    comparators, ~200 elementwise min/max over whole planes: several times faster than ``torch.median`` over a
    25-wide dimension on CPU, and free of a sort on GPU.
    """
    size = 1
    while size < n:
        size *= 2
    pairs = []
    merge = 1
    while merge < size:
        k = merge
        while k >= 1:
            for j in range(k % merge, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * merge) == (i + j + k) // (2 * merge) and i + j + k < n:
                        pairs.append((i + j, i + j + k))
            k //= 2
        merge *= 2
    needed = {n // 2}
    steps = []
    for i, j in reversed(pairs):
        if i in needed or j in needed:
            steps.append((i, j, i in needed, j in needed))
            needed |= {i, j}
    return tuple(reversed(steps))


def _median_filter(u: torch.Tensor, ksize: int,
                   network: tuple[tuple[int, int, bool, bool], ...] | None = None) -> torch.Tensor:
    """``cv::medianBlur`` (replicated border) of each (H, W) plane of (B, C, H, W): exact median of ksize**2 values.

    ``network`` is ``_median_network(ksize**2)``, which a compiled caller passes in (torch.compile should not trace
    the cached network's construction).
    """
    height, width = u.shape[-2:]
    half = ksize // 2
    padded = F.pad(u, (half, half, half, half), mode="replicate")
    wires = [padded[..., dy : dy + height, dx : dx + width] for dy in range(ksize) for dx in range(ksize)]
    for i, j, keep_min, keep_max in network or _median_network(ksize * ksize):
        low = torch.minimum(wires[i], wires[j]) if keep_min else None
        if keep_max:
            wires[j] = torch.maximum(wires[i], wires[j])
        if keep_min:
            wires[i] = low
    return wires[ksize * ksize // 2].contiguous()


def _warp_bicubic(images: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``cv::remap(INTER_CUBIC, BORDER_CONSTANT 0)`` of (B, C, H, W) images at x + u1, y + u2; flow (B, 2, H, W)."""
    _, _, height, width = images.shape
    ys = torch.arange(height, device=flow.device, dtype=flow.dtype)[:, None]
    xs = torch.arange(width, device=flow.device, dtype=flow.dtype)
    # grid_sample's normalised coordinates with align_corners=True: -1 and 1 are the centres of the corner pixels.
    gx = (xs + flow[:, 0]) * (2.0 / (width - 1)) - 1.0
    gy = (ys + flow[:, 1]) * (2.0 / (height - 1)) - 1.0
    grid = torch.stack((gx, gy), dim=-1)
    return F.grid_sample(images, grid, mode="bicubic", padding_mode="zeros", align_corners=True)


def _iterate(
    u: torch.Tensor,
    px: torch.Tensor,
    py: torch.Tensor,
    step_dir: torch.Tensor,
    rho_c: torch.Tensor,
    grad: torch.Tensor,
    params: TVL1Params,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One inner iteration of OpenCV's procOneScale on a batch; updates px, py in place.

    Returns the new flow (B, C, H, W) and each sample's summed squared flow update (B,), OpenCV's ``error``.
    """
    l_t = params.lambda_ * params.theta
    taut = params.tau / params.theta
    # Thresholding step TH (OpenCV's estimateV). Its three cases are fi = -rho/|grad|^2 clamped to [-l_t, l_t]:
    # -rho/0 = -+inf clamps to the same +-l_t OpenCV picks where the gradient vanishes, and 0/0 (rho = 0) is 0.
    rho = rho_c.clone()
    for c in range(u.shape[1]):
        rho.addcmul_(step_dir[:, c], u[:, c])
    fi = torch.div(rho, grad).neg_().clamp_(-l_t, l_t).nan_to_num_(0.0)
    u_new = torch.addcmul(u, fi[:, None], step_dir)
    u_new.add_(_divergence(px, py), alpha=params.theta)
    change = u_new - u
    error = change.mul_(change).sum(dim=(1, 2, 3))
    # Dual update (OpenCV's estimateDualVariables), one norm per flow channel.
    ux, uy = _forward_gradient(u_new)
    # sqrt(ux^2 + uy^2) rather than torch.hypot, which is several times slower on CPU; no overflow at these values.
    norm = torch.mul(ux, ux).addcmul_(uy, uy).sqrt_().mul_(taut).add_(1.0)
    px.add_(ux, alpha=taut).div_(norm)
    py.add_(uy, alpha=taut).div_(norm)
    return u_new, error


def _scale_start(i1: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A level's fixed inputs and fresh state: I1 stacked with its centred gradient (warped together), a copy of the
    flow, and the dual variables px, py at zero, as OpenCV starts each scale."""
    i1x, i1y = _centred_gradient(i1)
    return torch.stack((i1, i1x, i1y), dim=1), u.clone(), torch.zeros_like(u), torch.zeros_like(u)


def _linearise(i0: torch.Tensor, i1_stack: torch.Tensor, u: torch.Tensor,
               gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One warp's data term: I1 and its gradient remapped by the flow ``u``, linearised around it.

    Returns (step_dir, rho_c, grad): the direction of the data-term step for each flow channel (the illumination
    channel's "gradient" is gamma), the constant part of the residual and the squared gradient norm.
    """
    warped = _warp_bicubic(i1_stack, u[:, :2])
    i1w, i1wx, i1wy = warped[:, 0], warped[:, 1], warped[:, 2]
    grad = i1wx * i1wx + i1wy * i1wy
    rho_c = i1w - i1wx * u[:, 0] - i1wy * u[:, 1] - i0
    step_dir = torch.cat((warped[:, 1:], torch.full_like(u[:, 2:], gamma)), dim=1)
    return step_dir, rho_c, grad


def _solve_scale(i0: torch.Tensor, i1: torch.Tensor, u: torch.Tensor, params: TVL1Params) -> torch.Tensor:
    """OpenCV's procOneScale for a batch: refine flow ``u`` (B, C, H, W) between i0 and i1 (B, H, W) at one level.

    Channels of u are (u1, u2) or, with gamma, (u1, u2, u3). Returns the refined u.

    Per-sample stopping: OpenCV ends a warp's iterations once its summed squared update is <= epsilon**2 * H * W.
    A sample that meets this leaves the working batch (its flow and dual variables are written back and frozen)
    and the others go on, so every pair gets exactly OpenCV's iteration count and finished pairs cost nothing.
    """
    batch, _, height, width = u.shape
    scaled_epsilon = float(np.float32(params.epsilon * params.epsilon * height * width))
    i1_stack, u, px, py = _scale_start(i1, u)

    for _ in range(params.warps):
        step_dir, rho_c, grad = _linearise(i0, i1_stack, u, params.gamma)
        live = torch.arange(batch, device=u.device)  # samples whose error is still above scaled_epsilon
        w_u, w_px, w_py, w_dir, w_rho, w_grad = u, px, py, step_dir, rho_c, grad
        for _outer in range(params.outerIterations):
            if params.medianFiltering > 1:
                w_u = torch.cat((_median_filter(w_u[:, :2], params.medianFiltering), w_u[:, 2:]), dim=1)
            for _inner in range(params.innerIterations):
                w_u, error = _iterate(w_u, w_px, w_py, w_dir, w_rho, w_grad, params)
                going = error > scaled_epsilon
                if bool(going.all()):
                    continue
                done = ~going
                stopped = live[done]
                u[stopped], px[stopped], py[stopped] = w_u[done], w_px[done], w_py[done]
                live = live[going]
                w_u, w_px, w_py, w_dir, w_rho, w_grad = (
                    t[going] for t in (w_u, w_px, w_py, w_dir, w_rho, w_grad)
                )
                if live.numel() == 0:
                    break
            if live.numel() == 0:
                break
        if live.numel() == batch:  # nobody stopped: px, py were updated in place, w_u is everyone's flow
            u = w_u
        else:
            u[live], px[live], py[live] = w_u, w_px, w_py
    return u


def _masked_step(u: torch.Tensor, px: torch.Tensor, py: torch.Tensor, step_dir: torch.Tensor, rho_c: torch.Tensor,
                 grad: torch.Tensor, live: torch.Tensor, l_t: float, taut: float,
                 theta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One inner iteration of every sample whose ``live`` flag is set; the others keep u, px and py unchanged.

    The same arithmetic as :func:`_iterate`, written without in-place ops and without leaving the device, so that
    ``torch.compile`` fuses it into a few kernels and the batch keeps one shape. Returns (u, px, py, error): each
    sample's summed squared update, which the caller compares with the level's threshold (kept out of here: a float
    argument that changes per pyramid level would make torch.compile specialise on each).
    """
    # The reference's own ops in its order (addcmul, add with alpha), so that eager runs of the two round alike.
    rho = rho_c
    for c in range(u.shape[1]):
        rho = torch.addcmul(rho, step_dir[:, c], u[:, c])
    fi = torch.div(rho, grad).neg().clamp(-l_t, l_t).nan_to_num(0.0)
    u_new = torch.addcmul(u, fi[:, None], step_dir).add(_divergence_pure(px, py), alpha=theta)
    change = u_new - u
    error = (change * change).sum(dim=(1, 2, 3))
    ux = F.pad(u_new[..., :, 1:] - u_new[..., :, :-1], (0, 1))
    uy = F.pad(u_new[..., 1:, :] - u_new[..., :-1, :], (0, 0, 0, 1))
    norm = torch.addcmul(ux * ux, uy, uy).sqrt().mul(taut).add(1.0)
    keep = live[:, None, None, None]
    u = torch.where(keep, u_new, u)
    px = torch.where(keep, px.add(ux, alpha=taut).div(norm), px)
    py = torch.where(keep, py.add(uy, alpha=taut).div(norm), py)
    return u, px, py, error


def _divergence_pure(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """:func:`_divergence` without in-place writes (what torch.compile fuses best): backward differences, 0 outside."""
    return px + py - F.pad(px[..., :, :-1], (1, 0)) - F.pad(py[..., :-1, :], (0, 0, 1, 0))


def _masked_median(u: torch.Tensor, live: torch.Tensor, ksize: int,
                   network: tuple[tuple[int, int, bool, bool], ...]) -> torch.Tensor:
    """The outer iteration's median filter of (u1, u2), applied to live samples only (u3 is never filtered)."""
    filtered = torch.cat((_median_filter(u[:, :2], ksize, network), u[:, 2:]), dim=1)
    return torch.where(live[:, None, None, None], filtered, u)


class _Steps:
    """The two per-iteration functions of the fused solver, eager or compiled once per process and device type.

    Compiling is tried on a tiny batch when the solver is built: the time it took is printed once (Inductor caches
    the result on disk, so later runs start faster), and where the toolchain is missing (no C++ compiler for the
    CPU, no Triton for a GPU) the solver runs uncompiled with one warning, computing the same flow.
    """

    def __init__(self, compiled: bool, device_type: str, l_t: float, taut: float, theta: float):
        self.step, self.median = _masked_step, _masked_median
        if not compiled:
            return
        # dynamic: one graph serves every pyramid level and batch size instead of one compilation per shape
        step, median = torch.compile(_masked_step, dynamic=True), torch.compile(_masked_median, dynamic=True)
        start = time.perf_counter()
        try:
            # Every variant Dynamo makes is compiled here, not in the middle of the first video: a batch of one is a
            # specialisation of its own, and a second size turns sizes symbolic (one graph for every level / batch).
            # Sizes are unequal (equal ones would be assumed equal ever after), small and large (Inductor's CPU code
            # differs below and above 4096 values a sample), and the floats are the run's own (a float is a constant
            # of the graph).
            for batch, height, width in ((3, 16, 20), (2, 17, 23), (1, 16, 20), (3, 40, 61), (2, 43, 67), (1, 40, 61)):
                u = torch.rand(batch, 2, height, width, device=device_type)
                plane = torch.rand(batch, height, width, device=device_type)
                live = torch.ones(batch, dtype=torch.bool, device=device_type)
                step(u, u.clone(), u.clone(), u.clone(), plane, plane + 1, live, l_t, taut, theta)
                median(u, live, 5, _median_network(25))
        except Exception as err:  # noqa: BLE001 - any compiler failure: same results without compiling
            first = (str(err).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"torch.compile failed on {device_type} ({type(err).__name__}: {first}); the TV-L1 solver "
                          "runs uncompiled (solver 'fused', the same flow, slower)", stacklevel=2)
            return
        print(f"torch TV-L1: solver compiled for {device_type} in {time.perf_counter() - start:.1f} s "
              "(cached by Inductor for later runs)", file=sys.stderr)
        self.step, self.median = step, median


@functools.lru_cache(maxsize=4)
def _steps(compiled: bool, device_type: str, l_t: float, taut: float, theta: float) -> _Steps:
    return _Steps(compiled, device_type, l_t, taut, theta)


def _solve_scale_fused(i0: torch.Tensor, i1: torch.Tensor, u: torch.Tensor, params: TVL1Params, steps: _Steps,
                       check_every: int) -> torch.Tensor:
    """:func:`_solve_scale` with the stopping flags kept on the device and read every ``check_every`` iterations.

    A sample that meets the stopping rule is frozen by a mask inside the step (it does not move), so it stops after
    exactly OpenCV's number of iterations however late the host notices; at each read, frozen samples are written
    back and leave the working batch, so finished pairs cost at most ``check_every`` frozen iterations. On a GPU this
    replaces one host synchronisation per iteration by one per ``check_every``; ``check_every=1`` is the reference's
    schedule.
    """
    batch, _, height, width = u.shape
    scaled_epsilon = float(np.float32(params.epsilon * params.epsilon * height * width))
    l_t, taut = params.lambda_ * params.theta, params.tau / params.theta
    network = _median_network(params.medianFiltering ** 2)
    i1_stack, u, px, py = _scale_start(i1, u)
    for _ in range(params.warps):
        step_dir, rho_c, grad = _linearise(i0, i1_stack, u, params.gamma)
        rows = torch.arange(batch, device=u.device)  # the working batch's samples in the full batch
        live = torch.ones(batch, dtype=torch.bool, device=u.device)
        work = [u, px, py, step_dir, rho_c, grad]
        for _outer in range(params.outerIterations):
            if params.medianFiltering > 1:
                work[0] = steps.median(work[0], live, params.medianFiltering, network)
            for inner in range(params.innerIterations):
                work[0], work[1], work[2], error = steps.step(*work, live, l_t, taut, params.theta)
                live = live & (error > scaled_epsilon)  # OpenCV applies the last update, then stops
                if (inner + 1) % check_every and inner + 1 < params.innerIterations:
                    continue
                if bool(live.all()):
                    continue
                stopped = ~live
                for full, part in zip((u, px, py), work):
                    full[rows[stopped]] = part[stopped]
                rows, work, live = rows[live], [t[live] for t in work], live[live]
                if rows.numel() == 0:
                    break
            if rows.numel() == 0:
                break
        for full, part in zip((u, px, py), work):
            full[rows] = part
    return u


def tvl1_flow_torch(prev: torch.Tensor, next: torch.Tensor, params: TVL1Params = TVL1Params(), *,
                    solver: str = "eager", check_every: int | None = None) -> torch.Tensor:
    """Dual TV-L1 optical flow from ``prev`` to ``next`` for a batch of grayscale pairs, as OpenCV computes it.

    prev, next: (B, H, W) float32 grey levels in [0, 255] (OpenCV's 8-bit input converted to float), on any device.
    Returns (B, 2, H, W) float32 on the same device: channel 0 is u (horizontal, + right), channel 1 is v (vertical,
    + down), in pixels, such that ``prev[y, x] ~ next[y + v, x + u]``. See the module docstring for the algorithm and
    the documented differences from OpenCV.

    solver: see :data:`SOLVERS`. check_every: for the fused solvers, inner iterations between two reads of the
    stopping flags; results do not depend on it, only how many frozen iterations finished pairs cost (default 1 on
    the CPU, where a read is free, and 10 on a GPU, where each read waits for the device).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")
    if prev.ndim != 3 or prev.shape != next.shape:
        raise ValueError(f"prev and next must both be (B, H, W), got {tuple(prev.shape)} and {tuple(next.shape)}")
    if prev.shape[1] < 3 or prev.shape[2] < 3:
        raise ValueError(f"frames must be at least 3x3 pixels, got {prev.shape[1]}x{prev.shape[2]}")
    if prev.device != next.device:
        raise ValueError(f"prev and next are on different devices ({prev.device}, {next.device})")
    prev = prev.to(torch.float32)
    next = next.to(torch.float32)
    batch, height, width = prev.shape
    channels = 3 if params.gamma != 0 else 2

    sizes = _pyramid_sizes(height, width, params)
    factor = 1.0 / params.scaleStep
    pyramid = [(prev, next)]
    for size in sizes[1:]:
        pyramid.append(tuple(_resize_linear(img, size, (factor, factor)) for img in pyramid[-1]))

    u = prev.new_zeros(batch, channels, *sizes[-1])
    for level in range(len(sizes) - 1, -1, -1):
        i0, i1 = pyramid[level]
        if solver == "eager":
            u = _solve_scale(i0, i1, u, params)
        else:
            every = check_every or (1 if prev.device.type == "cpu" else 10)
            steps = _steps(solver == "compiled", prev.device.type, params.lambda_ * params.theta,
                           params.tau / params.theta, params.theta)
            u = _solve_scale_fused(i0, i1, u, params, steps, every)
        if level == 0:
            break
        finer = sizes[level - 1]
        u = _resize_linear(u, finer, (u.shape[-2] / finer[0], u.shape[-1] / finer[1]))
        # Flow vectors grow with the image; the illumination term u3 does not.
        u = torch.cat((u[:, :2] * factor, u[:, 2:]), dim=1)
    return u[:, :2].contiguous()


def rgb_to_gray(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB -> (T, H, W) uint8 with ``cv2.COLOR_RGB2GRAY`` (one call for all frames)."""
    t, h, w, _ = frames.shape
    return cv2.cvtColor(np.ascontiguousarray(frames).reshape(t * h, w, 3), cv2.COLOR_RGB2GRAY).reshape(t, h, w)


def tvl1_flow_frames(
    frames: np.ndarray,
    params: TVL1Params = TVL1Params(),
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    solver: str = "eager",
) -> np.ndarray:
    """TV-L1 flow between consecutive frames of one clip: (T, H, W, 3) uint8 RGB -> (T - 1, H, W, 2) float32.

    Frames are converted to grey as ``cv2.cvtColor(COLOR_RGB2GRAY)`` (what the OpenCV backend feeds its TV-L1), then
    pairs (t, t + 1) are solved ``batch_size`` at a time on ``device``; memory on the device is bounded by the batch.
    Flow channels are (u, v) in pixels, as ``cv2.optflow.DualTVL1OpticalFlow.calc`` returns them.
    """
    ((_, flow),) = tvl1_flow_videos([(None, frames)], params, device=device, batch_size=batch_size, solver=solver)
    if isinstance(flow, Exception):
        raise flow
    return flow


@dataclass
class _Video:
    """A video in the batcher: its grey frames, its flow as solved so far, and how many pairs are sent / solved."""

    tag: Any
    gray: torch.Tensor  # (T, H, W) uint8 on the host
    flow: np.ndarray  # (T - 1, H, W, 2) float32
    sent: int = 0
    solved: int = 0
    error: Exception | None = None

    @property
    def pairs(self) -> int:
        return len(self.flow)


def tvl1_flow_videos(
    videos: Iterable[tuple[Any, np.ndarray]],
    params: TVL1Params = TVL1Params(),
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    solver: str = "eager",
) -> Iterator[tuple[Any, np.ndarray | Exception]]:
    """Flow of many videos, their frame pairs batched across videos: ``(tag, frames)`` in, ``(tag, flow)`` out.

    Why: one video's pairs are too few to fill a GPU (a UCF-101 clip has ~180), and the solver's cost on a GPU barely
    grows with the batch (BENCHMARKS.md, device check), so pairs from consecutive videos share batches of
    ``batch_size``. Videos come out in the order they went in, each as soon as its last pair is solved, so the caller
    can consume a generator (decoding ahead) and write each video while later ones are still being solved.
    frames: (T, H, W, 3) uint8 RGB, T >= 2, every video the same size. A batch that fails (e.g. out of memory) fails
    the videos with pairs in it: their ``flow`` is the exception, and the others go on.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")
    pending: collections.deque[_Video] = collections.deque()
    exhausted = False
    source = iter(videos)
    while pending or not exhausted:
        while not exhausted and sum(v.pairs - v.sent for v in pending) < batch_size:
            item = next(source, None)
            if item is None:
                exhausted = True
                break
            tag, frames = item
            if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
                raise ValueError(f"frames must be (T, H, W, 3) uint8 RGB, got {frames.shape} {frames.dtype}")
            if frames.shape[0] < 2:
                raise ValueError(f"need at least 2 frames for flow, got {frames.shape[0]}")
            height, width = frames.shape[1:3]
            pending.append(_Video(tag, torch.from_numpy(rgb_to_gray(frames)),
                                  np.empty((len(frames) - 1, height, width, 2), dtype=np.float32)))
        _solve_batch(pending, batch_size, params, device, solver)
        while pending and pending[0].solved == pending[0].pairs:
            done = pending.popleft()
            yield done.tag, done.error or done.flow


def _solve_batch(pending: collections.deque[_Video], batch_size: int, params: TVL1Params,
                 device: str | torch.device, solver: str) -> None:
    """Solve up to ``batch_size`` unsent pairs of the pending videos, in order, and file each flow with its video."""
    parts = []  # (video, first pair, pairs)
    room = batch_size
    for video in pending:
        take = min(room, video.pairs - video.sent)
        if take:
            parts.append((video, video.sent, take))
            video.sent += take
            room -= take
        if room == 0:
            break
    if not parts:
        return
    try:
        # uint8 over the bus (a quarter of the bytes of float32); prev and next of a video share its frames
        prev = torch.cat([v.gray[first:first + n] for v, first, n in parts]).to(device).float()
        nxt = torch.cat([v.gray[first + 1:first + n + 1] for v, first, n in parts]).to(device).float()
        flow = tvl1_flow_torch(prev, nxt, params, solver=solver).permute(0, 2, 3, 1).cpu().numpy()
    except Exception as err:  # noqa: BLE001 - the batch's videos fail with the reason; later batches go on
        for video, _, _ in parts:
            video.error = video.error or err
            video.sent = video.solved = video.pairs
        return
    offset = 0
    for video, first, n in parts:
        video.flow[first:first + n] = flow[offset:offset + n]
        video.solved += n
        offset += n


def known_flow_pair(target: np.ndarray, amplitude: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """A grey frame pair with known, smooth flow, for checking a flow method against the truth.

    target: (H, W) uint8 grey frame (a real one, so the texture is realistic). Returns ``(source, flow)``: source is
    (H, W) uint8 with ``source(x) = target(x + flow(x))`` (bicubic, reflected border), so ``flow`` (H, W, 2) float32,
    a sinusoidal field of up to ``amplitude`` px, is exactly the source -> target flow at every pixel of source.
    """
    height, width = target.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    flow = np.stack(
        [amplitude * np.sin(2 * np.pi * ys / height) + amplitude / 3, amplitude * np.cos(2 * np.pi * xs / width)],
        axis=-1,
    ).astype(np.float32)
    warped = cv2.remap(
        target.astype(np.float32), xs + flow[..., 0], ys + flow[..., 1], cv2.INTER_CUBIC,
        borderMode=cv2.BORDER_REFLECT,
    )
    return np.clip(np.round(warped), 0, 255).astype(np.uint8), flow
