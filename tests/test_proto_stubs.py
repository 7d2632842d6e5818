"""The committed stubs under proto/nanoplane/v1 must match the .proto sources.

Compiles each .proto with grpc_tools (whatever version is installed) and compares
the resulting FileDescriptorProto with the one embedded in the committed _pb2
module, so the test is independent of the protoc version that generated the stubs.
Regenerate with proto/generate.sh when it fails.
"""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[1]
PROTOS = sorted((ROOT / "proto" / "nanoplane" / "v1").glob("*.proto"))


def compiled_descriptor(proto: Path, tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    pytest.importorskip("grpc_tools")
    out = tmp_path / (proto.stem + ".pb")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT), f"--descriptor_set_out={out}",
                    str(proto.relative_to(ROOT))], check=True, cwd=ROOT)
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[-1]
    # the Python generator leaves out json_name (it is derived from the field name)
    for message in fresh.message_type:
        for field in message.field:
            field.ClearField("json_name")
    return fresh


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_committed_stubs_match_proto_sources(proto, tmp_path):
    module = importlib.import_module(f"proto.nanoplane.v1.{proto.stem}_pb2")
    committed = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
    fresh = compiled_descriptor(proto, tmp_path)
    assert committed == fresh, f"{proto.name} changed: run proto/generate.sh and commit the stubs"


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_grpc_stubs_cover_every_rpc(proto):
    pb2 = importlib.import_module(f"proto.nanoplane.v1.{proto.stem}_pb2")
    grpc_module = importlib.import_module(f"proto.nanoplane.v1.{proto.stem}_pb2_grpc")
    for service in pb2.DESCRIPTOR.services_by_name.values():
        servicer = getattr(grpc_module, service.name + "Servicer")
        for method in service.methods:
            assert hasattr(servicer, method.name), f"{service.name}.{method.name} missing from the grpc stubs"
