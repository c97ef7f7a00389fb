"""Training-step time of the asymmetric variants against their C3D baseline, measured side by side (issues 2, 25).

One training step = forward + cross-entropy + backward + SGD step (momentum 0.9, weight decay 5e-4, as in the
paper's §4.3; fused SGD, as the trainer). Each family (c3d-b5 with its b5 variants, c3d-b8 with its b8 variants)
is built once and its nets are timed round-robin -- one step of each in turn, the order rotated every round -- so
drift in a shared machine's load hits every net alike. The time ratio (fastest variant step / fastest baseline step)
is printed beside the MAC ratio, the ideal speed-up. Wall time and this process's CPU time are both reported: on a
machine shared with other work the CPU-time ratio is the steadier of the two (on a GPU, wall time is what counts).

How a step runs (:class:`Setup`): ``--precision`` fp32 (TF32 off), tf32 (TF32 on for convolutions and matmuls) or
bf16 (autocast, the trainer's GPU default); ``--mode`` eager, compiled (``torch.compile``) or graphs (the whole step
captured once in a CUDA graph and replayed: no launch gaps); ``--cascade`` eager or fused (the Triton kernel of
:mod:`model.fused_cascade`).

``--stages`` adds a per-stage breakdown (forward + backward of each conv stage and its pool alone, at that stage's
input size) for the baseline and the last variant named of each family (by default its -345 variant): where the
time goes, how fast a cascade runs per MAC against the 3x3x3 layer it replaces, and -- on a card with known peak
figures (:data:`PEAKS`) -- each stage's arithmetic floor and fewest-bytes floor. ``--kernels`` adds the profiler's
kernel list of each stage. ``--sgd`` adds default (multi-tensor) SGD against fused SGD for every net.

    .venv/bin/python bench/step_time.py --batch 2 --clip 16x56x56 --iters 3 --threads 2 [--channels-last]
        [--precision bf16] [--mode compiled] [--cascade fused] [--stages [--kernels]] [--sgd]
        [--variants b5-asyConv345,b8-asyConv345] [--device cuda]
"""
from __future__ import annotations

import argparse
import copy
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

import model

PRECISIONS = ("fp32", "tf32", "bf16")
MODES = ("eager", "compiled", "graphs")


@dataclass(frozen=True)
class Peak:
    """A card's peak rates, for the floors: dense FLOP/s by precision and memory bytes/s."""

    flops: dict[str, float]
    bytes_per_s: float
    source: str


#: Keyed by a substring of ``torch.cuda.get_device_name``. Dense figures: the datasheet gives the tensor-core rates
#: "with sparsity", twice the dense rate.
PEAKS = {
    "H200": Peak({"fp32": 67e12, "tf32": 989e12 / 2, "bf16": 1979e12 / 2}, 4.8e12,
                 "NVIDIA H200 Tensor Core GPU datasheet, SXM: FP32 67 TFLOPS, TF32 989 and BF16 1,979 TFLOPS with "
                 "sparsity (dense: half), memory bandwidth 4.8 TB/s"),
}


def device_peak(device: torch.device) -> Peak | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAKS.items() if key in name), None)


@dataclass(frozen=True)
class Setup:
    """How one step is run: where, at what size, in which precision and mode, with which cascade path."""

    device: torch.device
    batch: int
    clip: tuple[int, int, int]
    precision: str = "fp32"
    mode: str = "eager"
    channels_last: bool = False
    cascade: str = "eager"

    def describe(self) -> str:
        return (f"{self.precision}, batch {self.batch}, {self.mode}" + (", channels_last_3d" if self.channels_last
                else "") + (f", {self.cascade} cascade" if self.cascade != "eager" else ""))


