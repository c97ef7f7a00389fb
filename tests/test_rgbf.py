"""build-rgbf: flow images and RGBF (paper eq. 7) from flow shards, checked against independent recomputation.

Input flow shards are written here with the store API from frames and flow the test constructs, so the exact flow is
known and the extract-flow stage is not involved.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from pipeline.build_rgbf import BuildConfig, build_rgbf
from pipeline.rgbf import (RGBFError, figure_rows, flow_to_image, image_to_flow, paired_flow_index, rgbf,
                           training_frames)
from pipeline.store import FieldSpec, Schema, ShardSet, ShardWriter, StoreError, VideoMeta, prepare_output, shard_name

H, W, T = 24, 32, 6
SQUARE, DX, DY = 6, 2, 1
BACKGROUND = 90  # grey: RGBF must turn it black, since it does not move
# The same fields extract-flow declares: lossless RGB, flow as int16 hundredths of a pixel.
FLOW_FIELDS = (FieldSpec("rgb", 3, compression="lzf"),
               FieldSpec("flow", 2, dtype="int16", scale=100.0, compression="lzf", frames_offset=-1))


def square_video(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A bright textured square moving (DX, DY) px per frame over grey, and its exact flow t -> t+1.

    Pairs 0-2: the square moves (flow (DX, DY) plus a fractional per-pixel part, zero on the background);
    pair 3: nothing moves (zero flow); pair 4: a pan where every pixel moves 5 px in one of two directions
    (constant magnitude).
    """
    rng = np.random.default_rng(seed)
    patch = rng.integers(180, 256, (SQUARE, SQUARE, 3), dtype=np.uint8)
    rgb = np.full((T, H, W, 3), BACKGROUND, np.uint8)
    flow = np.zeros((T - 1, H, W, 2), np.float32)
    for t in range(T):
        y, x = 2 + min(t, 3) * DY, 2 + min(t, 3) * DX
        rgb[t, y:y + SQUARE, x:x + SQUARE] = patch
        if t < 3:
            flow[t, y:y + SQUARE, x:x + SQUARE] = (DX, DY) + rng.uniform(-0.4, 0.4, (SQUARE, SQUARE, 2))
    flow[4] = (3.0, 4.0)
    flow[4, ::2] = (-4.0, 3.0)
    return rgb, flow


def write_flow_dir(root: Path, videos: list[tuple[str, np.ndarray, np.ndarray]], *, per_shard: int = 2,
                   backend: str = "tvl1", failures: dict[int, list[tuple[str, str]]] | None = None,
                   skip_shards: tuple[int, ...] = ()) -> Path:
    """A flow shard directory as extract-flow writes it, holding ``videos`` = [(id, rgb, flow)]."""
    schema = Schema(kind="flow", height=H, width=W, fields=FLOW_FIELDS,
                    config={"flow": {"algorithm": backend, "params": {"lambda_": 0.15}}, "videos_per_shard": per_shard})
    plan = [[v[0] for v in videos[i:i + per_shard]] for i in range(0, len(videos), per_shard)]
    prepare_output(root, schema, {"kind": "folder", "classes": ["move", "still"]}, plan)
    for index, ids in enumerate(plan):
        if index in skip_shards:
            continue
        with ShardWriter(root / shard_name(index), schema, index) as writer:
            for vid, rgb, flow in videos:
                if vid in ids:
                    writer.add_video(VideoMeta(vid, len(vid) % 2, "move", f"videos/{vid}.avi", {1: "train"}),
                                     {"rgb": rgb, "flow": flow})
            for vid, reason in (failures or {}).get(index, []):
                writer.add_failure(vid, f"videos/{vid}.avi", reason)
    return root


@pytest.fixture
def flow_dir(tmp_path: Path) -> Path:
    videos = [(f"v{i}", *square_video(i)) for i in range(3)]
    return write_flow_dir(tmp_path / "flow", videos, failures={0: [("broken", "ffmpeg failed")]})


