"""Observability of the control plane: the Prometheus endpoint after real requests (and behind bearer tokens),
and a health status that follows the data plane (NOT_SERVING when it is gone, SERVING again when it is back)."""
import re
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import SamplingParams
from controlplane.ops.metrics import Metrics, MetricsServer
from dataplane.server import build_server, set_serving
from tests.stack import InProcessStack, free_port, without_model_name

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$')
NAMES = ["nanoplane:num_requests_running", "nanoplane:num_requests_waiting", "nanoplane:kv_cache_usage_perc",
         "nanoplane:prefix_cache_queries_total", "nanoplane:prefix_cache_hits_total", "nanoplane:num_preemptions_total",
         "nanoplane:prompt_tokens_total", "nanoplane:generation_tokens_total", "nanoplane:request_success_total",
         "nanoplane:time_to_first_token_seconds", "nanoplane:time_per_output_token_seconds",
         "nanoplane:e2e_request_latency_seconds", "nanoplane:request_queue_time_seconds",
         "nanoplane:step_duration_seconds", "nanoplane:dataplane_connected"]


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    s = InProcessStack(str(tiny_model_dir("qwen3")), block_size=16, num_kv_blocks=64,
                       control_plane_options=dict(metrics_port=free_port(), dataplane_health_interval_s=1.0))
    yield s
    s.close()


