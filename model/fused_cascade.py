"""The asymmetric cascade (1xkx1 -> 1x1xk -> 3x1x1, with biases) as one Triton kernel: no intermediate in memory.

Why: the eager cascade runs three convolutions, each writing a full-width activation that the next one re-reads
and that autograd keeps for backward; a one-directional kernel does only C*k MACs per output value, so those
passes through memory weigh more than its arithmetic (on a CPU a cascade costs 2.4-6x more per MAC than a 3x3x3
layer; on a GPU the device check measures it: BENCHMARKS.md, issues 2 and 25). Here one program computes a row
segment of the output for every time step, keeping the intermediates in registers:

- stage 1 (along H) reads its halo rows straight from the input;
- stage 2 (along W) needs stage 1 at W-shifted positions; registers cannot be shifted, so stage 1 is recomputed for
  each of the k shifts (k times stage 1's MACs: the price of not writing it);
- stage 3 (along T) walks the time steps in order with a rolling window of three stage-2 slices, so nothing is
  recomputed for it.

Each stage's result is rounded to the input dtype before the next stage reads it, as the eager cascade stores it.
Backward recomputes the eager cascade from the saved input (:class:`FusedCascade`): the forward writes no
intermediate and autograd keeps only the input, at the cost of one more forward in backward.

Runs on CUDA tensors; on CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1``, what the tests use).
:func:`available` says whether a tensor can take this path; :mod:`model.layers` falls back to the eager cascade
otherwise. The interpreter's ``tl.dot`` gives garbage for bfloat16 operands (2e10 off on a 16x16 product, triton
3.6.0 and 3.8.0), so there the operands are upcast to float32 after rounding: bfloat16 values multiply exactly in
float32, so the interpreted kernel computes what the GPU's bfloat16 tensor-core dot with float32 accumulation does,
up to summation order.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the eager cascade is used instead (model.layers warns once)
    triton = None

#: Tile sizes: output positions along W per program, and the channel blocks of each stage's contraction; warps per
#: program. Chosen without a GPU, from ptxas's report for sm_90 (bench/fused_compile.py; bf16, k 3, 256 channels):
#: 8 warps and BLOCK_N 16 spilled least (624 bytes a thread; BLOCK_N 32: 1,008; 4 or 16 warps: 1,428-2,728) and
#: in float32 halve the shared memory (112 KiB against 208). Their speed is measured by the device check, not here.
BLOCK_W, BLOCK_C, BLOCK_L, BLOCK_N = 16, 32, 32, 16
NUM_WARPS = 8


#: Whether the kernel runs in Triton's interpreter: Triton reads TRITON_INTERPRET when a kernel is decorated, i.e.
#: when this module is imported, and so does this module (Triton 3.8 reads it again when an interpreted kernel
#: calls another jit function, so it must stay set while the kernel runs).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def interpreting() -> bool:
    return INTERPRETED


def available(x: torch.Tensor) -> bool:
    """Whether the fused kernel can run on ``x``: Triton importable, and a CUDA tensor (or the interpreter)."""
    return triton is not None and (x.is_cuda or interpreting())


if triton is not None:

    @triton.jit
    def _round(x, IO: tl.constexpr, SOFT_ROUND: tl.constexpr):
        """float32 ``x`` rounded to IO (to nearest, ties to even). SOFT_ROUND does it with integer operations and
        keeps float32: the interpreter's own float32 -> bfloat16 cast truncates (0.125 off at magnitude 5)."""
        if SOFT_ROUND:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        else:
            return x.to(IO)

    @triton.jit
    def _cascade_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, y_ptr,
                        C, N, T, H, W, sxb, sxc, sxt, sxh, sxw, syb, syc, syt, syh, syw,
                        KH: tl.constexpr, KW: tl.constexpr, N_PAD: tl.constexpr, BLOCK_W: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr,
                        IO: tl.constexpr, SOFT_ROUND: tl.constexpr, PRECISION: tl.constexpr):
        """One program: sample ``b``, row ``h``, BLOCK_W positions along W, every time step and output channel.

        Step ``t`` computes stage 2 at time ``t`` (``nxt``), then the output at ``t - 1`` from stage 2 at
        ``t - 2, t - 1, t`` (``prev, cur, nxt``; zeros outside the clip are stage 3's padding). One body, no
        nested function: the interpreter cannot run a loop with a runtime bound inside a called jit function."""
        bh = tl.program_id(0)
        b, h = bh // H, bh % H
        w_offs = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        m = tl.arange(0, N_PAD)
        prev = tl.zeros((N_PAD, BLOCK_W), dtype=DOT)  # DOT holds the rounded intermediates
        cur = tl.zeros((N_PAD, BLOCK_W), dtype=DOT)
        for t in range(0, T + 1):
            if t < T:  # stage 2 at time t, all N channels, rounded to IO as the eager cascade stores it
                acc2 = tl.zeros((N_PAD, BLOCK_W), dtype=tl.float32)
                for dw in tl.static_range(KW):
                    w_in = w_offs + dw - KW // 2  # where stage 1 is needed for this shift of stage 2
                    w_ok = (w_in >= 0) & (w_in < W)  # outside the row stage 1 is stage 2's zero padding
                    for l0 in range(0, N, BLOCK_L):
                        lo = l0 + tl.arange(0, BLOCK_L)
                        acc1 = tl.zeros((BLOCK_L, BLOCK_W), dtype=tl.float32)
                        for dh in tl.static_range(KH):
                            h_in = h + dh - KH // 2
                            row_ok = (h_in >= 0) & (h_in < H)
                            for c0 in range(0, C, BLOCK_C):
                                c = c0 + tl.arange(0, BLOCK_C)
                                xs = tl.load(x_ptr + b * sxb + c[:, None] * sxc + t * sxt + h_in * sxh
                                             + w_in[None, :] * sxw,
                                             mask=(c[:, None] < C) & w_ok[None, :] & row_ok, other=0.0)
                                ws = tl.load(w1_ptr + lo[:, None] * (C * KH) + c[None, :] * KH + dh,
                                             mask=(lo[:, None] < N) & (c[None, :] < C), other=0.0)
                                acc1 += tl.dot(ws.to(DOT), xs.to(DOT), input_precision=PRECISION)
                        y1 = acc1 + tl.load(b1_ptr + lo, mask=lo < N, other=0.0).to(tl.float32)[:, None]
                        y1 = _round(tl.where((lo[:, None] < N) & w_ok[None, :], y1, 0.0), IO, SOFT_ROUND)
                        w2 = tl.load(w2_ptr + m[:, None] * (N * KW) + lo[None, :] * KW + dw,
                                     mask=(m[:, None] < N) & (lo[None, :] < N), other=0.0)
                        acc2 += tl.dot(w2.to(DOT), y1, input_precision=PRECISION)
                acc2 += tl.load(b2_ptr + m, mask=m < N, other=0.0).to(tl.float32)[:, None]
                nxt = _round(tl.where(m[:, None] < N, acc2, 0.0), IO, SOFT_ROUND)
            else:
                nxt = tl.zeros((N_PAD, BLOCK_W), dtype=DOT)
            if t >= 1:  # the output at t - 1, BLOCK_N channels at a time
                for n0 in range(0, N, BLOCK_N):
                    n = n0 + tl.arange(0, BLOCK_N)
                    w3 = w3_ptr + n[:, None] * (N * 3) + m[None, :] * 3
                    w3_ok = (n[:, None] < N) & (m[None, :] < N)
                    acc = tl.dot(tl.load(w3, mask=w3_ok, other=0.0).to(DOT), prev,
                                 input_precision=PRECISION)
                    acc += tl.dot(tl.load(w3 + 1, mask=w3_ok, other=0.0).to(DOT), cur,
                                  input_precision=PRECISION)
                    acc += tl.dot(tl.load(w3 + 2, mask=w3_ok, other=0.0).to(DOT), nxt,
                                  input_precision=PRECISION)
                    acc += tl.load(b3_ptr + n, mask=n < N, other=0.0).to(tl.float32)[:, None]
                    tl.store(y_ptr + b * syb + n[:, None] * syc + (t - 1) * syt + h * syh + w_offs[None, :] * syw,
                             _round(acc, IO, SOFT_ROUND).to(IO), mask=(n[:, None] < N) & (w_offs[None, :] < W))
            prev, cur = cur, nxt


