"""The benchmark scripts run end to end on tiny shapes (speed is measured by the scripts, never asserted here)."""
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


def test_angle_bench_script(tmp_path):
    import run_angle_bench

    out = tmp_path / "angle.json"
    assert run_angle_bench.main(["--cases", "2x64x32", "--min-time", "0", "--max-reps", "3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} >= {"released", "torch_vectorised", "torch_compile"}
    assert all(r["status"] == "ok" and r["seconds"] > 0 for r in rows)


def test_kernels_bench_script(tmp_path):
    import run_kernels_bench

    out = tmp_path / "kernels.json"
    assert run_kernels_bench.main(["--smoke", "--out", str(out)]) == 0
    kernels = {r["kernel"] for r in json.loads(out.read_text())["rows"]}
    assert kernels == {"rmsnorm", "angle_stats", "pairwise"}
