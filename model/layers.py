"""Building blocks of every network in the paper: a convolution step, the asymmetric cascade, the MicroNet.

A block is described as data before it is built: a tuple of *columns* whose outputs are concatenated along the
channel axis, each column a sequence of :class:`ConvStep` (a plain convolution or an asymmetric cascade, followed
by optional batch norm and a ReLU). A single-column block is an ordinary stack of conv layers (C3D's ``conv3a,
conv3b``); three columns make a MicroNet (Figure 3). The builders here and the counters in :mod:`model.counting`
read the same description, so parameters and multiply-accumulates can never drift from what is built.

All convolutions are stride 1 with "same" padding, so every step of a block runs at the block's input size
(T, H, W). Tensors are ``(B, C, T, H, W)``; kernels are written ``(T, H, W)`` as in the paper.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

Kernel = tuple[int, int, int]
#: A conv step's kernels: one kernel is a plain convolution, several are an asymmetric cascade applied in order.
Kernels = tuple[Kernel, ...]

CONV_3x3x3: Kernels = ((3, 3, 3),)
POINTWISE: Kernels = ((1, 1, 1),)
#: Approximates one 3x3x3 layer with the same receptive field (paper §3.1, eq. 3-6).
ASYM_3: Kernels = ((1, 3, 1), (1, 1, 3), (3, 1, 1))
#: Replaces a group of two 3x3x3 layers (receptive field 5x5x5) by 1x5x1, 1x1x5, 3x1x1 (paper Fig. 2b). The
#: temporal kernel stays 3: the paper argues 5x1x1 adds cost without need for 16-frame clips.
ASYM_5: Kernels = ((1, 5, 1), (1, 1, 5), (3, 1, 1))
#: How a cascade runs: three ``nn.Conv3d`` ("eager", the default), or one Triton kernel that keeps the
#: intermediates in registers ("fused", :mod:`model.fused_cascade`). Eager stays the default until the fused one is
#: measured faster on a GPU (issue 25).
CASCADE_PATHS = ("eager", "fused")


@dataclass(frozen=True)
class ConvStep:
    """One convolution (or asymmetric cascade) + [BatchNorm] + ReLU inside a block."""

    out_channels: int  # channels this step produces
    kernels: Kernels  # one kernel: plain Conv3d; several: an AsymConv3d cascade


#: A column is a chain of steps; a block concatenates its columns' outputs along channels.
Column = tuple[ConvStep, ...]
Block = tuple[Column, ...]


def block_out_channels(block: Block) -> int:
    """Channels a block produces: the sum of its columns' last widths."""
    return sum(column[-1].out_channels for column in block)


def describe_kernels(kernels: Kernels) -> str:
    """'3x3x3' for a plain conv, '1x3x1>1x1x3>3x1x1' for a cascade."""
    return ">".join("x".join(map(str, k)) for k in kernels)


