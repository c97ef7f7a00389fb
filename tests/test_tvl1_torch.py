"""The torch TV-L1 against OpenCV's CPU TV-L1: primitives, real video frames, and a known synthetic flow.

Everything runs at 64x48 / 96x72 with OpenCV's default parameters on both sides, single-threaded (the test machine's
cores are shared, and oversubscribed thread pools are slower than one thread).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.decode import DecodeConfig, decode_video
from pipeline.tvl1_torch import (
    TVL1Params,
    _linear_resize_matrix,
    _median_filter,
    _pyramid_sizes,
    _resize_linear,
    _warp_bicubic,
    known_flow_pair,
    tvl1_flow_frames,
    tvl1_flow_torch,
    tvl1_flow_videos,
)

VIDEOS = Path(__file__).resolve().parent / "data" / "real_clips" / "ucf101"
# The exactness contract (issue 11): mean end-point error between this backend and OpenCV on real frames (measured:
# ~0.01 px here and on a GPU, BENCHMARKS.md).
MAX_EPE_VS_OPENCV = 0.05
# Between the reference (eager) solver and the compiled one (the fused one is bitwise equal to eager): Inductor
# contracts and reorders float ops, and the iterations amplify the rounding to ~0.01 px (measured 0.008-0.011 px at
# 171x128, the same order as either solver's distance to OpenCV).
MAX_EPE_BETWEEN_SOLVERS = 0.015
FAST = TVL1Params(nscales=2, warps=1, outerIterations=2, innerIterations=5)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch and one OpenCV thread for these tests, restored afterwards for the rest of the suite."""
    torch_threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    yield
    torch.set_num_threads(torch_threads)
    cv2.setNumThreads(cv_threads)


def _gray_frames(name: str, height: int, width: int, count: int) -> np.ndarray:
    """The first ``count`` frames of a real test clip, decoded with ffmpeg at HxW: (T, H, W, 3) uint8."""
    path = VIDEOS / name
    return decode_video(path, DecodeConfig(height=height, width=width, max_frames=count))


def _opencv_flows(frames: np.ndarray, params: TVL1Params) -> np.ndarray:
    """OpenCV CPU TV-L1 between consecutive frames, a fresh object per pair (calc can change the object's nscales)."""
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    return np.stack([params.to_opencv().calc(a, b, None) for a, b in zip(gray[:-1], gray[1:])])


def _epe(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b, axis=-1).mean())


def test_defaults_are_opencvs():
    ocv = cv2.optflow.DualTVL1OpticalFlow_create()
    p = TVL1Params()
    assert (p.tau, p.lambda_, p.theta, p.epsilon, p.scaleStep, p.gamma) == pytest.approx(
        (ocv.getTau(), ocv.getLambda(), ocv.getTheta(), ocv.getEpsilon(), ocv.getScaleStep(), ocv.getGamma())
    )
    assert (p.nscales, p.warps, p.innerIterations, p.outerIterations, p.medianFiltering, p.useInitialFlow) == (
        ocv.getScalesNumber(),
        ocv.getWarpingsNumber(),
        ocv.getInnerIterations(),
        ocv.getOuterIterations(),
        ocv.getMedianFiltering(),
        ocv.getUseInitialFlow(),
    )
    custom = TVL1Params(innerIterations=7, scaleStep=0.7, gamma=0.2).to_opencv()
    assert (custom.getInnerIterations(), custom.getScaleStep(), custom.getGamma()) == (7, pytest.approx(0.7), 0.2)


@pytest.mark.parametrize("size", [(48, 64), (72, 96), (20, 23)])
def test_resize_matches_opencv_both_ways(size):
    rng = np.random.default_rng(0)
    img = (rng.random(size) * 255).astype(np.float32)
    down_ref = cv2.resize(img, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_LINEAR)
    small = _pyramid_sizes(*size, TVL1Params(nscales=2))[1]
    down = _resize_linear(torch.from_numpy(img)[None], small, (1 / 0.8, 1 / 0.8))[0].numpy()
    assert down.shape == down_ref.shape
    np.testing.assert_allclose(down, down_ref, atol=1e-3)
    up_ref = cv2.resize(down_ref, size[::-1], interpolation=cv2.INTER_LINEAR)
    up = _resize_linear(torch.from_numpy(down_ref)[None], size, (small[0] / size[0], small[1] / size[1]))[0]
    np.testing.assert_allclose(up.numpy(), up_ref, atol=1e-2)
    # Every output pixel is a convex combination of source pixels.
    np.testing.assert_allclose(_linear_resize_matrix(size[1], small[1], 1.25).sum(axis=1), 1.0, atol=1e-6)


