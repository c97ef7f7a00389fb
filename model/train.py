"""The trainer: any registered network on one modality of the training shards, CPU or CUDA, one process or DDP.

``train(cfg)`` runs one split into ``cfg.out_dir``; ``train_splits`` runs one per split into ``OUT/split{N}``.
Optimisation follows the paper (§4.3): SGD, momentum 0.9, weight decay 5e-4, batch 16, step learning-rate decay;
:data:`SCHEDULES` holds its pre-training and fine-tuning presets. Data sampling is described in :mod:`model.data`.

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

import csv
import dataclasses
import json
import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from model import WEIGHT_INITS, build_model, list_models
from pipeline.errors import Asym3dError

from pipeline.lock import DirectoryLock
from pipeline.store import atomic_output, write_text_atomic

from .checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from .data import (MODALITIES, CentreClips, EpochSampler, TrainClips, channel_statistics, collate_readable,
                   open_training_shards, split_videos)

# Paper §4.3. "none" keeps TrainConfig's own defaults (constant learning rate unless --lr-step is given).
SCHEDULES: dict[str, dict[str, Any]] = {
    "pretrain": {"lr": 1e-3, "lr_step": 15, "lr_gamma": 0.2, "epochs": 50, "fc8_lr_mult": 1.0},
    "finetune": {"lr": 1e-4, "lr_step": 8, "lr_gamma": 0.1, "epochs": 20, "fc8_lr_mult": 10.0},
    "none": {},
}
# Settings a resumed run may change: where things are and how fast it runs, never what is computed.
RUNTIME_FIELDS = ("shard_dir", "out_dir", "epochs", "workers", "device", "compile", "progress", "resume",
                  "max_missing", "max_bad_videos")
METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "clips_per_s", "seconds")


class TrainError(Asym3dError, ValueError):
    """A run that cannot start or continue as asked; the message names the file and the reason."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Saved as a plain dict in every checkpoint."""

    shard_dir: str  # build-rgbf output
    out_dir: str  # run directory
    model: str  # registry name (model.list_models())
    input: str = "rgb"  # modality: rgb, flow or rgbf
    split: int = 1  # which split's train list to train on (its test list validates)
    schedule: str = "none"  # the preset the values below came from (SCHEDULES)
    epochs: int = 20
    batch_size: int = 16  # per process
    lr: float = 1e-3
    lr_step: int = 0  # epochs between learning-rate decays; 0 keeps it constant
    lr_gamma: float = 0.1  # decay factor
    fc8_lr_mult: float = 1.0  # learning-rate multiplier of the last layer (10 when fine-tuning)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip_len: int = 16  # frames per clip
    crop: int = 112  # square crop; must fit the stored frames
    batch_norm: bool = False
    dropout: float = 0.5
    weight_init: str = "he-torchfc"  # model.WEIGHT_INITS; "c3d" is the paper's (Caffe C3D) fillers
    workers: int = 2  # DataLoader worker processes per training process
    device: str = "auto"  # auto, cpu or cuda
    seed: int = 0
    init: str | None = None  # checkpoint to start from (fc8 re-initialised when the class count differs)
    resume: bool = False  # continue out_dir/last.pt
    compile: bool = False  # torch.compile the network
    max_missing: float = 0.05  # largest tolerated fraction of planned videos absent from the shards
    max_bad_videos: int = 10  # videos whose stored frames fail to read are skipped, up to this many, then stop
    progress: bool = True  # progress bars and per-epoch lines (rank 0)

    def __post_init__(self) -> None:
        if self.input not in MODALITIES:
            raise TrainError(f"unknown input {self.input!r}; valid: {', '.join(MODALITIES)}")
        if self.weight_init not in WEIGHT_INITS:
            raise TrainError(f"unknown weight init {self.weight_init!r}; valid: {', '.join(WEIGHT_INITS)}")
        if self.schedule not in SCHEDULES:
            raise TrainError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise TrainError(f"unknown device {self.device!r}; valid: auto, cpu, cuda")
        for name in ("epochs", "batch_size", "clip_len", "crop"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.workers < 0 or not 0 < self.lr < math.inf or not 0 <= self.max_missing <= 1:  # `not`: NaN fails
            raise TrainError(f"workers must be >= 0, lr a finite number > 0 and max_missing in [0, 1]; got "
                             f"{self.workers}, {self.lr}, {self.max_missing}")


def make_config(schedule: str = "none", **options: Any) -> TrainConfig:
    """A config from a schedule preset, then ``options`` (``None`` values mean "not given": the preset stays)."""
    if schedule not in SCHEDULES:
        raise TrainError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    given = {key: value for key, value in options.items() if value is not None}
    return TrainConfig(**{**SCHEDULES[schedule], **given, "schedule": schedule})


def train_splits(cfg: TrainConfig, splits: Sequence[int]) -> list[dict[str, Any]]:
    """One run per split, into ``cfg.out_dir/split{N}``; returns each run's summary.

    With ``resume``, a split that has a ``last.pt`` continues it (a finished one has nothing left to do) and a split
    that never saved one starts afresh, so one command picks up a multi-split run wherever it was interrupted.
    """
    with _process_group(cfg.device):
        results = []
        for split in splits:
            out = Path(cfg.out_dir) / f"split{split}"
            resume = cfg.resume and (out / "last.pt").is_file()
            results.append(train(dataclasses.replace(cfg, split=split, out_dir=str(out), resume=resume)))
        return results


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train one run; returns a summary (run dir, best accuracy and epoch, per-epoch history, data counts).

    Raises :class:`TrainError`, :class:`model.data.DataError`, :class:`pipeline.store.StoreError`,
    :class:`model.checkpoint.CheckpointError` or the registry's unknown-model error for bad input, before any
    training step. The main process holds the run directory's lock (:mod:`pipeline.lock`) throughout. A failed
    checkpoint write (full disk) stops the run with :class:`CheckpointError`, the previous checkpoints intact.
    """
    if cfg.model not in list_models():
        raise TrainError(f"unknown model {cfg.model!r}; valid: {', '.join(list_models())}")
    with _process_group(cfg.device), DirectoryLock(cfg.out_dir) if is_main_process() else nullcontext():
        return _Run(cfg).fit()


# ------------------------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class _Env:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) for a plain process."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def is_main_process() -> bool:
    """True outside torchrun and on its rank 0: the process that reports."""
    return _world()[0] == 0


def _resolve_device(option: str, local_rank: int) -> torch.device:
    if option == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if option == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


@contextmanager
def _process_group(device_option: str) -> Iterator[None]:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) unless alone or already joined."""
    _, world, local_rank = _world()
    if world == 1 or dist.is_initialized():
        yield
        return
    device = _resolve_device(device_option, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sum_across(values: list[float], env: _Env) -> list[float]:
    if env.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


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
    state = load_checkpoint(path)
    if state["model_name"] != model_name:
        raise TrainError(f"{path}: a {state['model_name']} checkpoint cannot initialise {model_name}")
    own = net.state_dict()
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
    net.load_state_dict(weights, strict=False)
    return fresh_fc8


def _optimizer(net: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with the last layer in its own group, so fine-tuning can give it 10x the learning rate."""
    last = list(net.fc8.parameters())
    last_ids = {id(p) for p in last}
    body = [p for p in net.parameters() if id(p) not in last_ids]
    return torch.optim.SGD([{"params": body, "lr": cfg.lr}, {"params": last, "lr": cfg.lr * cfg.fc8_lr_mult}],
                           lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _step_decay(step: int, gamma: float) -> Any:
    """Learning-rate factor after ``epoch`` epochs: ``gamma`` per ``step`` epochs (constant when step is 0).

    A rule of the config rather than StepLR's stored step size, so a resumed run may extend ``epochs``."""
    return lambda epoch: gamma ** (epoch // step) if step else 1.0


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the GPU supports it, fp16 (with loss scaling) otherwise; full precision on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _write_metrics(out: Path, history: list[dict[str, float]]) -> None:
    with atomic_output(out / "metrics.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(history)


def _plot_curves(out: Path, history: list[dict[str, float]], title: str) -> None:
    """Loss and accuracy per epoch. Uses matplotlib's Figure directly: no pyplot state, no display needed."""
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(9, 3.5), tight_layout=True)
    for ax, what in zip(fig.subplots(1, 2), ("loss", "acc")):
        ax.plot(epochs, [row[f"train_{what}"] for row in history], "o-", label="train")
        if any(not math.isnan(row[f"val_{what}"]) for row in history):
            ax.plot(epochs, [row[f"val_{what}"] for row in history], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if what == "acc" else "cross-entropy loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    with atomic_output(out / "curves.png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))


# ------------------------------------------------------------------------------------------------ the run


class _Run:
    """One training run: set up from config (and checkpoint), then :meth:`fit`."""

    def __init__(self, cfg: TrainConfig):
        rank, world, local_rank = _world()
        self.env = _Env(rank, world, _resolve_device(cfg.device, local_rank))
        self.out = Path(cfg.out_dir)
        last = self.out / "last.pt"
        resume = None
        if cfg.resume:
            if not last.is_file():
                raise TrainError(f"{last}: nothing to resume (no checkpoint there)")
            resume = load_checkpoint(last)
            cfg, ignored = _resumed_config(cfg, resume, last)
            if ignored:
                self.log(f"resuming {last} with its own settings; ignoring {', '.join(ignored)}")
        elif last.exists():
            raise TrainError(f"{self.out}: already holds a run (last.pt); pass --resume to continue it or "
                             "choose another --out")
        self.cfg = cfg
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        shards = open_training_shards(cfg.shard_dir, cfg.input)
        self.classes = shards.classes
        if resume is not None and list(resume["classes"]) != self.classes:
            raise TrainError(f"{last}: the run was trained on {len(resume['classes'])} classes, {cfg.shard_dir} has "
                             f"{len(self.classes)} (or other names); refusing to resume (use another --out)")
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

        self.model_kwargs = {"num_classes": len(self.classes), "in_channels": 3,
                             "clip": [cfg.clip_len, cfg.crop, cfg.crop], "batch_norm": cfg.batch_norm,
                             "dropout": cfg.dropout, "weight_init": cfg.weight_init}
        self.net = build_model(cfg.model, **{**self.model_kwargs, "clip": tuple(self.model_kwargs["clip"])})
        if cfg.init and resume is None:
            fresh = init_from_checkpoint(self.net, cfg.init, cfg.model)
            self.log(f"initialised from {cfg.init}" + (" (fc8 re-initialised: class count differs)" if fresh else ""))
        device = self.env.device
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            self.net.to(device, memory_format=torch.channels_last_3d)
        self.optimizer = _optimizer(self.net, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _step_decay(cfg.lr_step, cfg.lr_gamma))
        self.amp_dtype = _amp_dtype(device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.start_epoch = 0
        self.history: list[dict[str, float]] = []
        self.best = {"best_acc": -1.0, "best_epoch": 0}
        self.unreadable: dict[str, str] = {}  # video id -> why its frames could not be read
        if resume is not None:
            self.net.load_state_dict(resume["model_state"])
            self.optimizer.load_state_dict(resume["optimizer_state"])
            self.scheduler.load_state_dict(resume["scheduler_state"])
            self.scaler.load_state_dict(resume.get("scaler_state", {}))
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
        stats = (self.normalization["mean"], self.normalization["std"])
        train_set = TrainClips(shards, self.videos.train, cfg.input, cfg.clip_len, cfg.crop, *stats, seed=cfg.seed)
        val_set = CentreClips(shards, self.videos.test, cfg.input, cfg.clip_len, cfg.crop, *stats)
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
        device = self.env.device
        x = batch[self.cfg.input].to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return x, batch["label"].to(device, non_blocking=True)

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype)

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
            with self._autocast():
                logits = self.model(x)
                loss = F.cross_entropy(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if step % 10 == 0 or step == len(self.train_loader) - 1:  # .item() waits for the GPU: not every step
                rate = seen * self.env.world / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{loss.item():.3f}", clips_s=f"{rate:.1f}")
        seconds = time.perf_counter() - start
        total_loss, total_correct, total_seen = _sum_across([loss_sum.item(), float(correct.item()), seen], self.env)
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
            with self._autocast():
                logits = self.eval_model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        loss_sum, correct, seen = _sum_across([loss_sum, correct, seen], self.env)
        return {"val_loss": loss_sum / max(seen, 1), "val_acc": correct / max(seen, 1)}

    def _state(self, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "model_name": self.cfg.model,
            "model_kwargs": self.model_kwargs,
            "model_state": self.net.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "scaler_state": self.scaler.state_dict(),
            "epoch": epoch,
            "config": dataclasses.asdict(self.cfg),
            "normalization": self.normalization,
            "classes": self.classes,
            "rng_state": capture_rng_state(),
            "metrics": metrics,
        }

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        has_val = bool(self.videos.test)
        if self.env.main:
            self.out.mkdir(parents=True, exist_ok=True)
            run_info = {"config": dataclasses.asdict(cfg), "classes": self.classes,
                        "normalization": self.normalization, "model_kwargs": self.model_kwargs,
                        "train_videos": len(self.videos.train), "test_videos": len(self.videos.test),
                        "absent_videos": self.videos.absent}
            write_text_atomic(self.out / "run.json", json.dumps(run_info, indent=1))
        if self.start_epoch >= cfg.epochs:
            self.log(f"{self.out}: already trained {self.start_epoch} of {cfg.epochs} epochs; nothing to do")
        writer = _tensorboard(self.out) if self.env.main else None
        if self.rng_after_setup is not None:
            restore_rng_state(self.rng_after_setup)
        for epoch in range(self.start_epoch, cfg.epochs):
            lr = self.optimizer.param_groups[0]["lr"]
            row = {"epoch": epoch + 1, "lr": lr, **self._train_epoch(epoch), **self._validate()}
            row = {key: row[key] for key in METRIC_COLUMNS}
            self.scheduler.step()
            self.history.append(row)
            score = row["val_acc"] if has_val else row["train_acc"]
            improved = score > self.best["best_acc"]
            if improved:
                self.best = {"best_acc": score, "best_epoch": epoch + 1}
            metrics = {**row, **self.best, "best_on": "val" if has_val else "train", "history": self.history}
            if self.env.main:
                state = self._state(epoch + 1, metrics)
                if improved:  # best.pt first: last.pt must never name a best epoch whose best.pt was not written
                    save_checkpoint(self.out / "best.pt", state)
                save_checkpoint(self.out / "last.pt", state)
                _write_metrics(self.out, self.history)
                _plot_curves(self.out, self.history, f"{cfg.model} {cfg.input} split {cfg.split}")
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
