"""ControlPlaneConfig: every option of the control plane, filled from flags or environment, validated once."""
from __future__ import annotations

from dataclasses import dataclass

from controlplane.core.speculative import MAX_SPECULATIVE_TOKENS, SpeculativeConfig

ENV_PREFIX = "NANOPLANE_CP_"


@dataclass
class ControlPlaneConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    dataplane: str = "127.0.0.1:50061"  # one or more HOST:PORT, comma-separated
    transport: str = "auto"  # auto | shm | grpc: how steps reach the data plane
    tokenizer: str = ""  # empty = the model path the data plane reports
    served_model_name: str = ""  # empty = the data plane's model name
    enable_prefix_caching: bool = True
    dataplane_connect_timeout_s: float = 60.0
    max_logprobs: int = 20
    max_n: int = 16
    overlap: bool = True
    structured_output_threads: int = 0  # 0 = half the cores, at most 8
    # speculative decoding (docs/speculative.md)
    speculative_method: str = SpeculativeConfig.method
    num_speculative_tokens: int = SpeculativeConfig.num_speculative_tokens
    speculative_ngram_min: int = SpeculativeConfig.ngram_min
    speculative_ngram_max: int = SpeculativeConfig.ngram_max
    speculative_disable_batch_size: int = SpeculativeConfig.disable_batch_size
    speculative_min_acceptance: float = SpeculativeConfig.min_acceptance
    # many data planes (docs/multi_dataplane.md)
    dataplane_dns: str = ""
    dataplane_discovery_interval_s: float = 5.0
    placement: str = "prefix"
    scheduling_policy: str = "fcfs"
    priority_aging_requests: int = 1000
    admin_token_file: str = ""
    # reliability (docs/reliability.md)
    dataplane_reconnect_timeout_s: float = 60.0
    max_waiting_requests: int = 1024
    max_pending_tokens: int = 4 * 2**20
    # running it like production (docs/operations.md)
    tls_cert: str = ""
    tls_key: str = ""
    auth_token_file: str = ""
    max_message_bytes: int = 16 * 2**20
    health_port: int = 0
    metrics_port: int = 0
    metrics_auth_token_file: str = ""
    shutdown_grace_s: float = 30.0
    dataplane_tls_ca: str = ""
    dataplane_tls_cert: str = ""
    dataplane_tls_key: str = ""
    dataplane_tls_server_name: str = ""
    dataplane_max_message_bytes: int = 64 * 2**20
    dataplane_keepalive_s: float = 5.0
    dataplane_keepalive_timeout_s: float = 5.0
    dataplane_health_interval_s: float = 2.0
    dataplane_token_file: str = "auto"
    dataplane_liveness_timeout_s: float = 8.0  # + up to 2 probes of 0.8 s: lost within 10 s
    max_prompt_chars: int = 2**20
    max_prompt_tokens: int = 2**18
    tokenizer_workers: int = 2

    def validate(self) -> None:
        problems = []
        if not 0 <= self.port < 65536:
            problems.append(f"--port must be in [0, 65535], got {self.port}")
        from controlplane.link.discovery import split_targets, target_problem
        from controlplane.serving.placement import POLICIES
        problems += filter(None, (target_problem(t, "--dataplane") for t in split_targets(self.dataplane)))
        if self.dataplane_dns and (problem := target_problem(self.dataplane_dns, "--dataplane-dns")):
            problems.append(problem)
        if not split_targets(self.dataplane) and not self.dataplane_dns:
            problems.append("give the data planes with --dataplane HOST:PORT[,HOST:PORT...] or --dataplane-dns NAME:PORT")
        if self.dataplane_discovery_interval_s <= 0:
            problems.append("--dataplane-discovery-interval-s must be positive")
        if self.placement not in POLICIES:
            problems.append(f"--placement must be one of {', '.join(POLICIES)}, got {self.placement!r}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            problems.append(f"--scheduling-policy must be fcfs or priority, got {self.scheduling_policy!r}")
        if self.priority_aging_requests < 1:
            problems.append(f"--priority-aging-requests must be >= 1, got {self.priority_aging_requests}")
        if self.transport not in ("auto", "shm", "grpc"):
            problems.append(f"--transport must be auto, shm or grpc, got {self.transport!r}")
        if self.dataplane_connect_timeout_s <= 0:
            problems.append("--dataplane-connect-timeout-s must be positive")
        if self.max_logprobs < 0:
            problems.append(f"--max-logprobs must be >= 0, got {self.max_logprobs}")
        if self.structured_output_threads < 0:
            problems.append(f"--structured-output-threads must be >= 0, got {self.structured_output_threads}")
        problems += self.speculative_config().problems()
        if self.max_n < 1:
            problems.append(f"--max-n must be >= 1, got {self.max_n}")
        if self.dataplane_reconnect_timeout_s < 0:
            problems.append("--dataplane-reconnect-timeout-s must not be negative")
        if self.max_waiting_requests < 1:
            problems.append(f"--max-waiting-requests must be >= 1, got {self.max_waiting_requests}")
        if self.max_pending_tokens < 1:
            problems.append(f"--max-pending-tokens must be >= 1, got {self.max_pending_tokens}")
        if self.dataplane_liveness_timeout_s <= 0:
            problems.append(f"--dataplane-liveness-timeout-s must be positive, got {self.dataplane_liveness_timeout_s}")
        for flag, value in (("--max-prompt-chars", self.max_prompt_chars),
                            ("--max-prompt-tokens", self.max_prompt_tokens),
                            ("--tokenizer-workers", self.tokenizer_workers)):
            if value < 1:
                problems.append(f"{flag} must be >= 1, got {value}")
        from controlplane.ops.security import config_problems  # imports grpc, which config users need anyway
        problems += config_problems(self)
        if problems:
            raise ValueError("invalid control plane configuration: " + "; ".join(problems))

    def speculative_config(self) -> SpeculativeConfig:
        return SpeculativeConfig(self.speculative_method, self.num_speculative_tokens, self.speculative_ngram_min,
                                 self.speculative_ngram_max, self.speculative_disable_batch_size,
                                 self.speculative_min_acceptance)


# Options of a data plane elsewhere; `nanoplane serve` starts its own on loopback and leaves them out.
REMOTE_DATAPLANE_FIELDS = ("dataplane", "dataplane_tls_ca", "dataplane_tls_cert", "dataplane_tls_key",
                           "dataplane_tls_server_name", "dataplane_token_file")

HELP = {
    "host": "address the public Generation API listens on",
    "port": "port the public Generation API listens on (0 = pick a free one)",
    "dataplane": "HOST:PORT of the data plane's gRPC service; several, comma-separated, for many data planes "
                 "behind this control plane (docs/multi_dataplane.md)",
    "dataplane_dns": "NAME:PORT: also use every address NAME resolves to as a data plane, re-resolved every "
                     "--dataplane-discovery-interval-s (a Kubernetes headless Service); with it, the default "
                     "--dataplane is left out",
    "dataplane_discovery_interval_s": "how often new data planes (DNS, or listed ones that did not answer) are "
                                      "looked for and joined",
    "placement": "which data plane a new request goes to: prefix (where the longest prefix of it is cached, "
                 "unless that plane is much busier), least-loaded or round-robin",
    "scheduling_policy": "fcfs (arrival order) or priority (a request's priority, lower first; under KV "
                         "pressure the lowest-priority newest sequence is preempted first)",
    "priority_aging_requests": "with --scheduling-policy priority, a request of priority p is ordered as if it "
                               "arrived p × this many requests later: it waits behind at most that many later "
                               "arrivals per priority level of difference (starvation bound)",
    "admin_token_file": "file of bearer tokens, one per line, that the Admin API (drain, undrain, join, list) "
                        "accepts (also NANOPLANE_CP_ADMIN_TOKENS); none = the Admin API refuses every call",
    "transport": "how step plans and results travel: auto (shared memory when the data plane runs on this host "
                 "and offers it, else gRPC), shm (fail at start-up when it cannot) or grpc",
    "tokenizer": "tokenizer path (HF folder or .gguf); empty = the data plane's model path",
    "served_model_name": "model name reported to clients; empty = the data plane's",
    "enable_prefix_caching": "reuse KV blocks of identical prompt prefixes",
    "dataplane_connect_timeout_s": "how long to wait for the data plane at start-up",
    "max_logprobs": "most top logprobs a request may ask for per token (sampling.logprobs, prompt_logprobs)",
    "max_n": "most parallel samples a request may ask for (sampling.n)",
    "overlap": "plan step N+1 while the data plane runs step N (stop conditions act one step late; "
               "--no-overlap waits for each result before planning the next step)",
    "structured_output_threads": "threads filling structured output's token bitmasks each step, per data plane "
                                 "(0 = half the cores, at most 8; the whole batch's masks are filled in parallel)",
    "speculative_method": "speculative decoding: ngram (drafts from the sequence's own tokens, vLLM's prompt "
                          "lookup; docs/speculative.md) or empty (off)",
    "num_speculative_tokens": f"with --speculative-method, the most draft tokens a sequence proposes per step "
                              f"(1 to {MAX_SPECULATIVE_TOKENS})",
    "speculative_ngram_min": "the shortest suffix of a sequence's tokens the n-gram proposer looks up",
    "speculative_ngram_max": "the longest suffix of a sequence's tokens the n-gram proposer looks up (it tries "
                             "the longest first)",
    "speculative_disable_batch_size": "no sequence speculates while more than this many run (0 = no limit): a "
                                      "large batch already keeps the device busy",
    "speculative_min_acceptance": "a sequence whose share of accepted drafts (a moving average) falls below this "
                                  "decodes without drafts for a while, then tries again",
    "dataplane_reconnect_timeout_s": "when the data plane is lost, how long requests in flight wait for it to come "
                                     "back (they are recomputed then) before they fail with UNAVAILABLE",
    "max_waiting_requests": "most requests waiting for a batch slot; more get RESOURCE_EXHAUSTED at once",
    "max_pending_tokens": "most tokens (prompt + max_tokens × n) of all unfinished requests; more get "
                          "RESOURCE_EXHAUSTED at once",
    "tls_cert": "PEM certificate (chain) of the public API; with --tls-key, clients must use TLS",
    "tls_key": "PEM private key of --tls-cert",
    "auth_token_file": "file of bearer tokens, one per line, that the public API accepts "
                       "(also NANOPLANE_CP_AUTH_TOKENS, comma-separated); none = no authentication",
    "max_message_bytes": "largest request or response message of the public API",
    "health_port": "plaintext port serving only grpc.health.v1, for probes that cannot do TLS (0 = off)",
    "metrics_port": "port of the Prometheus /metrics endpoint over HTTP (0 = off)",
    "metrics_auth_token_file": "file of bearer tokens, one per line, that GET /metrics requires (401 without "
                               "one); empty = /metrics is open",
    "shutdown_grace_s": "on SIGTERM, how long in-flight requests may run on before they are aborted",
    "dataplane_tls_ca": "PEM CA certificate that signed the data plane's certificate; turns TLS to the data plane on",
    "dataplane_tls_cert": "PEM client certificate presented to the data plane (mutual TLS)",
    "dataplane_tls_key": "PEM private key of --dataplane-tls-cert",
    "dataplane_tls_server_name": "name to verify in the data plane's certificate; empty = the host of --dataplane",
    "dataplane_max_message_bytes": "largest message on the connection to the data plane",
    "dataplane_keepalive_s": "send the data plane a keepalive ping this often (seconds), to notice when it is gone",
    "dataplane_keepalive_timeout_s": "the data plane is gone when a ping gets no answer within this",
    "dataplane_health_interval_s": "how often the data plane's health is checked, for this plane's health",
    "dataplane_token_file": "file holding the data plane's token (its --auth-token-file), presented on every call "
                            "to it; auto: the per-launch token of a data plane on loopback, read from where it "
                            "wrote it (none for another host: then give the file, or use mutual TLS)",
    "dataplane_liveness_timeout_s": "while a step is outstanding, a data plane that neither answers it nor a health "
                                    "probe for this long (frozen, stopped, a hung host) is declared lost and the "
                                    "requests wait for it to come back (--dataplane-reconnect-timeout-s)",
    "max_prompt_chars": "longest prompt (or chat messages' content together) in characters; longer ones get "
                        "INVALID_ARGUMENT before they are tokenized",
    "max_prompt_tokens": "most tokens a prompt may encode to (the model length also bounds it)",
    "tokenizer_workers": "threads that tokenize prompts, off the API's event loop; also the most prompts tokenized "
                         "at once (the others wait their turn)",
}