def parse_clip(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not TxHxW, e.g. 16x112x112")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def use_precision(precision: str) -> None:
    """TF32 on for "tf32" only (PyTorch's own default leaves it on for cuDNN convolutions): fp32 means fp32."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"


def autocast(setup: Setup) -> torch.autocast:
    # no weight cache: a captured graph must cast the weights itself at every replay
    return torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=setup.precision == "bf16",
                          cache_enabled=False)


def round_robin(steps: dict[str, Callable[[], None]], iters: int, warmup: int, device: torch.device
                ) -> dict[str, tuple[float, float]]:
    """Fastest (wall s, CPU s) step of each callable, timed one after another, order rotated every round.

    The minimum, not the median: on a shared machine other work only ever adds time, so the fastest round is the
    least disturbed estimate of each net's own cost (the reasoning of ``timeit``)."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    sync(device)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for i in range(iters):
        for name in names[i % len(names):] + names[: i % len(names)]:
            wall, cpu = time.perf_counter(), time.process_time()
            steps[name]()
            sync(device)
            samples[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {n: (min(s[0] for s in v), min(s[1] for s in v)) for n, v in samples.items()}


def cost(times: tuple[float, float], device: torch.device) -> float:
    """The time that measures a step: wall on a GPU, this process's CPU time on a (shared) CPU."""
    return times[0] if device.type == "cuda" else times[1]


def prepare(net: nn.Module, setup: Setup) -> nn.Module:
    net = net.to(setup.device)
    model.set_cascade_path(net, setup.cascade)
    if setup.channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    return torch.compile(net) if setup.mode == "compiled" else net


def make_input(shape: tuple[int, ...], setup: Setup) -> torch.Tensor:
    x = torch.randn(shape, device=setup.device)
    return x.contiguous(memory_format=torch.channels_last_3d) if setup.channels_last else x


def captured(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """``step`` captured in a CUDA graph after three warm-up runs on a side stream (cuDNN autotuning and the
    optimizer's momentum buffers happen there); the returned callable replays it."""
    if device.type != "cuda":
        raise ValueError("graphs mode needs a CUDA device")
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def train_step(net: nn.Module, setup: Setup, fused: bool = True) -> Callable[[], None]:
    """A closure running one SGD training step of ``net`` on a fixed random batch (fused SGD, as the trainer)."""
    net = prepare(net, setup)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4, fused=fused)
    x = make_input((setup.batch, 3, *setup.clip), setup)
    y = torch.randint(0, 101, (setup.batch,), device=setup.device)

    def step() -> None:
        with autocast(setup):
            loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return captured(step, setup.device) if setup.mode == "graphs" else step


def build(label: str, clip: tuple[int, int, int]) -> tuple[nn.Module, str]:
    """A net and its cascade path from a label: "b5-asyConv345" (eager cascades) or "b5-asyConv345 fused"."""
    name, _, path = label.partition(" ")
    return model.build_model(name, clip=clip), path or "eager"


def stage_step(block: nn.Module, in_shape: tuple[int, ...], setup: Setup) -> Callable[[], None]:
    """Forward + backward of one stage (conv block and pool) alone; the input gradient is computed as in the net."""
    block = prepare(block, setup)
    x = make_input((setup.batch, *in_shape), setup).requires_grad_()

    def step() -> None:
        with autocast(setup):
            out = block(x)
        out.float().sum().backward()

    return step


# ------------------------------------------------------------------------------------------------ per stage


@dataclass(frozen=True)
class StageCost:
    """One stage of one net: its size, its measured forward+backward time and its floors."""

    stage: str
    net: str
    label: str
    in_shape: tuple[int, ...]  # (C, T, H, W) of one clip
    out_shape: tuple[int, ...]  # after the pool
    params: int
    macs: int  # per clip, forward
    seconds: float  # forward + backward of the whole batch

    def flops(self, batch: int) -> float:
        return 2 * 3 * self.macs * batch  # backward: input and weight gradients, each as costly as forward

    def min_bytes(self, batch: int, precision: str) -> float:
        """Fewest bytes any implementation moves: forward reads x and the weights, writes y; backward reads dy, x
        and the weights, writes dx and the weight gradients (activations in the step's precision, weights fp32)."""
        act = 2 if precision == "bf16" else 4
        return act * batch * (3 * math.prod(self.in_shape) + 2 * math.prod(self.out_shape)) + 4 * 3 * self.params

    def floors(self, setup: Setup, peak: Peak | None) -> tuple[float, float] | None:
        """(arithmetic floor s, fewest-bytes floor s) on ``peak``'s card; None where no peak figure is known."""
        if peak is None:
            return None
        return (self.flops(setup.batch) / peak.flops[setup.precision],
                self.min_bytes(setup.batch, setup.precision) / peak.bytes_per_s)


def stage_costs(nets: list[str], setup: Setup, iters: int, warmup: int,
                kernels: int = 0) -> tuple[list[list[StageCost]], dict[tuple[str, str], list[tuple[str, int, float]]]]:
    """Per stage (outer list), each net's :class:`StageCost` timed round-robin; with ``kernels`` > 0 also the
    profiler's top kernels of each (stage, net). Nets may repeat with a different cascade path: "b5-asyConv345
    fused" names the net with its fusable cascades on the fused path."""
    built = {label: build(label, setup.clip) for label in nets}
    layers = {label: model.layer_costs(label.split(" ")[0], clip=setup.clip) for label in nets}
    first = nets[0]
    shapes = [(3, *setup.clip)] + [r.out_shape for r in layers[first] if r.name.startswith("pool")]
    rows, kernel_lists = [], {}
    for index, stage in enumerate(built[first][0].spec.stages):
        pool = stage.name.replace("conv", "pool")
        steps, costs = {}, {}
        for label, (net, path) in built.items():
            block = nn.Sequential(getattr(net.features, stage.name), getattr(net.features, pool))
            steps[label] = stage_step(block, shapes[index], replace(setup, cascade=path))
            conv = next(r for r in layers[label] if r.name == stage.name)
            out = next(r for r in layers[label] if r.name == pool).out_shape
            costs[label] = (net.spec.stages[index].label, conv.params, conv.macs, out)
        times = round_robin(steps, iters, warmup, setup.device)
        rows.append([StageCost(stage.name, label, costs[label][0], shapes[index], costs[label][3], costs[label][1],
                               costs[label][2], cost(times[label], setup.device)) for label in nets])
        if kernels:
            for label, step in steps.items():
                kernel_lists[(stage.name, label)] = kernel_list(step, setup.device, kernels)
    return rows, kernel_lists


def kernel_list(step: Callable[[], None], device: torch.device, top: int, steps: int = 3
                ) -> list[tuple[str, int, float]]:
    """The profiler's ``top`` kernels of ``step`` by their own time: (name, calls per step, microseconds per step).
    On a GPU the device kernels; on a CPU the aten operators (self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        sync(device)
    events = [e for e in prof.key_averages()
              if (e.self_device_time_total if cuda else e.self_cpu_time_total) > 0
              and (not cuda or e.device_type == torch.autograd.DeviceType.CUDA)]
    events.sort(key=lambda e: e.self_device_time_total if cuda else e.self_cpu_time_total, reverse=True)
    return [(e.key, round(e.count / steps), (e.self_device_time_total if cuda else e.self_cpu_time_total) / steps)
            for e in events[:top]]


# ------------------------------------------------------------------------------------------------ the CLI


def bench_sgd(names: list[str], setup: Setup, args: argparse.Namespace) -> None:
    """Step time with the default (foreach) SGD against the fused SGD, per network, timed round-robin."""
    print(f"\n{'network':<15} {'params M':>8} {'foreach ms':>10} {'fused ms':>9} {'time ratio':>10} "
          f"{'CPU-time ratio':>14}")
    for name in names:
        net = model.build_model(name, clip=setup.clip)
        params = sum(p.numel() for p in net.parameters())
        steps = {fused: train_step(copy.deepcopy(net), setup, fused=fused) for fused in (False, True)}
        times = round_robin(steps, args.iters, args.warmup, setup.device)
        (plain_wall, plain_cpu), (wall, cpu) = times[False], times[True]
        print(f"{name:<15} {params / 1e6:>8.1f} {plain_wall * 1e3:>10.0f} {wall * 1e3:>9.0f} "
              f"{wall / plain_wall:>10.2f} {cpu / plain_cpu:>14.2f}")


def families(variants: list[str]) -> dict[str, list[str]]:
    """Baseline -> its variants among ``variants`` (registry order)."""
    grouped: dict[str, list[str]] = {}
    for name in variants:
        baseline = model.get_spec(name).baseline
        if baseline != name:
            grouped.setdefault(baseline, []).append(name)
    return grouped


def bench_steps(baseline: str, variants: list[str], setup: Setup, args: argparse.Namespace) -> None:
    macs = {n: model.count(n, clip=setup.clip)[1] for n in [baseline, *variants]}
    steps = {n: train_step(model.build_model(n, clip=setup.clip), setup) for n in [baseline, *variants]}
    times = round_robin(steps, args.iters, args.warmup, setup.device)
    base_wall, base_cpu = times[baseline]
    print(f"\n{'network':<15} {'GMACs':>6} {'MAC ratio':>9} {'step ms':>9} {'time ratio':>10} {'CPU-time ratio':>14}")
    for name in [baseline, *variants]:
        wall, cpu = times[name]
        print(f"{name:<15} {macs[name] / 1e9:>6.2f} {macs[name] / macs[baseline]:>9.2f} {wall * 1e3:>9.1f} "
              f"{wall / base_wall:>10.2f} {cpu / base_cpu:>14.2f}")


def bench_stages(baseline: str, variant: str, setup: Setup, args: argparse.Namespace) -> None:
    """Per-stage forward+backward time of ``baseline`` and ``variant`` side by side, with MACs and floors."""
    peak = device_peak(setup.device)
    what = "wall" if setup.device.type == "cuda" else "CPU"
    print(f"\nper stage (forward+backward, conv block + pool, {what} time): {baseline} vs {variant}")
    print(f"{'stage':<6} {'share of baseline':>17} {'GMACs base':>10} {'variant':>8} {'MAC ratio':>9} "
          f"{'time ratio':>10} {'base ms':>8} {'variant ms':>10} {'floor ms (MACs / bytes)':>24}")
    rows, kernels = stage_costs([baseline, variant], setup, args.iters, args.warmup, args.kernels)
    total = sum(base.seconds for base, _ in rows)
    for base, var in rows:
        floors = var.floors(setup, peak)
        floor_text = f"{floors[0] * 1e3:.3f} / {floors[1] * 1e3:.3f}" if floors else "n/a (no peak figures)"
        print(f"{base.stage:<6} {base.seconds / total:>17.0%} {base.macs / 1e9:>10.2f} {var.macs / 1e9:>8.2f} "
              f"{var.macs / base.macs:>9.2f} {var.seconds / base.seconds:>10.2f} {base.seconds * 1e3:>8.2f} "
              f"{var.seconds * 1e3:>10.2f} {floor_text:>24}")
    for (stage, net), top in kernels.items():
        print(f"  {stage} {net}: " + "; ".join(f"{name[:60]} x{calls} {us:.0f} us" for name, calls, us in top))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--clip", type=parse_clip, default=(16, 56, 56), help="TxHxW (default 16x56x56)")
    parser.add_argument("--iters", type=int, default=3, help="timed rounds (each times every net once)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last_3d weights and inputs")
    parser.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                        help="fp32 (TF32 off), tf32, or bf16 autocast; auto = bf16 on CUDA, fp32 on a CPU")
    parser.add_argument("--mode", choices=MODES, default="eager",
                        help="eager, compiled (torch.compile) or graphs (the step replayed from a CUDA graph)")
    parser.add_argument("--cascade", choices=model.CASCADE_PATHS, default="eager",
                        help="how asymmetric cascades run (fused: the Triton kernel; needs CUDA)")
    parser.add_argument("--stages", action="store_true", help="also a per-stage breakdown of each family")
    parser.add_argument("--kernels", type=int, default=0, metavar="N",
                        help="with --stages: the profiler's N top kernels (operators on a CPU) of each stage")
    parser.add_argument("--sgd", action="store_true", help="also default vs fused SGD for every net")
    parser.add_argument("--variants", default=",".join(n for n in model.list_models() if "asyConv" in n),
                        help="comma-separated networks (default: every b5 and b8 asymmetric variant)")
    args = parser.parse_args()
    device = torch.device(args.device)
    precision = args.precision if args.precision != "auto" else "bf16" if device.type == "cuda" else "fp32"
    setup = Setup(device, args.batch, args.clip, precision, args.mode, args.channels_last, args.cascade)
    if setup.mode == "graphs" and device.type != "cuda":
        parser.error("--mode graphs needs a CUDA device")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    use_precision(precision)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    variants = [v for v in args.variants.split(",") if v]
    for name in variants:
        model.get_spec(name)  # fail before any timing on a typo
    print(f"torch {torch.__version__} on {platform.processor() or platform.machine()}, device {device}, "
          f"threads {torch.get_num_threads()}, clip {'x'.join(map(str, args.clip))}, {setup.describe()}, "
          f"{args.iters} timed rounds after {args.warmup} warm-up")
    for baseline, members in families(variants).items():
        bench_steps(baseline, members, setup, args)
        if args.stages:
            bench_stages(baseline, members[-1], replace(setup, mode="eager"), args)
        if args.sgd:
            bench_sgd([baseline, *members], setup, args)


if __name__ == "__main__":
    main()
