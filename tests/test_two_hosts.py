"""The planes on separate hosts: a control-plane host and two data-plane hosts (three network namespaces, the
control plane's joined to each data plane's by a veth pair), mutual TLS between the planes, a client on a data
plane's host generating through the control plane with TLS and a token; requests placed on both data planes; then
a network partition of one data-plane host (the other serves on, the lost one is `down` and rejoins once its link is
back) and of both (the control plane turns NOT_SERVING, and serves again once the links are back). A data plane on a
host address without a credential refuses to start.

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
DP2_IP, CP2_IP = "10.231.1.1", "10.231.1.2"  # the second data-plane host's link to the control plane's host
TOKEN = "two-hosts-token"
ADMIN_TOKEN = "two-hosts-admin-token"
DATAPLANES = (f"{DP_IP}:{DP_PORT}", f"{DP2_IP}:{DP_PORT}")

CLIENT = r"""
import json, sys, time, urllib.request
from client import Client, SamplingParams
from proto.healthcheck import check
target, ca, token, metrics_url, request_ids = sys.argv[1:6]
deadline = time.monotonic() + 120
while not check(target, tls_ca=ca)[0]:
    if time.monotonic() > deadline:
        sys.exit("the control plane did not become SERVING: " + check(target, tls_ca=ca)[1])
    time.sleep(0.2)
with Client(target, tls_ca=ca, token=token, timeout_s=60) as client:
    results = [client.generate("Once upon a time", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                               request_id=request_id) for request_id in request_ids.split(",")]
metrics = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
print(json.dumps({"finish_reasons": [r.finish_reason for r in results], "num_tokens": [len(r.token_ids) for r in results],
                  "metrics": metrics}))
