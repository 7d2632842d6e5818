"""GatewayConfig: every option of the OpenAI-compatible HTTP gateway, filled from flags or environment."""
from __future__ import annotations

from dataclasses import dataclass

ENV_PREFIX = "NANOPLANE_GATEWAY_"


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


@dataclass
class GatewayConfig:
    target: str = "localhost:50051"
    host: str = "127.0.0.1"
    http_port: int = 8000
    tls_ca: str = ""
    max_body_bytes: int = 8 * 2**20
    shutdown_grace_s: float = 30.0
    cors_allowed_origins: str = ""  # comma-separated; empty = no CORS headers
    cors_allowed_methods: str = "GET,POST"
    cors_allowed_headers: str = "Authorization,Content-Type"
    cors_allow_credentials: bool = False

    def validate(self) -> None:
        problems = []
        if not 0 <= self.http_port < 65536:
            problems.append(f"--http-port must be in [0, 65535], got {self.http_port}")
        if ":" not in self.target:
            problems.append(f"--target must be HOST:PORT, got {self.target!r}")
        if self.max_body_bytes < 1:
            problems.append(f"--max-body-bytes must be positive, got {self.max_body_bytes}")
        if self.shutdown_grace_s < 0:
            problems.append(f"--shutdown-grace-s must not be negative, got {self.shutdown_grace_s}")
        if self.cors_allow_credentials and "*" in comma_list(self.cors_allowed_origins):
            problems.append("--cors-allow-credentials needs --cors-allowed-origins to list origins, not `*` "
                            "(browsers refuse credentials for any origin)")
        if problems:
            raise ValueError("invalid gateway configuration: " + "; ".join(problems))


# `nanoplane serve --http-port` runs the gateway beside the control plane: its address, the target and the
# TLS towards it follow from the control plane's options
SERVE_OWNED_FIELDS = ("target", "host", "http_port", "tls_ca", "shutdown_grace_s")

HELP = {
    "target": "HOST:PORT of the control plane's gRPC API",
    "host": "address the HTTP server listens on",
    "http_port": "port the HTTP server listens on (0 = any free one)",
    "tls_ca": "PEM CA certificate: reach the target over TLS verified against it; empty = plaintext",
    "max_body_bytes": "largest request body accepted (413 beyond it)",
    "shutdown_grace_s": "on SIGTERM, how long streams in flight may run on before they are cut (a second signal "
                        "cuts them at once)",
    "cors_allowed_origins": "comma-separated origins whose browser pages may call the API (CORS), `*` for any; "
                            "empty = no CORS headers",
    "cors_allowed_methods": "comma-separated HTTP methods allowed across origins (with --cors-allowed-origins)",
    "cors_allowed_headers": "comma-separated request headers allowed across origins (with --cors-allowed-origins)",
    "cors_allow_credentials": "let cross-origin requests carry cookies and HTTP authentication "
                              "(needs listed origins, not `*`)",
}
