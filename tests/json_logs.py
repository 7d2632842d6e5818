"""Reading the planes' JSON logs (NANOPLANE_LOG_FORMAT=json) back in tests."""
from __future__ import annotations

import json
from pathlib import Path


def json_lines(path: Path) -> list[dict]:
    """The JSON log entries in a file, skipping lines that are not ours (grpc's C core writes to stderr too)."""
    decoder, entries = json.JSONDecoder(), []
    for line in path.read_text(errors="replace").splitlines():
        i = 0
        while i < len(line):
            try:
                entry, i = decoder.raw_decode(line, i)
            except ValueError:
                break  # not ours: grpc's own stderr lines
            entries.append(entry)
    return entries
