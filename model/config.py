"""What defines a training run (:class:`TrainConfig`) and the paper's schedules (§4.3).

Optimisation follows the paper: SGD, momentum 0.9, weight decay 5e-4, batch 16, step learning-rate decay;
:data:`SCHEDULES` holds its pre-training and fine-tuning presets, :func:`make_config` applies one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.errors import Asym3dError
from pipeline.rgbf import MODALITIES

from .networks import WEIGHT_INITS
from .runtime import PRECISIONS, check_device

# Paper §4.3. "none" keeps TrainConfig's own defaults (constant learning rate unless --lr-step is given).
SCHEDULES: dict[str, dict[str, Any]] = {
    "pretrain": {"lr": 1e-3, "lr_step": 15, "lr_gamma": 0.2, "epochs": 50, "fc8_lr_mult": 1.0},
    "finetune": {"lr": 1e-4, "lr_step": 8, "lr_gamma": 0.1, "epochs": 20, "fc8_lr_mult": 10.0},
    "none": {},
}
# Settings a resumed run may change: where things are and how fast it runs, never what is computed.
RUNTIME_FIELDS = ("shard_dir", "out_dir", "epochs", "workers", "device", "compile", "precision", "progress",
                  "resume", "max_missing", "max_bad_videos")


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
    device: str = "auto"  # model.runtime.check_device: auto, cpu, cuda or cuda:N
    seed: int = 0
    init: str | None = None  # checkpoint to start from (fc8 re-initialised when the class count differs)
    resume: bool = False  # continue out_dir/last.pt
    compile: bool = False  # torch.compile the network
    precision: str = "auto"  # model.runtime.PRECISIONS: bf16 autocast on a GPU that has it, float32 elsewhere
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
        check_device(self.device)
        if self.precision not in PRECISIONS:
            raise TrainError(f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
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