_TL_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def cascade_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                    w3: torch.Tensor, b3: torch.Tensor) -> torch.Tensor:
    """The fused cascade's output for ``x`` (B, C, T, H, W); every tensor in x's dtype, output in x's memory format.

    Weights as ``nn.Conv3d`` holds them: w1 (N, C, 1, kh, 1), w2 (N, N, 1, 1, kw), w3 (N, N, 3, 1, 1)."""
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"fused cascade: unsupported dtype {x.dtype}")
    batch, channels, frames, height, width = x.shape
    n, kh, kw = w1.shape[0], w1.shape[3], w2.shape[4]
    channels_last = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    y = torch.empty((batch, n, frames, height, width), device=x.device, dtype=x.dtype,
                    memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
    io = getattr(tl, _TL_DTYPES[x.dtype])
    dot = tl.float32 if interpreting() else io  # see the module docstring: the interpreter's bf16 dot is broken
    precision = "tf32" if x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not interpreting() \
        else "ieee"  # float32 follows cuDNN's convolution setting
    grid = (batch * height, triton.cdiv(width, BLOCK_W))
    _cascade_kernel[grid](
        x, w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), w3.contiguous(), b3.contiguous(), y,
        channels, n, frames, height, width, *x.stride(), *y.stride(),
        KH=kh, KW=kw, N_PAD=max(16, triton.next_power_of_2(n)), BLOCK_W=BLOCK_W, BLOCK_C=BLOCK_C,
        BLOCK_L=BLOCK_L, BLOCK_N=BLOCK_N, DOT=dot, IO=io,
        SOFT_ROUND=interpreting() and x.dtype != torch.float32, PRECISION=precision, num_warps=NUM_WARPS)
    return y