def test_pyramid_stops_below_16_pixels_like_opencv():
    assert _pyramid_sizes(48, 64, TVL1Params()) == [(48, 64), (38, 51), (30, 41), (24, 33), (19, 26)]
    assert _pyramid_sizes(30, 200, TVL1Params()) == [(30, 200), (24, 160), (19, 128)]


@pytest.mark.parametrize("ksize", [3, 5])
def test_median_filter_matches_opencv(ksize):
    rng = np.random.default_rng(1)
    planes = rng.standard_normal((2, 3, 17, 22)).astype(np.float32)
    ours = _median_filter(torch.from_numpy(planes), ksize).numpy()
    ref = np.stack([[cv2.medianBlur(p, ksize) for p in sample] for sample in planes])
    np.testing.assert_array_equal(ours, ref)


def test_bicubic_warp_matches_opencv_remap_including_borders():
    rng = np.random.default_rng(2)
    h, w = 20, 23
    img = (rng.random((h, w)) * 255).astype(np.float32)
    flow = rng.uniform(-3, 3, (2, h, w)).astype(np.float32)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    ref = cv2.remap(img, xs + flow[0], ys + flow[1], cv2.INTER_CUBIC)
    ours = _warp_bicubic(torch.from_numpy(img)[None, None], torch.from_numpy(flow)[None])[0, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-3)


@pytest.mark.parametrize("video", ["PushUps/v_PushUps_g02_c03.avi", "Basketball/v_Basketball_g01_c02.mp4"])
def test_real_frames_match_opencv(video):
    frames = _gray_frames(video, 48, 64, 3)
    params = TVL1Params()
    ours = tvl1_flow_frames(frames, params, batch_size=2)
    ref = _opencv_flows(frames, params)
    assert ours.shape == ref.shape == (2, 48, 64, 2)
    assert np.abs(ref).max() > 0.5  # there is motion to get right
    assert _epe(ours, ref) <= MAX_EPE_VS_OPENCV


def test_illumination_term_matches_opencv():
    frames = _gray_frames("PushUps/v_PushUps_g02_c03.avi", 48, 64, 2)
    params = TVL1Params(gamma=0.1, nscales=3, warps=3)
    assert _epe(tvl1_flow_frames(frames, params), _opencv_flows(frames, params)) <= MAX_EPE_VS_OPENCV


@pytest.mark.parametrize("solver", ["eager", "compiled"])
def test_known_smooth_flow_no_worse_than_opencv(solver):
    """A real frame warped by a smooth known field: error against the truth within 5% of OpenCV's."""
    target = cv2.cvtColor(_gray_frames("PushUps/v_PushUps_g02_c03.avi", 72, 96, 1)[0], cv2.COLOR_RGB2GRAY)
    source, truth = known_flow_pair(target, amplitude=1.5)
    assert np.abs(truth).max() > 1.4
    params = TVL1Params()
    ref = params.to_opencv().calc(source, target, None)
    pair = torch.from_numpy(np.stack([source, target])).float()
    ours = tvl1_flow_torch(pair[:1], pair[1:], params, solver=solver)[0].permute(1, 2, 0).numpy()
    opencv_error = _epe(ref, truth)
    assert opencv_error < 0.5  # the synthetic case is solvable, so the comparison means something
    assert _epe(ours, truth) <= 1.05 * opencv_error


def test_batch_gives_each_pair_its_own_answer():
    """Pairs stop iterating at different times; batching must not change any pair's flow."""
    frames = np.concatenate([_gray_frames("Basketball/v_Basketball_g01_c02.mp4", 48, 64, 2),
                             _gray_frames("PushUps/v_PushUps_g02_c03.avi", 48, 64, 2)])
    gray = torch.from_numpy(np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])).float()
    prev, nxt = gray[[0, 2]], gray[[1, 3]]
    params = TVL1Params(nscales=3, warps=2)
    batched = tvl1_flow_torch(prev, nxt, params)
    singles = torch.cat([tvl1_flow_torch(prev[i : i + 1], nxt[i : i + 1], params) for i in range(2)])
    assert batched.shape == (2, 2, 48, 64) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=0)


