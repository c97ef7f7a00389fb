"""The trainer on tiny real training shards: over-fitting, exact resume, augmentation, checkpoints and bad input.

The shards are written here with the store API (what build-rgbf writes): two classes that differ in colour and in
the direction a bright square moves, 16x20 frames, clips of 16x16x16 (the smallest the five pools accept).
"""
from __future__ import annotations

import math
import csv
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main
from model.clips import clip_indices, network_input
from model.checkpoint import CheckpointError, build_model_from_checkpoint, load_checkpoint, save_checkpoint
from model.data import CentreClips, DataError, TrainClips, View, open_training_shards, split_videos
from model.runtime import Runtime
from model.config import make_config
from model.train import TrainConfig, TrainError, init_from_checkpoint, train, train_splits
from model import build_model
from pipeline.store import (SCHEMA_KEYS, FieldSpec, Schema, ShardWriter, StoreError, VideoMeta, prepare_output,
                            read_json_sealed, shard_name, write_json_sealed)

HEIGHT, WIDTH = 16, 20
CLIP = 16
FIELDS = ("rgb", "flow", "rgbf")


def toy_video(label: int, n_frames: int, seed: int) -> dict[str, np.ndarray]:
    """Frames of class ``label``: class 0 warm and moving right, class 1 cool and moving left; noise per video."""
    rng = np.random.default_rng(seed)
    base = np.array([[170, 90, 60], [60, 90, 170], [90, 170, 60]][label], dtype=np.float64)
    rgb = np.clip(base + rng.normal(0, 12, (n_frames, HEIGHT, WIDTH, 3)), 0, 255)
    step = (2, -2, 0)[label]
    for t in range(n_frames):
        x = (4 + step * t) % (WIDTH - 6)
        rgb[t, 5:11, x:x + 6] = 250
    flow = np.empty((n_frames, HEIGHT, WIDTH, 3))
    flow[..., 0] = 127.5 + step * 127.5 / 20  # u, encoded as build-rgbf does (bound 20 px)
    flow[..., 1] = 127.5 + rng.normal(0, 3, (n_frames, HEIGHT, WIDTH))  # v
    flow[..., 2] = abs(step) * 255 / 20
    rgbf = rgb * (flow[..., 2:3] / 255)
    return {name: np.clip(np.rint(a), 0, 255).astype(np.uint8) for name, a in zip(FIELDS, (rgb, flow, rgbf))}


def write_toy_shards(root: Path, *, classes: int = 2, train_per_class: int = 4, test_per_class: int = 2,
                     fields: tuple[str, ...] = FIELDS, absent: int = 0) -> Path:
    """Training shards as build-rgbf writes them (two shards). ``absent`` planned videos are never written."""
    schema = Schema(kind="train", height=HEIGHT, width=WIDTH, fields=tuple(FieldSpec(f, 3) for f in fields))
    names = ["warm_right", "cool_left", "green_still"][:classes]
    videos = []
    for label in range(classes):
        for i in range(train_per_class + test_per_class):
            subset = "train" if i < train_per_class else "test"
            # lengths 10..21: some shorter than the 16-frame clip (they loop), some longer
            videos.append((VideoMeta(f"{names[label]}/v{i}", label, names[label], splits={1: subset, 2: "train"}),
                           10 + 2 * i + label))
    plan = [[m.video_id for m, _ in videos[::2]], [m.video_id for m, _ in videos[1::2]]]
    plan[0] += [f"missing/v{i}" for i in range(absent)]
    prepare_output(root, schema, {"kind": "folder", "classes": names}, plan)
    for index, ids in enumerate(plan):
        with ShardWriter(root / shard_name(index), schema, index) as writer:
            for seed, (meta, n_frames) in enumerate(videos):
                if meta.video_id in ids:
                    arrays = toy_video(meta.label, n_frames, seed)
                    writer.add_video(meta, {f: arrays[f] for f in fields})
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_shards(tmp_path_factory.mktemp("toy") / "shards")


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(2)


