# The control plane: tokenizer, scheduler and the public gRPC API. CPU only, no torch.
# Build from the repository root:  docker build -f deploy/controlplane.Dockerfile -t nanoplane-controlplane .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proto proto
COPY controlplane controlplane
COPY dataplane dataplane
COPY client client
# The package without its dependencies, then only what the control plane imports: torch stays out.
RUN pip install --no-deps . \
 && pip install "grpcio>=1.66" "grpcio-reflection>=1.66" "grpcio-health-checking>=1.66" "protobuf>=5.29" \
        "numpy>=1.26" "xxhash>=3.4" "structlog>=24.1" "transformers>=4.51" "tokenizers>=0.20" "gguf>=0.10" \
 && pip install --no-deps "xgrammar>=0.2.9" && pip install "apache-tvm-ffi>=0.1.11" "pydantic>=2"

RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin nanoplane
USER 10001

# Every flag is also an environment variable (nanoplane controlplane --help).
ENV NANOPLANE_CP_HOST=0.0.0.0 \
    NANOPLANE_CP_PORT=50051 \
    NANOPLANE_CP_HEALTH_PORT=50052 \
    NANOPLANE_LOG_FORMAT=json \
    HF_HUB_OFFLINE=1
EXPOSE 50051 50052 9090

# The plaintext health port answers even when the API port needs TLS and a token.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD python -m proto.healthcheck --target "127.0.0.1:${NANOPLANE_CP_HEALTH_PORT}"

# SIGTERM drains: NOT_SERVING, in-flight streams get --shutdown-grace-s (30 s) to finish.
STOPSIGNAL SIGTERM
ENTRYPOINT ["nanoplane", "controlplane"]
