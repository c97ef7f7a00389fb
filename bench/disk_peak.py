"""Peak disk from videos to training shards (issue 17), measured side by side in one run on real clips.

Three ways from the same videos to the same kind of training shards (build-rgbf's defaults, JPEG q90):

- **two stages**: ``extract-flow`` (every flow shard kept), then ``build-rgbf``: peak = all flow shards + all
  training shards.
- **--train-dir**: ``extract-flow --train-dir``: each training shard built as soon as its flow shard is complete,
  the flow shard then deleted: peak = training shards + flow shards in flight.
- **compact flow shards** (measured, not adopted): the same flow shards re-stored with JPEG RGB and coarser flow
  quantisation, to compare their size to the source videos and the error they add.

Disk is sampled every 10 ms by a thread summing every file in the output directories (temporary files included).
Errors: flow's in pixels against the backend's float32 flow computed in memory (first ``--float-clips`` clips);
RGBF's on 0..255 against eq. 7 computed in float from lossless inputs (the lossless RGB of the flow shards and, on
those clips, the float flow; elsewhere the stored flow, within 0.005 px). CPU seconds are this process's and its
children's (ffmpeg), so they hold on a loaded machine where wall-clock time does not.

    .venv/bin/python bench/disk_peak.py [--clips ../shared/data/real_clips] [--max-frames 24] [--backend cpu]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from pipeline.build_rgbf import BuildConfig, FollowOn, build_rgbf
from pipeline.datasets import VIDEO_EXTENSIONS, index_dataset
from pipeline.decode import DecodeConfig, decode_video
from pipeline.extract import ExtractConfig, extract_flow
from pipeline.rgbf import image_to_flow, paired_flow_index, rgbf
from pipeline.store import FieldSpec, Schema, ShardSet, ShardWriter, VideoMeta, prepare_output, shard_name

REPO = Path(__file__).resolve().parents[1]
# Compact flow-shard storage options: (RGB field options, flow int16 scale); today's is the first.
COMPACT = {
    "today: RGB lzf, flow int16 x100 gzip": ({"compression": "lzf"}, 100.0),
    "RGB JPEG q95 4:4:4, flow x100 gzip": ({"encoding": "jpeg", "quality": 95}, 100.0),
    "RGB JPEG q95 4:4:4, flow x20 gzip": ({"encoding": "jpeg", "quality": 95}, 20.0),
    "RGB JPEG q90 4:2:0, flow x10 gzip": ({"encoding": "jpeg", "quality": 90, "subsampling": "420"}, 10.0),
}


class DiskPeak:
    """Largest total size of the files under ``roots`` seen while the ``with`` block runs (sampled every 10 ms)."""

    def __init__(self, *roots: Path):
        self.roots, self.peak, self._stop = roots, 0, threading.Event()

    def size(self) -> int:
        total = 0
        for root in self.roots:
            for dirpath, _, names in os.walk(root):
                for name in names:
                    try:
                        total += os.stat(os.path.join(dirpath, name)).st_size
                    except FileNotFoundError:  # renamed or deleted between the listing and the stat
                        pass
        return total

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.size())

    def __enter__(self) -> "DiskPeak":
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.size())


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def shard_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.glob("shard-*.h5"))


def copy_clips(clips: Path, root: Path) -> list[Path]:
    """A folder dataset (``root/<set>_<label>/<file>``) of copies of every clip under ``clips/<set>/<label>/``
    (copies, not links: the dataset index refuses paths that resolve outside its root)."""
    videos = sorted(p for p in clips.glob("*/*/*") if p.suffix.lower() in VIDEO_EXTENSIONS)
    for video in videos:
        (root / f"{video.parts[-3]}_{video.parts[-2]}").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(video, root / f"{video.parts[-3]}_{video.parts[-2]}" / video.name)
    return videos


def source_bytes(videos: list[Path], max_frames: int) -> tuple[float, int]:
    """Bytes of the source videos that the decoded frames stand for (a clip cut at ``max_frames`` counts its size in
    proportion), and the frames decoded."""
    total, frames = 0.0, 0
    for video in videos:
        n = len(decode_video(video, DecodeConfig()))
        total += video.stat().st_size * min(n, max_frames) / n
        frames += min(n, max_frames)
    return total, frames


def compact_copy(flow: ShardSet, root: Path, rgb_options: dict, scale: float) -> ShardSet:
    """The flow shards re-stored with another RGB field and flow quantisation (one shard, same videos)."""
    fields = (FieldSpec("rgb", 3, **rgb_options), FieldSpec("flow", 2, dtype="int16", scale=scale,
                                                            compression="gzip", frames_offset=-1))
    schema = Schema(kind="flow", height=flow.schema.height, width=flow.schema.width, fields=fields)
    prepare_output(root, schema, {}, [[v.video_id for v in flow.videos]])
    with ShardWriter(root / shard_name(0), schema, 0) as writer:
        for v in flow.videos:
            writer.add_video(VideoMeta(v.video_id, v.label, v.label_name),
                             {"rgb": flow.read(v, "rgb"), "flow": flow.read(v, "flow")})
    return ShardSet(root)


def eq7(rgb: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Eq. 7 in float (no rounding) with build-rgbf's frame pairing."""
    paired = flow[paired_flow_index(len(rgb))]
    mag = np.hypot(paired[..., 0], paired[..., 1])
    lo, hi = mag.min(axis=(1, 2), keepdims=True), mag.max(axis=(1, 2), keepdims=True)
    weight = np.where(hi - lo >= 1e-6, (mag - lo) / np.maximum(hi - lo, 1e-6), 0)
    return rgb.astype(np.float64) * weight[..., None]


