"""The trainer: any registered network on one modality of the training shards, CPU or CUDA, one process or DDP.

``train(cfg)`` runs one split into ``cfg.out_dir``; ``train_splits`` runs one per split into ``OUT/split{N}``.
What a run is and the paper's schedules: :mod:`model.config`; processes: :mod:`model.distributed`; data sampling:
:mod:`model.data`; how the network runs on its device: :mod:`model.runtime`.

Run directory: ``last.pt`` (every epoch) and ``best.pt`` (best validation accuracy; training accuracy when the split
has no test videos), both in the format of :mod:`model.checkpoint`; ``metrics.csv`` (one row per epoch);
``curves.png``; ``run.json`` (config, classes, normalisation, for people); TensorBoard events when tensorboard is
installed.

Reproducibility: the batch order of epoch ``e`` is a permutation seeded by ``seed + e`` and every augmentation is
seeded by ``(seed, epoch, index)`` (see :mod:`model.data`); the only other randomness, dropout, comes from the global
generators, whose states are saved with each checkpoint and restored on ``--resume``. On CPU a resumed run therefore
ends with the weights of the uninterrupted one. On CUDA the order and augmentation are equally exact, the arithmetic
only as deterministic as cuDNN's autotuned kernels.

Many GPUs: launch with ``torchrun --nproc_per_node N -m cli train ...``. ``--batch-size`` is per process (global
batch = batch x processes); every process must see the same shard and run directories (one machine, or a shared
file system). Rank 0 writes the logs, metrics and checkpoints.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from model import build_model, list_models
from pipeline.lock import DirectoryLock
from pipeline.store import ShardSet, write_text_atomic

from .checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from .clips import network_input
from .config import RUNTIME_FIELDS, TrainConfig, TrainError
from .data import (CentreClips, EpochSampler, TrainClips, channel_statistics, check_crop, check_shard_identity,
                   collate_readable, open_training_shards, shard_identity, split_videos)
from .distributed import Env, is_main_process, process_group, sum_across, torchrun_world
from .run_files import METRIC_COLUMNS, plot_curves, tensorboard_writer, write_metrics
from .runtime import Runtime, device_memory, resolve_device

def train_splits(cfg: TrainConfig, splits: Sequence[int]) -> list[dict[str, Any]]:
    """One run per split, into ``cfg.out_dir/split{N}``; returns each run's summary.

    Every split is checked (:func:`check_run`) before the first one trains. With ``resume``, a split that has a
    ``last.pt`` continues it (a finished one has nothing left to do) and a split that never saved one starts afresh,
    so one command picks up a multi-split run wherever it was interrupted.
    """
    plans = []
    for split in splits:
        out = Path(cfg.out_dir) / f"split{split}"
        resume = cfg.resume and (out / "last.pt").is_file()
        plans.append(check_run(dataclasses.replace(cfg, split=split, out_dir=str(out), resume=resume)))
    with process_group(cfg.device):
        return [_train_checked(plan) for plan in plans]


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train one run; returns a summary (run dir, best accuracy and epoch, per-epoch history, data counts).

    Raises :class:`TrainError`, :class:`model.data.DataError`, :class:`pipeline.store.StoreError`,
    :class:`model.checkpoint.CheckpointError`, :class:`pipeline.errors.ConfigError` or the registry's unknown-model
    error for bad input, before anything is created (:func:`check_run`). The main process then holds the run
    directory's lock (:mod:`pipeline.lock`) throughout. A failed checkpoint write (full disk) stops the run with
    :class:`CheckpointError`, the previous checkpoints intact.
    """
    plan = check_run(cfg)
    with process_group(cfg.device):
        return _train_checked(plan)


