"""deploy/: the YAML parses and says what it must (GPU, gRPC probes, mTLS from mounted certificates; for the fleet of
data planes a StatefulSet behind a headless Service that the control plane discovers, probes per plane, the data-plane
token from a Secret), every option it sets is a flag of the CLI, the Dockerfiles run as non-root with a health check,
and gen-certs.sh makes certificates that verify.
The images themselves are not built here (no Docker engine in CI)."""
import os
import shutil
import subprocess
import sys
from dataclasses import fields

import pytest

from tests.stack import ROOT

yaml = pytest.importorskip("yaml", reason="PyYAML checks the deploy files' syntax")
DEPLOY = ROOT / "deploy"
COMPOSE_FILES = ("compose.yaml", "compose.fleet.yaml")
K8S_FOLDERS = ("k8s", "k8s-fleet")


def k8s_objects(folder: str = "k8s") -> dict[tuple[str, str], dict]:
    objects = {}
    for path in sorted((DEPLOY / folder).glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def test_kubernetes_manifests():
    objects = k8s_objects()
    for plane in ("dataplane", "controlplane"):
        assert ("Service", f"nanoplane-{plane}") in objects
        deployment = objects[("Deployment", f"nanoplane-{plane}")]
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        c = container(deployment)
        assert "grpc" in c["readinessProbe"] and "grpc" in c["startupProbe"]
        secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        assert secrets, f"{plane} mounts no certificates"
    dp = container(objects[("Deployment", "nanoplane-dataplane")])
    assert dp["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"NANOPLANE_DP_TLS_CERT", "NANOPLANE_DP_TLS_KEY", "NANOPLANE_DP_TLS_CLIENT_CA"} <= env(dp).keys()
    cp = container(objects[("Deployment", "nanoplane-controlplane")])
    assert env(cp)["NANOPLANE_CP_DATAPLANE"].startswith("nanoplane-dataplane:")
    assert {"NANOPLANE_CP_DATAPLANE_TLS_CA", "NANOPLANE_CP_DATAPLANE_TLS_CERT", "NANOPLANE_CP_DATAPLANE_TLS_KEY",
            "NANOPLANE_CP_TLS_CERT", "NANOPLANE_CP_AUTH_TOKEN_FILE"} <= env(cp).keys()
    grace = objects[("Deployment", "nanoplane-controlplane")]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(env(cp)["NANOPLANE_CP_SHUTDOWN_GRACE_S"])


def test_every_environment_variable_in_deploy_is_an_option():
    from controlplane.config import ControlPlaneConfig
    from dataplane.config import DataPlaneConfig

    known = {"NANOPLANE_CP_" + f.name.upper() for f in fields(ControlPlaneConfig)}
    known |= {"NANOPLANE_DP_" + f.name.upper() for f in fields(DataPlaneConfig)}
    names = set()
    for compose_file in COMPOSE_FILES:
        for service in yaml.safe_load((DEPLOY / compose_file).read_text())["services"].values():
            names |= set(service.get("environment", {}))
    for folder in K8S_FOLDERS:
        for workload in (d for (kind, _), d in k8s_objects(folder).items() if kind in ("Deployment", "StatefulSet")):
            names |= env(container(workload)).keys()
    assert names and names <= known, names - known


def test_compose_runs_both_planes_with_mutual_tls():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    dp, cp = compose["services"]["dataplane"], compose["services"]["controlplane"]
    assert dp["environment"]["NANOPLANE_DP_TLS_CLIENT_CA"] and cp["environment"]["NANOPLANE_CP_DATAPLANE_TLS_CERT"]
    assert any(v.startswith("./certs:") and v.endswith(":ro") for v in dp["volumes"] + cp["volumes"])
    assert dp["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert cp["depends_on"]["dataplane"]["condition"] == "service_healthy"
    for service in (dp, cp):
        assert (DEPLOY / service["build"]["dockerfile"].removeprefix("deploy/")).exists()


@pytest.mark.parametrize("plane", ["controlplane", "dataplane"])
def test_dockerfiles_run_as_a_user_with_a_health_check(plane):
    text = (DEPLOY / f"{plane}.Dockerfile").read_text()
    assert "USER 10001" in text and "HEALTHCHECK" in text and "proto.healthcheck" in text
    assert ("FROM python:3.11-slim" in text) if plane == "controlplane" else ("nvidia/cuda" in text)


def test_each_image_copies_only_its_plane():
    controlplane = (DEPLOY / "controlplane.Dockerfile").read_text()
    dataplane = (DEPLOY / "dataplane.Dockerfile").read_text()
    installs = [line for line in controlplane.splitlines() if line.startswith(("RUN pip", " &&", "        "))]
    assert "COPY dataplane" not in controlplane and installs and not any("torch" in line for line in installs)
    assert "COPY controlplane" not in dataplane and "COPY dataplane dataplane" in dataplane


def test_gen_certs_makes_certificates_that_verify(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    subprocess.run(["sh", str(DEPLOY / "gen-certs.sh"), str(tmp_path)], check=True, capture_output=True,
                   env={**os.environ, "DATAPLANE_SANS": "IP:10.1.2.3"}, timeout=60)
    for name in ("controlplane", "dataplane", "controlplane-client"):
        done = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / f"{name}.pem")],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        assert (tmp_path / f"{name}-key.pem").stat().st_mode & 0o077 == 0  # keys are private
    sans = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "dataplane.pem"), "-noout", "-text"],
                          capture_output=True, text=True).stdout
    assert "DNS:nanoplane-dataplane" in sans and "IP Address:10.1.2.3" in sans
    client = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "controlplane-client.pem"), "-noout", "-text"],
                            capture_output=True, text=True).stdout
    assert "TLS Web Client Authentication" in client


