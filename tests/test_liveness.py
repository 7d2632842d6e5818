"""A frozen data plane (SIGSTOP) is declared lost within --dataplane-liveness-timeout-s on either transport, then
the requests it held finish with the tokens of an undisturbed run once it is back (SIGCONT).

Without the liveness watch a stopped data plane was noticed after ~61 s over gRPC and never over shared
memory (issue 15): its sockets stay open. Here the timeout is short (1.5 s) to keep the test quick.
"""
import os
import signal
import threading
import time

import pytest

from client import SamplingParams
from controlplane.link.liveness import PROBE_FRACTION
from tests.stack import TRANSPORTS, DataPlaneProcess, InProcessControlPlane

LIVENESS_TIMEOUT_S = 1.5
NUM_STREAMS = 4
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
PROMPTS = [f"Stream {i} of the liveness test: once upon a time" for i in range(NUM_STREAMS)]


@pytest.fixture(scope="module")
def dataplane(tiny_model_dir, tmp_path_factory):
    dp = DataPlaneProcess(str(tiny_model_dir("qwen3")), tmp_path_factory.mktemp("liveness") / "dataplane.log",
                          "--num-kv-blocks", "64", "--block-size", "16", "--num-threads", "1")
    yield dp
    dp.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_stopped_data_plane_is_lost_in_time_then_recovered(dataplane, tiny_model_dir, transport):
    stack = InProcessControlPlane(dataplane.target, str(tiny_model_dir("qwen3")),
                                  dict(dataplane_liveness_timeout_s=LIVENESS_TIMEOUT_S), transport=transport)
    try:
        want = [stack.client.generate(p, GREEDY).token_ids for p in PROMPTS]
        got, errors, first_tokens = {}, [], threading.Semaphore(0)

        def stream(i):
            try:
                tokens = []
                for delta in stack.client.generate_stream(PROMPTS[i], GREEDY, timeout_s=120):
                    if delta.token_ids and not tokens:
                        first_tokens.release()
                    tokens += delta.token_ids
                got[i] = tokens
            except Exception as e:  # the test fails on it below
                errors.append(e)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(NUM_STREAMS)]
        for t in threads:
            t.start()
        for _ in range(NUM_STREAMS):
            assert first_tokens.acquire(timeout=60)
        os.kill(dataplane.proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            while stack.engine.dataplane_connected and time.monotonic() - stopped < 30:
                time.sleep(0.01)
            lost_after_s = time.monotonic() - stopped
        finally:
            time.sleep(0.5)  # a reconnect attempt or two against the stopped process
            os.kill(dataplane.proc.pid, signal.SIGCONT)
        print(f"\n{transport}: data plane lost {lost_after_s:.2f} s after SIGSTOP "
              f"(--dataplane-liveness-timeout-s {LIVENESS_TIMEOUT_S})")
        assert not stack.engine.dataplane_connected or stack.engine.reconnector.num_reconnects
        # the bound the docs state: the timeout plus two probe intervals, and a margin for a shared CPU
        assert lost_after_s < LIVENESS_TIMEOUT_S * (1 + 2 * PROBE_FRACTION) + 1.0
        assert stack.engine.dataplane.liveness.num_declared_lost == 1
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert [got[i] for i in range(NUM_STREAMS)] == want
        assert stack.engine.reconnector.num_reconnects >= 1
    finally:
        stack.close()
