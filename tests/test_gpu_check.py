"""The device check (bench/gpu_check.py) in its smoke mode: the same code the GPU runs, on the CPU at tiny sizes.

It runs in CI so that the script a rare GPU session depends on cannot rot: inputs are prepared from the real clips in
tests/data, every section runs, and each section's own checks (TV-L1 against OpenCV, falling losses, device and CPU
predictions, DDP against a plain step) must pass.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("tvl1", "extract", "train", "steps", "stages", "fused", "loader", "evaluate", "ddp", "predict")


def test_smoke_run_passes_every_section(tmp_path: Path) -> None:
    script = REPO / "bench" / "gpu_check.py"
    prepared = subprocess.run([sys.executable, script, "--smoke", "--prepare", tmp_path / "inputs"],
                              capture_output=True, text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stdout[-2000:] + prepared.stderr[-2000:]
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, script, "--smoke", "--device", "cpu", "--inputs", tmp_path / "inputs",
                          "--out", out], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    verdicts = json.loads((out / "gpu_check.json").read_text())
    assert list(verdicts) == list(SECTIONS)
    assert all(status == "ok" for status in verdicts.values()), verdicts  # nothing failed, nothing cut by a limit
    report = (out / "gpu_check.md").read_text()
    for name in SECTIONS:
        assert f"## {name}: ok" in report
    # one measured row per network timed, and the TV-L1 agreement at both frame sizes
    assert report.count("| c3d-b8 |") == 1 and "| 171x128 | 2 |" in report and "| 340x256 | 1 |" in report


def test_prepare_refuses_a_missing_input_directory(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, REPO / "bench" / "gpu_check.py", "--smoke", "--inputs", tmp_path / "none"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "no prepared inputs" in run.stderr and "Traceback" not in run.stderr
