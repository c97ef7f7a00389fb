"""pipeline.flow: every backend recovers a known translation from a real decoded video; the registry's rules."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch

from pipeline.decode import DecodeConfig, decode_video
from pipeline.errors import ConfigError
from pipeline.flow import (
    BACKENDS,
    FlowBackendUnavailable,
    TVL1Params,
    backend_metadata,
    backend_record,
    cuda_available,
    flow_identity,
    make_backend,
    resolve_backend,
)

# Flow near the border is extrapolated (the texture enters/leaves the frame there); the motion is measured inside.
MARGIN = 8
# Mean error on these lossless whole-pixel motions, measured (OpenCV 5.1 contrib): TV-L1 <= 0.0021 px over eight
# texture seeds and 0.002 px inside the moving square; DIS and Farneback <= 0.0014 px; the torch TV-L1 with the
# cut-down parameters below 0.008 px. The bounds keep a margin of 4x (2.5x for torch): far inside the 0.05 px
# contract against OpenCV, and a 1% scale error (0.02 px on a 2 px motion) fails them.
TRANSLATION_ATOL = 0.01
TORCH_FAST_ATOL = 0.02


def interior_mean(flow: np.ndarray) -> np.ndarray:
    """Mean (u, v) over all pairs, away from the border."""
    return flow[:, MARGIN:-MARGIN, MARGIN:-MARGIN].mean(axis=(0, 1, 2))


@pytest.fixture
def decoded(lossless_video) -> np.ndarray:
    """The lossless texture video decoded at its stored size (64x80), i.e. exactly the frames that were encoded."""
    _, h, w, _ = lossless_video.frames.shape
    return decode_video(lossless_video.path, DecodeConfig(height=h, width=w))


def test_cpu_tvl1_recovers_known_translation(lossless_video, decoded: np.ndarray) -> None:
    flow = make_backend("cpu").compute(decoded)
    assert flow.shape == (len(decoded) - 1, *decoded.shape[1:3], 2) and flow.dtype == np.float32
    np.testing.assert_allclose(interior_mean(flow), [lossless_video.dx, lossless_video.dy], atol=TRANSLATION_ATOL)


@pytest.mark.parametrize("name", ["dis", "farneback"])
def test_fast_backends_recover_known_translation(lossless_video, decoded: np.ndarray, name: str) -> None:
    flow = make_backend(name).compute(decoded)
    assert flow.shape == (len(decoded) - 1, *decoded.shape[1:3], 2) and flow.dtype == np.float32
    np.testing.assert_allclose(interior_mean(flow), [lossless_video.dx, lossless_video.dy], atol=TRANSLATION_ATOL)


def test_torch_backend_recovers_known_translation(lossless_video, decoded: np.ndarray) -> None:
    # Fewer scales and iterations than the defaults keep this CPU run short; a 2 px motion needs no more.
    params = TVL1Params(nscales=3, warps=2, innerIterations=20, outerIterations=2)
    flow = make_backend("torch", params, device="cpu", batch_size=2).compute(decoded[:3])
    assert flow.shape == (2, *decoded.shape[1:3], 2) and flow.dtype == np.float32
    np.testing.assert_allclose(interior_mean(flow), [lossless_video.dx, lossless_video.dy], atol=TORCH_FAST_ATOL)


def test_moving_square_flow_inside_square(moving_square_frames: np.ndarray) -> None:
    flow = make_backend("cpu").compute(moving_square_frames[:2])
    # The 16 px square starts at (2, 2) and moves (+2, +1): its centre region in frame 0 moves with it.
    # (The flat background has no data term, so TV-L1 fills it by smoothing: nothing to assert there.)
    np.testing.assert_allclose(flow[0, 6:14, 6:14].mean(axis=(0, 1)), [2, 1], atol=TRANSLATION_ATOL)


def test_cpu_backend_runs_opencv_with_the_given_params(decoded: np.ndarray) -> None:
    params = TVL1Params(nscales=2, warps=2, innerIterations=5, outerIterations=2, medianFiltering=3, lambda_=0.3)
    flow = make_backend("cpu", params).compute(decoded[:2])
    reference = cv2.optflow.DualTVL1OpticalFlow_create(*dataclasses.astuple(params))
    gray = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in decoded[:2]]
    np.testing.assert_array_equal(flow[0], reference.calc(gray[0], gray[1], None))
    assert not np.array_equal(flow, make_backend("cpu").compute(decoded[:2]))


def test_cuda_is_unavailable_here_with_a_clear_error() -> None:
    if cuda_available():
        pytest.skip("OpenCV here was built with CUDA")
    with pytest.raises(FlowBackendUnavailable, match="--backend torch"):
        make_backend("cuda")


def test_torch_on_a_missing_gpu_errors_clearly() -> None:
    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here")
    with pytest.raises(ConfigError, match="no CUDA device"):
        make_backend("torch", device="cuda")
    with pytest.raises(ConfigError, match="not a device"):
        make_backend("torch", device="bogus")


def test_auto_prefers_cuda_then_torch_gpu_then_cpu() -> None:
    expected = "cuda" if cuda_available() else "torch" if torch.cuda.is_available() else "cpu"
    assert resolve_backend("auto") == expected
    assert make_backend("auto").name == expected
    if not cuda_available() and not torch.cuda.is_available():
        assert expected == "cpu"


def test_explicit_names_resolve_to_themselves_and_unknown_names_list_choices() -> None:
    for name in BACKENDS[1:]:
        assert resolve_backend(name) == name
    with pytest.raises(ValueError, match="farneback"):
        resolve_backend("tvl1-gpu")


@pytest.mark.parametrize(("name", "algorithm"), [("dis", "dis"), ("farneback", "farneback")])
def test_fast_backends_are_labelled_non_tvl1(name: str, algorithm: str) -> None:
    meta = backend_metadata(make_backend(name))
    assert meta["algorithm"] == algorithm and meta["is_tvl1"] is False
    assert backend_record(make_backend(name))["backend"] == name


@pytest.mark.parametrize("name", ["cpu", "torch"])
def test_tvl1_metadata_records_params_and_versions(name: str) -> None:
    params = TVL1Params(lambda_=0.1, nscales=3)
    backend = make_backend(name, params, device="cpu")
    meta = backend_metadata(backend)
    assert meta == {"algorithm": "tvl1", "is_tvl1": True, "params": dataclasses.asdict(params)}
    assert flow_identity(name, params) == meta  # the same identity without building the backend
    solver = {"solver": "eager"} if name == "torch" else {}  # auto on a CPU
    assert backend_record(backend) == {"backend": name, "device": "cpu", "torch": torch.__version__, **solver}


def test_bad_frames_are_rejected() -> None:
    backend = make_backend("cpu")
    with pytest.raises(ValueError, match="at least 2 frames"):
        backend.compute(np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        backend.compute(np.zeros((2, 8, 8, 3), np.float32))