def _init_conv(conv: nn.Conv3d, relu_follows: bool) -> None:
    """He initialisation for the non-linearity that actually follows this conv.

    Without batch norm (the paper's setting) PyTorch's default init shrinks the signal ~6x per layer, which
    stalls from-scratch training of 8-10 layer nets; inner cascade stages without a ReLU get the linear gain so the
    cascade as a whole keeps unit variance.
    """
    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu" if relu_follows else "linear")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _same_conv(in_channels: int, out_channels: int, kernel: Kernel, bias: bool, relu_follows: bool) -> nn.Conv3d:
    if len(kernel) != 3 or any(k < 1 or k % 2 == 0 for k in kernel):
        raise ValueError(f"kernel {kernel} must be three odd sizes (T, H, W) for 'same' padding")
    conv = nn.Conv3d(in_channels, out_channels, kernel, padding=tuple(k // 2 for k in kernel), bias=bias)
    _init_conv(conv, relu_follows)
    return conv


class AsymConv3d(nn.Sequential):
    """A cascade of one-directional convolutions standing in for one full 3D convolution (paper eq. 3-6).

    ``kernels`` are applied in order; the first maps ``in_channels`` to ``out_channels`` and the rest keep
    ``out_channels`` (the paper's D = M = N). Eq. 6 composes the stages as linear filters, so by default nothing
    sits between them; ``batch_norm`` puts a BatchNorm3d between stages and ``relu_inside`` a ReLU (experiments).
    The last stage is bare: like an ``nn.Conv3d``, the module's caller adds the BN/ReLU that follow it.
    With D = M = N it has ``C*k1*N + N*k2*N + N*k3*N`` weights instead of ``C*k1*k2*k3*N``, and the receptive
    field of the full kernel whose extent is the sum of the stages' extents along each axis.

    Input ``(B, in_channels, T, H, W)`` -> output ``(B, out_channels, T, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernels: Sequence[Kernel] = ASYM_3,
        batch_norm: bool = False,
        relu_inside: bool = False,
        bias: bool = True,
    ) -> None:
        if not kernels:
            raise ValueError("AsymConv3d needs at least one kernel")
        layers: list[nn.Module] = []
        for i, kernel in enumerate(kernels):
            last = i == len(kernels) - 1
            layers.append(
                _same_conv(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    tuple(kernel),
                    bias=bias if last else not batch_norm,
                    relu_follows=True if last else relu_inside,
                )
            )
            if not last:
                if batch_norm:
                    layers.append(nn.BatchNorm3d(out_channels))
                if relu_inside:
                    layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
        self.kernels: Kernels = tuple(tuple(k) for k in kernels)
        self.path = "eager"  # CASCADE_PATHS; set by set_cascade_path

    @property
    def fusable(self) -> bool:
        """Whether the fused kernel computes this cascade: three biased convolutions with nothing between them,
        shaped 1xkx1 -> 1x1xk -> 3x1x1 (ASYM_3, ASYM_5)."""
        if len(self) != 3 or any(conv.bias is None for conv in self):
            return False
        (t1, kh, w1), (t2, h2, kw), kt = self.kernels
        return (t1, w1, t2, h2, kt) == (1, 1, 1, 1, (3, 1, 1)) and kh % 2 == 1 and kw % 2 == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.path == "fused":
            from . import fused_cascade

            if fused_cascade.available(x):
                return fused_cascade.fused_cascade(x, list(self))
            _warn_fallback(x)
        return super().forward(x)


_warned_fallback = False


def _warn_fallback(x: torch.Tensor) -> None:
    """One warning per process: the fused path was asked for where it cannot run, so the eager cascade runs."""
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        from .fused_cascade import triton

        why = "Triton is not installed" if triton is None else f"a {x.device.type} tensor needs TRITON_INTERPRET=1"
        warnings.warn(f"fused cascade: {why}; running the eager cascade", RuntimeWarning, stacklevel=3)


def set_cascade_path(net: nn.Module, path: str) -> int:
    """Run every fusable :class:`AsymConv3d` in ``net`` by ``path`` (:data:`CASCADE_PATHS`); returns how many.

    Cascades the kernel does not cover (batch norm or ReLU inside, other kernel shapes) stay eager."""
    if path not in CASCADE_PATHS:
        raise ValueError(f"unknown cascade path {path!r}; valid: {', '.join(CASCADE_PATHS)}")
    cascades = [m for m in net.modules() if isinstance(m, AsymConv3d) and m.fusable]
    for cascade in cascades:
        cascade.path = path
    return len(cascades)


class ConvUnit(nn.Sequential):
    """conv (plain or :class:`AsymConv3d`) -> [BatchNorm3d] -> ReLU: one :class:`ConvStep`, built."""

    def __init__(
        self, in_channels: int, step: ConvStep, batch_norm: bool = False, relu_inside_asym: bool = False
    ) -> None:
        if len(step.kernels) == 1:
            conv: nn.Module = _same_conv(
                in_channels, step.out_channels, step.kernels[0], bias=not batch_norm, relu_follows=True
            )
        else:
            conv = AsymConv3d(
                in_channels, step.out_channels, step.kernels, batch_norm, relu_inside_asym, bias=not batch_norm
            )
        layers = [conv]
        if batch_norm:
            layers.append(nn.BatchNorm3d(step.out_channels))
        layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class ConvBlock(nn.Module):
    """A :data:`Block` built: its columns run on the same input and are concatenated along channels.

    Input ``(B, in_channels, T, H, W)`` -> ``(B, block_out_channels(block), T, H, W)``. A one-column block is a
    plain stack and skips the concatenation.
    """

    def __init__(
        self, in_channels: int, block: Block, batch_norm: bool = False, relu_inside_asym: bool = False
    ) -> None:
        super().__init__()
        if not block or any(not column for column in block):
            raise ValueError("a block needs at least one column, and every column at least one step")
        self.block = block
        self.columns = nn.ModuleList()
        for column in block:
            units, channels = [], in_channels
            for step in column:
                units.append(ConvUnit(channels, step, batch_norm, relu_inside_asym))
                channels = step.out_channels
            self.columns.append(nn.Sequential(*units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.columns) == 1:
            return self.columns[0](x)
        return torch.cat([column(x) for column in self.columns], dim=1)


def stack_block(out_channels: int, kernels: Kernels, layers: int = 1) -> Block:
    """``layers`` conv steps of one kernel (plain or cascade) in a single column: conv3a, conv3b, ..."""
    return ((ConvStep(out_channels, kernels),) * layers,)


def micronet_block(out_channels: int, variant: str) -> Block:
    """The MicroNet columns for N = ``out_channels`` (Figure 3, as docs/DESIGN.md reads it; the figure is not in the
    text we have, so the widths are our reading, chosen to match the paper's parameter counts of b5-M1..M4).

    left:   1x1x1 -> N/16, then 3x3x3 -> N/8, 3x3x3 -> N/8   (M2, M4: one cascade 1x5x1, 1x1x5, 3x1x1 -> N/8)
    middle: 1x1x1 -> 3N/8, then 3x3x3 -> N/2                 (M3, M4: one cascade 1x3x1, 1x1x3, 3x1x1 -> N/2)
    right:  1x1x1 -> 3N/8
    Concatenated: N/8 + N/2 + 3N/8 = N channels.
    """
    if variant not in MICRONET_VARIANTS:
        raise ValueError(f"unknown MicroNet variant {variant!r}; valid: {', '.join(MICRONET_VARIANTS)}")
    if out_channels % 16:
        raise ValueError(f"MicroNet output channels must be a multiple of 16, got {out_channels}")
    n = out_channels
    left_asym, middle_asym = MICRONET_VARIANTS[variant]
    left_tail = (ConvStep(n // 8, ASYM_5),) if left_asym else (ConvStep(n // 8, CONV_3x3x3),) * 2
    middle_tail = ConvStep(n // 2, ASYM_3 if middle_asym else CONV_3x3x3)
    return (
        (ConvStep(n // 16, POINTWISE), *left_tail),
        (ConvStep(3 * n // 8, POINTWISE), middle_tail),
        (ConvStep(3 * n // 8, POINTWISE),),
    )


#: variant -> (left column asymmetric, middle column asymmetric)
MICRONET_VARIANTS: dict[str, tuple[bool, bool]] = {
    "M1": (False, False),
    "M2": (True, False),
    "M3": (False, True),
    "M4": (True, True),
}


class MicroNet(ConvBlock):
    """A local Inception-like network (paper §3.2, Figure 3), variants M1-M4; see :func:`micronet_block`.

    Input ``(B, in_channels, T, H, W)`` -> ``(B, out_channels, T, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        variant: str = "M1",
        batch_norm: bool = False,
        relu_inside_asym: bool = False,
    ) -> None:
        super().__init__(in_channels, micronet_block(out_channels, variant), batch_norm, relu_inside_asym)
        self.variant = variant
