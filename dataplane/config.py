"""DataPlaneConfig: every option of the data plane, filled from flags or environment, validated once."""
from __future__ import annotations

import os
from dataclasses import dataclass

ENV_PREFIX = "NANOPLANE_DP_"
# here, not beside their code, so that validating flags imports no torch
QUANTIZATION_CHOICES = ("auto", "none", "fp8")  # dataplane/quantization.py
KV_CACHE_DTYPE_CHOICES = ("auto", "fp8")  # dataplane/kv_fp8.py
CPU_WEIGHTS_CHOICES = ("auto", "fp32", "bf16", "int4", "int8")  # dataplane/cpu_weights.py


@dataclass
class DataPlaneConfig:
    model: str = ""
    load_format: str = "auto"  # auto | dummy (random weights from config.json alone, for benchmarks)
    host: str = "127.0.0.1"
    port: int = 50061
    shm_socket: str = "auto"  # Unix socket of same-host shared-memory step sessions; auto | off | a path
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    quantization: str = "auto"  # auto (the checkpoint's) | none | fp8 (dataplane/quantization.py)
    kv_cache_dtype: str = "auto"  # auto (= dtype) | fp8 (e4m3 with per-layer scales, dataplane/kv_fp8.py)
    cpu_weights: str = "auto"  # auto | fp32 | bf16 | int4 | int8: linear layers' weights on a CPU (dataplane/cpu_weights.py)
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 0  # 0 = the model's own
    num_kv_blocks: int = 0  # 0 = size from memory
    cpu_kv_cache_gib: float = 1.0
    gpu_memory_utilization: float = 0.9
    attention_backend: str = "auto"  # auto | cpu | torch | triton | flash-attn
    enforce_eager: bool = False
    warm_up: str = "auto"  # auto (on a GPU) | on | off: synthetic steps before serving (dataplane/warmup.py)
    tensor_parallel_size: int = 1
    seed: int = 0
    num_threads: int = 0  # torch intra-op threads; 0 = auto (dataplane/cpu_threads.py)
    # running it like production (docs/operations.md)
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    max_message_bytes: int = 64 * 2**20
    health_port: int = 0
    keepalive_s: float = 10.0
    keepalive_timeout_s: float = 5.0
    auth_token_file: str = "auto"  # auto | a path: the credential every DataPlane RPC must carry
    insecure: bool = False  # serve whoever reaches --host without a credential

    def validate(self) -> None:
        problems = []
        if not self.model:
            problems.append("--model is required (a Hugging Face folder or a .gguf file)")
        else:
            problems += model_path_problems(self.model)
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            problems.append(f"--block-size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            problems.append(f"--max-num-seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            problems.append("--max-num-batched-tokens must be at least --max-num-seqs")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            problems.append(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.cpu_kv_cache_gib <= 0:
            problems.append(f"--cpu-kv-cache-gib must be positive, got {self.cpu_kv_cache_gib}")
        if self.load_format not in ("auto", "dummy"):
            problems.append(f"--load-format must be auto or dummy, got {self.load_format!r}")
        if self.num_threads < 0:
            problems.append(f"--num-threads must be 0 (auto) or more, got {self.num_threads}")
        if self.tensor_parallel_size < 1:
            problems.append(f"--tensor-parallel-size must be at least 1, got {self.tensor_parallel_size}")
        if self.warm_up not in ("auto", "on", "off"):
            problems.append(f"--warm-up must be auto, on or off, got {self.warm_up!r}")
        elif self.warm_up == "on" and self.tensor_parallel_size > 1:
            problems.append("--warm-up on needs --tensor-parallel-size 1 (ranks do not warm up together yet); "
                            "use auto or off")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            problems.append(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quantization not in QUANTIZATION_CHOICES:
            problems.append(f"unsupported --quantization {self.quantization!r}; supported: "
                            f"{', '.join(QUANTIZATION_CHOICES)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPE_CHOICES:
            problems.append(f"unsupported --kv-cache-dtype {self.kv_cache_dtype!r}; supported: "
                            f"{', '.join(KV_CACHE_DTYPE_CHOICES)}")
        if self.cpu_weights not in CPU_WEIGHTS_CHOICES:
            problems.append(f"unsupported --cpu-weights {self.cpu_weights!r}; supported: "
                            f"{', '.join(CPU_WEIGHTS_CHOICES)}")
        from dataplane.security import config_problems
        problems += config_problems(self)
        if problems:
            raise ValueError("invalid data plane configuration: " + "; ".join(problems))


def model_path_problems(model: str) -> list[str]:
    """Checked before anything loads, so that a mistyped path is one line, not a traceback from the loader."""
    if not os.path.exists(model):
        return [f"--model {model}: no such file or folder; give a Hugging Face folder (config.json + "
                "safetensors) or a .gguf file"]
    if os.path.isdir(model) and not os.path.exists(os.path.join(model, "config.json")):
        return [f"--model {model}: the folder has no config.json; give a Hugging Face folder or a .gguf file"]
    if os.path.isfile(model) and not model.endswith(".gguf"):
        return [f"--model {model}: a file that is not .gguf; give a Hugging Face folder or a .gguf file"]
    return []


HELP = {
    "model": "Hugging Face folder (config.json + safetensors) or .gguf file to serve; `nanoplane serve` and "
             "`nanoplane dataplane` serve the embedded SmolLM2-135M-Instruct when it is empty",
    "load_format": "auto (weights from the checkpoint) or dummy (random weights of config.json's architecture)",
    "host": "address the DataPlane gRPC service listens on",
    "port": "port the DataPlane gRPC service listens on (0 = pick a free one)",
    "shm_socket": "Unix socket on which control planes on this host open shared-memory step sessions (advertised "
                  "in Describe): auto (a private temporary directory), off, or a path (shared with a control plane "
                  "in another container through a volume)",
    "device": "auto, cpu, cuda or cuda:N",
    "dtype": "weights and KV cache dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16",
    "quantization": "weight quantization: auto (what the checkpoint is: FP8 checkpoints, with 128x128 block or "
                    "compressed-tensors per-channel scales, serve in FP8), none (weights in --dtype), fp8 (FP8 e4m3 "
                    "linear layers with per-channel weight and per-token activation scales; needs compute "
                    "capability 8.9+, or the CPU)",
    "kv_cache_dtype": "KV cache element type: auto (--dtype) or fp8 (e4m3 with a scale per layer: half the bytes of "
                      "bf16; the triton and torch attention backends)",
    "cpu_weights": "how the linear layers hold their weights on a CPU (no effect on a GPU): auto (fp32: the "
                   "fastest measured end to end on a 2-core AVX2 host), fp32 (--dtype, the oracle), "
                   "bf16, int4 (group-wise int4, group 32: GGUF Q4_0/Q4_1 blocks taken as they are, other weights "
                   "quantized at load), int8 (per-output-channel int8, the LM head too)",
    "block_size": "tokens per KV cache block",
    "max_num_seqs": "sequences per step (batch slots)",
    "max_num_batched_tokens": "tokens per step (the chunked-prefill budget)",
    "max_model_len": "longest sequence (prompt + output); 0 = the model's own",
    "num_kv_blocks": "KV cache blocks; 0 = size from memory",
    "cpu_kv_cache_gib": "KV cache size on CPU when --num-kv-blocks is 0",
    "gpu_memory_utilization": "fraction of GPU memory for weights, activations and KV cache",
    "attention_backend": "auto, cpu, torch, triton or flash-attn",
    "enforce_eager": "disable CUDA graphs",
    "warm_up": "run a few synthetic steps before serving, so that the first requests do not wait for kernels "
               "to compile: auto (on a GPU, one rank), on, off",
    "tensor_parallel_size": "split the model over this many ranks, one process per GPU (GPUs N, N+1, ... for "
                            "--device cuda:N), NCCL between them; on CPU, processes talking gloo",
    "seed": "seed of the data plane's sampler for unseeded requests",
    "num_threads": "threads torch computes with (0 = auto: on a CPU, every core this process may run on, shared "
                   "between the tensor-parallel ranks; on a GPU, torch's default)",
    "tls_cert": "PEM certificate (chain) of this server; with --tls-key, control planes must use TLS",
    "tls_key": "PEM private key of --tls-cert",
    "tls_client_ca": "PEM CA certificate: accept only control planes presenting a client certificate it signed "
                     "(mutual TLS; needs --tls-cert)",
    "max_message_bytes": "largest step plan or result message",
    "health_port": "plaintext port serving only grpc.health.v1, for probes that cannot do TLS (0 = off)",
    "keepalive_s": "send the control plane a keepalive ping this often (seconds), to notice when it is gone "
                   "and free its Step stream",
    "keepalive_timeout_s": "the control plane is gone when a ping gets no answer within this",
    "auth_token_file": "file holding the token every DataPlane RPC and shared-memory session must present (the "
                       "control plane's --dataplane-token-file); auto: on a loopback --host without mutual TLS, a "
                       "per-launch token written where only this user can read it and a control plane on this host "
                       "finds it; elsewhere none, so a non-loopback --host needs mutual TLS, a file, or --insecure",
    "insecure": "serve any process that reaches --host without a credential (no token, no mutual TLS)",
}

# What `nanoplane serve` fixes for the data plane it starts as a loopback child: the control
# plane's flags of these names (--port, --tls-cert, ...) are about the control plane's own port.
SERVE_CHILD_OVERRIDES = {"host": "127.0.0.1", "port": 0, "tls_cert": "", "tls_key": "", "tls_client_ca": "",
                         "health_port": 0, "max_message_bytes": DataPlaneConfig.max_message_bytes,
                         "auth_token_file": "auto", "insecure": False}