def scrape(stack) -> tuple[str, dict[str, float]]:
    """The exposition text and its samples by `name{labels}` (the constant model_name label left out)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{stack.control_plane.metrics.port}/metrics", timeout=10).read()
    samples = {}
    for line in text.decode().splitlines():
        if line.startswith("#") or not line:
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        samples[without_model_name(name + (labels or ""))] = float(value)
    return text.decode(), samples


def health_status(stack) -> int:
    channel = grpc.insecure_channel(stack.target)
    with channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def wait_for_health(stack, status: int, timeout_s: float) -> float:
    started = time.monotonic()
    while health_status(stack) != status:
        assert time.monotonic() - started < timeout_s, f"health did not become {status} within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_metrics_after_a_few_requests(stack):
    _, before = scrape(stack)
    prompt = "The quick brown fox jumps over the lazy dog. " * 5  # > 2 blocks, so repeats hit the prefix cache
    prompt_ids = stack.client.tokenize(prompt)
    for _ in range(3):
        result = stack.client.generate(prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        assert result.finish_reason == "length"
    stack.wait_idle()
    text, after = scrape(stack)

    for name in NAMES:
        assert f"# TYPE {name} " in text, name
    assert 'model_name="' in text and 'dataplane="127.0.0.1:' in text
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta['nanoplane:request_success_total{finished_reason="length"}'] == 3
    assert delta["nanoplane:prompt_tokens_total"] == 3 * len(prompt_ids)
    assert delta["nanoplane:generation_tokens_total"] == 15
    assert delta["nanoplane:prefix_cache_queries_total"] == 3 * len(prompt_ids)
    assert delta["nanoplane:prefix_cache_hits_total"] >= 2 * 16 * 2  # the 2nd and 3rd found full blocks
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                      "time_per_output_token_seconds"):
        assert delta[f"nanoplane:{histogram}_count"] == 3, histogram
        assert delta[f'nanoplane:{histogram}_bucket{{le="+Inf"}}'] == 3
    assert delta["nanoplane:step_duration_seconds_count"] >= 5 * 3
    assert 0 < after["nanoplane:time_to_first_token_seconds_sum"] < after["nanoplane:e2e_request_latency_seconds_sum"]
    assert after["nanoplane:num_requests_running"] == 0 and after["nanoplane:num_requests_waiting"] == 0
    assert 0.0 <= after["nanoplane:kv_cache_usage_perc"] <= 1.0
    assert after["nanoplane:num_preemptions_total"] == 0 and after["nanoplane:dataplane_connected"] == 1
    buckets = [v for k, v in after.items() if k.startswith("nanoplane:e2e_request_latency_seconds_bucket")]
    assert buckets == sorted(buckets)  # cumulative


def test_running_requests_and_kv_usage_show_while_generating(stack):
    done = threading.Event()

    def generate():
        stack.client.generate("Once upon a time", SamplingParams(max_tokens=300, temperature=0, ignore_eos=True))
        done.set()

    threading.Thread(target=generate, daemon=True).start()
    seen = {}
    while not done.is_set():
        _, samples = scrape(stack)
        if samples["nanoplane:num_requests_running"] == 1:
            seen = samples
            break
        time.sleep(0.005)
    done.wait(60)
    assert seen, "the request finished before a scrape saw it run"
    assert seen["nanoplane:kv_cache_usage_perc"] > 0


def test_metrics_render_the_text_format():
    metrics = Metrics({"model_name": 'a "b"'})
    counter = metrics.counter("x_total", "Things.", ("kind",))
    counter.labels(kind="k").inc(2)
    histogram = metrics.histogram("h_seconds", "Times.", (0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(value)
    pending = [7]
    metrics.gauge("g", "Read at scrape time.", lambda: pending[0])
    metrics.counter_reader("r_total", "Kept elsewhere.", lambda: 5)
    pending[0] = 9
    text = metrics.render()
    assert 'x_total{kind="k",model_name="a \\"b\\""} 2.0' in text and "# TYPE x_total counter" in text
    assert 'h_seconds_bucket{le="0.1",model_name="a \\"b\\""} 2.0' in text  # le is inclusive
    assert 'h_seconds_bucket{le="1.0",model_name="a \\"b\\""} 3.0' in text
    assert 'h_seconds_bucket{le="+Inf",model_name="a \\"b\\""} 4.0' in text
    assert 'h_seconds_count{model_name="a \\"b\\""} 4.0' in text
    assert 'g{model_name="a \\"b\\""} 9.0' in text and 'r_total{model_name="a \\"b\\""} 5.0' in text
    assert "_created" not in text
    with pytest.raises(ValueError):
        counter.labels(kind="k").inc(-1)
    with pytest.raises(ValueError):  # one name, one metric
        metrics.counter("x_total", "Again.")


def get(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_metrics_endpoint_with_bearer_tokens():
    metrics = Metrics({"model_name": "m"})
    metrics.counter("nanoplane:x_total", "Things.").inc()
    server = MetricsServer(metrics, "127.0.0.1", 0, tokens=["scrape-token", "other"]).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert get(f"{base}/metrics")[0] == 401
        status, body = get(f"{base}/metrics", "wrong")
        assert status == 401 and "Bearer" in body
        for token in ("scrape-token", "other"):
            status, body = get(f"{base}/metrics", token)
            assert status == 200 and 'nanoplane:x_total{model_name="m"} 1.0' in body
        assert get(f"{base}/other", "scrape-token")[0] == 404
    finally:
        server.stop()
    open_server = MetricsServer(metrics, "127.0.0.1", 0).start()
    try:
        assert get(f"http://127.0.0.1:{open_server.port}/metrics")[0] == 200  # no tokens: open, as before
    finally:
        open_server.stop()


def test_health_follows_the_data_plane(stack):
    """Gone during a stream: NOT_SERVING at once and the stream pauses. Back on the same port: SERVING
    again, and the stream goes on to its end (its tokens recomputed from what the control plane held)."""
    assert health_status(stack) == health_pb2.HealthCheckResponse.SERVING
    params = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
    stream = stack.client.generate_stream("Once upon a time", params)
    deltas = [next(stream)]
    stack.dp_server.stop(0)  # the data plane goes away under the stream
    wait_for_health(stack, health_pb2.HealthCheckResponse.NOT_SERVING, timeout_s=0.5)  # well before a watcher probe
    _, samples = scrape(stack)
    assert samples["nanoplane:dataplane_connected"] == 0 and samples["nanoplane:dataplane_losses_total"] >= 1
    assert samples["nanoplane:request_failure_total"] == 0  # held, not failed

    stack.dp_server, _, dp_health = build_server(stack.runner, "127.0.0.1", stack.dp_port)
    stack.dp_server.start()
    set_serving(dp_health, True)
    wait_for_health(stack, health_pb2.HealthCheckResponse.SERVING, timeout_s=10)
    deltas += list(stream)
    assert deltas[-1].finish_reason == "length" and sum(len(d.token_ids) for d in deltas) == params.max_tokens
    assert scrape(stack)[1]["nanoplane:dataplane_reconnects_total"] >= 1
    result = stack.client.generate("Once upon a time", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert result.finish_reason == "length"


def test_idle_control_plane_notices_a_dead_data_plane(stack):
    """No request in flight: the health watcher, not the engine, finds the data plane gone."""
    stack.dp_server.stop(0)
    wait_for_health(stack, health_pb2.HealthCheckResponse.NOT_SERVING, timeout_s=5)
    stack.dp_server, _, dp_health = build_server(stack.runner, "127.0.0.1", stack.dp_port)
    stack.dp_server.start()
    set_serving(dp_health, True)
    wait_for_health(stack, health_pb2.HealthCheckResponse.SERVING, timeout_s=10)
    result = stack.client.generate("Once upon a time", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert result.finish_reason == "length"  # the step stream that died while idle was replaced
