"""deploy/: the YAML parses and says what it must (GPU, gRPC probes, mTLS from mounted certificates), the
Dockerfiles run as non-root with a health check, and gen-certs.sh makes certificates that verify.
The images themselves are not built here (no Docker engine in CI)."""
import os
import shutil
import subprocess
from dataclasses import fields

import pytest

from tests.stack import ROOT

yaml = pytest.importorskip("yaml", reason="PyYAML checks the deploy files' syntax")
DEPLOY = ROOT / "deploy"


def k8s_objects() -> dict[tuple[str, str], dict]:
    objects = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
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
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    names = set()
    for service in compose["services"].values():
        names |= set(service.get("environment", {}))
    for deployment in (d for (kind, _), d in k8s_objects().items() if kind == "Deployment"):
        names |= env(container(deployment)).keys()
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
