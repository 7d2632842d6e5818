"""benchmarks/hop.py runs end to end (a real null data plane process, both transports) and reports every row."""
import json
import subprocess
import sys

from tests.stack import ROOT


def test_hop_benchmark_reports_both_transports(tmp_path):
    out = tmp_path / "hop.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hop.py"), "--iters", "20", "--json-out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())
    assert [(r["transport"], r["num_seqs"]) for r in rows] == [
        (t, n) for t in ("shm", "grpc") for n in (1, 64, 256, 1024)]
    for r in rows:
        assert 0 < r["median_us"] <= r["p99_us"] and r["bytes_per_step"] > 8 * r["num_seqs"]
    assert "median µs" in run.stdout