def _train_checked(plan: "RunPlan") -> dict[str, Any]:
    with DirectoryLock(plan.cfg.out_dir) if is_main_process() else nullcontext():
        return _Run(plan).fit()


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A run checked by :func:`check_run`: its config (shard path absolute; a resumed run's own settings), the
    checkpoint it resumes, the settings a resume ignores and the identity of its shards."""

    cfg: TrainConfig
    resume: dict[str, Any] | None
    ignored: list[str]
    shards: dict[str, Any]


def check_run(cfg: TrainConfig) -> RunPlan:
    """Everything a run can be refused for, checked before any file or directory is created: the model, the device,
    the run directory (a run there without --resume), the checkpoints to resume or start from (verified), the shards
    (modality, identity of a resumed run's shards, the split's videos), the clip against the stored frames and the
    memory its network needs (:func:`check_clip`)."""
    if cfg.model not in list_models():
        raise TrainError(f"unknown model {cfg.model!r}; valid: {', '.join(list_models())}")
    last = Path(cfg.out_dir) / "last.pt"
    resume, ignored = None, []
    if cfg.resume:
        if not last.is_file():
            raise TrainError(f"{last}: nothing to resume (no checkpoint there)")
        resume = load_checkpoint(last)
        cfg, ignored = _resumed_config(cfg, resume, last)
    elif last.exists():
        raise TrainError(f"{Path(cfg.out_dir)}: already holds a run (last.pt); pass --resume to continue it or "
                         "choose another --out")
    cfg = dataclasses.replace(cfg, shard_dir=str(Path(cfg.shard_dir).resolve()))
    shards = open_training_shards(cfg.shard_dir, cfg.input)
    try:
        if resume is not None:
            if list(resume["classes"]) != shards.classes:
                raise TrainError(f"{last}: the run was trained on {len(resume['classes'])} classes, {cfg.shard_dir} "
                                 f"has {len(shards.classes)} (or other names); refusing to resume (use another --out)")
            check_shard_identity(shards, resume.get("shards"), last)
        split_videos(shards, cfg.split, cfg.input, cfg.max_missing)
        net = check_clip(cfg, shards)
        if cfg.init and resume is None:
            init_weights(net.state_dict(), cfg.init, cfg.model)
        return RunPlan(cfg, resume, ignored, shard_identity(shards))
    finally:
        shards.close()


def check_clip(cfg: TrainConfig, shards: ShardSet) -> nn.Module:
    """Refuse a clip the stored frames cannot give (crop larger than a frame) or whose network cannot be trained
    in the device's memory: fp32 weights, gradients and momentum (12 bytes a parameter; activations come on top),
    counted on a network built on torch's "meta" device, which allocates nothing. Returns that network.

    The clip's size sets fc6's: c3d-b5 at 16x4000x4000 has 8.3G parameters (33 GB of weights alone)."""
    check_crop(shards, cfg.crop)
    with torch.device("meta"):
        net = _network(cfg, len(shards.classes))
    params = sum(p.numel() for p in net.parameters())
    device = resolve_device(cfg.device)
    need, have = 12 * params, device_memory(device)
    if need > have:
        raise TrainError(f"--clip {cfg.clip_len}x{cfg.crop}x{cfg.crop}: {cfg.model} would have {params:,} "
                         f"parameters, {need / 2**30:.1f} GiB for weights, gradients and momentum alone, more than "
                         f"the {have / 2**30:.1f} GiB of {device}; use a smaller clip")
    return net


def _network(cfg: TrainConfig, num_classes: int) -> nn.Module:
    return build_model(cfg.model, num_classes=num_classes, in_channels=3, clip=(cfg.clip_len, cfg.crop, cfg.crop),
                       batch_norm=cfg.batch_norm, dropout=cfg.dropout, weight_init=cfg.weight_init)


# ------------------------------------------------------------------------------------------------ set-up helpers


def _resumed_config(cfg: TrainConfig, state: dict[str, Any], path: Path) -> tuple[TrainConfig, list[str]]:
    """The checkpoint's config with this invocation's runtime settings; refuses another model or input."""
    saved = state["config"]
    for name in ("model", "input"):
        if saved[name] != getattr(cfg, name):
            raise TrainError(f"{path}: the run was trained with {name} {saved[name]!r}; refusing to resume it "
                             f"with {name} {getattr(cfg, name)!r} (use another --out)")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    merged = {**{k: v for k, v in saved.items() if k in known}, **{k: getattr(cfg, k) for k in RUNTIME_FIELDS}}
    resumed = TrainConfig(**merged)
    ignored = [f"{k}={getattr(cfg, k)!r}" for k in sorted(known - set(RUNTIME_FIELDS) - {"init"})
               if getattr(cfg, k) != getattr(resumed, k)]
    return resumed, ignored


def init_from_checkpoint(net: nn.Module, path: Path | str, model_name: str) -> bool:
    """Copy a pre-trained checkpoint's weights into ``net`` (a ``model_name``); True when fc8 was left as built
    because the class count differs (e.g. FCVID pre-training -> UCF-101). Other shape mismatches are refused."""
    weights, fresh_fc8 = init_weights(net.state_dict(), path, model_name)
    net.load_state_dict(weights, strict=False)
    return fresh_fc8


def init_weights(own: dict[str, torch.Tensor], path: Path | str, model_name: str) -> tuple[dict[str, Any], bool]:
    """The weights of checkpoint ``path`` that initialise a ``model_name`` whose state dict is ``own`` (shapes are
    all that is read, so a network on the "meta" device will do), and whether fc8 stays fresh."""
    state = load_checkpoint(path)
    if state["model_name"] != model_name:
        raise TrainError(f"{path}: a {state['model_name']} checkpoint cannot initialise {model_name}")
    weights, fresh_fc8 = {}, False
    for key, value in state["model_state"].items():
        if key in own and own[key].shape != value.shape and key.startswith("fc8."):
            fresh_fc8 = True
            continue
        if key not in own or own[key].shape != value.shape:
            raise TrainError(f"{path}: weight {key} does not fit this {model_name} (another --clip or --batch-norm?)")
        weights[key] = value
    missing = sorted(set(own) - set(weights) - ({"fc8.weight", "fc8.bias"} if fresh_fc8 else set()))
    if missing:
        raise TrainError(f"{path}: lacks weights {', '.join(missing[:3])} (another --batch-norm setting?)")
    return weights, fresh_fc8


def _optimizer(net: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with the last layer in its own group, so fine-tuning can give it 10x the learning rate.

    Fused (one kernel for all parameters): the update of asym3d's 28-54M parameters was a sixth of a CPU step
    (53 -> 11 ms at batch 4, 16x32x32; BENCHMARKS.md, "make demo")."""
    last = list(net.fc8.parameters())
    last_ids = {id(p) for p in last}
    body = [p for p in net.parameters() if id(p) not in last_ids]
    fused = next(net.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.SGD([{"params": body, "lr": cfg.lr}, {"params": last, "lr": cfg.lr * cfg.fc8_lr_mult}],
                           lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)


def _step_decay(step: int, gamma: float) -> Any:
    """Learning-rate factor after ``epoch`` epochs: ``gamma`` per ``step`` epochs (constant when step is 0).

    A rule of the config rather than StepLR's stored step size, so a resumed run may extend ``epochs``."""
    return lambda epoch: gamma ** (epoch // step) if step else 1.0


# ------------------------------------------------------------------------------------------------ the run


class _Run:
    """One training run: set up from config (and checkpoint), then :meth:`fit`."""

    def __init__(self, plan: RunPlan):
        cfg = self.cfg = plan.cfg
        rank, world, local_rank = torchrun_world()
        self.env = Env(rank, world, resolve_device(cfg.device, local_rank))
        self.out = Path(cfg.out_dir)
        self.shard_identity = plan.shards
        resume = plan.resume
        if plan.ignored:
            self.log(f"resuming {self.out / 'last.pt'} with its own settings; ignoring {', '.join(plan.ignored)}")
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        shards = open_training_shards(cfg.shard_dir, cfg.input)
        self.classes = shards.classes
        self.schema = shards.schema.to_dict()  # how the shards were made, so `asym3d predict` can make its input
        self.videos = split_videos(shards, cfg.split, cfg.input, cfg.max_missing)
        if self.videos.absent:
            self.log(f"{cfg.shard_dir}: {self.videos.absent} of {self.videos.planned} planned videos are absent "
                     "from the shards; training without them")
        if resume is not None:
            self.normalization = resume["normalization"]
        else:
            mean, std = channel_statistics(shards, self.videos.train, cfg.input)
            self.normalization = {"mean": mean, "std": std}
        shards.close()  # workers fork from here: each must open its own HDF5 handles

        self.net = _network(cfg, len(self.classes))
        # the checkpoint's architecture is the network's own record of how it was built (model.networks.Net3D.arch)
        self.model_kwargs = {k: list(v) if k == "clip" else v for k, v in self.net.arch.items() if k != "name"}
        if cfg.init and resume is None:
            fresh = init_from_checkpoint(self.net, cfg.init, cfg.model)
            self.log(f"initialised from {cfg.init}" + (" (fc8 re-initialised: class count differs)" if fresh else ""))
        device = self.env.device
        self.runtime = Runtime.choose(device, cfg.precision)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.runtime.prepare(self.net)
        self.optimizer = _optimizer(self.net, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _step_decay(cfg.lr_step, cfg.lr_gamma))
        # the normalisation happens on the device (model.clips.network_input), with these
        self.mean, self.std = (torch.tensor(self.normalization[k], dtype=torch.float32, device=device)
                               for k in ("mean", "std"))
        self.start_epoch = 0
        self.history: list[dict[str, float]] = []
        self.best = {"best_acc": -1.0, "best_epoch": 0}
        self.unreadable: dict[str, str] = {}  # video id -> why its frames could not be read
        if resume is not None:
            self.net.load_state_dict(resume["model_state"])
            self.optimizer.load_state_dict(resume["optimizer_state"])
            self.scheduler.load_state_dict(resume["scheduler_state"])
            self.start_epoch = int(resume["epoch"])
            self.history = list(resume["metrics"]["history"])
            self.best = {key: resume["metrics"][key] for key in self.best}
        self.model: nn.Module = self.net
        if self.env.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[device.index] if device.type == "cuda" else None)
        self.eval_model: nn.Module = self.net
        if cfg.compile:
            self.model, self.eval_model = torch.compile(self.model), torch.compile(self.net)
        self._make_loaders(shards)
        self.rng_after_setup = resume["rng_state"] if resume is not None else None

    def log(self, message: str) -> None:
        if self.env.main:
            tqdm.write(message)

    def _make_loaders(self, shards: Any) -> None:
        cfg, env = self.cfg, self.env
        train_set = TrainClips(shards, self.videos.train, cfg.input, cfg.clip_len, cfg.crop, seed=cfg.seed)
        val_set = CentreClips(shards, self.videos.test, cfg.input, cfg.clip_len, cfg.crop)
        self.sampler = EpochSampler(len(train_set), cfg.seed, env.rank, env.world)
        common = {"batch_size": cfg.batch_size, "num_workers": cfg.workers, "pin_memory": env.device.type == "cuda",
                  "persistent_workers": cfg.workers > 0, "collate_fn": collate_readable,
                  # the loader's own seed must not come from the global generator, which dropout replays on resume
                  "generator": torch.Generator().manual_seed(cfg.seed)}
        self.train_loader = DataLoader(train_set, sampler=self.sampler, **common)
        # disjoint shares of the test videos (no padding duplicates); a rank may get none but still joins the sums
        self.val_loader = DataLoader(val_set, sampler=list(range(env.rank, len(val_set), env.world)), **common)

    def _skip_unreadable(self, batch: dict[str, Any]) -> bool:
        """Count the batch's unreadable videos (logged once each); stop past ``max_bad_videos``. True when the
        batch still holds samples to use."""
        for video_id, reason in batch.pop("unreadable"):
            if video_id in self.unreadable:
                continue
            self.unreadable[video_id] = reason
            if len(self.unreadable) > self.cfg.max_bad_videos:
                raise TrainError(f"{self.cfg.shard_dir}: {len(self.unreadable)} videos could not be read (more "
                                 f"than --max-bad-videos {self.cfg.max_bad_videos}); last: {reason}. Check the "
                                 "shards with asym3d inspect --verify")
            self.log(f"skipping unreadable video ({reason})")
        return "label" in batch

    def _to_device(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 clips over the bus (pinned, asynchronous), mirrored and normalised there in one pass."""
        device = self.env.device
        clips = batch["clip"].to(device, non_blocking=True)
        flips = batch["flip"].to(device, non_blocking=True)
        x = network_input(clips, flips, self.cfg.input, self.mean, self.std)
        return self.runtime.inputs(x), batch["label"].to(device, non_blocking=True)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        self.sampler.set_epoch(epoch)
        self.model.train()
        device = self.env.device
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        start = time.perf_counter()
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
                   disable=not (self.env.main and cfg.progress))
        for step, batch in enumerate(bar):
            if not self._skip_unreadable(batch):
                continue
            x, y = self._to_device(batch)
            with self.runtime.autocast():
                logits = self.model(x)
                loss = F.cross_entropy(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if step % 10 == 0 or step == len(self.train_loader) - 1:  # .item() waits for the GPU: not every step
                rate = seen * self.env.world / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{loss.item():.3f}", clips_s=f"{rate:.1f}")
        seconds = time.perf_counter() - start
        total_loss, total_correct, total_seen = sum_across([loss_sum.item(), float(correct.item()), seen], self.env)
        total_seen = max(total_seen, 1)
        return {"train_loss": total_loss / total_seen, "train_acc": total_correct / total_seen,
                "clips_per_s": total_seen / seconds, "seconds": seconds}

    @torch.no_grad()
    def _validate(self) -> dict[str, float]:
        if not self.videos.test:
            return {"val_loss": math.nan, "val_acc": math.nan}
        self.eval_model.eval()
        loss_sum = correct = seen = 0.0
        for batch in self.val_loader:
            if not self._skip_unreadable(batch):
                continue
            x, y = self._to_device(batch)
            with self.runtime.autocast():
                logits = self.eval_model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        loss_sum, correct, seen = sum_across([loss_sum, correct, seen], self.env)
        return {"val_loss": loss_sum / max(seen, 1), "val_acc": correct / max(seen, 1)}

    def _state(self, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "model_name": self.cfg.model,
            "model_kwargs": self.model_kwargs,
            "model_state": self.net.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "epoch": epoch,
            "config": dataclasses.asdict(self.cfg),
            "normalization": self.normalization,
            "classes": self.classes,
            "schema": self.schema,
            "rng_state": capture_rng_state(),
            "metrics": metrics,
            "shards": self.shard_identity,
        }

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        has_val = bool(self.videos.test)
        if self.env.main:
            self.out.mkdir(parents=True, exist_ok=True)
            run_info = {"config": dataclasses.asdict(cfg), "shards": self.shard_identity, "classes": self.classes,
                        "normalization": self.normalization, "model_kwargs": self.model_kwargs,
                        "train_videos": len(self.videos.train), "test_videos": len(self.videos.test),
                        "absent_videos": self.videos.absent}
            write_text_atomic(self.out / "run.json", json.dumps(run_info, indent=1))
        if self.start_epoch >= cfg.epochs:
            self.log(f"{self.out}: already trained {self.start_epoch} of {cfg.epochs} epochs; nothing to do")
        writer = tensorboard_writer(self.out) if self.env.main else None
        if self.rng_after_setup is not None:
            restore_rng_state(self.rng_after_setup)
        for epoch in range(self.start_epoch, cfg.epochs):
            lr = self.optimizer.param_groups[0]["lr"]
            row = {"epoch": epoch + 1, "lr": lr, **self._train_epoch(epoch), **self._validate()}
            row = {key: row[key] for key in METRIC_COLUMNS}
            if not math.isfinite(row["train_loss"]):  # summed over every rank, so all of them stop here together
                kept = f"last.pt keeps epoch {epoch}" if epoch else "no checkpoint was written"
                raise TrainError(f"{self.out}: training diverged in epoch {epoch + 1} (loss {row['train_loss']}); "
                                 f"its weights are not saved, {kept}. Start again with a lower --lr (or "
                                 "--precision fp32)")
            self.scheduler.step()
            self.history.append(row)
            score = row["val_acc"] if has_val else row["train_acc"]
            improved = score > self.best["best_acc"]
            if improved:
                self.best = {"best_acc": score, "best_epoch": epoch + 1}
            metrics = {**row, **self.best, "best_on": "val" if has_val else "train", "history": self.history}
            if self.env.main:
                state = self._state(epoch + 1, metrics)
                # best.pt first, then last.pt as a second name for it: last.pt must never name a best epoch whose
                # best.pt was not written
                if improved:
                    save_checkpoint(self.out / "best.pt", state, also=self.out / "last.pt")
                else:
                    save_checkpoint(self.out / "last.pt", state)
                write_metrics(self.out, self.history)
                plot_curves(self.out, self.history, f"{cfg.model} {cfg.input} split {cfg.split}")
                if writer is not None:
                    for key in METRIC_COLUMNS[1:]:
                        writer.add_scalar(key, row[key], epoch + 1)
                self.log(f"epoch {epoch + 1}/{cfg.epochs} lr {lr:.2e} train loss {row['train_loss']:.4f} "
                         f"acc {row['train_acc']:.3f} | val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} | "
                         f"{row['clips_per_s']:.1f} clips/s")
        if writer is not None:
            writer.close()
        return {"run_dir": str(self.out), "history": self.history, **self.best,
                "best_on": "val" if has_val else "train", "classes": self.classes,
                "train_videos": len(self.videos.train), "test_videos": len(self.videos.test),
                "absent_videos": self.videos.absent, "planned_videos": self.videos.planned}
