#!/usr/bin/env sh
# Regenerates the committed Python stubs from the .proto sources.
# Stubs are generated with an old grpcio-tools on purpose: older gencode runs on
# every newer protobuf/grpcio runtime, newer gencode refuses older runtimes.
# tests/test_proto_stubs.py fails when the stubs drift from the .proto files.
set -eu
cd "$(dirname "$0")/.."
PY=${PROTOC_PYTHON:-python3}
"$PY" -c 'import grpc_tools' 2>/dev/null || {
  echo "needs grpcio-tools==1.66.2: python3 -m venv /tmp/protogen && /tmp/protogen/bin/pip install grpcio-tools==1.66.2 && PROTOC_PYTHON=/tmp/protogen/bin/python $0" >&2
  exit 1
}
"$PY" -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. \
  proto/nanoplane/v1/generation.proto proto/nanoplane/v1/dataplane.proto proto/nanoplane/v1/admin.proto