def test_frames_are_batched_in_chunks_with_opencv_grey():
    frames = _gray_frames("PushUps/v_PushUps_g02_c03.avi", 24, 32, 4)
    params = TVL1Params(nscales=2, warps=1, outerIterations=2, innerIterations=5)
    chunked = tvl1_flow_frames(frames, params, batch_size=2)
    whole = tvl1_flow_frames(frames, params, batch_size=8)
    np.testing.assert_allclose(chunked, whole, atol=1e-4)
    gray = torch.from_numpy(np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])).float()
    direct = tvl1_flow_torch(gray[:-1], gray[1:], params).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(chunked, direct, atol=1e-4)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="useInitialFlow"):
        TVL1Params(useInitialFlow=True)
    with pytest.raises(ValueError, match="scaleStep"):
        TVL1Params(scaleStep=1.0)
    with pytest.raises(ValueError, match="medianFiltering"):
        TVL1Params(medianFiltering=4)
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        tvl1_flow_torch(torch.zeros(1, 8, 8), torch.zeros(1, 8, 9))
    with pytest.raises(ValueError, match="uint8"):
        tvl1_flow_frames(np.zeros((3, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="at least 2 frames"):
        tvl1_flow_frames(np.zeros((1, 8, 8, 3), dtype=np.uint8))


@pytest.mark.parametrize("solver", ["fused", "compiled"])
def test_fused_solvers_agree_with_the_reference_and_opencv(solver):
    """At the paper's 128x171 (on tiny frames the iterations amplify rounding more: 0.02 px at 48x64)."""
    frames = _gray_frames("PushUps/v_PushUps_g02_c03.avi", 128, 171, 3)
    params = TVL1Params()
    ours = tvl1_flow_frames(frames, params, batch_size=3, solver=solver)
    eager = tvl1_flow_frames(frames, params, batch_size=3)
    if solver == "fused":  # the same ops in the same order: the same floats
        np.testing.assert_array_equal(ours, eager)
    assert _epe(ours, eager) <= MAX_EPE_BETWEEN_SOLVERS
    assert _epe(ours, _opencv_flows(frames, params)) <= MAX_EPE_VS_OPENCV


def test_fused_flow_does_not_depend_on_when_the_stopping_flags_are_read():
    """A pair that met the stopping rule is frozen by the mask, so reading the flags late changes nothing."""
    frames = np.concatenate([_gray_frames("Basketball/v_Basketball_g01_c02.mp4", 48, 64, 3),
                             _gray_frames("PushUps/v_PushUps_g02_c03.avi", 48, 64, 3)])
    gray = torch.from_numpy(np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])).float()
    prev, nxt = gray[[0, 1, 3, 4]], gray[[1, 2, 4, 5]]
    every_iteration = tvl1_flow_torch(prev, nxt, solver="fused", check_every=1)
    every_seventh = tvl1_flow_torch(prev, nxt, solver="fused", check_every=7)
    torch.testing.assert_close(every_seventh, every_iteration, atol=0, rtol=0)


def test_pairs_of_many_videos_share_batches_and_come_back_in_order():
    source = _gray_frames("PushUps/v_PushUps_g02_c03.avi", 24, 32, 12)
    clips = [source[0:4], source[4:6], source[6:12]]  # 3, 1 and 5 pairs in batches of 3: batches span videos
    out = list(tvl1_flow_videos([(i, c) for i, c in enumerate(clips)], FAST, batch_size=3))
    assert [tag for tag, _ in out] == [0, 1, 2]
    for (_, flow), clip in zip(out, clips):
        np.testing.assert_allclose(flow, tvl1_flow_frames(clip, FAST, batch_size=len(clip)), atol=1e-5, rtol=0)


def test_a_failed_batch_fails_only_the_videos_in_it():
    good = _gray_frames("PushUps/v_PushUps_g02_c03.avi", 24, 32, 3)
    other_size = _gray_frames("PushUps/v_PushUps_g02_c03.avi", 16, 16, 3)
    # batch 1 = video 0's two pairs + video 1's first: they cannot be stacked, so both fail; video 2 goes on
    out = dict(tvl1_flow_videos([(0, good), (1, other_size), (2, good)], FAST, batch_size=3))
    assert isinstance(out[0], RuntimeError) and isinstance(out[1], RuntimeError)
    np.testing.assert_array_equal(out[2], tvl1_flow_frames(good, FAST, batch_size=3))