"""


@dataclass
class Hosts:
    dp_ns: str
    dp2_ns: str
    cp_ns: str
    dp_link: str
    dp2_link: str


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
    h = Hosts(f"np-dp-{tag}", f"np-dq-{tag}", f"np-cp-{tag}", f"npd{tag}", f"npe{tag}")
    made = ip("netns", "add", h.dp_ns)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    try:
        must(ip("netns", "add", h.dp2_ns))
        must(ip("netns", "add", h.cp_ns))
        must(ip("-n", h.cp_ns, "link", "set", "lo", "up"))
        for dp_ns, dp_link, cp_link, dp_ip, cp_ip in ((h.dp_ns, h.dp_link, f"npc{tag}", DP_IP, CP_IP),
                                                      (h.dp2_ns, h.dp2_link, f"npf{tag}", DP2_IP, CP2_IP)):
            must(ip("link", "add", dp_link, "type", "veth", "peer", "name", cp_link))
            must(ip("link", "set", dp_link, "netns", dp_ns))
            must(ip("link", "set", cp_link, "netns", h.cp_ns))
            for ns, link, address in ((dp_ns, dp_link, dp_ip), (h.cp_ns, cp_link, cp_ip)):
                must(ip("-n", ns, "addr", "add", f"{address}/24", "dev", link))
                must(ip("-n", ns, "link", "set", link, "up"))
            must(ip("-n", dp_ns, "link", "set", "lo", "up"))
        yield h
    finally:  # deleting a namespace deletes its end of the veth pairs, and with it the pairs
        for ns in (h.dp_ns, h.dp2_ns, h.cp_ns):
            ip("netns", "del", ns)


def in_ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


@pytest.fixture(scope="module")
def planes(hosts, tiny_model_dir, tmp_path_factory):
    model = str(tiny_model_dir("qwen3"))
    work = tmp_path_factory.mktemp("two-hosts")
    pki = make_pki(work / "pki", server_ips=("127.0.0.1", DP_IP, CP_IP, DP2_IP, CP2_IP))
    (work / "tokens").write_text(TOKEN + "\n")
    (work / "admin-tokens").write_text(ADMIN_TOKEN + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NANOPLANE_LOG_FORMAT": "json"}

    def dataplane(host: str) -> list[str]:
        return [sys.executable, "-m", "dataplane", "--model", model, "--device", "cpu", "--num-threads", "1",
                "--num-kv-blocks", "64", "--host", host, "--port", str(DP_PORT),
                "--tls-cert", str(pki.dataplane_server.cert), "--tls-key", str(pki.dataplane_server.key),
                "--tls-client-ca", str(pki.ca), "--keepalive-s", "1", "--keepalive-timeout-s", "1"]

    controlplane = [sys.executable, "-m", "controlplane", "--dataplane", ",".join(DATAPLANES), "--tokenizer", model,
                    "--host", "0.0.0.0", "--port", str(CP_PORT), "--health-port", str(CP_HEALTH_PORT),
                    "--metrics-port", str(METRICS_PORT), "--auth-token-file", str(work / "tokens"),
                    "--tls-cert", str(pki.controlplane_server.cert), "--tls-key", str(pki.controlplane_server.key),
                    "--dataplane-tls-ca", str(pki.ca), "--dataplane-tls-cert", str(pki.controlplane_client.cert),
                    "--dataplane-tls-key", str(pki.controlplane_client.key), "--dataplane-keepalive-s", "1",
                    "--dataplane-keepalive-timeout-s", "1", "--dataplane-health-interval-s", "0.5",
                    "--dataplane-liveness-timeout-s", "2", "--dataplane-discovery-interval-s", "0.5",
                    "--admin-token-file", str(work / "admin-tokens"), "--log-level", "debug"]
    procs = []
    try:
        for name, ns, argv in (("dataplane", hosts.dp_ns, dataplane(DP_IP)), ("dataplane2", hosts.dp2_ns,
                               dataplane(DP2_IP)), ("controlplane", hosts.cp_ns, controlplane)):
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
        for name in ("dataplane", "dataplane2", "controlplane"):
            print(f"--- {name}.log\n{(work / f'{name}.log').read_text(errors='replace')[-3000:]}")


def generate_from_a_dataplane_host(hosts, planes, *request_ids: str, second: bool = False) -> dict:
    """Requests sent from the first data plane's host (second: the second's), to the control plane's address there."""
    pki, work, env, procs = planes
    ns, cp_ip = (hosts.dp2_ns, CP2_IP) if second else (hosts.dp_ns, CP_IP)
    done = subprocess.run(in_ns(ns, sys.executable, "-c", CLIENT, f"{cp_ip}:{CP_PORT}", str(pki.ca), TOKEN,
                                f"http://{cp_ip}:{METRICS_PORT}/metrics", ",".join(request_ids)),
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def dataplane_states(hosts, planes) -> dict[str, str]:
    """`nanoplane admin list` on the control plane's host: address → state ({} while the control plane does not answer)."""
    pki, work, env, procs = planes
    exited = [p.args for p in procs if p.poll() is not None]
    assert not exited, f"a plane exited: {exited}"
    done = subprocess.run(in_ns(hosts.cp_ns, sys.executable, "-m", "nanoplane.cli", "admin", "--target",
                                f"127.0.0.1:{CP_PORT}", "--tls-ca", str(pki.ca), "--admin-token-file",
                                str(work / "admin-tokens"), "--timeout-s", "5", "list"),
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        assert "UNAVAILABLE" in done.stderr or "DEADLINE_EXCEEDED" in done.stderr, done.stderr[-3000:]
        return {}
    return {line.split()[0]: line.split()[1] for line in done.stdout.splitlines() if line.strip()}


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
    wait_until(lambda: dataplane_states(hosts, planes) == dict.fromkeys(DATAPLANES, "serving"), 180,
               "both data planes did not join")
    ids = [f"across-hosts-{i}" for i in range(4)]
    out = generate_from_a_dataplane_host(hosts, planes, *ids)
    assert out["finish_reasons"] == ["length"] * 4 and out["num_tokens"] == [8] * 4
    assert re.search(r'^nanoplane:request_success_total\{.*model_name="', out["metrics"], re.M)
    for address in DATAPLANES:  # a series per data plane
        assert re.search(rf'^nanoplane:step_duration_seconds_count\{{.*dataplane="{address}"', out["metrics"], re.M)
    work = planes[1]
    cp_logs = json_lines(work / "controlplane.log")
    placed = {e["request_id"]: e["dataplane"] for e in cp_logs if e["event"] == "placement" and e.get("request_id") in ids}
    assert set(placed.values()) == set(DATAPLANES), "idle data planes take turns: both hosts ran a request"
    for request_id, address in placed.items():  # the slot the control plane chose is the one its data plane filled
        dp_logs = json_lines(work / ("dataplane.log" if address == DATAPLANES[0] else "dataplane2.log"))
        entered = next(e for e in cp_logs if e["event"] == "sequence entered slot" and e["request_id"] == request_id)
        changed = next(e for e in dp_logs if e["event"] == "batch changed" and e["step_id"] == entered["step_id"])
        assert entered["slot"] in changed["new_slots"]
    for log_name, cp_ip in (("dataplane.log", CP_IP), ("dataplane2.log", CP2_IP)):
        connected = next(e for e in json_lines(work / log_name) if e["event"] == "control plane connected")
        assert cp_ip in connected["peer"]


def test_partition_of_one_dataplane_host_and_then_of_both(hosts, planes):
    generate_from_a_dataplane_host(hosts, planes, "before-partition")  # Step streams are open now
    must(ip("-n", hosts.dp_ns, "link", "set", hosts.dp_link, "down"))
    try:
        # the first host is cut off; a client on the second's sees nothing but success: a request placed on the
        # silent plane (idle, it is noticed only when a step goes unanswered, --dataplane-liveness-timeout-s) moves
        ids = [f"one-host-cut-{i}" for i in range(4)]
        out = generate_from_a_dataplane_host(hosts, planes, *ids, second=True)
        assert out["finish_reasons"] == ["length"] * 4
        assert dataplane_states(hosts, planes).get(DATAPLANES[0]) == "down"
        assert control_plane_serving(hosts, planes)
        cp_logs = json_lines(planes[1] / "controlplane.log")
        if any(e["event"] == "placement" and e.get("request_id") in ids and e["dataplane"] == DATAPLANES[0]
               for e in cp_logs):  # placed there before it was noticed: moved, not failed
            assert any(e["event"] == "requests moved to other data planes" and e["dataplane"] == DATAPLANES[0]
                       for e in cp_logs)
    finally:
        must(ip("-n", hosts.dp_ns, "link", "set", hosts.dp_link, "up"))
    wait_until(lambda: dataplane_states(hosts, planes).get(DATAPLANES[0]) == "serving", 30,
               "the data plane did not rejoin once its link was back")

    for ns, link in ((hosts.dp_ns, hosts.dp_link), (hosts.dp2_ns, hosts.dp2_link)):
        must(ip("-n", ns, "link", "set", link, "down"))
    try:  # no data plane left: the control plane's health says so
        wait_until(lambda: not control_plane_serving(hosts, planes), 15, "the control plane did not become NOT_SERVING")
        time.sleep(3)  # both ends' keepalive (1 s + 1 s) gives up on the silent connections
    finally:
        for ns, link in ((hosts.dp_ns, hosts.dp_link), (hosts.dp2_ns, hosts.dp2_link)):
            must(ip("-n", ns, "link", "set", link, "up"))
    wait_until(lambda: control_plane_serving(hosts, planes), 30, "the control plane did not serve again")
    wait_until(lambda: dataplane_states(hosts, planes) == dict.fromkeys(DATAPLANES, "serving"), 30,
               "the data planes did not come back")
    # the data planes let go of the dead Step streams, so the control plane's new ones are accepted
    out = generate_from_a_dataplane_host(hosts, planes, "after-partition")
    assert out["finish_reasons"] == ["length"]


def test_a_dataplane_on_a_host_address_without_a_credential_refuses_to_start(hosts, tiny_model_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NANOPLANE_LOG_FORMAT": "json"}
    done = subprocess.run(in_ns(hosts.dp2_ns, sys.executable, "-m", "dataplane", "--model", str(tiny_model_dir("qwen3")),
                                "--device", "cpu", "--host", DP2_IP, "--port", str(DP_PORT + 1)),
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "--auth-token-file" in done.stderr and "--insecure" in done.stderr
