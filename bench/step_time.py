"""Training-step time of the asymmetric variants against their C3D baseline, measured side by side (issue 2).

One training step = forward + cross-entropy + backward + SGD step (momentum 0.9, weight decay 5e-4, as in the
paper's §4.3). Each family (c3d-b5 with its b5 variants, c3d-b8 with its b8 variants) is built once and its nets
are timed round-robin -- one step of each in turn, the order rotated every round -- so drift in a shared machine's
load hits every net alike. The time ratio (fastest variant step / fastest baseline step) is printed beside the MAC ratio, the
ideal speed-up. Wall time and this process's CPU time are both reported: on a machine shared with other work the
CPU-time ratio is the steadier of the two.

``--sgd`` adds the optimizer's share: each family's baseline and variants stepped with PyTorch's default
(multi-tensor) SGD and with the fused SGD the trainer uses (one kernel for every parameter), side by side.

``--stages`` adds a per-stage breakdown (forward + backward of each conv stage and its pool alone, at that stage's
input size) for the baseline and the last variant named of each family (by default its -345 variant): it shows
where the time goes and how fast a cascade runs per MAC compared with the 3x3x3 layer it replaces.

    .venv/bin/python bench/step_time.py --batch 2 --clip 16x56x56 --iters 3 --threads 2 [--channels-last]
        [--compile] [--stages] [--sgd] [--variants b5-asyConv345,b8-asyConv345] [--device cuda]  # AMP on by default on CUDA
"""
from __future__ import annotations

import argparse
import copy
import platform
import time
from collections.abc import Callable

import torch
from torch import nn

import model


def parse_clip(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not TxHxW, e.g. 16x112x112")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def prepare(net: nn.Module, args: argparse.Namespace) -> nn.Module:
    net = net.to(args.device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    return torch.compile(net) if args.compile else net


def make_input(shape: tuple[int, ...], args: argparse.Namespace) -> torch.Tensor:
    x = torch.randn(shape, device=args.device)
    return x.contiguous(memory_format=torch.channels_last_3d) if args.channels_last else x


def train_step(net: nn.Module, args: argparse.Namespace, fused: bool = True) -> Callable[[], None]:
    """A closure running one SGD training step of ``net`` on a fixed random batch (fused SGD, as the trainer)."""
    net = prepare(net, args)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4, fused=fused)
    x = make_input((args.batch, 3, *args.clip), args)
    y = torch.randint(0, 101, (args.batch,), device=args.device)

    def step() -> None:
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_sgd(names: list[str], args: argparse.Namespace) -> None:
    """Step time with the default (foreach) SGD against the fused SGD, per network, timed round-robin."""
    print(f"\n{'network':<15} {'params M':>8} {'foreach ms':>10} {'fused ms':>9} {'time ratio':>10} "
          f"{'CPU-time ratio':>14}")
    for name in names:
        net = model.build_model(name, clip=args.clip)
        params = sum(p.numel() for p in net.parameters())
        steps = {fused: train_step(copy.deepcopy(net), args, fused=fused) for fused in (False, True)}
        times = round_robin(steps, args.iters, args.warmup, args.device)
        (plain_wall, plain_cpu), (wall, cpu) = times[False], times[True]
        print(f"{name:<15} {params / 1e6:>8.1f} {plain_wall * 1e3:>10.0f} {wall * 1e3:>9.0f} "
              f"{wall / plain_wall:>10.2f} {cpu / plain_cpu:>14.2f}")


def stage_step(block: nn.Module, in_shape: tuple[int, ...], args: argparse.Namespace) -> Callable[[], None]:
    """Forward + backward of one stage (conv block and pool) alone; the input gradient is computed as in the net."""
    block = prepare(block, args)
    x = make_input((args.batch, *in_shape), args).requires_grad_()

    def step() -> None:
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.amp):
            out = block(x)
        out.float().sum().backward()

    return step


def families(variants: list[str]) -> dict[str, list[str]]:
    """Baseline -> its variants among ``variants`` (registry order)."""
    grouped: dict[str, list[str]] = {}
    for name in variants:
        baseline = model.get_spec(name).baseline
        if baseline != name:
            grouped.setdefault(baseline, []).append(name)
    return grouped


