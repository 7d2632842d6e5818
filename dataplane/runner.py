"""ModelRunner: loads the model, sizes the KV cache, and executes StepPlans.

One step = fold the plan's deltas into the persistent batch, run the model over the
scheduled tokens, sample the rows that finish their chunk, and return the sampled
ids. The control plane decides everything else. `launch(plan)` enqueues the whole step
on the device (inputs built there from one packed upload, graph replay or eager
forward, sampling, one non_blocking copy of the outputs into pinned memory) without
waiting for it, so plan N+1 can be launched while N runs: its decode inputs are N's
samples, already on the device. `PendingStep.result()` waits for the copy.
`execute(plan)` is `launch(plan).result()`. On CPU the step simply runs at launch.

Under tensor parallelism every rank builds its own ModelRunner over its shard and
executes the same plans (dataplane/tp_group.py hands them out); only rank 0 samples,
the other ranks join the LM head's logit gathers (dataplane/tp_worker.py).
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass

import structlog
import torch

from dataplane.attention import available_backends
from dataplane.batch_state import BatchState, PlanError, StepInputs
from dataplane.config import DataPlaneConfig
from dataplane.cpu_weights import convert_linear_layers, resolve_cpu_weights
from dataplane.context import AttentionMetadata, forward_context
from dataplane.cpu_threads import resolve_num_threads, set_torch_threads
from dataplane.cuda_graphs import DecodeGraphs
from dataplane.distributed import get_tp_rank, get_tp_size, min_over_ranks, rank_device
from dataplane.kv_cache import allocate_kv_cache, bind_kv_cache, num_blocks_for_bytes
from dataplane.kv_fp8 import FP8_KV_DTYPE, calibrate_kv_scales, kv_cache_dtype
from dataplane.layers.attention import set_attention_backend
from dataplane.sampling.sampler import Sampler
from dataplane.host_transfer import Downloads, PendingCopy
from dataplane.sampling.logprobs import PROMPT_ROWS_PER_CHUNK
from dataplane.sampling.sampling_step import SamplingStep
from dataplane.loader import load_dummy_model, load_model
from dataplane.model_config import ModelConfig
from dataplane.warmup import warm_up
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


def _backend_supports(name: str, block_size: int, dtype: torch.dtype) -> bool:
    if name != "flash-attn":
        return True
    from dataplane.attention.flash_attn_backend import check_supported
    try:
        check_supported(block_size, dtype)
        return True
    except ValueError as e:
        log.info("flash-attn skipped", reason=str(e))
        return False


def resolve_attention_backend(name: str, device: torch.device, block_size: int, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        for module in ("dataplane.attention.flash_attn_backend", "dataplane.attention.triton_backend"):
            try:
                importlib.import_module(module)  # registers itself when its library is importable
            except ImportError as e:
                log.info("attention backend unavailable", module=module, reason=str(e))
    backends = available_backends()
    if name == "auto":
        if device.type == "cuda":
            for preferred in ("flash-attn", "triton"):
                if preferred in backends and _backend_supports(preferred, block_size, dtype):
                    return preferred
            return "torch"
        return "cpu"
    if name not in backends:
        raise ValueError(f"--attention-backend {name!r} is not available here; available: {', '.join(backends)}")
    if name == "flash-attn":
        from dataplane.attention.flash_attn_backend import check_supported
        check_supported(block_size, dtype)
    return name


class ModelRunner:
    def __init__(self, config: DataPlaneConfig):
        self.config = config
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.device = rank_device(config.device, self.tp_rank)
        # on a CPU the step has run by the time launch() returns: the step loop does not pipeline it
        self.launch_returns_early = self.device.type == "cuda"
        self.num_threads = set_torch_threads(resolve_num_threads(config.num_threads, self.device.type,
                                                                 self.tp_size))
        dtype_name = config.dtype if config.dtype != "auto" else ("bfloat16" if self.device.type == "cuda" else "float32")
        self.dtype = DTYPES[dtype_name]
        self.kv_dtype = kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        self.attention_backend = resolve_attention_backend(config.attention_backend, self.device,
                                                           config.block_size, self.kv_dtype)
        set_attention_backend(self.attention_backend)

        started = time.perf_counter()
        torch.manual_seed(config.seed)  # dummy weights are reproducible
        if config.load_format == "dummy":
            self.model, self.model_config = load_dummy_model(config.model, self.dtype, self.device, config.seed,
                                                             config.quantization)
        else:
            self.model, self.model_config = load_model(config.model, self.dtype, self.device, config.quantization)
        self.model.eval()
        self.cpu_weights = resolve_cpu_weights(config.cpu_weights, self.device)
        convert_linear_layers(self.model, self.cpu_weights)
        mc: ModelConfig = self.model_config
        if self.kv_dtype == FP8_KV_DTYPE:
            calibrate_kv_scales(self.model, mc.vocab_size, self.device, self.dtype, config.seed)
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.max_blocks_per_seq = (self.max_model_len + config.block_size - 1) // config.block_size
        self.num_blocks = min_over_ranks(self._size_kv_cache(mc), self.device)  # ranks' free memory may differ
        self.kv_cache = allocate_kv_cache(mc, self.num_blocks, config.block_size, self.kv_dtype, self.device)
        bind_kv_cache(self.model, self.kv_cache)
        self.batch = BatchState(config.max_num_seqs, self.max_blocks_per_seq, config.block_size, self.num_blocks,
                                self.max_model_len, mc.vocab_size, self.device, config.max_num_batched_tokens)
        self.downloads = Downloads(self.device, capacity_words=2 * config.max_num_seqs)
        self.sampler = Sampler()
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.sampling = SamplingStep(self.model, self.batch, self.sampler, self.generator)
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and self.attention_backend not in ("torch", "cpu"):
            self.graphs = DecodeGraphs(self.model, config.max_num_seqs, self.max_blocks_per_seq, self.max_model_len,
                                       self.device, use_graphs=not config.enforce_eager)
            self.graphs.capture()
        if self._wants_warm_up():
            warm_up(self)
        log.info("data plane ready", tp_rank=self.tp_rank, tp_size=self.tp_size, model=config.model,
                 architecture=mc.architecture, device=str(self.device),
                 cuda_graphs=self.graphs.batch_sizes if self.graphs and self.graphs.use_graphs else None,
                 dtype=dtype_name, quantization=config.quantization, cpu_weights=self.cpu_weights, kv_cache_dtype=str(self.kv_dtype),
                 attention_backend=self.attention_backend, num_kv_blocks=self.num_blocks,
                 block_size=config.block_size, max_model_len=self.max_model_len, num_threads=self.num_threads,
                 load_s=round(time.perf_counter() - started, 2))

    def _wants_warm_up(self) -> bool:
        # every rank would have to run the same steps at the same time: tensor-parallel ranks do not (yet)
        if self.config.warm_up == "auto":
            return self.device.type == "cuda" and self.tp_size == 1
        return self.config.warm_up == "on"

    def _size_kv_cache(self, mc: ModelConfig) -> int:
        cfg = self.config
        if cfg.num_kv_blocks > 0:
            return cfg.num_kv_blocks
        if self.device.type == "cuda":
            budget = self._gpu_kv_budget(mc)
        else:
            budget = cfg.cpu_kv_cache_gib * 2**30
        num_blocks = num_blocks_for_bytes(mc, cfg.block_size, self.kv_dtype, int(budget))
        if num_blocks < 1:
            raise RuntimeError(f"no memory left for the KV cache (budget {budget / 2**30:.2f} GiB)")
        return num_blocks

    @torch.inference_mode()
    def _gpu_kv_budget(self, mc: ModelConfig) -> float:
        """Bytes left for the KV cache: total × utilisation − what is in use − the activation peak of
        a warm-up forward over max_num_batched_tokens (run against a scratch cache just big enough)."""
        cfg = self.config
        tokens = cfg.max_num_batched_tokens
        seq_len = min(tokens, self.max_model_len)
        num_seqs = (tokens + seq_len - 1) // seq_len
        blocks_per_seq = (seq_len + cfg.block_size - 1) // cfg.block_size
        scratch = allocate_kv_cache(mc, num_seqs * blocks_per_seq, cfg.block_size, self.kv_dtype, self.device)
        bind_kv_cache(self.model, scratch)
        lens = [min(seq_len, tokens - i * seq_len) for i in range(num_seqs)]
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lens])
        tables = torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32, device=self.device).view(num_seqs, -1)
        slots = torch.cat([tables[i, torch.arange(n, device=self.device) // cfg.block_size].long() * cfg.block_size
                           + torch.arange(n, device=self.device) % cfg.block_size for i, n in enumerate(lens)])
        meta = AttentionMetadata(
            slot_mapping=slots, query_start_loc=torch.tensor(cu, dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=self.device), block_tables=tables,
            max_query_len=max(lens), max_seq_len=max(lens), query_start_loc_cpu=cu, seq_lens_cpu=lens)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        with forward_context(meta):
            hidden = self.model(torch.zeros(tokens, dtype=torch.long, device=self.device), positions)
            self.model.compute_logits(hidden[-cfg.max_num_seqs:])
        torch.cuda.synchronize()
        activation_peak = torch.cuda.max_memory_allocated(self.device) - before
        del scratch, hidden
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        in_use = total - free
        budget = total * cfg.gpu_memory_utilization - in_use - activation_peak
        log.info("sized KV cache from GPU memory", total_gib=round(total / 2**30, 2), in_use_gib=round(in_use / 2**30, 2),
                 activation_peak_gib=round(activation_peak / 2**30, 2), kv_budget_gib=round(budget / 2**30, 2))
        return budget

    def facts(self) -> DataPlaneFacts:
        mc = self.model_config
        return DataPlaneFacts(
            model_name=mc.model_name, model_path=self.config.model, architecture=mc.architecture,
            vocab_size=mc.vocab_size, max_model_len=self.max_model_len, block_size=self.config.block_size,
            num_kv_blocks=self.num_blocks, max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens, eos_token_ids=list(mc.eos_token_ids),
            dtype=str(self.dtype).removeprefix("torch."), device=str(self.device),
            attention_backend=self.attention_backend, kv_bytes_per_token=mc.kv_bytes_per_token(self.kv_dtype),
        )

    def reset(self) -> None:
        """Forget every sequence and every block's contents: a new step session starts from an empty batch and
        a zeroed KV cache, so it can read only KV it wrote itself (a claim of cached tokens it never wrote reads
        zeros, not another session's prompt). A few ms on a GPU, per session, not per step."""
        self.batch.reset()
        self.kv_cache.zero_()

    def execute(self, plan: StepPlan) -> StepResult:
        return self.launch(plan).result()

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> "PendingStep":
        """Enqueues the step; nothing here waits for the device (tests/dataplane/test_pipelined_steps.py
        checks that under torch.cuda.set_sync_debug_mode("error"))."""
        if plan.run_num_tokens.sum() > self.config.max_num_batched_tokens:
            raise PlanError(f"plan {plan.step_id} runs more than max_num_batched_tokens "
                            f"({self.config.max_num_batched_tokens}) tokens")
        inputs = self.batch.apply(plan)
        if inputs is None:
            return PendingStep(StepResult(step_id=plan.step_id))
        if self.graphs is not None and self.graphs.can_run(inputs.meta):
            hidden = self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
        else:
            with forward_context(inputs.meta):
                hidden = self.model(inputs.input_ids, inputs.positions)
        if self.tp_rank != 0:
            _join_logit_gathers(self.model, hidden, inputs)
            self.sampling.receive_leader_samples(inputs)
            return PendingStep(StepResult(step_id=plan.step_id))
        outputs = self.sampling.run(hidden, inputs)
        result = StepResult(step_id=plan.step_id)
        if "token_ids" in outputs:
            result.slots = inputs.sampled_slots
        if "logprobs" in outputs:
            result.logprob_rows = inputs.sampling.logprob_rows.astype("<i4")
        return PendingStep(result, self.downloads.start(outputs) if outputs else None)


class PendingStep:
    """A launched step; result() waits for its outputs to reach the host (once) and returns them."""

    __slots__ = ("_result", "_copy")

    def __init__(self, result: StepResult, copy: PendingCopy | None = None):
        self._result = result
        self._copy = copy

    def ready(self) -> bool:
        """Whether result() would return without waiting for the device."""
        return self._copy is None or self._copy.ready()

    def result(self) -> StepResult:
        if self._copy is not None:
            for name, array in self._copy.arrays().items():
                setattr(self._result, name, array)
            self._copy = None
        return self._result


def _join_logit_gathers(model: torch.nn.Module, hidden: torch.Tensor, inputs: StepInputs) -> None:
    """A rank > 0's side of SamplingStep.run: the same compute_logits calls, on the same rows and in the same
    order (prompt-logprob chunks, then the sampled rows), since each gathers logits on rank 0."""
    if inputs.prompt_logprobs is not None:
        rows = inputs.prompt_logprobs.rows
        for start in range(0, len(rows), PROMPT_ROWS_PER_CHUNK):
            model.compute_logits(hidden[rows[start:start + PROMPT_ROWS_PER_CHUNK]])
    if len(inputs.sampled_slots):
        model.compute_logits(inputs.sampled_hidden(hidden))