def rgbf_error(shards: ShardSet, truth: dict[str, tuple[np.ndarray, np.ndarray]], stored: bool) -> float:
    """Mean |RGBF - eq. 7 from lossless inputs| on 0..255: the stored training RGBF (``stored``), or eq. 7 made by
    build-rgbf's code from a (compact) flow shard's decoded RGB and flow."""
    errors = []
    for vid, (rgb, flow) in truth.items():
        if stored:
            got = shards.read(vid, "rgbf")
        else:
            got = rgbf(shards.read(vid, "rgb"), shards.read(vid, "flow")[paired_flow_index(len(rgb))])
        errors.append(np.abs(got - eq7(rgb, flow)).mean())
    return float(np.mean(errors))


def flow_image_error(shards: ShardSet, floats: dict[str, np.ndarray]) -> float:
    """Mean |u,v decoded from the stored flow image - float flow| in pixels (JPEG and 8-bit quantisation)."""
    bound = shards.schema.config["flow_image"]["bound"]
    return float(np.mean([np.abs(image_to_flow(shards.read(vid, "flow"), bound)
                                 - flow[paired_flow_index(len(flow) + 1)]).mean() for vid, flow in floats.items()]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=Path, default=REPO.parent / "shared" / "data" / "real_clips")
    parser.add_argument("--max-frames", type=int, default=24, help="frames decoded per clip")
    parser.add_argument("--backend", default="cpu", help="flow backend (cpu: OpenCV TV-L1)")
    parser.add_argument("--videos-per-shard", type=int, default=2)
    parser.add_argument("--float-clips", type=int, default=4, help="clips whose float flow is computed for errors")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        videos = copy_clips(args.clips, tmp / "videos")
        video_bytes, n_frames = source_bytes(videos, args.max_frames)
        index = index_dataset("folder", tmp / "videos")
        cfg = ExtractConfig(decode=DecodeConfig(max_frames=args.max_frames), backend=args.backend,
                            videos_per_shard=args.videos_per_shard)
        print(f"{len(videos)} real clips under {args.clips}, first {args.max_frames} frames each ({n_frames} frames "
              f"at 128x171, {video_bytes / 1e6:.2f} MB of source video for them); flow backend {args.backend}; "
              f"{args.videos_per_shard} videos per shard, one job; {platform.machine()}, {os.cpu_count()} CPUs\n")

        cpu = cpu_seconds()
        with DiskPeak(tmp / "flow", tmp / "train") as two:
            extract_flow(index, tmp / "flow", cfg, progress=False)
            build_rgbf(tmp / "flow", tmp / "train", BuildConfig(), progress=False)
        two_cpu, cpu = cpu_seconds() - cpu, cpu_seconds()
        with DiskPeak(tmp / "flow-b", tmp / "train-b") as chained:
            extract_flow(index, tmp / "flow-b", cfg, train=FollowOn(tmp / "train-b"), progress=False)
        chained_cpu = cpu_seconds() - cpu
        flow_a, train_a, train_b = shard_bytes(tmp / "flow"), shard_bytes(tmp / "train"), shard_bytes(tmp / "train-b")
        a, b = ShardSet(tmp / "train"), ShardSet(tmp / "train-b")
        same = all(np.array_equal(a.read(v, name), b.read(v.video_id, name))
                   for v in a.videos for name in a.schema.field_names)
        print("| path | flow shards left | training shards | peak disk | peak / training shards "
              "| flow intermediate / source video | CPU s per frame |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, left, train, peak, cpu_s in (("two stages", flow_a, train_a, two.peak, two_cpu),
                                               ("extract-flow --train-dir", shard_bytes(tmp / "flow-b"), train_b,
                                                chained.peak, chained_cpu)):
            print(f"| {name} | {left / 1e6:.2f} MB | {train / 1e6:.2f} MB | {peak / 1e6:.2f} MB | "
                  f"{peak / train:.2f} | {(peak - train) / video_bytes:.1f} | {cpu_s / n_frames:.3f} |")
        print(f"\ntraining shards of the two paths identical frame for frame: {'yes' if same else 'NO'}; "
              f"flow shards {flow_a / n_frames / 1e3:.1f} KB/frame, training shards {train_a / n_frames / 1e3:.1f} "
              f"KB/frame, source video {video_bytes / n_frames / 1e3:.2f} KB/frame\n")

        flow = ShardSet(tmp / "flow")
        backend = cfg.make_backend()
        floats = {v.video_id: backend.compute(flow.read(v, "rgb")) for v in flow.videos[:args.float_clips]}
        truth = {v.video_id: (flow.read(v, "rgb"), floats.get(v.video_id, flow.read(v, "flow"))) for v in flow.videos}
        print(f"errors against lossless inputs ({len(floats)} clips with float flow, "
              f"{sum(len(f) for f in floats.values())} pairs):\n")
        print("| flow-shard storage | bytes/frame | flow shards / source video | flow max / mean error px "
              "| RGBF from it vs eq. 7, mean abs (0..255) |")
        print("|---|---:|---:|---:|---:|")
        for i, (name, (rgb_options, scale)) in enumerate(COMPACT.items()):
            shards = compact_copy(flow, tmp / f"compact{i}", rgb_options, scale)
            size = shard_bytes(tmp / f"compact{i}")
            diff = [np.abs(shards.read(vid, "flow") - f) for vid, f in floats.items()]
            print(f"| {name} | {size / n_frames:,.0f} | {size / video_bytes:.1f} | "
                  f"{max(d.max() for d in diff):.4f} / {np.mean([d.mean() for d in diff]):.4f} | "
                  f"{rgbf_error(shards, truth, stored=False):.2f} |")
        print(f"\ntraining shards (JPEG q90; RGBF 4:2:0) vs eq. 7 from lossless inputs: RGBF mean abs error "
              f"{rgbf_error(b, truth, stored=True):.2f} (0..255); flow image u,v mean error "
              f"{flow_image_error(b, floats):.3f} px")


if __name__ == "__main__":
    main()
