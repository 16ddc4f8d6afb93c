"""The GPU benchmark's script runs end to end on the CPU (``--dry-run``: a tiny UNet, fp32), so a
GPU session only has to run it. Speed figures are never asserted here (docs/performance.md)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_gpu_benchmark_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--dry-run", "--steps", "1",
                             "--variants", "plain", "xformers", "compile", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["variant"]: r for r in report["variants"]}
    plain = rows["plain"]
    assert plain["status"] == "ok" and plain["step_s"] > 0 and plain["tflop_per_step"] > 0
    # MFU is the achieved FLOP rate over the matmul rate measured in the same run
    assert abs(plain["mfu"] - plain["achieved_tflops"] / report["matmul_tflops_measured"]) < 1e-9
    assert abs(plain["pairs_per_s"] * plain["step_s"] - report["pairs"]) < 1e-9
    assert rows["xformers"]["status"].startswith("unavailable") and rows["compile"]["status"].startswith("skipped")
    assert report["machine"]["cpu_cores"] >= 1
