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
from controlplane.config import ControlPlaneConfig
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
        drained = planes[1].target
        # drained while it holds requests and more keep coming: what it holds moves, nothing new lands there
        wait_until(lambda: load.num_tokens > 100 and router.member(drained).engine.num_requests > 0, 60,
                   "the load did not reach the plane to drain")
        moved_before = router.num_moved_requests
        reply = stub.DrainDataPlane(admin_pb2.DrainDataPlaneRequest(address=drained, move=True), metadata=md)
        assert len(load.finish) < 200, "the load was over before the plane was drained"
        assert reply.state == "draining" and reply.num_running + reply.num_waiting > 0
        wait_until(lambda: states(stack)[drained] == "drained", 30, "the drained plane did not become idle")
        steps_after_drain = router.member(drained).engine.num_steps
        load.join()
        assert load.errors == {} and len(load.finish) == 200
        assert router.num_moved_requests > moved_before
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


def plane_samples(stack, name: str) -> dict[str, float]:
    """The value of metric sample `name` for each data plane (its `dataplane` label)."""
    found = {}
    for line in stack.control_plane.registry.render().splitlines():
        name_labels, _, value = line.rpartition(" ")
        if name_labels.startswith(name + "{") and 'dataplane="' in name_labels:
            found[name_labels.split('dataplane="')[1].split('"')[0]] = float(value)
    return found


def test_each_data_plane_has_its_own_metric_series(stack, planes):
    serving = [dp.target for dp in planes]
    for name in ("nanoplane:num_requests_running", "nanoplane:num_requests_waiting", "nanoplane:kv_cache_usage_perc",
                 "nanoplane:prefix_cache_hits_total", "nanoplane:step_duration_seconds_count"):
        assert set(serving) <= plane_samples(stack, name).keys(), name
    assert all(plane_samples(stack, "nanoplane:step_duration_seconds_count")[t] > 0 for t in serving)
    # a request sharing a cached prefix counts its hit on the plane it ran on, and on no other
    shared = "Another long prefix, for the per-plane hit counters, that many requests share: " * 3
    stack.client.generate(shared + "one", SamplingParams(max_tokens=2, temperature=0))
    before = plane_samples(stack, "nanoplane:prefix_cache_hits_total")
    hit = stack.client.generate(shared + "two", SamplingParams(max_tokens=2, temperature=0))
    after = plane_samples(stack, "nanoplane:prefix_cache_hits_total")
    gained = sorted(after[t] - before.get(t, 0.0) for t in after)
    assert hit.usage.cached_prompt_tokens > 0 and gained[-1] == hit.usage.cached_prompt_tokens
    assert gained[:-1] == [0.0] * (len(gained) - 1)


def test_drain_without_move_lets_its_requests_finish_where_they_are(stack, planes):
    router = stack.control_plane.router
    target = planes[0].target
    wait_until(lambda: all(states(stack)[dp.target] == "serving" for dp in planes), 30, "planes not serving")
    engine = router.member(target).engine
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    load = Streams(stack.client, [f"Drain without move {i}" for i in range(60)], params, rate_s=0.01)
    wait_until(lambda: engine.num_requests >= 2, 60, "the load did not reach the plane to drain")
    moved_before = router.num_moved_requests
    channel, stub, md = admin(stack)
    with channel:
        reply = stub.DrainDataPlane(admin_pb2.DrainDataPlaneRequest(address=target), metadata=md)
        steps_at_drain = engine.num_steps
        assert reply.state == "draining"
        wait_until(lambda: states(stack)[target] == "drained", 60, "the drained plane did not finish its requests")
        assert engine.num_steps > steps_at_drain  # it ran what it held to the end
        load.join()
        assert load.errors == {} and len(load.finish) == 60
        assert router.num_moved_requests == moved_before  # nothing moved: they finished on the drained plane
        steps_drained = engine.num_steps
        more = Streams(stack.client, [f"While drained {i}" for i in range(6)], params)
        more.join()
        assert more.errors == {} and engine.num_steps == steps_drained
        assert stub.UndrainDataPlane(admin_pb2.UndrainDataPlaneRequest(address=target), metadata=md).state == "serving"


def test_data_planes_found_by_dns_name_join(tiny_model_dir, tmp_path):
    """--dataplane-dns NAME:PORT: every address of NAME is a data plane (here `localhost`, 127.0.0.1)."""
    model = str(tiny_model_dir("qwen3"))
    plane = DataPlaneProcess(model, tmp_path / "dns-plane.log", *DATAPLANE_ARGS)
    try:
        cp = InProcessControlPlane(ControlPlaneConfig.dataplane, model,
                                   dict(dataplane_dns=f"localhost:{plane.port}", dataplane_discovery_interval_s=0.5))
        try:
            assert [m.address for m in cp.control_plane.router.members] == [plane.target]  # the default left out
            result = cp.client.generate("Found by name", SamplingParams(max_tokens=4, temperature=0))
            assert result.usage.completion_tokens == 4
        finally:
            cp.close()
    finally:
        plane.close()