def bench_steps(baseline: str, variants: list[str], args: argparse.Namespace) -> None:
    macs = {n: model.count(n, clip=args.clip)[1] for n in [baseline, *variants]}
    steps = {n: train_step(model.build_model(n, clip=args.clip), args) for n in [baseline, *variants]}
    times = round_robin(steps, args.iters, args.warmup, args.device)
    base_wall, base_cpu = times[baseline]
    print(f"\n{'network':<15} {'GMACs':>6} {'MAC ratio':>9} {'step ms':>9} {'time ratio':>10} {'CPU-time ratio':>14}")
    for name in [baseline, *variants]:
        wall, cpu = times[name]
        print(f"{name:<15} {macs[name] / 1e9:>6.2f} {macs[name] / macs[baseline]:>9.2f} {wall * 1e3:>9.0f} "
              f"{wall / base_wall:>10.2f} {cpu / base_cpu:>14.2f}")


def bench_stages(baseline: str, variant: str, args: argparse.Namespace) -> None:
    """Per-stage forward+backward time of ``baseline`` and ``variant`` side by side, with each stage's MACs."""
    print(f"\nper stage (forward+backward, conv block + pool): {baseline} vs {variant}")
    print(f"{'stage':<6} {'share of baseline':>17} {'GMACs base':>10} {'variant':>8} {'MAC ratio':>9} "
          f"{'time ratio':>10}")
    nets = {n: model.build_model(n, clip=args.clip) for n in (baseline, variant)}
    costs = {n: [r for r in model.layer_costs(n, clip=args.clip) if r.name.startswith("conv")] for n in nets}
    shapes = [(3, *args.clip)] + [r.out_shape for r in model.layer_costs(baseline, clip=args.clip)
                                  if r.name.startswith("pool")]
    rows, total = [], 0.0
    for index, stage in enumerate(nets[baseline].spec.stages):
        pool = stage.name.replace("conv", "pool")
        steps = {n: stage_step(nn.Sequential(getattr(net.features, stage.name), getattr(net.features, pool)),
                               shapes[index], args) for n, net in nets.items()}
        times = round_robin(steps, args.iters, args.warmup, args.device)
        base_macs, var_macs = costs[baseline][index].macs, costs[variant][index].macs
        rows.append((stage.name, times[baseline][1], base_macs, var_macs, times[variant][1] / times[baseline][1]))
        total += times[baseline][1]
    for name, base_cpu, base_macs, var_macs, ratio in rows:
        print(f"{name:<6} {base_cpu / total:>17.0%} {base_macs / 1e9:>10.2f} {var_macs / 1e9:>8.2f} "
              f"{var_macs / base_macs:>9.2f} {ratio:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--clip", type=parse_clip, default=(16, 56, 56), help="TxHxW (default 16x56x56)")
    parser.add_argument("--iters", type=int, default=3, help="timed rounds (each times every net once)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last_3d weights and inputs")
    parser.add_argument("--compile", action="store_true", help="torch.compile every net")
    parser.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                        help="bfloat16 autocast; auto = on for CUDA, off for CPU")
    parser.add_argument("--stages", action="store_true", help="also a per-stage breakdown of each family")
    parser.add_argument("--sgd", action="store_true", help="also default vs fused SGD for every net")
    parser.add_argument("--variants", default=",".join(n for n in model.list_models() if "asyConv" in n),
                        help="comma-separated networks (default: every b5 and b8 asymmetric variant)")
    args = parser.parse_args()
    args.device = torch.device(args.device)
    args.amp = args.amp == "on" or (args.amp == "auto" and args.device.type == "cuda")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    variants = [v for v in args.variants.split(",") if v]
    for name in variants:
        model.get_spec(name)  # fail before any timing on a typo
    print(f"torch {torch.__version__} on {platform.processor() or platform.machine()}, device {args.device}, "
          f"threads {torch.get_num_threads()}, batch {args.batch}, clip {'x'.join(map(str, args.clip))}, "
          f"channels_last_3d {args.channels_last}, compile {args.compile}, amp {args.amp}, "
          f"{args.iters} timed rounds after {args.warmup} warm-up")
    for baseline, members in families(variants).items():
        bench_steps(baseline, members, args)
        if args.stages:
            bench_stages(baseline, members[-1], args)
        if args.sgd:
            bench_sgd([baseline, *members], args)


if __name__ == "__main__":
    main()
