"""Attacks on the data plane by a local process without its credential, and on KV left by an earlier session.

Each test tries what issue 15 found open and sees it fail: Describe and Step without the
token, a shared-memory session with the ticket but not the token, locking the real control
plane out by opening Step first, reading another session's KV by claiming cached tokens,
and a data plane on a non-loopback address without a credential.
"""
from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from controlplane.link.dataplane_client import DataPlaneClient
from dataplane.config import DataPlaneConfig
from dataplane.runner import ModelRunner
from dataplane.server import build_server
from proto.dataplane_access import default_token_path, session_proof
from proto.nanoplane.v1 import dataplane_pb2, dataplane_pb2_grpc
from proto.shm_channel import SessionRefused, open_session
from proto.step import RUN_SAMPLE, RUN_TOKENS_IN_PLAN, StepPlan
from tests.tiny_models import save_tiny_model

OPTIONS = dict(dtype="float32", block_size=16, num_kv_blocks=16, max_num_seqs=2, max_num_batched_tokens=128,
               max_model_len=128, num_threads=1)
PROMPT_LEN, NUM_DECODES = 64, 6


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = save_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3-access"), vocab_size=512, seed=5)
    runner = ModelRunner(DataPlaneConfig(model=str(model), device="cpu", **OPTIONS))
    server, port, _ = build_server(runner, "127.0.0.1", 0)  # auto: a per-launch token, as `nanoplane dataplane`
    server.start()
    yield runner, f"127.0.0.1:{port}", port
    server.stop(0)


def _new_sequence(num_cached: int) -> dict:
    one = lambda value, dtype: np.full(1, value, dtype)  # noqa: E731
    return dict(new_slots=one(0, np.int32), new_num_cached_tokens=one(num_cached, np.int32),
                new_temperature=one(0, np.float32), new_top_p=one(1, np.float32), new_top_k=one(-1, np.int32),
                new_seed=one(0, np.int64), new_has_seed=one(0, np.uint8), new_num_prompt_tokens=one(PROMPT_LEN, np.int32),
                new_min_p=one(0, np.float32), new_repetition_penalty=one(1, np.float32),
                new_presence_penalty=one(0, np.float32), new_frequency_penalty=one(0, np.float32),
                new_min_tokens=one(0, np.int32), new_num_logprobs=one(-1, np.int32),
                new_num_prompt_logprobs=one(-1, np.int32), new_num_stop_ids=one(0, np.int32),
                block_slots=np.zeros(5, np.int32), block_indices=np.arange(5, dtype=np.int32),
                block_ids=np.arange(5, dtype=np.int32))  # 4 of prompt, 1 of decodes


def _generate(step, prompt: np.ndarray, num_cached: int) -> list[int]:
    """Prompt tokens from num_cached on in blocks 0-3 of slot 0 (decodes in block 4), then greedy decodes: the sampled tokens."""
    first = StepPlan(step_id=0, run_slots=np.zeros(1, np.int32),
                     run_num_tokens=np.array([PROMPT_LEN - num_cached], np.int32),
                     run_flags=np.array([RUN_SAMPLE | RUN_TOKENS_IN_PLAN], np.uint8),
                     token_ids=prompt[num_cached:].astype(np.int32), **_new_sequence(num_cached))
    tokens = [int(step(first).token_ids[0])]
    for i in range(1, NUM_DECODES):
        decode = StepPlan(step_id=i, run_slots=np.zeros(1, np.int32), run_num_tokens=np.ones(1, np.int32),
                          run_flags=np.array([RUN_SAMPLE], np.uint8))
        tokens.append(int(step(decode).token_ids[0]))
    return tokens


