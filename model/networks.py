"""Every network of the paper from one specification: spec dataclasses, the two family builders, the named variants
(one line each), the registry and the :class:`Net3D` module that a spec builds into.

Shared skeleton (docs/DESIGN.md, "Networks"): five conv stages, each followed by a max-pool (pool1 1x2x2, the rest
2x2x2, pool5 padded (0,1,1) as in C3D so 2x7x7 becomes 1x4x4), then fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout
-> fc8. Families differ only in what each stage's :data:`~model.layers.Block` is and in the widths.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.errors import Asym3dError, ConfigError

from .layers import (
    ASYM_3,
    ASYM_5,
    CONV_3x3x3,
    Block,
    ConvBlock,
    block_out_channels,
    describe_kernels,
    micronet_block,
    stack_block,
)

Shape3 = tuple[int, int, int]


@dataclass(frozen=True)
class Stage:
    """One conv layer or group (the paper's "Conv3" may be conv3a + conv3b) and the max-pool after it."""

    name: str  # the paper's layer name: conv1 ... conv5
    block: Block  # what the stage computes, as data (see model.layers)
    label: str  # short human description for tables: "3x3x3 x2", "asym 1x5x1>1x1x5>3x1x1", "MicroNet-M2"
    pool: Shape3 = (2, 2, 2)  # kernel = stride
    pool_padding: Shape3 = (0, 0, 0)


@dataclass(frozen=True)
class NetworkSpec:
    """A whole network: its conv stages and the widths of fc6/fc7 (fc8 has one output per class)."""

    name: str  # registry name, recorded in checkpoints
    stages: tuple[Stage, ...]
    fc_widths: tuple[int, int]  # fc6, fc7
    baseline: str  # the network this one is measured against (MAC ratio = ideal speed-up); itself for baselines
    description: str


# ---------------------------------------------------------------------------------------------------- families

_C3D_WIDTHS = {8: (64, 128, 256, 512, 512), 5: (64, 128, 256, 256, 256)}
_C3D_FC = {8: (4096, 4096), 5: (2048, 2048)}


def _pool(index: int) -> dict[str, Shape3]:
    """C3D's pools: pool1 keeps time (1x2x2); pool5 pads H and W so 2x7x7 -> 1x4x4 at 16x112x112."""
    if index == 1:
        return {"pool": (1, 2, 2)}
    if index == 5:
        return {"pool": (2, 2, 2), "pool_padding": (0, 1, 1)}
    return {}


def c3d_spec(name: str, depth: int, asym: str = "", micronet: str = "") -> NetworkSpec:
    """C3D family. ``depth`` 8 is C3D itself (conv3-5 are pairs of 3x3x3 layers), 5 the paper's slimmer baseline
    (one layer per stage, conv4/5 at 256 channels, fc 2048).

    ``asym``: digits of the stages (3, 4, 5) replaced by asymmetric convolutions -- in b5 one 3x3x3 layer becomes
    1x3x1, 1x1x3, 3x1x1; in b8 a group of two 3x3x3 layers becomes 1x5x1, 1x1x5, 3x1x1 (same receptive field).
    ``micronet``: M1..M4 replaces conv5 by that MicroNet (b5 only, as in the paper's Table 4).
    """
    if depth not in _C3D_WIDTHS:
        raise ValueError(f"C3D depth must be 5 or 8, got {depth}")
    if set(asym) - set("345"):
        raise ValueError(f"asym may name stages 3, 4, 5 only, got {asym!r}")
    stages = []
    for index, width in enumerate(_C3D_WIDTHS[depth], start=1):
        grouped = depth == 8 and index >= 3
        if str(index) in asym:
            kernels = ASYM_5 if grouped else ASYM_3
            block, label = stack_block(width, kernels), "asym " + describe_kernels(kernels)
        elif micronet and index == 5:
            block, label = micronet_block(width, micronet), f"MicroNet-{micronet}"
        else:
            layers = 2 if grouped else 1
            block, label = stack_block(width, CONV_3x3x3, layers), "3x3x3" + (f" x{layers}" if layers > 1 else "")
        stages.append(Stage(f"conv{index}", block, label, **_pool(index)))
    baseline = f"c3d-b{depth}"
    what = f"C3D-b{depth}" + (f" with asymmetric conv{','.join(asym)}" if asym else "")
    what += f" with MicroNet-{micronet} as conv5" if micronet else ""
    return NetworkSpec(name, tuple(stages), _C3D_FC[depth], baseline, what)


def asym3d_spec(name: str, micronets: tuple[str, str, str]) -> NetworkSpec:
    """The paper's asymmetric 3D-CNN (Figure 4): conv1 64, conv2 128 (3x3x3), then MicroNets for conv3-5 at 256,
    512, 512 channels and fc 4096. Figure 4's widths are not in the text; these are our reading (docs/DESIGN.md)."""
    stages = [Stage("conv1", stack_block(64, CONV_3x3x3), "3x3x3", **_pool(1))]
    stages.append(Stage("conv2", stack_block(128, CONV_3x3x3), "3x3x3", **_pool(2)))
    for index, (width, variant) in enumerate(zip((256, 512, 512), micronets), start=3):
        stages.append(Stage(f"conv{index}", micronet_block(width, variant), f"MicroNet-{variant}", **_pool(index)))
    what = "asymmetric 3D-CNN, MicroNets " + "/".join(micronets)
    return NetworkSpec(name, tuple(stages), (4096, 4096), "c3d-b8", what)


# ---------------------------------------------------------------------------------------------------- variants

_SPECS: dict[str, NetworkSpec] = {}


def _register(spec: NetworkSpec) -> None:
    _SPECS[spec.name] = spec


_register(c3d_spec("c3d-b8", depth=8))
_register(c3d_spec("c3d-b5", depth=5))
_register(c3d_spec("b5-asyConv3", depth=5, asym="3"))
_register(c3d_spec("b5-asyConv4", depth=5, asym="4"))
_register(c3d_spec("b5-asyConv5", depth=5, asym="5"))
_register(c3d_spec("b5-asyConv34", depth=5, asym="34"))
_register(c3d_spec("b5-asyConv35", depth=5, asym="35"))
_register(c3d_spec("b5-asyConv45", depth=5, asym="45"))
_register(c3d_spec("b5-asyConv345", depth=5, asym="345"))
_register(c3d_spec("b8-asyConv3", depth=8, asym="3"))
_register(c3d_spec("b8-asyConv4", depth=8, asym="4"))
_register(c3d_spec("b8-asyConv5", depth=8, asym="5"))
_register(c3d_spec("b8-asyConv34", depth=8, asym="34"))
_register(c3d_spec("b8-asyConv35", depth=8, asym="35"))
_register(c3d_spec("b8-asyConv45", depth=8, asym="45"))
_register(c3d_spec("b8-asyConv345", depth=8, asym="345"))
_register(c3d_spec("b5-M1", depth=5, micronet="M1"))
_register(c3d_spec("b5-M2", depth=5, micronet="M2"))
_register(c3d_spec("b5-M3", depth=5, micronet="M3"))
_register(c3d_spec("b5-M4", depth=5, micronet="M4"))
_register(asym3d_spec("asym3d", ("M2", "M2", "M3")))
_register(asym3d_spec("asym3d-m2", ("M2", "M2", "M2")))
_register(asym3d_spec("asym3d-m3", ("M3", "M3", "M3")))


class UnknownModelError(Asym3dError, KeyError):
    """An unknown network name; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0])


def list_models() -> list[str]:
    """The registered network names, in registry order (baselines first, then b5, b8, MicroNet, asym3d)."""
    return list(_SPECS)


def get_spec(name: str) -> NetworkSpec:
    """The specification of a registered network; :class:`UnknownModelError` lists the valid names."""
    try:
        return _SPECS[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; valid: {', '.join(_SPECS)}") from None


# ---------------------------------------------------------------------------------------------------- the module


def pool_output(size: Shape3, kernel: Shape3, padding: Shape3) -> Shape3:
    """Output (T, H, W) of a max-pool with stride = kernel (PyTorch's floor rule)."""
    return tuple((s + 2 * p - k) // k + 1 for s, k, p in zip(size, kernel, padding))  # type: ignore[return-value]


def feature_shape(spec: NetworkSpec, clip: Shape3) -> tuple[int, int, int, int]:
    """(C, T, H, W) after pool5 for a ``clip`` of (T, H, W); ConfigError if a pool would get an empty input."""
    size = tuple(clip)
    if len(size) != 3 or any(s < 1 for s in size):
        raise ConfigError(f"clip must be three positive sizes (T, H, W), got {clip}")
    for stage in spec.stages:
        out = pool_output(size, stage.pool, stage.pool_padding)
        if any(o < 1 for o in out):
            raise ConfigError(
                f"clip {tuple(clip)} is too small for {spec.name}: {stage.name}'s pool {stage.pool} gets "
                f"{size}; the five pools need at least 16 frames and 16x16 pixels"
            )
        size = out
    return (block_out_channels(spec.stages[-1].block), *size)  # type: ignore[return-value]


#: Weight initialisation schemes, chosen by ``build_model(weight_init=...)`` (``asym3d train --weight-init``).
#: All but "c3d" and "torch" give every conv He-normal weights with the gain of the non-linearity that follows it (set
#: in model.layers) and zero biases; fc8 is N(0, 0.01) except under "torch". They differ in fc6/fc7:
#: "he-torchfc" (default): PyTorch's Linear default, U(+-1/sqrt(fan_in)), a third of He's variance per layer.
#:   He-normal 2048/4096-wide fc6/fc7 make the fc8 input so large that one SGD step moves the logits by several
#:   units: first gradient norms of 54-190 and loss spikes to 3-7x ln(classes), which neither a learning-rate
#:   warm-up nor batch norm removes (BENCHMARKS.md, "Training from scratch").
#: "he-smallfc": fc6/fc7 N(0, 0.005) (C3D's fc std): stable too, but the tiny fc path leaves training on a plateau.
#: "he": He-normal fc6/fc7 (the init before issue 16).
#: "c3d": C3D's Caffe fillers (facebookarchive/C3D conv3d_ucf101_train.prototxt; the paper trained in Caffe):
#:   conv N(0, 0.01), fc6/fc7 N(0, 0.005), fc8 N(0, 0.01); biases 0 for conv1 and fc8, 1 elsewhere.
#: "torch": PyTorch's own defaults for every layer (the signal fades through the conv stack).
WEIGHT_INITS = ("he-torchfc", "he-smallfc", "he", "c3d", "torch")


def init_weights(net: "Net3D", scheme: str) -> None:
    """(Re-)initialise ``net``'s convolutions and fc layers by ``scheme`` (see :data:`WEIGHT_INITS`)."""
    if scheme not in WEIGHT_INITS:
        raise ValueError(f"unknown weight init {scheme!r}; valid: {', '.join(WEIGHT_INITS)}")
    fc_hidden = (net.fc6, net.fc7)
    if scheme == "torch":
        for module in net.modules():
            if isinstance(module, (nn.Conv3d, nn.Linear)):
                module.reset_parameters()
        return
    if scheme == "he-torchfc":
        for fc in fc_hidden:
            fc.reset_parameters()
    elif scheme in ("he-smallfc", "he"):  # the convs got theirs when built: only model.layers knows what follows each
        for fc in fc_hidden:
            if scheme == "he":
                nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
            else:
                nn.init.normal_(fc.weight, std=0.005)
            nn.init.zeros_(fc.bias)
    else:
        for stage, block in net.features.named_children():
            for conv in (m for m in block.modules() if isinstance(m, nn.Conv3d)):
                nn.init.normal_(conv.weight, std=0.01)
                if conv.bias is not None:
                    nn.init.constant_(conv.bias, 0.0 if stage == "conv1" else 1.0)
        for fc in fc_hidden:
            nn.init.normal_(fc.weight, std=0.005)
            nn.init.constant_(fc.bias, 1.0)
    nn.init.normal_(net.fc8.weight, std=0.01)  # small logits at start: the loss begins near log(classes)
    nn.init.zeros_(net.fc8.bias)


class Net3D(nn.Module):
    """A network built from a :class:`NetworkSpec`. Input ``(B, in_channels, *clip)`` -> logits ``(B, classes)``.

    ``spec`` and ``name`` say what it is; ``arch`` holds every argument of :func:`build_model` so a checkpoint can
    rebuild the same module (``build_model(**ckpt["arch"])``).
    """

    def __init__(
        self,
        spec: NetworkSpec,
        num_classes: int,
        in_channels: int,
        clip: Shape3,
        batch_norm: bool,
        dropout: float,
        relu_inside_asym: bool,
        weight_init: str = "he-torchfc",
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.spec = spec
        self.name = spec.name
        self.arch: dict[str, Any] = {
            "name": spec.name,
            "num_classes": num_classes,
            "in_channels": in_channels,
            "clip": tuple(clip),
            "batch_norm": batch_norm,
            "dropout": dropout,
            "relu_inside_asym": relu_inside_asym,
            "weight_init": weight_init,
        }
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = in_channels
        for stage in spec.stages:
            layers[stage.name] = ConvBlock(channels, stage.block, batch_norm, relu_inside_asym)
            layers[stage.name.replace("conv", "pool")] = nn.MaxPool3d(stage.pool, padding=stage.pool_padding)
            channels = block_out_channels(stage.block)
        self.features = nn.Sequential(layers)
        flat = 1
        for size in feature_shape(spec, clip):
            flat *= size
        fc6, fc7 = spec.fc_widths
        self.fc6 = nn.Linear(flat, fc6)
        self.fc7 = nn.Linear(fc6, fc7)
        self.fc8 = nn.Linear(fc7, num_classes)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        init_weights(self, weight_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)
        x = self.dropout(self.relu(self.fc6(x)))
        x = self.dropout(self.relu(self.fc7(x)))
        return self.fc8(x)


def build_model(
    name: str,
    num_classes: int = 101,
    in_channels: int = 3,
    clip: Shape3 = (16, 112, 112),
    batch_norm: bool = False,
    dropout: float = 0.5,
    relu_inside_asym: bool = False,
    weight_init: str = "he-torchfc",
) -> Net3D:
    """Build a registered network for clips of ``in_channels x clip`` (T, H, W); fc6's input follows from ``clip``.

    ``batch_norm`` adds BatchNorm3d after every convolution (off in the paper); ``relu_inside_asym`` puts a ReLU
    between the stages of each asymmetric cascade (eq. 6 has none); ``weight_init`` names a scheme of
    :data:`WEIGHT_INITS`. Unknown names raise :class:`UnknownModelError`.
    """
    return Net3D(get_spec(name), num_classes, in_channels, tuple(clip), batch_norm, dropout, relu_inside_asym,
                 weight_init)

