"""The fused cascade kernel (model/fused_cascade.py) against the eager cascade, on the CPU through Triton's interpreter.

The interpreter runs the kernel's own code (loads, masks, dots, the rolling time window) in numpy, so what is tested
here is what a GPU compiles; the shapes are tiny because the interpreter is slow, and chosen to cross every block
edge: channels above and below a block, widths spanning two W tiles, both kernel sizes, both memory formats.
Fresh random inputs every run (no fixed seed): the bounds must hold for any input, not one.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Before Triton is imported: it reads TRITON_INTERPRET when its own library's jit functions and ours are decorated,
# and again when an interpreted kernel calls one (see the fixture below). Left set for the session: nothing else
# here runs Triton; the fallback test and bench/fused_compile.py clear it for their processes.
os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton is installed by `make test` (the Makefile's TRITON_SPEC)")

from model import ASYM_3, ASYM_5, AsymConv3d, build_model, set_cascade_path  # noqa: E402
from model import fused_cascade  # noqa: E402

assert fused_cascade.INTERPRETED, "model.fused_cascade was imported earlier without the interpreter"


@pytest.fixture(autouse=True)
def interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set again for each test: Triton reads it while an interpreted kernel runs, and another test may have
    restored the environment it saw before this module was imported."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
# (batch, in channels, out channels, T, H, W, kernels, channels_last)
SHAPES = [
    (1, 5, 16, 3, 4, 5, ASYM_3, False),
    (2, 40, 24, 2, 3, 17, ASYM_5, True),  # C over one block, W over two tiles
    (1, 16, 40, 4, 5, 3, ASYM_3, True),  # N over one block and not a power of two
]
# Measured over 5 runs of each shape: fp32 error at most 2.0e-7 of the output's scale (max |reference|); in bf16
# the fused and eager cascades round at the same points, and their errors from float64 were equal in all 15 runs
# (eager's own error up to 4.5e-3 of the scale). The bf16 bound allows what one intermediate landing on the other
# side of a rounding boundary (the kernel sums in another order) can add: far below 2^-9 of the scale.
FP32_BOUND = 1e-6  # of the scale
BF16_EXTRA = 2 ** -9  # of the scale, above the eager bf16 cascade's own error


def random_cascade(c: int, n: int, kernels) -> tuple[torch.Tensor, ...]:
    kh, kw = kernels[0][1], kernels[1][2]
    return (torch.randn(n, c, 1, kh, 1) / (c * kh) ** 0.5, torch.randn(n),
            torch.randn(n, n, 1, 1, kw) / (n * kw) ** 0.5, torch.randn(n),
            torch.randn(n, n, 3, 1, 1) / (3 * n) ** 0.5, torch.randn(n))


def make_input(b, c, t, h, w, channels_last) -> torch.Tensor:
    x = torch.randn(b, c, t, h, w)
    return x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])))
def test_forward_float32_matches_the_eager_cascade(shape) -> None:
    b, c, n, t, h, w, kernels, channels_last = shape
    x, weights = make_input(b, c, t, h, w, channels_last), random_cascade(c, n, kernels)
    ours = fused_cascade.cascade_forward(x, *weights)
    reference = fused_cascade.eager_cascade(x.double(), *(p.double() for p in weights))
    scale = reference.abs().max().item()
    assert ours.shape == reference.shape and ours.dtype == torch.float32
    assert ours.is_contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
    assert (ours.double() - reference).abs().max().item() <= FP32_BOUND * scale


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s[:6])))
def test_forward_bfloat16_is_as_accurate_as_the_eager_cascade(shape) -> None:
    b, c, n, t, h, w, kernels, channels_last = shape
    tensors = [make_input(b, c, t, h, w, channels_last), *random_cascade(c, n, kernels)]
    low = [p.bfloat16() for p in tensors]
    ours = fused_cascade.cascade_forward(*low)
    eager = fused_cascade.eager_cascade(*low)
    exact = fused_cascade.eager_cascade(*(p.double() for p in low))  # same bf16 inputs, no rounding after
    scale = exact.abs().max().item()
    ours_error = (ours.double() - exact).abs().max().item()
    eager_error = (eager.double() - exact).abs().max().item()
    assert ours.dtype == torch.bfloat16 and eager_error > 0  # bf16 rounding is really there
    assert ours_error <= eager_error + BF16_EXTRA * scale, (ours_error, eager_error, scale)


def module_grads(module: AsymConv3d, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = module(x)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return [out.detach().float(), x.grad] + [p.grad for p in module.parameters()]


def test_module_fused_path_matches_eager_forward_and_backward() -> None:
    eager = AsymConv3d(6, 16, ASYM_3)
    fused = AsymConv3d(6, 16, ASYM_3)
    fused.load_state_dict(eager.state_dict())
    assert set_cascade_path(fused, "fused") == 1
    x = make_input(2, 6, 3, 4, 5, channels_last=False)
    for ours, theirs in zip(module_grads(fused, x), module_grads(eager, x)):
        scale = theirs.abs().max().item()
        assert (ours - theirs).abs().max().item() <= FP32_BOUND * scale


def test_module_fused_path_under_bf16_autocast() -> None:
    """The trainer's GPU path (bf16 autocast) on the CPU: the fused cascade casts like eager autocast does.
    oneDNN is off: its bf16 conv3d weight gradient is nondeterministic (BENCHMARKS.md, "bf16 on a CPU")."""
    eager = AsymConv3d(6, 16, ASYM_5).to(memory_format=torch.channels_last_3d)  # as the trainer's GPU path
    fused = AsymConv3d(6, 16, ASYM_5).to(memory_format=torch.channels_last_3d)
    fused.load_state_dict(eager.state_dict())
    set_cascade_path(fused, "fused")
    x = make_input(1, 6, 3, 5, 6, channels_last=True)
    with torch.backends.mkldnn.flags(enabled=False), torch.autocast("cpu", dtype=torch.bfloat16):
        results = [module_grads(net, x) for net in (fused, eager)]
    (out_f, *grads_f), (out_e, *grads_e) = results
    assert (out_f - out_e).abs().max().item() <= 2 ** -7 * out_e.abs().max().item()  # one bf16 step
    for ours, theirs in zip(grads_f, grads_e):  # backward is the eager cascade on the same bf16 tensors
        assert torch.equal(ours, theirs)


def test_set_cascade_path_covers_the_fusable_cascades_only() -> None:
    counts = {name: set_cascade_path(build_model(name, clip=(16, 16, 16)), "fused")
              for name in ("c3d-b5", "b5-asyConv345", "b8-asyConv345", "b5-M4")}
    assert counts == {"c3d-b5": 0, "b5-asyConv345": 3, "b8-asyConv345": 3, "b5-M4": 2}
    assert set_cascade_path(build_model("b5-asyConv3", clip=(16, 16, 16), batch_norm=True), "fused") == 0
    with pytest.raises(ValueError, match="unknown cascade path 'fast'; valid: eager, fused"):
        set_cascade_path(build_model("b5-asyConv3", clip=(16, 16, 16)), "fast")


FALLBACK = """
import sys, warnings
{block}
import torch
from model import ASYM_3, AsymConv3d, set_cascade_path
net = AsymConv3d(3, 16, ASYM_3)
reference = net(torch.ones(1, 3, 3, 4, 4))
set_cascade_path(net, "fused")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    outs = [net(torch.ones(1, 3, 3, 4, 4)) for _ in range(3)]
assert all(torch.equal(out, reference) for out in outs)
print(len(caught), caught[0].message if caught else "")
"""


@pytest.mark.parametrize("block, why", [("sys.modules['triton'] = None", "Triton is not installed"),
                                        ("", "a cpu tensor needs TRITON_INTERPRET=1")])
def test_fused_path_falls_back_to_eager_with_one_warning(block: str, why: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", FALLBACK.format(block=block)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == f"1 fused cascade: {why}; running the eager cascade"
