"""Parameters and multiply-accumulates (MACs) of every network, per layer, read from the same specification that
:func:`model.build_model` builds (tests check both against the built module).

Counting rules: a convolution with ``c_in`` inputs, ``c_out`` outputs and kernel ``k`` run at (T, H, W) costs
``c_in * c_out * prod(k) * T*H*W`` MACs (stride 1, "same" padding, so every conv of a stage runs at the stage's
input size); a linear layer costs ``in * out``. Biases, BN, ReLU and pools are not multiplications and count 0.

Table 1 of the paper (C3D = c3d-b8 at 16x112x112) prints conv1 1.04B, conv2 11.09B, conv3 31.12B, conv4 8.33B,
conv5 1.39B, total 52.97B. The layer sizes reproduce conv1, conv2, conv4 and conv5 to within 0.2%, but conv3
(128->256 and 256->256, 3x3x3, at 8x28x28) is 16.65B and the total ~38.5B -- the figure usually quoted for C3D.
We report the computed values rather than bend the counter to the printed ones.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from .layers import Block, block_out_channels
from .networks import NetworkSpec, Shape3, feature_shape, get_spec, list_models, pool_output


@dataclass(frozen=True)
class LayerCost:
    """One row of a per-layer breakdown."""

    name: str  # conv1, pool1, ..., fc8
    detail: str  # what the layer is: "3x3x3 x2", "MicroNet-M2", "max 2x2x2", "4096 -> 101"
    out_shape: tuple[int, ...]  # (C, T, H, W) for conv/pool rows, (features,) for fc rows
    params: int
    macs: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelSummary:
    """One row of the model table."""

    name: str
    description: str
    params: int
    macs: int
    baseline: str  # the network the MAC ratio is taken against
    mac_ratio: float  # macs / baseline's macs: the ideal speed-up of the substitution

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def block_cost(in_channels: int, block: Block, size: Shape3, batch_norm: bool = False) -> tuple[int, int]:
    """(params, MACs) of a block run at ``size`` (T, H, W); mirrors :class:`model.layers.ConvBlock`, which has a
    bias on every conv without batch norm and, with it, no biases and a BN (2 parameters a channel) after each."""
    params = macs = 0
    voxels = math.prod(size)
    for column in block:
        channels = in_channels
        for step in column:
            for kernel in step.kernels:
                weights = channels * step.out_channels * math.prod(kernel)
                params += weights + step.out_channels * (2 if batch_norm else 1)
                macs += weights * voxels
                channels = step.out_channels
    return params, macs


def _spec(name_or_spec: str | NetworkSpec) -> NetworkSpec:
    return get_spec(name_or_spec) if isinstance(name_or_spec, str) else name_or_spec


def layer_costs(
    name: str | NetworkSpec,
    num_classes: int = 101,
    in_channels: int = 3,
    clip: Shape3 = (16, 112, 112),
    batch_norm: bool = False,
) -> list[LayerCost]:
    """Per-layer parameters and MACs of one network for one clip (T, H, W); ValueError if the clip is too small."""
    spec = _spec(name)
    flat = math.prod(feature_shape(spec, clip))  # validates the clip first
    rows, channels, size = [], in_channels, tuple(clip)
    for stage in spec.stages:
        params, macs = block_cost(channels, stage.block, size, batch_norm)
        channels = block_out_channels(stage.block)
        rows.append(LayerCost(stage.name, stage.label, (channels, *size), params, macs))
        size = pool_output(size, stage.pool, stage.pool_padding)
        pool_name = stage.name.replace("conv", "pool")
        rows.append(LayerCost(pool_name, "max " + "x".join(map(str, stage.pool)), (channels, *size), 0, 0))
    widths = (flat, *spec.fc_widths, num_classes)
    for index, (fan_in, fan_out) in enumerate(zip(widths, widths[1:]), start=6):
        params = fan_in * fan_out + fan_out
        rows.append(LayerCost(f"fc{index}", f"{fan_in} -> {fan_out}", (fan_out,), params, fan_in * fan_out))
    return rows


def count(
    name: str | NetworkSpec,
    num_classes: int = 101,
    in_channels: int = 3,
    clip: Shape3 = (16, 112, 112),
    batch_norm: bool = False,
) -> tuple[int, int]:
    """(parameters, MACs per clip) of one network."""
    rows = layer_costs(name, num_classes, in_channels, clip, batch_norm)
    return sum(r.params for r in rows), sum(r.macs for r in rows)


def model_summary(
    names: Sequence[str] | None = None,
    num_classes: int = 101,
    in_channels: int = 3,
    clip: Shape3 = (16, 112, 112),
    batch_norm: bool = False,
) -> list[ModelSummary]:
    """One :class:`ModelSummary` per network (all registered ones by default), in registry order."""
    rows = []
    for name in names if names is not None else list_models():
        spec = get_spec(name)
        params, macs = count(spec, num_classes, in_channels, clip, batch_norm)
        baseline_macs = count(spec.baseline, num_classes, in_channels, clip, batch_norm)[1]
        rows.append(ModelSummary(name, spec.description, params, macs, spec.baseline, macs / baseline_macs))
    return rows


def markdown_table(num_classes: int = 101, clip: Shape3 = (16, 112, 112)) -> str:
    """The README's network table: parameters, GMACs per clip and the MAC ratio to each network's baseline."""
    t, h, w = clip
    lines = [
        f"| network | what it is | parameters ({num_classes} classes) | GMACs per {t}x{h}x{w} clip | MACs / baseline |",
        "|---|---|---:|---:|---:|",
    ]
    for row in model_summary(num_classes=num_classes, clip=clip):
        lines.append(
            f"| {row.name} | {row.description} | {row.params:,} | {row.macs / 1e9:.2f} "
            f"| {row.mac_ratio:.2f} ({row.baseline}) |"
        )
    return "\n".join(lines) + "\n"


def summary_table(rows: Sequence[ModelSummary]) -> str:
    """Plain-text model table for the terminal (``asym3d models``)."""
    lines = [f"{'network':<14} {'params':>12} {'GMACs':>8}  MACs / baseline"]
    lines += [f"{r.name:<14} {r.params:>12,} {r.macs / 1e9:>8.2f}  {r.mac_ratio:.2f} ({r.baseline})" for r in rows]
    return "\n".join(lines) + "\n"


def layer_table(rows: Sequence[LayerCost]) -> str:
    """Plain-text per-layer breakdown for the terminal (``asym3d models --layers NAME``)."""
    lines = [f"{'layer':<7} {'what':<26} {'output':<18} {'params':>12} {'GMACs':>8}"]
    for r in rows:
        shape = "x".join(map(str, r.out_shape))
        lines.append(f"{r.name:<7} {r.detail:<26} {shape:<18} {r.params:>12,} {r.macs / 1e9:>8.3f}")
    total_params, total_macs = sum(r.params for r in rows), sum(r.macs for r in rows)
    lines.append(f"{'total':<53} {total_params:>12,} {total_macs / 1e9:>8.3f}")
    return "\n".join(lines) + "\n"