def config(shards: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(shard_dir=str(shards), out_dir=str(out), model="c3d-b5", clip_len=CLIP, crop=16, batch_size=4,
                workers=0, epochs=2, lr=0.01, device="cpu", progress=False)
    return TrainConfig(**{**base, **overrides})


def test_overfits_two_classes(shards: Path, tmp_path: Path) -> None:
    result = train(config(shards, tmp_path / "run", epochs=5, dropout=0.0, lr=0.01))
    history = result["history"]
    assert len(history) == 5
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["train_acc"] == 1.0

    run = tmp_path / "run"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 6))
    assert (run / "curves.png").stat().st_size > 0
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 5 and state["classes"] == ["warm_right", "cool_left"]
    assert state["model_kwargs"] == {"num_classes": 2, "in_channels": 3, "clip": [16, 16, 16],
                                     "batch_norm": False, "dropout": 0.0, "relu_inside_asym": False,
                                     "weight_init": "he-torchfc"}
    assert state["config"]["input"] == "rgb" and state["config"]["crop"] == 16
    assert len(state["normalization"]["mean"]) == 3 and min(state["normalization"]["std"]) > 1
    best = load_checkpoint(run / "best.pt")
    assert best["metrics"]["val_acc"] == result["best_acc"] == max(r["val_acc"] for r in history)
    # an improving epoch writes its checkpoint once, under both names
    assert (run / "best.pt").samefile(run / "last.pt") == (result["best_epoch"] == 5)

    # 100% on the training videos with the saved model, normalisation and centre clips (eval mode, no dropout)
    net = build_model_from_checkpoint(state).eval()
    shard_set = open_training_shards(shards, "rgb")
    train_videos = split_videos(shard_set, 1, "rgb", 0.0).train
    data = CentreClips(shard_set, train_videos, "rgb", CLIP, 16)
    samples = [data[i] for i in range(len(data))]
    mean, std = (torch.tensor(state["normalization"][k]) for k in ("mean", "std"))
    batch = network_input(torch.stack([s["clip"] for s in samples]), torch.tensor([s["flip"] for s in samples]),
                          "rgb", mean, std)
    with torch.no_grad():
        predicted = net(batch).argmax(1)
    assert predicted.tolist() == [v.label for v in train_videos]


