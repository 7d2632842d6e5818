"""ModelRunner: loads the model, sizes the KV cache, and executes StepPlans.

One `execute(plan)` = fold the plan's deltas into the persistent batch, run the
model over the scheduled tokens, sample the rows that finish their chunk, and
return the sampled ids. The control plane decides everything else.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import structlog
import torch

from dataplane.attention import available_backends
from dataplane.batch_state import BatchState, PlanError
from dataplane.config import DataPlaneConfig
from dataplane.context import forward_context
from dataplane.kv_cache import allocate_kv_cache, bind_kv_cache, num_blocks_for_bytes
from dataplane.layers.attention import set_attention_backend
from dataplane.layers.sampler import Sampler
from dataplane.loader import load_model
from dataplane.model_config import ModelConfig
from proto.step import StepPlan, StepResult

log = structlog.get_logger("dataplane.runner")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class DataPlaneFacts:
    """What Describe reports: the model and the capacity this data plane sized itself to."""

    model_name: str
    model_path: str
    architecture: str
    vocab_size: int
    max_model_len: int
    block_size: int
    num_kv_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    eos_token_ids: list[int]
    dtype: str
    device: str
    attention_backend: str
    kv_bytes_per_token: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA GPU")
    return device


def resolve_attention_backend(name: str, device: torch.device) -> str:
    backends = available_backends()
    if name == "auto":
        if device.type == "cuda":
            for preferred in ("flash-attn", "triton"):
                if preferred in backends:
                    return preferred
        return "torch"
    if name not in backends:
        raise ValueError(f"--attention-backend {name!r} is not available here; available: {', '.join(backends)}")
    return name


class ModelRunner:
    def __init__(self, config: DataPlaneConfig):
        self.config = config
        self.device = resolve_device(config.device)
        if config.num_threads > 0:
            torch.set_num_threads(config.num_threads)
        dtype_name = config.dtype if config.dtype != "auto" else ("bfloat16" if self.device.type == "cuda" else "float32")
        self.dtype = DTYPES[dtype_name]
        self.attention_backend = resolve_attention_backend(config.attention_backend, self.device)
        set_attention_backend(self.attention_backend)

        started = time.perf_counter()
        self.model, self.model_config = load_model(config.model, self.dtype, self.device)
        self.model.eval()
        mc: ModelConfig = self.model_config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.num_blocks = self._size_kv_cache(mc)
        self.kv_cache = allocate_kv_cache(mc, self.num_blocks, config.block_size, self.dtype, self.device)
        bind_kv_cache(self.model, self.kv_cache)
        max_blocks_per_seq = (self.max_model_len + config.block_size - 1) // config.block_size
        self.batch = BatchState(config.max_num_seqs, max_blocks_per_seq, config.block_size, self.num_blocks,
                                self.max_model_len, mc.vocab_size, self.device)
        self.sampler = Sampler()
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        log.info("data plane ready", model=config.model, architecture=mc.architecture, device=str(self.device),
                 dtype=dtype_name, attention_backend=self.attention_backend, num_kv_blocks=self.num_blocks,
                 block_size=config.block_size, max_model_len=self.max_model_len,
                 load_s=round(time.perf_counter() - started, 2))

    def _size_kv_cache(self, mc: ModelConfig) -> int:
        cfg = self.config
        if cfg.num_kv_blocks > 0:
            return cfg.num_kv_blocks
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - (1 - cfg.gpu_memory_utilization) * total
        else:
            budget = cfg.cpu_kv_cache_gib * 2**30
        num_blocks = num_blocks_for_bytes(mc, cfg.block_size, self.dtype, int(budget))
        if num_blocks < 1:
            raise RuntimeError(f"no memory left for the KV cache (budget {budget / 2**30:.2f} GiB)")
        return num_blocks

    def facts(self) -> DataPlaneFacts:
        mc = self.model_config
        return DataPlaneFacts(
            model_name=mc.model_name, model_path=self.config.model, architecture=mc.architecture,
            vocab_size=mc.vocab_size, max_model_len=self.max_model_len, block_size=self.config.block_size,
            num_kv_blocks=self.num_blocks, max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens, eos_token_ids=list(mc.eos_token_ids),
            dtype=str(self.dtype).removeprefix("torch."), device=str(self.device),
            attention_backend=self.attention_backend, kv_bytes_per_token=mc.kv_bytes_per_token(self.dtype),
        )

    def reset(self) -> None:
        """Forget every sequence: a new control-plane stream starts from an empty batch."""
        self.batch.reset()

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        if plan.run_num_tokens.sum() > self.config.max_num_batched_tokens:
            raise PlanError(f"plan {plan.step_id} runs more than max_num_batched_tokens "
                            f"({self.config.max_num_batched_tokens}) tokens")
        inputs = self.batch.apply(plan)
        if inputs is None:
            return StepResult(step_id=plan.step_id)
        with forward_context(inputs.meta):
            hidden = self.model(inputs.input_ids, inputs.positions)
        if len(inputs.sampled_slots) == 0:
            return StepResult(step_id=plan.step_id)
        logits = self.model.compute_logits(hidden[inputs.sample_indices])
        s = inputs.sampling
        token_ids = self.sampler.sample(logits, s.temperature, s.top_p, s.top_k, s.seed, s.has_seed, s.positions,
                                        generator=self.generator)
        self.batch.record_sampled(inputs.sampled_slots, token_ids)
        return StepResult(step_id=plan.step_id, slots=inputs.sampled_slots,
                          token_ids=token_ids.to("cpu", dtype=torch.int32).numpy())
