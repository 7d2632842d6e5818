"""The planes on two hosts: two network namespaces joined by a veth pair, mutual TLS between the planes,
a client on the data plane's host generating through the control plane with TLS and a token; then a network
partition that keepalive and health must notice, and recovery once the link is back.

Needs root and iproute2 (`ip netns`); skipped, with the reason, where namespaces cannot be made.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from tests.certs import make_pki
from tests.json_logs import json_lines
from tests.stack import ROOT

DP_IP, CP_IP, DP_PORT, CP_PORT, CP_HEALTH_PORT, METRICS_PORT = "10.231.0.1", "10.231.0.2", 50061, 50051, 50052, 9090
TOKEN = "two-hosts-token"

CLIENT = r"""
import json, sys, time, urllib.request
from client import Client, SamplingParams
from proto.healthcheck import check
target, ca, token, metrics_url, request_id = sys.argv[1:6]
deadline = time.monotonic() + 120
while not check(target, tls_ca=ca)[0]:
    if time.monotonic() > deadline:
        sys.exit("the control plane did not become SERVING: " + check(target, tls_ca=ca)[1])
    time.sleep(0.2)
with Client(target, tls_ca=ca, token=token, timeout_s=60) as client:
    result = client.generate("Once upon a time", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                             request_id=request_id)