def eager_cascade(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                  w3: torch.Tensor, b3: torch.Tensor) -> torch.Tensor:
    """The same cascade as three convolutions: the reference, and what backward differentiates."""
    y = F.conv3d(x, w1, b1, padding=(0, w1.shape[3] // 2, 0))
    y = F.conv3d(y, w2, b2, padding=(0, 0, w2.shape[4] // 2))
    return F.conv3d(y, w3, b3, padding=(1, 0, 0))


class FusedCascade(torch.autograd.Function):
    """Fused forward; backward recomputes :func:`eager_cascade` from the saved input and differentiates it."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, w3, b3):  # noqa: D102 (autograd's signature)
        ctx.save_for_backward(x, w1, b1, w2, b2, w3, b3)
        return cascade_forward(x, w1, b1, w2, b2, w3, b3)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        inputs = [t.detach().requires_grad_(needed) for t, needed in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        with torch.enable_grad():
            out = eager_cascade(*inputs)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
        return tuple(next(grads) if t.requires_grad else None for t in inputs)


def fused_cascade(x: torch.Tensor, convs) -> torch.Tensor:
    """The three ``nn.Conv3d`` of a cascade applied to ``x`` by the fused kernel, under autocast as eager would be:
    inputs and weights cast to the autocast dtype, then the kernel runs with autocast off."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    tensors = [x.to(dtype)] + [p.to(dtype) for conv in convs for p in (conv.weight, conv.bias)]
    with torch.autocast(device, enabled=False):
        return FusedCascade.apply(*tensors)
