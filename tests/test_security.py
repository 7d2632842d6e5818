"""Security of both planes: TLS and bearer tokens on the public API, mutual TLS between the planes,
what grpcurl sees with and without credentials, and the start-up checks of the security flags."""
import asyncio
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import AsyncClient, Client, NanoplaneError, SamplingParams
from controlplane.ops.auth import BearerTokens, load_tokens
from controlplane.config import ControlPlaneConfig
from proto.healthcheck import check
from dataplane.config import DataPlaneConfig
from dataplane.security import server_credentials
from tests.certs import make_pki
from tests.grpcurl import grpcurl, json_messages
from tests.stack import ROOT, InProcessStack

TOKEN = "test-token-1"
PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"# tokens of the test\n\n{TOKEN}\nanother-token\n")
    return path


@pytest.fixture(scope="module")
def stack(tiny_model_dir, pki, token_file):
    dp_tls = DataPlaneConfig(model="-", tls_cert=str(pki.dataplane_server.cert), tls_key=str(pki.dataplane_server.key),
                             tls_client_ca=str(pki.ca))
    s = InProcessStack(
        str(tiny_model_dir("qwen3")), block_size=16, num_kv_blocks=64,
        dataplane_credentials=server_credentials(dp_tls),
        control_plane_options=dict(
            tls_cert=str(pki.controlplane_server.cert), tls_key=str(pki.controlplane_server.key),
            auth_token_file=str(token_file), dataplane_tls_ca=str(pki.ca),
            dataplane_tls_cert=str(pki.controlplane_client.cert), dataplane_tls_key=str(pki.controlplane_client.key),
            dataplane_tls_server_name="dataplane"),  # a SAN of the data plane's certificate, not its address
        client_options=dict(token=TOKEN, tls_ca=str(pki.ca)))
    yield s
    s.close()


def test_generate_over_tls_with_a_token(stack):
    result = stack.client.generate("Once upon a time", PARAMS)
    assert result.finish_reason == "length" and len(result.token_ids) == 6


def test_async_client_over_tls_with_a_token(stack, pki):
    async def generate():
        async with AsyncClient(stack.target, token="another-token", tls_ca=Path(pki.ca).read_bytes()) as client:
            return await client.generate("Once upon a time", PARAMS)

    assert asyncio.run(generate()).finish_reason == "length"


@pytest.mark.parametrize("token, message", [(None, "authorization: Bearer"), ("wrong-token", "invalid bearer token")])
def test_missing_or_wrong_token_is_unauthenticated(stack, pki, token, message):
    with Client(stack.target, tls_ca=str(pki.ca), token=token, timeout_s=30) as client:
        with pytest.raises(NanoplaneError) as caught:
            client.generate("hi", PARAMS)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED and message in caught.value.message
        with pytest.raises(NanoplaneError) as caught:
            client.model_info()
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_token(stack, pki):
    channel = grpc.secure_channel(stack.target, grpc.ssl_channel_credentials(Path(pki.ca).read_bytes()))
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert check(stack.target, tls_ca=str(pki.ca)) == (True, "SERVING")  # the container health probe


def test_plaintext_client_cannot_reach_the_tls_port(stack):
    with Client(stack.target, token=TOKEN, timeout_s=10) as client:
        with pytest.raises(NanoplaneError) as caught:
            client.model_info()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_grpcurl_with_tls_and_token(stack, pki):
    tls = ["-cacert", str(pki.ca)]
    listed = grpcurl(*tls, stack.target, "list")  # reflection is open, like health
    assert listed.returncode == 0, listed.stderr
    assert "nanoplane.v1.Generation" in listed.stdout and "grpc.health.v1.Health" in listed.stdout
    described = grpcurl(*tls, stack.target, "describe", "nanoplane.v1.Generation")
    assert "rpc Generate" in described.stdout, described.stderr
    health = grpcurl(*tls, stack.target, "grpc.health.v1.Health/Check")
    assert json.loads(health.stdout) == {"status": "SERVING"}, health.stderr
    body = json.dumps({"prompt": "Once upon a time", "sampling": {"temperature": 0, "max_tokens": 4, "ignore_eos": True}})
    out = grpcurl(*tls, "-H", f"authorization: Bearer {TOKEN}", "-d", body, stack.target,
                  "nanoplane.v1.Generation/Generate")
    assert out.returncode == 0, out.stderr
    messages = json_messages(out.stdout)
    assert sum(len(m.get("token_ids", [])) for m in messages) == 4, out.stdout  # grpcurl keeps proto field names
    assert messages[-1].get("finish_reason") == "length"
    refused = grpcurl(*tls, "-d", body, stack.target, "nanoplane.v1.Generation/Generate")
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr


