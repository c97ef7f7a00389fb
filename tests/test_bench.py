"""Every bench/ script runs here at a tiny size, so none can rot (issue 14: bench/eval_views.py once crashed as
committed while BENCHMARKS.md told readers to run it).

Each script runs as a reader runs it, a subprocess from the repository root, on data every clone has (without
../shared/data the scripts fall back to the real clips in tests/data). A run must exit 0 and print its table: the header
and the rows it promises, with numbers in them. Timings are never asserted (they depend on the machine), only that
the timed figures are real positive numbers and that the figures that do not depend on time are right.
(bench/gpu_check.py has its own test, tests/test_gpu_check.py; bench/train_shards.py and bench/sample_videos.py are
helper modules the scripts import.)
"""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str) -> str:
    """The stdout of ``python bench/<script> <args>`` run from the repository root; its output if it fails."""
    run = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def row(out: str, prefix: str) -> list[str]:
    """The cells of the first printed line starting with ``prefix``: a markdown row split at its bars, or a
    fixed-width row (bench/step_time.py) split at white space."""
    line = next((line for line in out.splitlines() if line.startswith(prefix)), None)
    assert line is not None, f"no row {prefix!r} in:\n{out}"
    return [cell.strip() for cell in line.strip("|").split("|")] if line.startswith("|") else line.split()


def number(cell: str) -> float:
    """The first number in a cell ('1,234', '0.82x', '10.03 / 14.42' -> 10.03), which must be finite."""
    match = re.search(r"-?\d[\d,]*(?:\.\d+)?", cell)
    assert match, f"no number in {cell!r}"
    value = float(match.group().replace(",", ""))
    assert math.isfinite(value)
    return value


def test_eval_views() -> None:
    out = run_bench("eval_views.py", "--models", "c3d-b5", "--batch", "2", "--repeats", "1", "--clips", "1",
                    "--crop", "32", "--frames", "40")
    assert "| host reading | frames decoded | views/s | views per CPU-s | CPU ms per view |" in out
    before, after = row(out, "| one read per clip"), row(out, "| one read per video, clips cut")
    # two sample videos of >= 40 frames: 25 clips x 16 frames each before, their 40 distinct frames each after
    assert number(before[1]) == 2 * 25 * 16 and number(after[1]) == 2 * 40
    assert number(before[4]) > 0 and number(after[4]) > 0 and number(row(out, "| host CPU per view on a GPU")[4]) > 0
    assert "| network | device | batch | network views/s | end-to-end views/s |" in out
    cells = row(out, "| c3d-b5 | cpu | 2 |")
    assert number(cells[3]) > 0 and number(cells[4]) > 0  # network alone, end to end


def test_extract_overhead() -> None:
    out = run_bench("extract_overhead.py", "--backend", "dis", "--videos", "2", "--frames", "3", "--jobs", "1")
    assert "| run | frames/s | vs bare loop |" in out
    assert number(row(out, "| bare decode + flow loop |")[2]) == 1.0
    assert number(row(out, "| extract-flow --jobs 1 |")[1]) > 0


def test_flow_backends() -> None:
    out = run_bench("flow_backends.py", "--size", "43x32", "--frames", "4", "--tvl1-pairs", "2", "--torch-pairs",
                    "1", "--fast-pairs", "3")
    assert "| backend | pairs | pairs/s | vs cpu TV-L1 | mean EPE vs cpu TV-L1 (px) |" in out
    reference = row(out, "| cpu (tvl1, cpu) |")
    assert reference[3:] == ["1.00x", "0.000"] and number(reference[2]) > 0
    for backend, pairs in (("torch (tvl1, cpu)", 1), ("dis (dis, cpu)", 3), ("farneback (farneback, cpu)", 3)):
        cells = row(out, f"| {backend} |")
        assert number(cells[1]) == pairs and number(cells[2]) > 0 and number(cells[4]) >= 0
    assert "skipped" in row(out, "| cuda |")[1]  # no CUDA OpenCV here: listed with the reason, not a crash


def test_flow_storage() -> None:
    # 16 pairs: the reads are random 16-frame windows; DIS instead of TV-L1 keeps the flow cheap
    out = run_bench("flow_storage.py", "--backend", "dis", "--pairs", "16", "--copies", "1", "--windows", "2")
    assert "| option | bytes/frame | vs float32 | write frames/s | 16-frame windows/s | max error px |" in out
    raw = row(out, "| float32 raw |")
    assert number(raw[2]) == 1.0 and number(raw[5]) == 0.0 and number(raw[3]) > 0 and number(raw[4]) > 0
    packed = row(out, "| int16 x100 gzip |")
    assert number(packed[2]) < 0.5 and 0 < number(packed[5]) <= 0.005  # int16 x100 rounds to 0.005 px


