"""Both step transports against a real data plane (a tiny model on CPU): the same results, plans in flight,
the transport choice, one session at a time, a rejected plan's reason; and the data plane's pipelined step
loop gives the results of the unpipelined one."""
from __future__ import annotations

import numpy as np
import pytest

from controlplane.link.dataplane_client import DataPlaneClient, DataPlaneFenced, DataPlaneUnavailable
from controlplane.link.transport import choose_transport
from dataplane.config import DataPlaneConfig
from dataplane.runner import ModelRunner
from dataplane.server import build_server
from dataplane.step_loop import END, run_steps
from proto import sampling_schema
from proto.nanoplane.v1 import dataplane_pb2
from proto.shm_channel import host_identity
from proto.step import RUN_SAMPLE, RUN_TOKENS_IN_PLAN, StepPlan
from tests.test_tensor_parallel import DATAPLANE_OPTIONS, generate, prompts
from tests.tiny_models import save_tiny_model

TRANSPORTS = ["grpc", "shm"]


class Recorder:
    """Runs plans on a ModelRunner and keeps each plan with its result, as a reference."""

    def __init__(self, runner):
        self.runner, self.steps = runner, []

    def __call__(self, plan):
        result = self.runner.execute(plan)
        self.steps.append((plan, result))
        return result


@pytest.fixture(scope="module")
def dataplane(tmp_path_factory):
    model = save_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3-transport"), vocab_size=512, seed=0)
    runner = ModelRunner(DataPlaneConfig(model=str(model), device="cpu", **DATAPLANE_OPTIONS))
    reference = Recorder(runner)
    tokens, _ = generate(reference, runner.facts(), prompts(5, 512, seed=2), max_tokens=10)
    runner.reset()
    server, port, _ = build_server(runner, "127.0.0.1", 0)
    server.start()
    yield runner, f"127.0.0.1:{port}", reference.steps, tokens
    server.stop(0)