@pytest.fixture(scope="module")
def one_epoch_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run (dropout on), shared by the tests that only read it or copy it."""
    out = tmp_path_factory.mktemp("runs") / "one_epoch"
    train(config(shards, out, epochs=1))
    return out


def test_resume_reproduces_the_uninterrupted_run(shards: Path, one_epoch_run: Path, tmp_path: Path) -> None:
    # dropout is on: the resumed run must also replay the dropout masks (global RNG restored from the checkpoint)
    whole = train(config(shards, tmp_path / "whole", epochs=2))
    shutil.copytree(one_epoch_run, tmp_path / "resumed")
    resumed = train(config(shards, tmp_path / "resumed", epochs=2, resume=True, workers=1))  # workers: same samples

    a = load_checkpoint(tmp_path / "whole" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["model_state"].keys() == b["model_state"].keys()
    for key in a["model_state"]:
        assert torch.equal(a["model_state"][key], b["model_state"][key]), key
    momentum_a = [s["momentum_buffer"] for s in a["optimizer_state"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer_state"]["state"].values()]
    assert len(momentum_a) == len(momentum_b) > 0
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b))
    assert [r["train_loss"] for r in whole["history"]] == [r["train_loss"] for r in resumed["history"]]


def test_resume_and_rerun_refusals(shards: Path, one_epoch_run: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="already holds a run"):
        train(config(shards, one_epoch_run, epochs=1))
    with pytest.raises(TrainError, match="model 'c3d-b5'.*refusing to resume"):
        train(config(shards, one_epoch_run, model="b5-asyConv3", resume=True))
    three = write_toy_shards(tmp_path / "three", classes=3, train_per_class=1, test_per_class=1)
    with pytest.raises(TrainError, match="2 classes.*has 3"):
        train(config(three, one_epoch_run, resume=True))
    with pytest.raises(TrainError, match="nothing to resume"):
        train(config(shards, tmp_path / "fresh", resume=True))


def test_init_reinitialises_fc8_when_classes_differ(one_epoch_run: Path) -> None:
    path = one_epoch_run / "last.pt"
    pre = load_checkpoint(path)["model_state"]
    net = build_model("c3d-b5", num_classes=3, clip=(CLIP, 16, 16))
    fresh_fc8 = net.fc8.weight.detach().clone()
    assert init_from_checkpoint(net, path, "c3d-b5") is True
    own = net.state_dict()
    assert all(torch.equal(own[k], v) for k, v in pre.items() if not k.startswith("fc8."))
    assert torch.equal(net.fc8.weight, fresh_fc8)
    with pytest.raises(TrainError, match="cannot initialise b5-asyConv3"):
        init_from_checkpoint(build_model("b5-asyConv3", num_classes=3, clip=(CLIP, 16, 16)), path, "b5-asyConv3")
    with pytest.raises(TrainError, match="does not fit"):  # another clip changes fc6
        init_from_checkpoint(build_model("c3d-b5", num_classes=2, clip=(CLIP, 32, 32)), path, "c3d-b5")


def test_flip_negates_u_for_flow_only(shards: Path) -> None:
    """The worker ships the cropped uint8 clip and the flip flag; the device mirrors (and negates u) and normalises."""
    shard_set = open_training_shards(shards, "flow")
    videos = split_videos(shard_set, 1, "flow", 0.0).train
    mean, std = torch.zeros(3), torch.ones(3)  # identity normalisation: samples are the stored values
    stored = shard_set.read(videos[0], "flow", index=clip_indices(videos[0].n_frames, 0, CLIP))[:, :, 2:18]
    for modality in ("flow", "rgb"):
        data = TrainClips(shard_set, videos, modality, CLIP, 16, seed=0)
        samples = [data.clip(0, View(start=0, top=0, left=2, flip=flip)) for flip in (False, True)]
        assert samples[0]["clip"].dtype == torch.uint8 and torch.equal(samples[0]["clip"], samples[1]["clip"])
        plain, flipped = network_input(torch.stack([s["clip"] for s in samples]),
                                       torch.tensor([s["flip"] for s in samples]), modality, mean, std)
        if modality == "flow":
            assert torch.equal(plain, torch.from_numpy(stored).permute(3, 0, 1, 2).float())
            assert torch.equal(flipped[0], 255 - plain[0].flip(-1))  # u negated: 127.5 + u -> 127.5 - u
            assert torch.equal(flipped[1:], plain[1:].flip(-1))  # v and |F| only mirrored
        else:
            assert torch.equal(flipped, plain.flip(-1))


def test_random_views_are_seeded_and_reach_every_corner(shards: Path) -> None:
    shard_set = open_training_shards(shards, "rgb")
    videos = split_videos(shard_set, 1, "rgb", 0.0).train
    data = TrainClips(shard_set, videos, "rgb", CLIP, 12, seed=3)
    assert data.random_view(5, 2) == TrainClips(shard_set, videos, "rgb", CLIP, 12, seed=3).random_view(5, 2)
    views = [data.random_view(epoch, 0) for epoch in range(400)]
    assert {(v.top, v.left) for v in views} >= {(0, 0), (0, 8), (4, 0), (4, 8), (2, 4)}
    assert {v.flip for v in views} == {True, False}
    long_video = max(range(len(videos)), key=data.frames)
    starts = {data.random_view(epoch, long_video).start for epoch in range(200)}
    assert starts == set(range(data.frames(long_video) - CLIP + 1))
    sample = data[(0, 0)]
    assert sample["clip"].shape == (CLIP, 12, 12, 3) and sample["clip"].dtype == torch.uint8
    assert sample["label"] == videos[0].label and isinstance(sample["flip"], bool)


def test_bad_input_errors(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such shard directory"):
        train(config(tmp_path / "nowhere", tmp_path / "run"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no complete shards"):
        train(config(tmp_path / "empty", tmp_path / "run"))
    with pytest.raises(TrainError, match="unknown model 'c3d-b9'; valid: .*c3d-b5"):
        train(config(shards, tmp_path / "run", model="c3d-b9"))
    rgb_only = write_toy_shards(tmp_path / "rgb_only", fields=("rgb",), train_per_class=1, test_per_class=0)
    with pytest.raises(DataError, match="holds no 'flow' frames"):
        train(config(rgb_only, tmp_path / "run", input="flow"))
    with pytest.raises(DataError, match="split 3 has no training videos"):
        train(config(rgb_only, tmp_path / "run", split=3))
    with pytest.raises(DataError, match="crop 17 does not fit the stored 16x20"):
        train(config(rgb_only, tmp_path / "run", crop=17))
    gappy = write_toy_shards(tmp_path / "gappy", train_per_class=1, test_per_class=0, absent=1)
    with pytest.raises(DataError, match="1 of 3 planned videos are absent"):
        train(config(gappy, tmp_path / "run"))
    result = train(config(gappy, tmp_path / "run", max_missing=0.5, epochs=1))
    assert result["absent_videos"] == 1 and result["best_on"] == "train"  # no test videos: best by train accuracy

    meta_path = rgb_only / "dataset.json"
    meta, _ = read_json_sealed(meta_path, SCHEMA_KEYS)
    meta["schema"]["version"] = 99
    write_json_sealed(meta_path, meta)  # as a later asym3d would write it, with its checksum
    with pytest.raises(StoreError, match="format version 99"):
        train(config(rgb_only, tmp_path / "run2"))
    meta_path.write_text(meta_path.read_text().replace('"version": 99', '"version": 98'))  # edited by hand
    with pytest.raises(StoreError, match="dataset.json: damaged"):
        train(config(rgb_only, tmp_path / "run2"))


def test_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="absent.pt: no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"model_name": "c3d-b5"}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="partial.pt: not an asym3d checkpoint"):
        load_checkpoint(tmp_path / "partial.pt")


def test_a_diverged_run_stops_in_one_line_and_keeps_the_last_finite_checkpoint(shards: Path, one_epoch_run: Path,
                                                                               tmp_path: Path) -> None:
    with pytest.raises(TrainError, match=r"training diverged in epoch 1 \(loss (nan|inf)\); its weights are not "
                                         r"saved, no checkpoint was written. Start again with a lower --lr"):
        train(config(shards, tmp_path / "fresh", lr=1e12))
    assert not (tmp_path / "fresh" / "last.pt").exists()
    # a run that was fine for an epoch keeps that epoch: the resumed copy takes a learning rate that diverges
    run = tmp_path / "resumed"
    shutil.copytree(one_epoch_run, run)
    state = load_checkpoint(run / "last.pt")
    for group in state["optimizer_state"]["param_groups"]:
        group["lr"] = group["initial_lr"] = 1e12
    save_checkpoint(run / "last.pt", state)
    finished = (run / "last.pt").read_bytes()
    with pytest.raises(TrainError, match="diverged in epoch 2 .*last.pt keeps epoch 1"):
        train(config(shards, run, epochs=2, resume=True))
    assert (run / "last.pt").read_bytes() == finished


def test_one_write_gives_best_and_last_and_a_later_write_parts_them(tmp_path: Path) -> None:
    base = dict(model_name="c3d-b5", model_kwargs={}, config={}, normalization={}, classes=[])
    save_checkpoint(tmp_path / "best.pt", dict(base, epoch=1, model_state={"w": torch.ones(3)}),
                    also=tmp_path / "last.pt")
    assert (tmp_path / "best.pt").samefile(tmp_path / "last.pt")
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    save_checkpoint(tmp_path / "last.pt", dict(base, epoch=2, model_state={"w": torch.zeros(3)}))
    assert not (tmp_path / "best.pt").samefile(tmp_path / "last.pt")
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1 and load_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # no temporary file left


def test_schedule_presets() -> None:
    common = dict(shard_dir="s", out_dir="o", model="c3d-b5")
    fine = make_config("finetune", **common, epochs=None, lr=None)
    assert (fine.lr, fine.lr_step, fine.lr_gamma, fine.epochs, fine.fc8_lr_mult) == (1e-4, 8, 0.1, 20, 10.0)
    pre = make_config("pretrain", **common, epochs=3)
    assert (pre.lr, pre.lr_step, pre.lr_gamma, pre.epochs) == (1e-3, 15, 0.2, 3)
    assert replace(pre, batch_size=8).momentum == 0.9 and pre.weight_decay == 5e-4 and pre.batch_size == 16


def test_cli_trains_each_split_and_reports_bad_input(shards: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["train", str(shards), "--model", "c3d-b5", "--clip", "16x16x16", "--batch-size", "4", "--workers", "0",
            "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "runs")]
    result = runner.invoke(main, args + ["--splits", "1,2", "--schedule", "finetune"])
    assert result.exit_code == 0, result.output
    for split in (1, 2):
        state = load_checkpoint(tmp_path / "runs" / f"split{split}" / "last.pt")
        assert state["config"]["split"] == split and state["config"]["schedule"] == "finetune"
        assert state["optimizer_state"]["param_groups"][1]["lr"] == pytest.approx(1e-3)  # fc8 at 10x 1e-4
    assert "split2: best train accuracy" in result.output  # split 2 has no test videos

    result = runner.invoke(main, args[:1] + [str(tmp_path / "nowhere")] + args[2:])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: {tmp_path / 'nowhere'}: no such shard directory"]
    result = runner.invoke(main, args + ["--input", "flow", "--model", "nope"])
    assert result.exit_code == 1 and "unknown model 'nope'" in result.output


def test_splits_resume_continues_the_interrupted_split_and_skips_finished_ones(shards: Path, one_epoch_run: Path,
                                                                               tmp_path: Path) -> None:
    out = tmp_path / "runs"
    shutil.copytree(one_epoch_run, out / "split1")  # split 1 finished its one epoch; split 2 never saved one
    finished = (out / "split1" / "last.pt").read_bytes()
    with pytest.raises(TrainError, match="split1: already holds a run"):
        train_splits(config(shards, out, epochs=1), [1, 2])
    results = train_splits(config(shards, out, epochs=1, resume=True), [1, 2])
    assert [len(r["history"]) for r in results] == [1, 1]
    assert (out / "split1" / "last.pt").read_bytes() == finished  # nothing redone
    assert load_checkpoint(out / "split2" / "last.pt")["config"]["split"] == 2


def test_unreadable_video_is_skipped_and_counted_up_to_the_cap(shards: Path, tmp_path: Path) -> None:
    from test_integrity import _flip, _stored_regions

    damaged = tmp_path / "shards"
    shutil.copytree(shards, damaged)
    shard = damaged / shard_name(1)
    _, offset, size = next(r for r in _stored_regions(shard) if r[0].endswith("rgb chunk 0"))
    _flip(shard, offset + size // 2)
    result = train(config(damaged, tmp_path / "ok", epochs=1, max_bad_videos=1))
    assert len(result["history"]) == 1
    with pytest.raises(TrainError, match=r"1 videos could not be read \(more than --max-bad-videos 0\).*"
                                         r"shard-00001.h5: video '.*', field 'rgb'"):
        train(config(damaged, tmp_path / "stop", epochs=1, max_bad_videos=0))


def test_the_gpu_precision_path_runs_on_the_cpu(shards: Path, tmp_path: Path) -> None:
    """bf16 autocast + channels_last_3d is what a GPU runs; forcing it here executes that Python in CI."""
    runtime = Runtime.choose("cpu", "bf16")
    net = runtime.prepare(build_model("c3d-b5", num_classes=2, clip=(CLIP, 16, 16)))
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in net.parameters() if p.dim() == 5)
    assert Runtime.choose("cpu").dtype is None  # auto: float32 on a CPU
    # without oneDNN: its bf16 conv3d weight gradient on the CPU is nondeterministic, and in about one 2-epoch run in
    # 20 it returned values near 1e23 (BENCHMARKS.md, "bf16 on a CPU"); the native kernels are slower but deterministic
    with torch.backends.mkldnn.flags(enabled=False):
        result = train(config(shards, tmp_path / "bf16", epochs=2, lr=1e-3, precision="bf16"))
    assert all(math.isfinite(row["train_loss"]) for row in result["history"])
    state = load_checkpoint(tmp_path / "bf16" / "last.pt")
    assert state["config"]["precision"] == "bf16" and state["model_state"]["fc8.weight"].dtype == torch.float32