def test_grpcurl_reaches_the_data_plane_only_with_a_client_certificate(stack, pki):
    target = f"127.0.0.1:{stack.dp_port}"
    mtls = ["-cacert", str(pki.ca), "-cert", str(pki.controlplane_client.cert), "-key", str(pki.controlplane_client.key),
            "-servername", "dataplane"]
    listed = grpcurl(*mtls, target, "list")
    assert "nanoplane.v1.DataPlane" in listed.stdout and "grpc.health.v1.Health" in listed.stdout, listed.stderr
    described = grpcurl(*mtls, target, "describe", "nanoplane.v1.DataPlane")
    assert "rpc Step" in described.stdout, described.stderr
    health = grpcurl(*mtls, target, "grpc.health.v1.Health/Check")
    assert json.loads(health.stdout) == {"status": "SERVING"}, health.stderr
    without_cert = grpcurl("-cacert", str(pki.ca), "-servername", "dataplane", target, "list")
    assert without_cert.returncode != 0


def test_control_plane_with_a_certificate_from_another_ca_fails_clearly(stack, pki, tiny_model_dir):
    """The data plane refuses it during the TLS handshake; `nanoplane controlplane` exits with an error that says why."""
    cmd = [sys.executable, "-m", "controlplane", "--dataplane", f"127.0.0.1:{stack.dp_port}", "--port", "0",
           "--tokenizer", str(tiny_model_dir("qwen3")), "--dataplane-connect-timeout-s", "1",
           "--dataplane-tls-ca", str(pki.ca), "--dataplane-tls-server-name", "dataplane",
           "--dataplane-tls-cert", str(pki.rogue_client.cert), "--dataplane-tls-key", str(pki.rogue_client.key)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "NANOPLANE_LOG_FORMAT": "console"})
    assert done.returncode == 1, done.stderr
    assert "nanoplane controlplane: error: data plane at" in done.stderr
    assert "client certificate" in done.stderr and "--tls-client-ca" in done.stderr
    assert stack.client.generate("still fine", PARAMS).finish_reason == "length"  # the right one is still served


def test_tokens_from_file_and_environment(token_file):
    assert load_tokens(str(token_file), environ={}) == [TOKEN, "another-token"]
    assert load_tokens("", environ={"NANOPLANE_CP_AUTH_TOKENS": " a, b ,,"}) == ["a", "b"]
    assert load_tokens("", environ={}) == []
    tokens = BearerTokens(["a", "bb"])
    assert tokens.accepts("a") and tokens.accepts("bb") and not tokens.accepts("b") and not tokens.accepts("")
    assert tokens.problem("Bearer bb") is None and tokens.problem("bearer a") is None
    assert "authorization: Bearer" in tokens.problem("") and tokens.problem("Bearer b") == "invalid bearer token"


def test_bad_security_flags_fail_at_start_up(pki, tmp_path):
    empty = tmp_path / "empty-tokens"
    empty.write_text("# nobody\n")
    cases = [
        (ControlPlaneConfig(tls_cert=str(pki.controlplane_server.cert)), "--tls-cert and --tls-key go together"),
        (ControlPlaneConfig(tls_cert=str(pki.controlplane_server.key), tls_key=str(pki.controlplane_server.key)),
         "holds no PEM certificate"),
        (ControlPlaneConfig(dataplane_tls_ca=str(tmp_path / "missing.pem")), "is not a readable file"),
        (ControlPlaneConfig(dataplane_tls_server_name="dataplane"), "needs TLS to the data plane"),
        (ControlPlaneConfig(auth_token_file=str(empty)), "holds no token"),
        (ControlPlaneConfig(metrics_port=50051), "--metrics-port must differ from --port"),
        (ControlPlaneConfig(metrics_port=9090, metrics_auth_token_file=str(empty)),
         "--metrics-auth-token-file .* holds no token"),
        (ControlPlaneConfig(metrics_auth_token_file=str(tmp_path / "missing")), "needs --metrics-port"),
        (ControlPlaneConfig(dataplane_keepalive_s=0.1), "--dataplane-keepalive-s must be at least"),
        (ControlPlaneConfig(shutdown_grace_s=-1), "--shutdown-grace-s"),
        (DataPlaneConfig(model="m", tls_client_ca=str(pki.ca)), "--tls-client-ca (mutual TLS) needs --tls-cert"),
        (DataPlaneConfig(model="m", tls_cert=str(pki.ca), tls_key=str(pki.ca)), "holds no PEM private key"),
    ]
    for config, message in cases:
        with pytest.raises(ValueError, match=r".*" + message.replace("(", r"\(").replace(")", r"\)")):
            config.validate()