@pytest.fixture(scope="module")
def cli_help() -> dict[str, str]:
    """`nanoplane controlplane --help` and `nanoplane dataplane --help`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return {plane: subprocess.run([sys.executable, "-m", "nanoplane.cli", plane, "--help"], capture_output=True,
                                  text=True, check=True, env=env, timeout=120).stdout
            for plane in ("controlplane", "dataplane")}


def flag_of(env_name: str) -> str:
    """NANOPLANE_CP_DATAPLANE_DNS -> --dataplane-dns"""
    return "--" + env_name.split("_", 2)[2].lower().replace("_", "-")


def test_fleet_compose_runs_one_control_plane_and_two_data_planes_with_a_shared_token(cli_help):
    compose = yaml.safe_load((DEPLOY / "compose.fleet.yaml").read_text())
    services = compose["services"]
    planes = {name: s for name, s in services.items() if name.startswith("dataplane")}
    cp = services["controlplane"]
    assert len(planes) == 2 and set(services) == {*planes, "controlplane"}
    assert cp["environment"]["NANOPLANE_CP_DATAPLANE"].split(",") == [f"{name}:50061" for name in planes]
    gpus = set()
    for name, dp in planes.items():
        assert dp["build"]["dockerfile"] == "deploy/dataplane.Dockerfile"
        # on the compose network, not loopback: without a credential the data plane would refuse to start
        token = dp["environment"]["NANOPLANE_DP_AUTH_TOKEN_FILE"]
        assert token == "/run/secrets/dataplane_token" and "dataplane_token" in dp["secrets"]
        gpus |= set(dp["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"])
        assert dp["command"][0] in cli_help["dataplane"]
    assert len(gpus) == 2, "both data planes on one GPU"
    assert cp["environment"]["NANOPLANE_CP_DATAPLANE_TOKEN_FILE"] == token and "dataplane_token" in cp["secrets"]
    assert cp["environment"]["NANOPLANE_CP_ADMIN_TOKEN_FILE"].removeprefix("/run/secrets/") in cp["secrets"]
    assert set(cp["depends_on"]) == set(planes)
    assert compose["secrets"]["dataplane_token"]["file"] == "./dataplane.token"
    ignored = (DEPLOY / ".gitignore").read_text().split()
    for secret in compose["secrets"].values():  # the secrets' files stay out of git
        assert secret["file"].removeprefix("./") in ignored
    for service in services.values():
        for name in service.get("environment", {}):
            assert flag_of(name) in cli_help["controlplane" if name.startswith("NANOPLANE_CP_") else "dataplane"]


def test_fleet_kubernetes_data_planes_are_a_statefulset_the_control_plane_discovers(cli_help):
    objects = k8s_objects("k8s-fleet")
    planes = objects[("StatefulSet", "nanoplane-dataplane")]
    service = objects[("Service", planes["spec"]["serviceName"])]
    assert service["spec"]["clusterIP"] == "None"  # headless: one address per ready pod
    pod_labels = planes["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert planes["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert planes["spec"]["replicas"] >= 2
    dp = container(planes)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # each plane its own health
        assert dp[probe]["grpc"]["port"] == int(env(dp)["NANOPLANE_DP_HEALTH_PORT"])
    assert env(dp)["NANOPLANE_DP_HOST"] == "0.0.0.0" and dp["resources"]["limits"]["nvidia.com/gpu"] == 1
    grpc_port = int(env(dp)["NANOPLANE_DP_PORT"])
    assert service["spec"]["ports"][0]["port"] == grpc_port

    controlplane = objects[("Deployment", "nanoplane-controlplane")]
    cp = container(controlplane)
    assert env(cp)["NANOPLANE_CP_DATAPLANE_DNS"] == f"{service['metadata']['name']}:{grpc_port}"
    assert "NANOPLANE_CP_DATAPLANE" not in env(cp)  # with --dataplane-dns the default local plane is left out

    def secret_file(workload: dict, c: dict, path: str) -> str:
        """The Secret holding the file at path in container c."""
        mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        volume = next(v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
        return volume["secret"]["secretName"]

    token = secret_file(planes, dp, env(dp)["NANOPLANE_DP_AUTH_TOKEN_FILE"])
    assert secret_file(controlplane, cp, env(cp)["NANOPLANE_CP_DATAPLANE_TOKEN_FILE"]) == token
    assert secret_file(controlplane, cp, env(cp)["NANOPLANE_CP_ADMIN_TOKEN_FILE"]) != token
    assert "grpc" in cp["readinessProbe"] and "grpc" in cp["startupProbe"]
    for workload, plane in ((planes, "dataplane"), (controlplane, "controlplane")):
        assert workload["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        for name in env(container(workload)):
            assert flag_of(name) in cli_help[plane], name
    policy = objects[("NetworkPolicy", "nanoplane-dataplane")]  # the token travels in plaintext: who may connect
    api_rule = next(r for r in policy["spec"]["ingress"] if "from" in r)
    assert api_rule["from"][0]["podSelector"]["matchLabels"] == controlplane["spec"]["template"]["metadata"]["labels"]
    assert api_rule["ports"] == [{"port": grpc_port}]
