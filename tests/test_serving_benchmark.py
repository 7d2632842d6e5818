"""benchmarks/serving.py at a low request rate against a tiny model: gRPC and HTTP backends, the reported
fields, and a two-rate sweep writing its CSV (timings are not asserted: this is a 2-core CPU)."""
import asyncio
import csv
import json
import math

import pytest

from benchmarks import serving
from tests.stack import InProcessStack

FIELDS = ["request_rate", "completed", "request_throughput", "output_tok_s", "ttft_mean_ms", "ttft_p50_ms",
          "ttft_p90_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p90_ms", "tpot_p99_ms", "e2e_p50_ms", "e2e_p99_ms"]
SMALL = ["--num-prompts", "8", "--input-len", "16:64", "--output-len", "4:12"]


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    s = InProcessStack(str(tiny_model_dir("qwen3")), block_size=16, num_kv_blocks=128)
    yield s
    s.close()


def check(summary: dict) -> None:
    for field in FIELDS:
        assert field in summary, field
    assert summary["completed"] == 8 and summary["failed"] == 0
    assert summary["output_tok_s"] > 0 and summary["request_throughput"] > 0
    assert 0 < summary["ttft_p50_ms"] <= summary["ttft_p99_ms"] <= summary["e2e_p99_ms"]
    assert not math.isnan(summary["tpot_p50_ms"])


def test_grpc_at_a_low_rate(stack, tmp_path, capsys):
    [summary] = serving.main(["--target", stack.target, *SMALL, "--request-rate", "4",
                              "--json-out", str(tmp_path / "out.json")])
    check(summary)
    assert json.loads((tmp_path / "out.json").read_text()) == [summary]
    assert "TTFT" in capsys.readouterr().out


def test_http_backend_through_the_gateway(stack):
    from gateway.config import GatewayConfig
    from gateway.http_gateway import start_http_gateway

    gateway = asyncio.run_coroutine_threadsafe(start_http_gateway(GatewayConfig(stack.target, http_port=0)),
                                               stack.loop).result(30)
    try:
        [summary] = serving.main(["--target", stack.target, "--backend", "http", "--http-url",
                                  f"http://127.0.0.1:{gateway.port}/v1", *SMALL, "--request-rate", "4"])
    finally:
        asyncio.run_coroutine_threadsafe(gateway.stop(), stack.loop).result(30)
    check(summary)


def test_sweep_writes_a_row_per_rate(stack, tmp_path, capsys):
    csv_path = tmp_path / "sweep.csv"
    summaries = serving.main(["--target", stack.target, *SMALL, "--sweep", "2,8", "--csv-out", str(csv_path)])
    assert [s["request_rate"] for s in summaries] == [2.0, 8.0]
    for s in summaries:
        check(s)
    rows = list(csv.DictReader(csv_path.open()))
    assert [float(r["request_rate"]) for r in rows] == [2.0, 8.0] and set(FIELDS) <= set(rows[0])
    out = capsys.readouterr().out
    assert csv_path.with_suffix(".png").exists() or "needs matplotlib" in out


def test_the_workload_is_fixed_by_the_seed():
    a = serving.workload(5, (10, 20), (3, 9), 49152, 0.6, seed=0)
    assert a == serving.workload(5, (10, 20), (3, 9), 49152, 0.6, seed=0)
    assert a != serving.workload(5, (10, 20), (3, 9), 49152, 0.6, seed=1)
    assert all(10 <= len(r.prompt_token_ids) <= 20 and 3 <= r.max_tokens <= 9 for r in a)
    assert serving.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
