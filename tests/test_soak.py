"""Soak: 2,000 requests, 200 at a time, against a CPU data plane in its own process; nothing lost, nothing leaked.

The control plane runs in this process (so the test reads its BlockManager, its admission
counts and its Python heap); the clients run in a third process (tests/soak_clients.py),
two runs of 1,000 requests each: a mix of completions (greedy, seeded, n = 2), client
cancellations and client deadlines. Every request must end as its kind says, the
server's own counts must agree, every KV block must come back, and the control plane's
heap must not grow from the end of the first thousand to the end of the second.
"""
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc

import pytest

from tests.soak_clients import EXPECTED, expected_outcomes, kind_of, num_samples
from tests.stack import ROOT, DataPlaneProcess, InProcessControlPlane

NUM_REQUESTS = 2000
CONCURRENCY = 200
DATAPLANE_ARGS = ("--num-kv-blocks", "384", "--block-size", "16", "--max-num-seqs", "256", "--num-threads", "1")
# Python heap (tracemalloc) allocated during the second thousand and still alive after it. A leak
# of half a KiB per request (a finished Sequence alone, with its token list, is more) passes
# 512 KiB per thousand. What may legitimately stay is bounded caches refilled after tracing
# starts (the prefix cache's block token tuples and hash map, the tokenizer's caches, a log
# timestamp cache): about 200 KiB observed, and a third thousand adds only about 20 KiB more.
# RSS is printed but not asserted: allocator arenas and gRPC's C buffers make it drift by MiBs.
MAX_HEAP_GROWTH_BYTES = 512 * 2**10

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    model = str(tiny_model_dir("qwen3"))
    dataplane = DataPlaneProcess(model, tmp_path_factory.mktemp("soak") / "dataplane.log", *DATAPLANE_ARGS)
    try:
        cp = InProcessControlPlane(dataplane.target, model)
        yield cp
        cp.close()
    finally:
        dataplane.close()


def run_clients(target: str, start: int, count: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "tests.soak_clients", "--target", target, "--start", str(start),
                           "--count", str(count), "--concurrency", str(CONCURRENCY)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def settle(stack) -> None:
    stack.wait_idle(30)
    deadline = time.monotonic() + 10  # the servicers' finally blocks (admission release) run on the API loop
    while stack.metric("nanoplane:pending_tokens") and time.monotonic() < deadline:
        time.sleep(0.02)
    gc.collect()


def finished_samples(stack) -> dict[str, float]:
    """The server's count of samples that finished "length" and of requests aborted, so far."""
    counts = {}
    for reason in ("length", "abort"):
        try:
            counts[reason] = stack.metric(f'nanoplane:request_success_total{{finished_reason="{reason}"}}')
        except KeyError:  # nothing finished that way yet
            counts[reason] = 0.0
    return counts


def rss_mib() -> float:
    """This process's resident set (control plane, test harness and all), for the report only."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def heap_bytes() -> int:
    return tracemalloc.get_traced_memory()[0]


def test_2000_requests_all_accounted_for_no_block_leaked_no_growth(stack):
    start_free = stack.num_free_blocks()
    server_before = finished_samples(stack)
    started_s = time.monotonic()
    first = run_clients(stack.target, 0, NUM_REQUESTS // 2)
    settle(stack)
    tracemalloc.start()  # from here on every allocation that stays alive counts as growth
    try:
        gc.collect()
        at_first = heap_bytes()
        second = run_clients(stack.target, NUM_REQUESTS // 2, NUM_REQUESTS // 2)
        settle(stack)
        growth = heap_bytes() - at_first
        top = tracemalloc.take_snapshot().statistics("lineno")[:5]
    finally:
        tracemalloc.stop()
    elapsed_s = time.monotonic() - started_s

    server = {reason: n - server_before[reason] for reason, n in finished_samples(stack).items()}
    outcomes = {k: first["outcomes"].get(k, 0) + second["outcomes"].get(k, 0)
                for k in {*first["outcomes"], *second["outcomes"]}}
    largest = "; ".join(f"{s.traceback[0].filename.rsplit('/', 1)[-1]}:{s.traceback[0].lineno} {s.size} B"
                        for s in top)
    print(f"\nsoak: {NUM_REQUESTS} requests, {CONCURRENCY} concurrent, {elapsed_s:.1f} s: {outcomes}, "
          f"mismatches {first['num_mismatches'] + second['num_mismatches']}; server: samples finished {server}; "
          f"free blocks {start_free} -> {stack.num_free_blocks()}; preemptions {stack.scheduler.num_preemptions}; "
          f"heap growth over the second thousand {growth / 1024:.1f} KiB (largest: {largest}); "
          f"RSS {rss_mib():.0f} MiB")
    assert first["mismatches"] == {} and second["mismatches"] == {}
    assert sum(outcomes.values()) == NUM_REQUESTS
    assert outcomes == dict(expected_outcomes(0, NUM_REQUESTS))
    # the server's view agrees: each sample that completed finished "length" there; each request cut off
    # after the server took it in was aborted there (one cancelled before it arrived never was)
    assert server["length"] == sum(num_samples(i) for i in range(NUM_REQUESTS)
                                   if EXPECTED[kind_of(i)] == "completed")
    assert server["abort"] <= outcomes["cancelled"] + outcomes["deadline_exceeded"]
    assert stack.num_free_blocks() == start_free
    stack.scheduler.check_invariants()
    assert not stack.engine._requests
    assert stack.metric("nanoplane:pending_tokens") == 0  # admission released every request it let in
    assert growth < MAX_HEAP_GROWTH_BYTES
