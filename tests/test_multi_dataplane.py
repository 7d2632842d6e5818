"""One control plane, three data planes (real processes, tiny model): failover, rejoin, drain, join, placement.

The headline: 60 greedy streams over three data planes, one killed with SIGKILL part-way;
all 60 finish with the tokens of an undisturbed single-plane run (the control plane held
every token and re-prefilled them on the survivors), and the survivors leak no KV block.
"""
import threading
import time

import grpc
import pytest

from client import Client, SamplingParams
from nanoplane.admin_cli import main as admin_main
from proto.nanoplane.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc
from tests.stack import DataPlaneProcess, InProcessControlPlane

NUM_STREAMS = 60
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
PROMPTS = [f"Stream {i} of the failover test: once upon a time" for i in range(NUM_STREAMS)]
DATAPLANE_ARGS = ("--num-kv-blocks", "192", "--block-size", "16", "--max-num-seqs", "32", "--num-threads", "1")
ADMIN_TOKEN = "admin-secret-of-the-test"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def planes(tiny_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("multidp")
    model = str(tiny_model_dir("qwen3"))
    made: list[DataPlaneProcess] = [None] * 3

    def start(i):
        made[i] = DataPlaneProcess(model, logs / f"dataplane{i}.log", *DATAPLANE_ARGS)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    yield made
    for dp in made:
        if dp is not None:
            dp.close()


@pytest.fixture(scope="module")
def admin_token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("admin") / "admin-tokens"
    path.write_text(f"# admin tokens\n{ADMIN_TOKEN}\n")
    return str(path)


@pytest.fixture(scope="module")
def reference(planes, tiny_model_dir):
    """The undisturbed run: one control plane, one data plane (closed before the three-plane stack connects)."""
    single = InProcessControlPlane(planes[0].target, str(tiny_model_dir("qwen3")))
    try:
        streams = Streams(single.client, PROMPTS)
        streams.join()
    finally:
        single.close()
    assert not streams.errors and all(len(t) == GREEDY.max_tokens for t in streams.tokens.values())
    return streams.tokens


@pytest.fixture(scope="module")
def stack(planes, reference, tiny_model_dir, admin_token_file):
    s = InProcessControlPlane(",".join(dp.target for dp in planes), str(tiny_model_dir("qwen3")),
                              dict(dataplane_health_interval_s=0.5, admin_token_file=admin_token_file,
                                   dataplane_discovery_interval_s=0.5))
    yield s
    s.close()


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def wait_idle(router) -> None:
    wait_until(lambda: all(not e.scheduler.has_unfinished() and e._inbox.empty() and not e.scheduler.in_flight
                           for e in router.engines), 30, "the engines did not become idle")


class Streams:
    """Concurrent greedy streams on threads; counts tokens as they arrive."""

    def __init__(self, client: Client, prompts: list[str], params: SamplingParams = GREEDY, rate_s: float = 0.0):
        self.tokens = {i: [] for i in range(len(prompts))}
        self.finish, self.errors = {}, {}
        self.num_tokens = 0
        self._lock = threading.Lock()
        self._threads = []
        for i, prompt in enumerate(prompts):
            self._threads.append(threading.Thread(target=self._run, args=(client, i, prompt, params), daemon=True))
            self._threads[-1].start()
            time.sleep(rate_s)

    def _run(self, client: Client, i: int, prompt: str, params: SamplingParams) -> None:
        try:
            for delta in client.generate_stream(prompt, params, timeout_s=120):
                with self._lock:
                    self.tokens[i] += delta.token_ids
                    self.num_tokens += len(delta.token_ids)
                if delta.finish_reason:
                    self.finish[i] = delta.finish_reason
        except Exception as e:  # recorded, and the test fails on it
            self.errors[i] = e

    def join(self) -> None:
        for t in self._threads:
            t.join(180)


def admin(stack, token: str = ADMIN_TOKEN):
    channel = grpc.insecure_channel(stack.target)
    return channel, admin_pb2_grpc.AdminStub(channel), (("authorization", f"Bearer {token}"),)


def states(stack) -> dict[str, str]:
    channel, stub, md = admin(stack)
    with channel:
        return {d.address: d.state for d in stub.ListDataPlanes(admin_pb2.ListDataPlanesRequest(), metadata=md).dataplanes}


def test_sigkill_of_one_of_three_data_planes_loses_nothing(stack, planes, reference):
    router = stack.control_plane.router
    assert len(router.engines) == 3
    streams = Streams(stack.client, PROMPTS)
    wait_until(lambda: streams.num_tokens >= NUM_STREAMS * GREEDY.max_tokens // 4, 60, "the streams did not start")
    victim = planes[2]
    victim_engine = router.member(victim.target).engine
    victim.kill()
    killed_at = streams.num_tokens
    streams.join()
    print(f"\nfailover: {NUM_STREAMS} streams on 3 data planes, SIGKILL of one after {killed_at} of "
          f"{NUM_STREAMS * GREEDY.max_tokens} tokens; moved {router.num_moved_requests} requests; errors "
          f"{len(streams.errors)}, mismatches {sum(streams.tokens[i] != reference[i] for i in streams.tokens)}")

    assert killed_at < NUM_STREAMS * GREEDY.max_tokens, "every stream had finished before the kill"
    assert streams.errors == {}
    assert streams.finish == {i: "length" for i in range(NUM_STREAMS)}
    assert streams.tokens == reference  # greedy: re-prefilled elsewhere, the same tokens
    assert router.num_moved_requests > 0
    wait_idle(router)
    for engine in router.engines:
        if engine is not victim_engine:  # the survivors: every block back, books consistent
            assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks
            engine.scheduler.check_invariants()
    assert states(stack)[victim.target] == "down"

    victim.start()  # the same address comes back: it rejoins and takes work again
    wait_until(lambda: states(stack)[victim.target] == "serving", 30, "the restarted data plane did not rejoin")
    before = victim_engine.num_steps
    more = Streams(stack.client, [f"After the rejoin, stream {i}" for i in range(9)])
    more.join()
    assert more.errors == {} and len(more.finish) == 9
    assert victim_engine.num_steps > before, "the rejoined data plane got no work"


def test_drain_under_load_fails_nothing_and_a_new_plane_joins(stack, planes, tiny_model_dir, tmp_path,
                                                               admin_token_file, capsys):
    router = stack.control_plane.router
    wait_until(lambda: all(s == "serving" for s in states(stack).values()), 30, "not every data plane serves")
    channel, stub, md = admin(stack)
    with channel:
        with pytest.raises(grpc.RpcError) as refused:  # a public (here: no) token does not open the Admin API
            stub.ListDataPlanes(admin_pb2.ListDataPlanesRequest(), metadata=(("authorization", "Bearer nope"),))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as unknown:
            stub.DrainDataPlane(admin_pb2.DrainDataPlaneRequest(address="10.9.9.9:1"), metadata=md)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and planes[0].target in unknown.value.details()

        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        load = Streams(stack.client, [f"Drain load {i}" for i in range(200)], params, rate_s=0.01)
        wait_until(lambda: load.num_tokens > 100, 60, "the load did not start")
        drained = planes[1].target
        reply = stub.DrainDataPlane(admin_pb2.DrainDataPlaneRequest(address=drained, move=True), metadata=md)
        assert reply.state in ("draining", "drained")
        wait_until(lambda: states(stack)[drained] == "drained", 30, "the drained plane did not become idle")
        steps_after_drain = router.member(drained).engine.num_steps
        load.join()
        assert load.errors == {} and len(load.finish) == 200
        assert router.member(drained).engine.num_steps == steps_after_drain, "work was placed on a drained plane"

        newcomer = DataPlaneProcess(str(tiny_model_dir("qwen3")), tmp_path / "newcomer.log", *DATAPLANE_ARGS)
        try:
            joined = stub.JoinDataPlane(admin_pb2.JoinDataPlaneRequest(address=newcomer.target), metadata=md)
            assert joined.state == "serving"
            more = Streams(stack.client, [f"After the join {i}" for i in range(12)], params)
            more.join()
            assert more.errors == {}
            assert router.member(newcomer.target).engine.num_steps > 0, "the new plane got no work"
            cli = ["--target", stack.target, "--admin-token-file", admin_token_file]
            capsys.readouterr()
            assert admin_main([*cli, "list"]) == 0
            listed = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
            assert listed[drained] == "drained" and listed[newcomer.target] == "serving"
            assert admin_main([*cli, "undrain", drained]) == 0
            assert admin_main(["--target", stack.target, "list"]) == 1  # no token: refused
            assert "UNAUTHENTICATED" in capsys.readouterr().err
            with grpc.insecure_channel(stack.target) as public:
                info = generation_pb2_grpc.GenerationStub(public).GetModelInfo(generation_pb2.GetModelInfoRequest())
            assert {d.address: d.state for d in info.dataplanes}[drained] == "serving"
            assert len(info.dataplanes) == 4
            stub.DrainDataPlane(admin_pb2.DrainDataPlaneRequest(address=newcomer.target, move=True), metadata=md)
            wait_until(lambda: states(stack)[newcomer.target] == "drained", 30, "the newcomer did not drain")
        finally:
            newcomer.close()


def test_a_request_lands_where_its_prefix_is_cached(stack):
    router = stack.control_plane.router
    wait_until(lambda: sum(s == "serving" for s in states(stack).values()) >= 3, 30, "planes not serving")
    shared = "A long shared system prompt that many requests begin with, " * 4
    first = stack.client.generate(shared + "first question", SamplingParams(max_tokens=2, temperature=0))
    before = router.num_prefix_placements
    second = stack.client.generate(shared + "second question", SamplingParams(max_tokens=2, temperature=0))
    assert router.num_prefix_placements == before + 1
    # only the plane that ran the first holds this prefix: a hit proves the second went there
    assert second.usage.cached_prompt_tokens == 32 > first.usage.cached_prompt_tokens  # 46 tokens: 2 full blocks
