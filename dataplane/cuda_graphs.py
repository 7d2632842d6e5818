"""CUDA graphs for decode steps: one graph per batch size of a ladder, replayed with padded inputs.

With --enforce-eager the same padded buffers and launch shapes run eagerly, so graphs
and eager execute identical kernels and give bit-identical tokens (bf16 included).

Captured sizes are 1, 2, 4, 8, then steps of 16 up to max_num_seqs; a decode batch of
n sequences replays the smallest graph of size >= n, its extra rows padded (slot
mapping -1, so they write no KV; context length 1, so they read one harmless slot).
Every graph reads the same static input buffers and all share one memory pool; each
returns the hidden states its capture allocated, not a copy in a buffer of its own: they
may share memory with another graph's intermediates, and a step's sampling reads them
before the stream replays any other graph. Attention metadata inside a graph must come
from tensors alone: max_seq_len is pinned to max_model_len at capture, so the kernels
size their grids for the longest context and read each sequence's real length from
seq_lens. On CUDA one kernel (graph_staging.py) stages a step's inputs into the static
buffers.
"""
from __future__ import annotations

import torch
from torch import nn

from dataplane.context import AttentionMetadata, forward_context
from dataplane.distributed import call_before_destroy

try:
    from dataplane import graph_staging
    from dataplane.layers import fused_ops
except ModuleNotFoundError as e:  # no Triton: the torch code stages the inputs
    if e.name != "triton":
        raise
    graph_staging = fused_ops = None


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] < max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    def __init__(self, model: nn.Module, max_num_seqs: int, max_blocks_per_seq: int, max_model_len: int,
                 device: torch.device, use_graphs: bool = True):
        self.model = model
        self.use_graphs = use_graphs
        self.max_model_len = max_model_len
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        n = self.batch_sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # batch size -> the hidden states its graph writes

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], query_start_loc=self.query_start_loc[:bs + 1],
            seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs], max_query_len=1,
            max_seq_len=self.max_model_len)

    @torch.inference_mode()
    def capture(self) -> None:
        if not self.use_graphs:
            return
        pool = None
        for bs in reversed(self.batch_sizes):  # largest first, so smaller graphs reuse its pool
            graph = torch.cuda.CUDAGraph()
            with forward_context(self._meta(bs)):
                self.model(self.input_ids[:bs], self.positions[:bs])  # warm-up, compiles kernels
                torch.cuda.synchronize()
                with torch.cuda.graph(graph, pool):
                    self.outputs[bs] = self.model(self.input_ids[:bs], self.positions[:bs])
            pool = graph.pool() if pool is None else pool
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        call_before_destroy(self.release)

    def release(self) -> None:
        """Frees the captured graphs (at shutdown, before the process group goes); later steps would run eager."""
        torch.cuda.synchronize()
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()
        self.use_graphs = False

    def can_run(self, meta: AttentionMetadata) -> bool:
        return meta.is_decode_only and meta.num_seqs <= self.batch_sizes[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = meta.num_seqs
        bs = next(s for s in self.batch_sizes if s >= n)
        self.stage(bs, input_ids, positions, meta)
        if self.use_graphs:
            self.graphs[bs].replay()
            return self.outputs[bs][:n]
        with forward_context(self._meta(bs)):
            return self.model(self.input_ids[:bs], self.positions[:bs])[:n]

    def stage(self, bs: int, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        """The step's inputs into rows [0, n) of the static buffers, padding into rows [n, bs)."""
        n = meta.num_seqs
        if graph_staging is not None and fused_ops.enabled_for(input_ids):
            graph_staging.stage_decode_inputs(bs, input_ids, positions, meta.slot_mapping, meta.seq_lens,
                                              meta.block_tables, self.input_ids, self.positions, self.slot_mapping,
                                              self.seq_lens, self.block_tables)
            return
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slot_mapping[:n] = meta.slot_mapping
        self.slot_mapping[n:bs] = -1
        self.seq_lens[:n] = meta.seq_lens
        self.seq_lens[n:bs] = 1
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width] = meta.block_tables
        self.block_tables[n:bs] = 0
