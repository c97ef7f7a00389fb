"""Evaluation reads each test video's frames once and cuts its clips by index (issue 23, item 6): the scores are
those of the earlier per-clip reading, bit for bit, batches still span videos, and no frame is read twice.

The reference below is the evaluator as it was before (one dataset item per clip, each reading its own 16 frames
from the shards, batches of ``batch_size // 10`` clips in video order), written out here so the comparison does not
depend on the code under test.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.checkpoint import build_model_from_checkpoint
from model.clips import clip_indices, evenly_spaced_starts, protocol_frames
from model.evaluate import ClipViews, checkpoint_views, evaluate_split
from pipeline.store import FieldSpec, Schema, ShardSet, ShardWriter, VideoMeta, prepare_output, shard_name
from test_evaluate import CLASSES, CLIP_LEN, HEIGHT, WIDTH, checkpoint, net_state  # noqa: F401 (fixture)

# lengths chosen so that clips of one batch come from two videos, and one video is shorter than a clip (it loops)
LENGTHS = {"a": 40, "b": 5, "c": 23}


def jpeg_shards(root: Path) -> ShardSet:
    """Training shards as build-rgbf writes them by default (JPEG q90), of random frames: what the network sees
    then depends on every pixel of every frame read."""
    schema = Schema(kind="train", height=HEIGHT, width=WIDTH,
                    fields=(FieldSpec("rgb", 3, encoding="jpeg", quality=90, subsampling="420"),))
    prepare_output(root, schema, {"classes": CLASSES}, [list(LENGTHS)])
    rng = np.random.default_rng(5)
    with ShardWriter(root / shard_name(0), schema, 0) as writer:
        for label, (vid, n) in enumerate(LENGTHS.items()):
            writer.add_video(VideoMeta(vid, label, CLASSES[label], splits={1: "test"}),
                             {"rgb": rng.integers(0, 256, (n, HEIGHT, WIDTH, 3), dtype=np.uint8)})
    return ShardSet(root)


def per_clip_reference(state: dict, shards: ShardSet, clips: int, batch_size: int) -> np.ndarray:
    """Mean softmax per video, one shard read per clip, batches of clips spanning videos (the earlier evaluator)."""
    spec = checkpoint_views(state, clips, 10)
    net = build_model_from_checkpoint(state).eval()
    items = [(i, clip_indices(v.n_frames, int(s), CLIP_LEN)) for i, v in enumerate(shards.split_videos(1, "test"))
             for s in evenly_spaced_starts(v.n_frames, CLIP_LEN, clips)]
    videos = shards.split_videos(1, "test")
    sums = np.zeros((len(videos), len(CLASSES)))
    per_batch = batch_size // 10
    with torch.inference_mode():
        for lo in range(0, len(items), per_batch):
            batch = items[lo:lo + per_batch]
            clips_ = torch.stack([torch.from_numpy(shards.read(videos[i], "rgb", index=index)) for i, index in batch])
            scores = net(spec.views(clips_).contiguous()).float().softmax(dim=1).view(len(batch), 10, -1).sum(dim=1).double()
            for (i, _), row in zip(batch, scores):
                sums[i] += row.numpy()
    return (sums / (clips * 10)).astype(np.float32)


def test_scores_equal_the_per_clip_reading_bit_for_bit(tmp_path, net_state):
    shards = jpeg_shards(tmp_path / "shards")
    state = checkpoint(net_state, shards.root)
    for clips, batch_size in ((4, 30), (2, 20)):  # 3 clips a batch: batches span videos; 2: one video a batch
        result = evaluate_split(state, shards, 1, clips=clips, crops=10, batch_size=batch_size, device="cpu",
                                progress=False)
        assert result.video_ids == list(LENGTHS) and result.views.tolist() == [clips * 10] * 3
        assert np.array_equal(result.scores, per_clip_reference(state, shards, clips, batch_size))


class CountingShards(ShardSet):
    """Real shards that also count the frames each read asks for, per video."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.frames_read: dict[str, list[int]] = {}

    def read(self, video_id, name, start=0, stop=None, index=None):
        self.frames_read.setdefault(video_id.video_id, []).extend(np.asarray(index).tolist())
        return super().read(video_id, name, start, stop, index)


def test_each_frame_is_read_once_and_at_most_clips_x_length_frames(tmp_path, net_state):
    jpeg_shards(tmp_path / "shards")
    shards = CountingShards(tmp_path / "shards")
    spec = checkpoint_views(checkpoint(net_state, shards.root), 25, 10)
    views = ClipViews(shards, shards.split_videos(1, "test"), spec)
    for i in range(len(views)):
        item = views[i]
        video = views.videos[i]
        read = shards.frames_read[video.video_id]
        assert len(read) == len(set(read)) == min(video.n_frames, 25 * CLIP_LEN)  # every frame once, no more
        expected = [clip_indices(video.n_frames, int(s), CLIP_LEN) for s in
                    evenly_spaced_starts(video.n_frames, CLIP_LEN, 25)]
        assert np.array_equal(np.asarray(read)[item["clips"].numpy()], np.stack(expected))  # clips cut by index


def test_a_long_video_reads_at_most_clips_x_length_frames():
    frames, clips = protocol_frames(20000, 16, 25)
    assert len(frames) == 25 * 16 and clips.shape == (25, 16) and frames[clips].min() == 0
    assert frames[clips][-1, -1] == 19999
