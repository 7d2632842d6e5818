# The control plane: tokenizer, scheduler and the public gRPC API. CPU only, no torch.
# Build from the repository root:  docker build -f deploy/controlplane.Dockerfile -t nanoplane-controlplane .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proto proto
COPY controlplane controlplane
COPY client client
COPY gateway gateway
COPY nanoplane nanoplane
# The base package is the control plane's: no torch, no data-plane code. Structured output's xgrammar
# without its declared torch dependency (the control plane imports only its torch-free parts).
RUN pip install . \
 && pip install --no-deps "xgrammar>=0.2.9" && pip install "apache-tvm-ffi>=0.1.11" "pydantic>=2.6"

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