def assert_same_result(got, want):
    assert got.step_id == want.step_id
    for name in ("slots", "token_ids", "logprobs", "prompt_logprobs"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_both_transports_give_the_reference_tokens_with_two_plans_in_flight(dataplane, transport):
    runner, target, steps, tokens = dataplane
    client = DataPlaneClient(target, transport=transport)
    try:
        info = client.describe(30)
        client.connect()
        assert client.transport_name == transport
        client.send(steps[0][0])
        for i in range(1, len(steps)):  # the plans are fixed, so each can go before the result it follows
            client.send(steps[i][0])
            assert_same_result(client.receive(), steps[i - 1][1])
        assert_same_result(client.receive(), steps[-1][1])
        with pytest.raises(RuntimeError, match="in flight"):
            client.send(steps[0][0]), client.send(steps[1][0]), client.send(steps[2][0])
        client.open_stream()  # a new session starts from an empty batch; the scheduler drives it through step()
        assert generate(client.step, info, prompts(5, 512, seed=2), max_tokens=10)[0] == tokens
    finally:
        client.close()


def test_auto_chooses_shared_memory_on_this_host_only():
    info = dataplane_pb2.DataPlaneInfo(host_id=host_identity(), shm_socket="/x.sock")
    assert choose_transport("auto", info, "t")[0] == "shm"
    assert choose_transport("grpc", info, "t")[0] == "grpc"
    elsewhere = dataplane_pb2.DataPlaneInfo(host_id="other-boot/other-host/ipc:1", shm_socket="/x.sock")
    name, why = choose_transport("auto", elsewhere, "t")
    assert name == "grpc" and "another host" in why
    with pytest.raises(DataPlaneUnavailable, match="--transport shm: .*another host"):
        choose_transport("shm", elsewhere, "t")


def test_forced_shm_without_it_on_offer_is_a_clear_error(dataplane):
    runner = dataplane[0]
    server, port, _ = build_server(runner, "127.0.0.1", 0, shm_socket="off")
    server.start()
    client = DataPlaneClient(f"127.0.0.1:{port}", transport="shm")
    try:
        client.describe(30)
        with pytest.raises(DataPlaneUnavailable, match="offers no shared-memory sessions.*--transport auto or grpc"):
            client.connect()
        auto = DataPlaneClient(f"127.0.0.1:{port}")
        auto.connect()
        assert auto.transport_name == "grpc" and "offers no shared-memory" in auto.transport_reason
        auto.close()
    finally:
        client.close()
        server.stop(0)


def test_a_newer_session_fences_the_older_over_either_transport(dataplane):
    """One control plane drives at a time: the newest (authenticated) one; the one it fenced is told so and stops
    (it never takes the data plane back, or two control planes would take it from each other in turn)."""
    runner, target, steps, _ = dataplane
    first, second, third = (DataPlaneClient(target, transport=t) for t in ("shm", "grpc", "shm"))
    try:
        first.connect()
        assert_same_result(first.step(steps[0][0]), steps[0][1])
        assert_same_result(second.step(steps[0][0]), steps[0][1])  # the same slot again: a clean batch
        with pytest.raises(DataPlaneFenced, match="fenced: a newer control plane opened step session"):
            first.step(steps[1][0])
        assert first.fenced
        with pytest.raises(DataPlaneFenced):
            first.connect()
        assert_same_result(third.step(steps[0][0]), steps[0][1])
        with pytest.raises(DataPlaneFenced, match="fenced"):
            second.step(steps[1][0])
        assert_same_result(third.step(steps[1][0]), steps[1][1])
    finally:
        for client in (first, second, third):
            client.close()


@pytest.mark.parametrize("transport, says", [("grpc", "INVALID_ARGUMENT"), ("shm", "ended the step session")])
def test_a_rejected_plan_ends_the_session_with_its_reason(dataplane, transport, says):
    runner, target, steps, _ = dataplane
    n = DATAPLANE_OPTIONS["max_num_batched_tokens"] + 1
    too_big = StepPlan(step_id=1, new_slots=np.array([0], np.int32), run_slots=np.array([0], np.int32),
                       run_num_tokens=np.array([n], np.int32),
                       run_flags=np.array([RUN_SAMPLE | RUN_TOKENS_IN_PLAN], np.uint8),
                       token_ids=np.zeros(n, np.int32), **{k: v for k, v in _one_new_sequence().items()})
    client = DataPlaneClient(target, transport=transport)
    try:
        with pytest.raises(DataPlaneUnavailable, match=f"{says}.*step plan 1 rejected.*max_num_batched_tokens"):
            client.step(too_big)
        assert_same_result(client.step(steps[0][0]), steps[0][1])  # a new session, on a reset batch
    finally:
        client.close()


def _one_new_sequence() -> dict:
    """The new-sequence columns of one sequence with every sampling option at its default."""
    columns = {c.field: np.array([c.pack(o.default)], c.dtype) for o in sampling_schema.DATAPLANE_OPTIONS
               for c in o.columns}
    return columns | {name: np.zeros(1, np.int32)
                      for name in ("new_num_cached_tokens", "new_num_prompt_tokens", "new_num_stop_ids")}


class LaunchingRunner:
    """A ModelRunner seen through the launch() contract (the step runs at launch), logging the loop's calls."""

    def __init__(self, runner):
        self.runner, self.calls = runner, []

    def launch(self, plan):
        self.calls.append(("launch", plan.step_id))
        result = self.runner.execute(plan)
        return _Pending(self, result)


class _Pending:
    def __init__(self, owner, result):
        self.owner, self._result = owner, result

    def result(self):
        self.owner.calls.append(("result", self._result.step_id))
        return self._result


class ListSource:
    def __init__(self, plans):
        self.plans = list(plans)

    def next_plan(self, block):
        return self.plans.pop(0) if self.plans else END


def test_the_pipelined_step_loop_gives_the_unpipelined_results(dataplane):
    shared, _, steps, _ = dataplane
    # a runner of its own: the server resets the shared one when an earlier test's session ends, at a time of its own
    runner = ModelRunner(shared.config)
    launching = LaunchingRunner(runner)
    try:
        results = list(run_steps(launching, ListSource(plan for plan, _ in steps)))
    finally:
        runner.reset()
    assert len(results) == len(steps)
    for got, (_, want) in zip(results, steps):
        assert_same_result(got, want)
    ids = [plan.step_id for plan, _ in steps]
    # step N+1 is launched before step N's result is waited for, never more than two in flight
    assert launching.calls[:3] == [("launch", ids[0]), ("launch", ids[1]), ("result", ids[0])]
    in_flight = 0
    for kind, _ in launching.calls:
        in_flight += 1 if kind == "launch" else -1
        assert 0 <= in_flight <= 2
    # the unpipelined loop (a runner without launch) runs one step at a time: same results
    runner.reset()
    try:
        plain = list(run_steps(runner, ListSource(plan for plan, _ in steps)))
    finally:
        runner.reset()
    for got, (_, want) in zip(plain, steps):
        assert_same_result(got, want)