def test_flow_torch_vs_opencv() -> None:
    # the eager solver only: compiling the other one takes about a minute on a CPU
    out = run_bench("flow_torch_vs_opencv.py", "--sizes", "43x32", "--pairs", "1", "--solvers", "eager")
    assert "| video | size | pairs | solver | OpenCV CPU pairs/s | torch pairs/s |" in out
    for video in ("v_PushUps_g02_c03.avi", "v_Basketball_g01_c02.mp4"):
        cells = row(out, f"| {video} | 43x32 | 1 | eager |")
        assert number(cells[4]) > 0 and number(cells[5]) > 0 and number(cells[9]) >= 0


def test_loader_vs_trainer() -> None:
    out = run_bench("loader_vs_trainer.py", "--videos", "2", "--frames", "16", "--workers", "0,1", "--batches", "1",
                    "--steps", "1", "--models", "c3d-b5", "--trainer-clip", "16x16x16")
    assert "| loader workers | loader clips/s | x c3d-b5 demand |" in out
    for workers in ("0", "1"):
        cells = row(out, f"| {workers} |")
        assert number(cells[1]) > 0 and number(cells[2]) > 0
    assert number(row(out, "| c3d-b5 |")[1]) > 0


def test_step_time() -> None:
    out = run_bench("step_time.py", "--batch", "1", "--clip", "16x16x16", "--iters", "1", "--warmup", "0",
                    "--variants", "b5-asyConv345", "--stages", "--kernels", "2", "--sgd")
    assert re.search(r"^network +GMACs +MAC ratio +step ms +time ratio +CPU-time ratio$", out, re.MULTILINE)
    baseline, variant = row(out, "c3d-b5 "), row(out, "b5-asyConv345 ")
    assert number(baseline[2]) == 1.0 and number(baseline[4]) == 1.0 and number(baseline[3]) > 0
    assert number(variant[2]) < 1.0 and number(variant[4]) > 0  # the cascades cost fewer MACs
    assert "per stage (forward+backward, conv block + pool, CPU time): c3d-b5 vs b5-asyConv345" in out
    conv3 = row(out, "conv3 ")
    assert number(conv3[4]) < 1.0 and number(conv3[5]) > 0  # share, GMACs base, variant, MAC ratio, time ratio
    assert number(conv3[6]) > 0 and number(conv3[7]) > 0 and "n/a (no peak figures)" in " ".join(conv3)  # ms; CPU
    kernels = row(out, "  conv3 b5-asyConv345:")  # the profiler's top operators of the cascade stage, timed
    assert re.search(r"aten::\S+ x3 \d+ us", " ".join(kernels))  # three convolutions where c3d-b5 has one
    assert re.search(r"^network +params M +foreach ms +fused ms +time ratio +CPU-time ratio$", out, re.MULTILINE)
    sgd = [line.split() for line in out.splitlines() if line.startswith("b5-asyConv345 ")][-1]
    assert len(sgd) == 6 and all(number(cell) > 0 for cell in sgd[1:])


def test_storage() -> None:
    out = run_bench("storage.py", "--frames", "17", "--seconds", "0.02")
    assert "| modality | storage | bytes/frame | ratio to raw | mean abs error (0..255) |" in out
    for modality in ("rgb", "flow", "rgbf"):
        raw, jpeg = row(out, f"| {modality} | raw |"), row(out, f"| {modality} | jpeg q90 4:2:0 |")
        assert number(raw[3]) >= 1.0 and number(raw[4]) == 0.0 and number(raw[5]) > 0  # lossless, plus HDF5 overhead
        assert number(jpeg[3]) < 0.5 and number(jpeg[4]) > 0 and number(jpeg[6]) > 0


def test_checkpoint_verify() -> None:
    out = run_bench("checkpoint_verify.py", "--clip", "16x16x16", "--classes", "2", "--repeats", "1")
    assert "| step | bare torch CPU s | verified CPU s | verified / bare |" in out
    for step in ("save", "load"):
        assert all(number(cell) > 0 for cell in row(out, f"| {step} |")[1:])


def test_predict_time() -> None:
    out = run_bench("predict_time.py", "--frames", "6", "--size", "32x43", "--clips", "1", "--crop", "16")
    assert "| video | frames | decode | TV-L1 flow (cpu) | flow store + RGBF + JPEG | predict RGB |" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| video")]
    assert len(rows) >= 2
    for line in rows:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert number(cells[1]) == 6 and all(number(cell) >= 0 for cell in cells[2:])
        assert number(cells[5]) > 0 and number(cells[7]) > 0  # predict RGB, fused: real seconds
