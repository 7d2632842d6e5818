# The data plane: the model, its KV cache and sampling, on one NVIDIA GPU.
# Build from the repository root:  docker build -f deploy/dataplane.Dockerfile -t nanoplane-dataplane .
# The torch wheel brings its own CUDA libraries; the base image brings the rest of the CUDA runtime.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

RUN pip install torch --index-url "$TORCH_INDEX_URL"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proto proto
COPY dataplane dataplane
COPY nanoplane nanoplane
RUN pip install ".[gpu]"

RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin nanoplane
USER 10001

# Every flag is also an environment variable (nanoplane dataplane --help). On 0.0.0.0 the data plane
# needs a credential: NANOPLANE_DP_TLS_* with a client CA (mutual TLS), or NANOPLANE_DP_AUTH_TOKEN_FILE;
# without either it refuses to start (--insecure serves anyone who reaches the port).
ENV NANOPLANE_DP_HOST=0.0.0.0 \
    NANOPLANE_DP_PORT=50061 \
    NANOPLANE_DP_HEALTH_PORT=50062 \
    NANOPLANE_LOG_FORMAT=json \
    HF_HUB_OFFLINE=1
EXPOSE 50061 50062

# SERVING once the weights are loaded and the KV cache is allocated, which can take minutes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD python -m proto.healthcheck --target "127.0.0.1:${NANOPLANE_DP_HEALTH_PORT}"

STOPSIGNAL SIGTERM
ENTRYPOINT ["nanoplane", "dataplane"]
