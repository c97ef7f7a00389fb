"""Wall and CPU time of ``asym3d predict`` per video (issue 23), and where it goes.

A run's checkpoint is made here (untrained weights: speed does not depend on them) with the schema of training shards
as the pipeline declares them by default (``pipeline.extract.ExtractConfig`` -> ``pipeline.build_rgbf.train_schema``:
128x171, OpenCV TV-L1 with its defaults, JPEG q90), except the frame cap, ``--frames`` (188: about UCF-101's mean
length). On each sample video (real clips), side by side in one run:

- the stages of making the input: decoding, TV-L1 flow (the ``cpu`` backend), flow storage + RGBF + JPEG;
- ``model.predict.predict_videos`` end to end for an RGB run, an RGBF run and the two fused (the flow computed once),
  with ``--clips`` x 10 views per run (the paper's 25 x 10 costs ``250 / views`` times the network's share; the
  network's views/s is printed so that figure can be read off).

    .venv/bin/python bench/predict_time.py [--frames 188] [--clips 2] [--model asym3d] [--crop 112] [--threads 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench helpers beside this script

from model import build_model  # noqa: E402
from model.predict import InputRecipe, Run, VideoInputs, flow_backend, predict_videos  # noqa: E402
from pipeline.build_rgbf import BuildConfig, train_schema  # noqa: E402
from pipeline.decode import DecodeConfig, decode_video  # noqa: E402
from pipeline.extract import ExtractConfig  # noqa: E402
from sample_videos import sample_videos  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (ffmpeg decodes in a child process)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Timer:
    def __enter__(self) -> "Timer":
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu


def make_run(modality: str, schema: dict, model: str, crop: int, classes: int = 101) -> Run:
    net = build_model(model, num_classes=classes, clip=(16, crop, crop)).eval()
    kwargs = {k: list(v) if k == "clip" else v for k, v in net.arch.items() if k != "name"}
    state = {"model_name": model, "model_kwargs": kwargs, "model_state": net.state_dict(), "epoch": 0,
             "config": {"input": modality, "clip_len": 16, "crop": crop}, "classes": [f"c{i}" for i in range(classes)],
             "normalization": {"mean": [100.0] * 3, "std": [60.0] * 3}, "schema": schema}
    return Run(f"({modality}, untrained)", state, InputRecipe.from_schema(schema, modality, modality), net)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=188, help="frames decoded per video at most")
    parser.add_argument("--size", default="128x171", help="decoded frame size HxW (smaller only to smoke-test)")
    parser.add_argument("--clips", type=int, default=2, help="clips per video (x 10 crops)")
    parser.add_argument("--model", default="asym3d")
    parser.add_argument("--crop", type=int, default=112)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--videos", type=int, default=2, help="the first N sample videos")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.size.split("x"))
    decode = DecodeConfig(height=height, width=width, max_frames=args.frames)
    schema = train_schema(dataclasses.replace(ExtractConfig(), decode=decode).schema(), BuildConfig()).to_dict()
    runs = {m: make_run(m, schema, args.model, args.crop) for m in ("rgb", "rgbf")}
    backend = flow_backend(runs["rgbf"].recipe, "cpu", None, "bench")
    views = args.clips * 10
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, load average "
          f"{os.getloadavg()[0]:.1f}; torch {torch.__version__}; {args.model} on 3x16x{args.crop}x{args.crop} views, "
          f"untrained; {args.size} frames, at most {args.frames} a video; {views} views per run. "
          f"Each cell: wall s / CPU s of this process and its ffmpeg children.\n")
    print("| video | frames | decode | TV-L1 flow (cpu) | flow store + RGBF + JPEG | predict RGB | predict RGBF "
          "| predict RGB+RGBF fused | network views/s (wall / CPU) |")
    print("|---|---|---|---|---|---|---|---|---|")
    network = network_rate(runs["rgb"].net, args.crop)
    for video in sample_videos()[:args.videos]:
        with Timer() as t_decode:
            frames = decode_video(video, decode)
        with Timer() as t_flow:
            flow = backend.compute(frames)
        inputs = VideoInputs(video, {runs["rgbf"].recipe.identity(): Given(flow)})
        inputs.frames(runs["rgb"].recipe)  # fills the decode cache (a second decode, untimed)
        with Timer() as t_make:
            inputs.frames(runs["rgbf"].recipe)
        cells = []
        for chosen in (["rgb"], ["rgbf"], ["rgb", "rgbf"]):
            with Timer() as t:
                (result,) = predict_videos([runs[m] for m in chosen], [video], clips=args.clips, crops=10,
                                           device="cpu", flow_backend_name="cpu")
            assert result.error is None, result.error
            cells.append(f"{t.wall:.1f} / {t.cpu:.1f}")
        print(f"| {video.name} | {len(frames)} | {t_decode.wall:.2f} / {t_decode.cpu:.2f} | "
              f"{t_flow.wall:.1f} / {t_flow.cpu:.1f} | {t_make.wall:.2f} / {t_make.cpu:.2f} | {' | '.join(cells)} | "
              f"{network[0]:.1f} / {network[1]:.1f} |")


class Given:
    """A flow backend that returns flow computed before (so the making is timed without TV-L1)."""

    def __init__(self, flow):
        self.flow = flow

    def compute(self, frames):
        return self.flow


def network_rate(net: torch.nn.Module, crop: int, batch: int = 10) -> tuple[float, float]:
    """Views/s of the network alone (float32, inference mode), per wall and per CPU second."""
    x = torch.randn(batch, 3, 16, crop, crop)
    with torch.inference_mode():
        net(x)
        with Timer() as t:
            net(x)
    return batch / t.wall, batch / t.cpu


if __name__ == "__main__":
    main()