def test_describe_and_step_without_the_token_are_refused(served):
    runner, target, port = served
    assert default_token_path(port).stat().st_mode & 0o077 == 0  # only this user can read the auto token
    with grpc.insecure_channel(target) as channel:
        stub = dataplane_pb2_grpc.DataPlaneStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Describe(dataplane_pb2.DescribeRequest(), timeout=10, metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "--dataplane-token-file" in caught.value.details()
            with pytest.raises(grpc.RpcError) as caught:
                next(stub.Step(iter([dataplane_pb2.StepPlan(step_id=0)]), timeout=10, metadata=metadata))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_shm_ticket_is_worthless_without_the_token(served):
    runner, target, port = served
    client = DataPlaneClient(target)
    try:
        info = client.describe(30)  # what a process with the token learns; one without it learns nothing
        for proof in (info.shm_ticket, session_proof("not-the-token", info.shm_ticket)):
            with pytest.raises(SessionRefused, match="session proof does not match"):
                open_session(info.shm_socket, proof, 2**16)
    finally:
        client.close()


def test_a_stream_without_the_token_cannot_lock_the_control_plane_out(served):
    runner, target, port = served
    hold = threading.Event()

    def hold_the_stream_open():
        hold.wait(30)
        yield from ()

    with grpc.insecure_channel(target) as channel:
        squatter = dataplane_pb2_grpc.DataPlaneStub(channel).Step(hold_the_stream_open(), timeout=30)
        for transport in ("grpc", "shm"):
            client = DataPlaneClient(target, transport=transport)
            try:
                prompt = np.arange(PROMPT_LEN) % 500
                assert len(_generate(client.step, prompt, 0)) == NUM_DECODES
            finally:
                client.close()
        with pytest.raises(grpc.RpcError) as caught:
            next(squatter)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        hold.set()


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_a_new_session_cannot_read_the_kv_an_earlier_one_left(served, transport):
    """Issue 15's attack: claim 63 cached tokens in the blocks of an earlier session's 64-token prompt, send the
    last token. It reads zeros (the tokens of an empty cache), not the earlier continuation."""
    runner, target, port = served
    prompt = np.random.default_rng(1).integers(0, 512, PROMPT_LEN)
    # the attack works where the KV survives: on a runner of its own, with only the batch forgotten
    offline = ModelRunner(runner.config)
    victim_tokens = _generate(offline.execute, prompt, 0)
    offline.batch.reset()
    assert _generate(offline.execute, prompt, PROMPT_LEN - 1) == victim_tokens
    offline.reset()
    empty_tokens = _generate(offline.execute, prompt, PROMPT_LEN - 1)
    assert empty_tokens != victim_tokens

    victim = DataPlaneClient(target, transport=transport)
    try:
        assert _generate(victim.step, prompt, 0) == victim_tokens
    finally:
        victim.close()
    attacker = DataPlaneClient(target, transport=transport)  # authenticated: a legitimate new session
    try:
        assert _generate(attacker.step, prompt, PROMPT_LEN - 1) == empty_tokens
        # of blocks 0-3 the attacker wrote only the last prompt position and the decodes after it
        assert not runner.kv_cache[:, :, :3].any(), "the new session reads an earlier session's KV"
        assert not runner.kv_cache[:, :, 3, :PROMPT_LEN - 1 - 48].any()
    finally:
        attacker.close()


def test_a_reachable_address_needs_a_credential(tmp_path):
    model = tmp_path / "model.gguf"  # start-up checks want the model to exist; its content is not read here
    model.write_bytes(b"")

    open_config = DataPlaneConfig(model=str(model), host="0.0.0.0")
    with pytest.raises(ValueError, match="can be reached from other hosts.*--tls-client-ca.*--auth-token-file"):
        open_config.validate()
    DataPlaneConfig(model=str(model), host="0.0.0.0", insecure=True).validate()
    token = tmp_path / "token"
    token.write_text("shared\n")
    DataPlaneConfig(model=str(model), host="0.0.0.0", auth_token_file=str(token)).validate()
    DataPlaneConfig(model=str(model), host="127.0.0.1").validate()  # loopback: an auto token
    with pytest.raises(ValueError, match="--auth-token-file .* cannot be read"):
        DataPlaneConfig(model=str(model), host="0.0.0.0", auth_token_file=str(tmp_path / "missing")).validate()
