"""ControlPlaneConfig: every option of the control plane, filled from flags or environment, validated once."""
from __future__ import annotations

from dataclasses import dataclass

ENV_PREFIX = "NANOPLANE_CP_"


@dataclass
class ControlPlaneConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    dataplane: str = "127.0.0.1:50061"
    tokenizer: str = ""  # empty = the model path the data plane reports
    served_model_name: str = ""  # empty = the data plane's model name
    enable_prefix_caching: bool = True
    dataplane_connect_timeout_s: float = 60.0

    def validate(self) -> None:
        problems = []
        if not 0 <= self.port < 65536:
            problems.append(f"--port must be in [0, 65535], got {self.port}")
        if ":" not in self.dataplane:
            problems.append(f"--dataplane must be HOST:PORT, got {self.dataplane!r}")
        if self.dataplane_connect_timeout_s <= 0:
            problems.append("--dataplane-connect-timeout-s must be positive")
        if problems:
            raise ValueError("invalid control plane configuration: " + "; ".join(problems))


HELP = {
    "host": "address the public Generation API listens on",
    "port": "port the public Generation API listens on (0 = pick a free one)",
    "dataplane": "HOST:PORT of the data plane's gRPC service",
    "tokenizer": "tokenizer path (HF folder or .gguf); empty = the data plane's model path",
    "served_model_name": "model name reported to clients; empty = the data plane's",
    "enable_prefix_caching": "reuse KV blocks of identical prompt prefixes",
    "dataplane_connect_timeout_s": "how long to wait for the data plane at start-up",
}