def eq7_reference(rgb: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Eq. 7 in float64, frame by frame, from the stored RGB and flow; the last frame reuses the last pair."""
    out = np.zeros(rgb.shape, np.float64)
    for t in range(len(rgb)):
        f = flow[min(t, len(flow) - 1)].astype(np.float64)
        mag = np.sqrt(f[..., 0] ** 2 + f[..., 1] ** 2)
        span = mag.max() - mag.min()
        if span >= 1e-6:
            out[t] = rgb[t] * ((mag - mag.min()) / span)[..., None]
    return out


def test_rgbf_is_eq7_of_the_stored_flow(flow_dir: Path, tmp_path: Path) -> None:
    summary = build_rgbf(flow_dir, tmp_path / "train", BuildConfig(storage="raw"), progress=False)
    source, train = ShardSet(flow_dir), ShardSet(tmp_path / "train")
    assert train.schema.kind == "train" and train.schema.field_names == ["rgb", "flow", "rgbf"]
    assert [v.video_id for v in train] == [v.video_id for v in source]
    for video in source:
        rgb, flow = source.read(video, "rgb"), source.read(video, "flow")
        out = train.read(video.video_id, "rgbf")
        assert out.shape == rgb.shape and out.dtype == np.uint8
        assert np.abs(out - eq7_reference(rgb, flow)).max() <= 1.0
        np.testing.assert_array_equal(train.read(video.video_id, "rgb"), rgb)
        for t in range(3):  # moving square: square pixels keep most of their brightness, the background is black
            y, x = 2 + t * DY, 2 + t * DX
            assert out[t, y:y + SQUARE, x:x + SQUARE].mean() > 0.5 * rgb[t, y:y + SQUARE, x:x + SQUARE].mean()
            background = np.ones((H, W), bool)
            background[y:y + SQUARE, x:x + SQUARE] = False
            assert not out[t][background].any()
        assert not out[3:].any()  # zero flow, then a constant-magnitude pan (reused by the last frame)
        train_video = train.video(video.video_id)
        assert (train_video.label, train_video.splits) == (video.label, video.splits)
    assert summary.videos_ok == 3 and summary.failures == [
        {"video_id": "broken", "path": "videos/broken.avi", "reason": "ffmpeg failed"}]


def test_flow_image_round_trips_u_v_within_the_quantisation(flow_dir: Path, tmp_path: Path) -> None:
    bound = 20.0
    rng = np.random.default_rng(1)
    flow = rng.uniform(-bound, bound, (4, H, W, 2)).astype(np.float32)
    image = flow_to_image(flow, bound)
    assert np.abs(image_to_flow(image, bound) - flow).max() <= bound / 255 + 1e-5
    np.testing.assert_array_equal(image_to_flow(255 - image, bound)[..., 0], -image_to_flow(image, bound)[..., 0])
    np.testing.assert_array_equal(image[..., 2], np.clip(np.rint(np.hypot(flow[..., 0], flow[..., 1]) * 255 / bound),
                                                         0, 255))
    assert (flow_to_image(np.full((1, 2, 2, 2), 3 * bound, np.float32), bound) == 255).all()  # saturates

    build_rgbf(flow_dir, tmp_path / "train", BuildConfig(modalities=("flow",), storage="lzf", flow_bound=8.0),
               progress=False)
    source, train = ShardSet(flow_dir), ShardSet(tmp_path / "train")
    assert train.schema.config["flow_image"]["bound"] == 8.0
    assert train.schema.field("flow").encoding == "raw"
    stored = source.read("v1", "flow")
    decoded = image_to_flow(train.read("v1", "flow"), 8.0)
    np.testing.assert_allclose(decoded[:-1], stored, atol=8.0 / 255 + 1e-5)
    np.testing.assert_array_equal(decoded[-1], decoded[-2])  # the last frame is paired with the last flow pair


def test_constant_and_zero_magnitude_frames_are_black_without_warnings() -> None:
    rgb = np.full((4, 5, 6, 3), 200, np.uint8)
    flow = np.zeros((4, 5, 6, 2), np.float32)  # frame 0: nothing moves
    flow[1] = (7.0, 0.0)  # a pure pan
    flow[2, :, :3] = (0.0, 7.0)  # constant magnitude, two directions
    flow[2, :, 3:] = (-7.0, 0.0)
    flow[3] = 2.0  # magnitude range 4e-7 px (< 1e-6): treated as constant
    flow[3, 0, 0, 0] += 4e-7
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        out = rgbf(rgb, flow)
    assert out.dtype == np.uint8 and not out.any()
    flow[3, 0, 0] = (9.0, 0.0)  # one pixel really moves: it alone keeps its colour
    with np.errstate(all="raise"):
        moving = rgbf(rgb, flow)[3]
    assert moving[0, 0].tolist() == [200, 200, 200] and not moving[1:].any()


def test_bad_videos_are_recorded_and_the_rest_is_built(tmp_path: Path) -> None:
    rgb, flow = square_video()
    videos = [("ok", rgb, flow), ("one_frame", rgb[:1], flow[:0]), ("short_flow", rgb, flow[:-2])]
    flow_dir = write_flow_dir(tmp_path / "flow", videos, per_shard=3)
    summary = build_rgbf(flow_dir, tmp_path / "train", BuildConfig(storage="lzf"), progress=False)
    reasons = {f["video_id"]: f["reason"] for f in summary.failures}
    assert summary.videos_ok == 1 and set(reasons) == {"one_frame", "short_flow"}
    assert "at least 2" in reasons["one_frame"] and "3 flow pairs for 6 frames" in reasons["short_flow"]
    manifest = json.loads((tmp_path / "train" / "manifest.json").read_text())
    assert manifest["summary"]["videos_failed"] == 2 and not summary.complete


def test_rerun_is_a_noop_and_other_configurations_are_refused(flow_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "train"
    cfg = BuildConfig(modalities=("rgbf",), storage="lzf")
    first = build_rgbf(flow_dir, out, cfg, progress=False)
    assert first.shards_built == 2
    kept = sorted(out.glob("shard-*.h5")) + [out / "dataset.json"]
    stamps = [p.stat().st_mtime_ns for p in kept]
    second = build_rgbf(flow_dir, out, cfg, progress=False)
    assert (second.shards_built, second.shards_skipped, second.frames_built) == (0, 2, 0)
    assert [p.stat().st_mtime_ns for p in kept] == stamps

    with pytest.raises(StoreError, match="modalities"):
        build_rgbf(flow_dir, out, BuildConfig(modalities=("rgb", "rgbf"), storage="lzf"), progress=False)
    other_flow = write_flow_dir(tmp_path / "dis", [(f"v{i}", *square_video(i)) for i in range(3)], backend="dis")
    with pytest.raises(StoreError, match="source.flow.algorithm"):
        build_rgbf(other_flow, out, cfg, progress=False)
    rebuilt = build_rgbf(other_flow, out, cfg, overwrite=True, progress=False)
    assert rebuilt.shards_built == 2 and ShardSet(out).schema.config["source"]["flow"]["algorithm"] == "dis"


def test_waiting_input_shards_are_built_on_a_later_run(tmp_path: Path) -> None:
    videos = [(f"v{i}", *square_video(i)) for i in range(3)]
    flow_dir = write_flow_dir(tmp_path / "flow", videos, skip_shards=(1,))
    partial = build_rgbf(flow_dir, tmp_path / "train", BuildConfig(storage="lzf"), progress=False)
    assert partial.shards_waiting == [shard_name(1)] and not partial.complete
    write_flow_dir(tmp_path / "flow", videos)  # extract-flow finishes (and rewrites shard 0: it is rebuilt too)
    final = build_rgbf(flow_dir, tmp_path / "train", BuildConfig(storage="lzf"), progress=False)
    assert final.complete and final.shards_built == 2 and len(ShardSet(tmp_path / "train")) == 3


def test_default_storage_is_jpeg_and_close_to_the_lossless_result(flow_dir: Path, tmp_path: Path) -> None:
    build_rgbf(flow_dir, tmp_path / "jpeg", progress=False)
    build_rgbf(flow_dir, tmp_path / "raw", BuildConfig(storage="raw"), progress=False)
    jpeg, raw = ShardSet(tmp_path / "jpeg"), ShardSet(tmp_path / "raw")
    assert {spec.encoding for spec in jpeg.schema.fields} == {"jpeg"}
    # Mean error on 0..255, measured (q90, simplejpeg): rgb 1.19, flow image 0.82, rgbf 0.43; bounds 1.5x those.
    for name, bound in (("rgb", 1.8), ("flow", 1.25), ("rgbf", 0.65)):
        error = np.abs(jpeg.read("v0", name).astype(np.int16) - raw.read("v0", name)).mean()
        assert error < bound, (name, error)


def test_figure_rows_show_the_stored_training_frames(flow_dir: Path, tmp_path: Path) -> None:
    build_rgbf(flow_dir, tmp_path / "train", BuildConfig(storage="raw"), progress=False)
    rows = figure_rows(ShardSet(tmp_path / "train"), "v2", n=4)
    assert [title for title, _ in rows] == ["RGB", "flow image (u, v, |F|)", "RGBF (eq. 7)"]
    flow_shards = ShardSet(flow_dir)
    video = flow_shards.video("v2")
    index = np.unique(np.rint(np.linspace(0, video.n_frames - 1, 4)).astype(np.int64))
    expected = training_frames(flow_shards.read(video, "rgb", index=index),
                               flow_shards.read(video, "flow", index=paired_flow_index(video.n_frames)[index]))
    for (_, frames), name in zip(rows, ("rgb", "flow", "rgbf")):
        assert frames.shape == (4, H, W, 3)
        np.testing.assert_array_equal(frames, expected[name])


def test_rgbf_normalises_between_the_frame_minimum_and_maximum() -> None:
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (3, H, W, 3), dtype=np.uint8)
    flow = rng.uniform(1.0, 6.0, (3, H, W, 2)).astype(np.float32)  # min |F| well above 0
    out = rgbf(rgb, flow)
    assert np.abs(out - eq7_reference(rgb, flow)).max() <= 1.0
    mag = np.hypot(flow[..., 0], flow[..., 1])
    for t in range(3):  # the slowest pixel is black, the fastest keeps its colour
        assert not out[t][np.unravel_index(mag[t].argmin(), mag[t].shape)].any()
        np.testing.assert_array_equal(out[t][np.unravel_index(mag[t].argmax(), mag[t].shape)],
                                      rgb[t][np.unravel_index(mag[t].argmax(), mag[t].shape)])


def test_rgbf_rejects_mismatched_frames() -> None:
    with pytest.raises(RGBFError, match="differ"):
        rgbf(np.zeros((2, 4, 4, 3), np.uint8), np.zeros((1, 4, 4, 2), np.float32))


def test_cli_builds_and_reports(flow_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    help_text = runner.invoke(main, ["build-rgbf", "--help"]).output
    assert "--modalities" in help_text and "--flow-bound" in help_text
    out = tmp_path / "train"
    args = ["build-rgbf", str(flow_dir), str(out), "--storage", "lzf", "--modalities", "rgbf,flow", "--jobs", "2"]
    result = runner.invoke(main, args)
    assert result.exit_code == 1  # the input's recorded failure is carried over
    assert "3 videos ok, 1 failed" in result.output and "FAILED broken: ffmpeg failed" in result.output
    assert ShardSet(out).schema.field_names == ["flow", "rgbf"]
    refused = runner.invoke(main, ["build-rgbf", str(flow_dir), str(out), "--storage", "raw"])
    assert refused.exit_code == 1 and "different configuration" in refused.output and "--overwrite" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    bad = runner.invoke(main, ["build-rgbf", str(flow_dir), str(out), "--modalities", "rgb,depth"])
    assert bad.exit_code == 1 and "depth" in bad.output
    not_flow = runner.invoke(main, ["build-rgbf", str(out), str(tmp_path / "again")])
    assert not_flow.exit_code == 1 and "extract-flow output" in not_flow.output


def shard_contents(root: Path) -> dict[str, object]:
    """Every array and attribute of every shard (file bytes differ by HDF5 timestamps, contents must not)."""
    contents: dict[str, object] = {}
    for path in sorted(root.glob("shard-*.h5")):
        with h5py.File(path, "r") as f:
            contents[path.name] = {k: v for k, v in f.attrs.items() if k != "asym3d_schema"}
            for key, group in f["videos"].items():
                contents[f"{path.name}/{key}"] = dict(group.attrs)
                for name, ds in group.items():
                    contents[f"{path.name}/{key}/{name}"] = ds[()].tobytes()
    return contents


def test_dask_cluster_gives_the_same_shards_as_one_job(flow_dir: Path, tmp_path: Path) -> None:
    from distributed import LocalCluster

    cfg = BuildConfig(storage="lzf")
    build_rgbf(flow_dir, tmp_path / "local", cfg, jobs=1, progress=False)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp://", host="127.0.0.1",
                      dashboard_address=None) as cluster:
        summary = build_rgbf(flow_dir, tmp_path / "dask", cfg, scheduler=cluster.scheduler_address, progress=False)
    assert summary.shards_built == 2
    assert shard_contents(tmp_path / "dask") == shard_contents(tmp_path / "local")