metrics = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
print(json.dumps({"finish_reason": result.finish_reason, "num_tokens": len(result.token_ids), "metrics": metrics}))
"""


@dataclass
class Hosts:
    dp_ns: str
    cp_ns: str
    dp_link: str


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def must(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, f"{done.args}: {done.stderr}"


@pytest.fixture(scope="module")
def hosts():
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed, so no network namespaces")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    tag = str(os.getpid() % 10**6)
    h = Hosts(f"np-dp-{tag}", f"np-cp-{tag}", f"npd{tag}")
    made = ip("netns", "add", h.dp_ns)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    try:
        must(ip("netns", "add", h.cp_ns))
        cp_link = f"npc{tag}"
        must(ip("link", "add", h.dp_link, "type", "veth", "peer", "name", cp_link))
        must(ip("link", "set", h.dp_link, "netns", h.dp_ns))
        must(ip("link", "set", cp_link, "netns", h.cp_ns))
        for ns, link, address in ((h.dp_ns, h.dp_link, DP_IP), (h.cp_ns, cp_link, CP_IP)):
            must(ip("-n", ns, "addr", "add", f"{address}/24", "dev", link))
            must(ip("-n", ns, "link", "set", link, "up"))
            must(ip("-n", ns, "link", "set", "lo", "up"))
        yield h
    finally:  # deleting a namespace deletes its end of the veth pair, and with it the pair
        for ns in (h.dp_ns, h.cp_ns):
            ip("netns", "del", ns)


def in_ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


@pytest.fixture(scope="module")
def planes(hosts, tiny_model_dir, tmp_path_factory):
    model = str(tiny_model_dir("qwen3"))
    work = tmp_path_factory.mktemp("two-hosts")
    pki = make_pki(work / "pki", server_ips=("127.0.0.1", DP_IP, CP_IP))
    (work / "tokens").write_text(TOKEN + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NANOPLANE_LOG_FORMAT": "json"}
    dataplane = [sys.executable, "-m", "dataplane", "--model", model, "--device", "cpu", "--num-threads", "1",
                 "--num-kv-blocks", "64", "--host", DP_IP, "--port", str(DP_PORT),
                 "--tls-cert", str(pki.dataplane_server.cert), "--tls-key", str(pki.dataplane_server.key),
                 "--tls-client-ca", str(pki.ca), "--keepalive-s", "1", "--keepalive-timeout-s", "1"]
    controlplane = [sys.executable, "-m", "controlplane", "--dataplane", f"{DP_IP}:{DP_PORT}", "--tokenizer", model,
                    "--host", "0.0.0.0", "--port", str(CP_PORT), "--health-port", str(CP_HEALTH_PORT),
                    "--metrics-port", str(METRICS_PORT), "--auth-token-file", str(work / "tokens"),
                    "--tls-cert", str(pki.controlplane_server.cert), "--tls-key", str(pki.controlplane_server.key),
                    "--dataplane-tls-ca", str(pki.ca), "--dataplane-tls-cert", str(pki.controlplane_client.cert),
                    "--dataplane-tls-key", str(pki.controlplane_client.key), "--dataplane-keepalive-s", "1",
                    "--dataplane-keepalive-timeout-s", "1", "--dataplane-health-interval-s", "0.5"]
    procs = []
    try:
        for name, ns, argv in (("dataplane", hosts.dp_ns, dataplane), ("controlplane", hosts.cp_ns, controlplane)):
            with open(work / f"{name}.log", "w") as log:
                procs.append(subprocess.Popen(in_ns(ns, *argv), env=env, stdout=log, stderr=subprocess.STDOUT,
                                              cwd=ROOT))
        yield pki, work, env, procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for name in ("dataplane", "controlplane"):
            print(f"--- {name}.log\n{(work / f'{name}.log').read_text(errors='replace')[-3000:]}")


def generate_from_the_dataplane_host(hosts, planes, request_id: str) -> dict:
    pki, work, env, procs = planes
    done = subprocess.run(in_ns(hosts.dp_ns, sys.executable, "-c", CLIENT, f"{CP_IP}:{CP_PORT}", str(pki.ca), TOKEN,
                                f"http://{CP_IP}:{METRICS_PORT}/metrics", request_id),
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def control_plane_serving(hosts, planes) -> bool:
    done = subprocess.run(in_ns(hosts.cp_ns, sys.executable, "-m", "proto.healthcheck", "--timeout-s", "1",
                                "--target", f"127.0.0.1:{CP_HEALTH_PORT}"),
                          env=planes[2], cwd=ROOT, capture_output=True, text=True, timeout=30)
    return done.returncode == 0


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout_s} s"
        time.sleep(0.2)


def test_generate_across_hosts_with_mutual_tls(hosts, planes):
    out = generate_from_the_dataplane_host(hosts, planes, "across-hosts-1")
    assert out["finish_reason"] == "length" and out["num_tokens"] == 8
    assert re.search(r'^nanoplane:request_success_total\{.*model_name="', out["metrics"], re.M)
    work = planes[1]
    cp_logs, dp_logs = json_lines(work / "controlplane.log"), json_lines(work / "dataplane.log")
    entered = next(e for e in cp_logs if e["event"] == "sequence entered slot" and e["request_id"] == "across-hosts-1")
    changed = next(e for e in dp_logs if e["event"] == "batch changed" and e["step_id"] == entered["step_id"])
    assert entered["slot"] in changed["new_slots"]
    connected = next(e for e in dp_logs if e["event"] == "control plane connected")
    assert CP_IP in connected["peer"]


def test_partition_is_noticed_and_healed(hosts, planes):
    generate_from_the_dataplane_host(hosts, planes, "before-partition")  # a Step stream is open now
    must(ip("-n", hosts.dp_ns, "link", "set", hosts.dp_link, "down"))
    try:
        wait_until(lambda: not control_plane_serving(hosts, planes), 10, "the control plane did not become NOT_SERVING")
        time.sleep(3)  # both ends' keepalive (1 s + 1 s) gives up on the silent connection
    finally:
        must(ip("-n", hosts.dp_ns, "link", "set", hosts.dp_link, "up"))
    wait_until(lambda: control_plane_serving(hosts, planes), 30, "the control plane did not serve again")
    # the data plane let go of the dead Step stream, so the control plane's new one is accepted
    out = generate_from_the_dataplane_host(hosts, planes, "after-partition")
    assert out["finish_reason"] == "length"
    cp_logs = json_lines(planes[1] / "controlplane.log")
    assert any(e["event"] == "data plane does not answer: not serving" for e in cp_logs)
    assert any(e["event"] == "data plane answers again: serving" for e in cp_logs)
