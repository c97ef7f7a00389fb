"""Training shards written from frames in memory, as build-rgbf stores them, for benchmarks and the device check.

Why a helper of its own: timing the loader or the evaluator needs real training shards (JPEG q90 4:2:0 RGB, the
build-rgbf default, so decode cost is what users pay), but running extract-flow and build-rgbf first would make every
benchmark pay for TV-L1. This writes the same files through the store's own writer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.build_rgbf import DEFAULT_JPEG_QUALITY, JPEG_SUBSAMPLING
from pipeline.store import FieldSpec, Schema, ShardWriter, VideoMeta, prepare_output, shard_name


def write_train_shards(root: Path, videos: list[tuple[VideoMeta, np.ndarray]], classes: list[str],
                       n_shards: int = 2) -> Path:
    """Write ``videos`` ((meta, (T, H, W, 3) uint8 RGB frames), all one size) as an ``rgb`` training-shard directory.

    Videos are dealt round-robin over ``n_shards`` shards; each meta's ``splits`` decides where it trains and tests.
    """
    height, width = videos[0][1].shape[1:3]
    spec = FieldSpec("rgb", 3, encoding="jpeg", quality=DEFAULT_JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING["rgb"])
    schema = Schema(kind="train", height=height, width=width, fields=(spec,))
    plan = [[meta.video_id for meta, _ in videos[i::n_shards]] for i in range(n_shards)]
    prepare_output(root, schema, {"kind": "bench", "classes": classes}, plan)
    for index in range(n_shards):
        with ShardWriter(root / shard_name(index), schema, index) as writer:
            for meta, frames in videos[index::n_shards]:
                writer.add_video(meta, {"rgb": frames})
    return root
