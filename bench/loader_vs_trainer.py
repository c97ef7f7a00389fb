"""Clips/s the training loader delivers (per worker count) against clips/s the trainer consumes (issue 5).

Both sides are measured in one run on the same machine:

- Loader: the trainer's own :class:`model.data.TrainClips` + :class:`model.data.EpochSampler` + DataLoader (batch 16)
  over a real training shard directory written here from real frames (``--videos`` windows of ``--frames`` frames
  of ``../shared/data/videos``, else of the real clips in tests/data, decoded at 128x171, stored as build-rgbf's
  default: JPEG q90, 4:2:0), random 16x112x112 clips with flips, normalised. Timed from the second batch on (worker
  start-up excluded), for each ``--workers`` count.
- Trainer: forward + cross-entropy + backward + SGD step (momentum 0.9, weight decay 5e-4) of c3d-b5 and asym3d at
  batch 16 on in-memory tensors: what the training loop asks of the loader. On CUDA with bf16 autocast and
  channels_last_3d, as ``asym3d train`` runs; on CPU in float32 at ``--trainer-clip`` (default 16x56x56 on CPU,
  where 16x112x112 takes minutes per step; a 112 crop costs ~4x the MACs, so the CPU demand at 112 is ~4x lower
  and the ratios printed are conservative).

The ratio loader / trainer says how many times over the loader could feed the network; the issue's goal is >= 3
per GPU-class device.

    .venv/bin/python bench/loader_vs_trainer.py [--workers 0,1,2] [--steps 2] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from model import build_model
from model.data import EpochSampler, TrainClips, open_training_shards, split_videos
from pipeline.store import VideoMeta
from sample_videos import sample_videos
from train_shards import write_train_shards

BATCH = 16


def write_shards(root: Path, n_videos: int, frames: int) -> Path:
    """``n_videos`` videos of ``frames`` real 128x171 frames (windows of the sample videos) in two JPEG shards."""
    from pipeline.decode import DecodeConfig, decode_video  # here only: the loader timing itself needs no ffmpeg

    sources = [decode_video(path, DecodeConfig(max_frames=400)) for path in sample_videos()]
    rng = np.random.default_rng(0)
    videos = []
    for i in range(n_videos):
        source = sources[i % len(sources)]
        start = int(rng.integers(0, len(source) - frames + 1))
        meta = VideoMeta(f"v{i:03d}", i % 2, f"class{i % 2}", splits={1: "train"})
        videos.append((meta, source[start:start + frames]))
    return write_train_shards(root, videos, ["class0", "class1"])


def loader_rate(root: Path, workers: int, batches: int) -> float:
    """Clips/s of the training DataLoader with ``workers`` processes, after its first batch.

    The keys of as many epochs as the timed batches need go through one loader: with a small bench set, restarting
    the loader every epoch would time the workers' pipeline refilling at each epoch boundary, not the loader.
    """
    shards = open_training_shards(root, "rgb")
    videos = split_videos(shards, 1, "rgb", 0.0).train
    shards.close()
    data = TrainClips(shards, videos, "rgb", 16, 112, seed=0)
    sampler, keys = EpochSampler(len(data), seed=0), []
    while len(keys) < (batches + 1) * BATCH:
        sampler.set_epoch(len(keys) // len(data))
        keys += list(sampler)
    loader = DataLoader(data, batch_size=BATCH, sampler=keys[:(batches + 1) * BATCH], num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    seen, start = 0, 0.0
    for batch in loader:
        if start == 0.0:
            start = time.perf_counter()  # from the end of the first batch: worker start-up excluded
            continue
        seen += len(batch["label"])
    return seen / (time.perf_counter() - start)


def trainer_rate(name: str, clip: tuple[int, int, int], steps: int, device: torch.device) -> float:
    """Clips/s one training process consumes: SGD steps of ``name`` at batch 16 on in-memory clips."""
    net = build_model(name, num_classes=101, clip=clip).to(device)
    x = torch.randn(BATCH, 3, *clip, device=device)
    y = torch.randint(0, 101, (BATCH,), device=device)
    amp = device.type == "cuda"
    if amp:
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(net(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up (cuDNN autotuning, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * BATCH / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="0,1,2", help="loader worker counts to measure")
    parser.add_argument("--batches", type=int, default=12, help="timed loader batches per worker count")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per network")
    parser.add_argument("--models", default="c3d-b5,asym3d")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trainer-clip", help="TxHxW for the trainer [default: 16x112x112 on CUDA, 16x56x56 on CPU]")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the trainer (CPU)")
    parser.add_argument("--videos", type=int, default=24, help="videos in the loader's training shards")
    parser.add_argument("--frames", type=int, default=48, help="frames per video (at least 16, the clip length)")
    args = parser.parse_args()
    device = torch.device(args.device)
    clip_text = args.trainer_clip or ("16x112x112" if device.type == "cuda" else "16x56x56")
    clip = tuple(int(p) for p in clip_text.split("x"))

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", load average at start {os.getloadavg()[0]:.1f}")
    # the loader's main process gets one intra-op thread, as DataLoader workers do: on an oversubscribed CPU, two
    # threads made the per-clip normalisation ~5x slower (measured), which would charge workers=0 for contention
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_shards(Path(tmp) / "shards", n_videos=args.videos, frames=args.frames)
        loader = {w: loader_rate(root, w, args.batches) for w in (int(s) for s in args.workers.split(","))}
    torch.set_num_threads(args.threads)
    trainer = {name: trainer_rate(name, clip, args.steps, device) for name in args.models.split(",")}

    print(f"\nloader: 16x112x112 clips from JPEG q90 shards, batch {BATCH}; trainer: batch {BATCH} at "
          f"{clip_text} on {device}\n")
    print("| loader workers | loader clips/s | " + " | ".join(f"x {n} demand" for n in trainer) + " |")
    print("|---:|---:|" + "---:|" * len(trainer))
    for workers, rate in loader.items():
        print(f"| {workers} | {rate:.1f} | " + " | ".join(f"{rate / t:.1f}x" for t in trainer.values()) + " |")
    print("\n| network | trainer clips/s |\n|---|---:|")
    for name, rate in trainer.items():
        print(f"| {name} | {rate:.2f} |")
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
