"""The fused cascade kernel compiled for a GPU architecture without a GPU: registers, spills and shared memory.

Why: the kernel keeps three time slices of stage 2 for every channel in registers, so whether it spills, and how
much shared memory it asks for, decide whether it can be fast -- and Triton's compiler with its bundled ptxas says
both on a machine with no GPU. One row per setting (dtype, kernel size, channels, warps, BLOCK_N), compiled for
``--arch`` (90: H100/H200). Timing needs the device check (bench/gpu_check.py, section fused).

    .venv/bin/python bench/fused_compile.py [--arch 90] [--dtypes bf16,fp32] [--kernels 3,5] [--channels 256,512]
        [--warps 8] [--block-n 16]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.pop("TRITON_INTERPRET", None)  # compiling, not interpreting (read when the kernel is decorated)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia import compiler as nvidia  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from model import fused_cascade  # noqa: E402

DTYPES = {"bf16": ("*bf16", tl.bfloat16), "fp32": ("*fp32", tl.float32)}


def compile_kernel(dtype: str, k: int, channels: int, warps: int, block_n: int, arch: int) -> dict[str, float]:
    """Compile the kernel for one setting; ptxas -v on its PTX gives registers and spills."""
    pointer, io = DTYPES[dtype]
    kernel = fused_cascade._cascade_kernel
    consts = dict(KH=k, KW=k, N_PAD=max(16, triton.next_power_of_2(channels)), BLOCK_W=fused_cascade.BLOCK_W,
                  BLOCK_C=fused_cascade.BLOCK_C, BLOCK_L=fused_cascade.BLOCK_L, BLOCK_N=block_n, DOT=io, IO=io,
                  SOFT_ROUND=False, PRECISION="ieee")
    names = kernel.arg_names
    signature = {n: pointer if n.endswith("_ptr") else "constexpr" if n in consts else "i32" for n in names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(n),): v for n, v in consts.items()})
    start = time.perf_counter()
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    seconds = time.perf_counter() - start
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        ptxas = Path(nvidia.__file__).parent / "bin" / "ptxas"
        report = subprocess.run([str(ptxas), "-v", "--gpu-name", f"sm_{arch}a" if arch >= 90 else f"sm_{arch}",
                                 ptx.name, "-o", "/dev/null"], capture_output=True, text=True, check=True)
    text = report.stdout + report.stderr
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    return {"registers": int(registers.group(1)) if registers else float("nan"),
            "spill_stores": int(spills.group(1)) if spills else 0,
            "shared_kib": compiled.metadata.shared / 1024, "compile_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100, H200)")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--kernels", default="3,5", help="k of 1xkx1 > 1x1xk (3: ASYM_3, 5: ASYM_5)")
    parser.add_argument("--channels", default="256,512")
    parser.add_argument("--warps", default=str(fused_cascade.NUM_WARPS))
    parser.add_argument("--block-n", default=str(fused_cascade.BLOCK_N))
    args = parser.parse_args()
    print(f"triton {triton.__version__}, sm_{args.arch}; BLOCK_W {fused_cascade.BLOCK_W}, BLOCK_C "
          f"{fused_cascade.BLOCK_C}, BLOCK_L {fused_cascade.BLOCK_L}")
    print("| dtype | k | channels | warps | BLOCK_N | registers | spill stores (bytes/thread) | shared KiB | "
          "compile s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dtype in args.dtypes.split(","):
        for k in map(int, args.kernels.split(",")):
            for channels in map(int, args.channels.split(",")):
                for warps in map(int, args.warps.split(",")):
                    for block_n in map(int, args.block_n.split(",")):
                        r = compile_kernel(dtype, k, channels, warps, block_n, args.arch)
                        print(f"| {dtype} | {k} | {channels} | {warps} | {block_n} | {r['registers']} | "
                              f"{r['spill_stores']:,} | {r['shared_kib']:.0f} | {r['compile_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
