"""The decode-input staging kernel (dataplane/graph_staging.py) against DecodeGraphs.stage's torch code.

Both start from the same stale static buffers (what an earlier, larger batch left) and must leave
them bit-identical: the step's rows copied, the padding rows reset, the rest untouched. Under the
Triton interpreter on CPU; the `gpu` test repeats it at a real graph ladder's sizes.
"""
from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import HAS_CUDA, interpreter_numpy_compat, kernel_module, use_interpreter_without_cuda

use_interpreter_without_cuda()
pytest.importorskip("triton", reason="triton is not installed: the staging kernel cannot run here")
if not HAS_CUDA:
    interpreter_numpy_compat()  # the kernel's runtime-bounded loops over block-table columns

from dataplane import cuda_graphs  # noqa: E402
from dataplane.context import AttentionMetadata  # noqa: E402
from dataplane.cuda_graphs import DecodeGraphs  # noqa: E402
from tests.kernel_launches import count_launches  # noqa: E402

graph_staging = kernel_module("dataplane.graph_staging")
fused_ops = kernel_module("dataplane.layers.fused_ops")
DEVICE = "cuda" if HAS_CUDA else "cpu"
BUFFERS = ("input_ids", "positions", "slot_mapping", "seq_lens", "block_tables")


def stale_graphs(max_num_seqs: int, max_blocks_per_seq: int, seed: int) -> DecodeGraphs:
    graphs = DecodeGraphs(None, max_num_seqs, max_blocks_per_seq, max_blocks_per_seq * 16, torch.device(DEVICE),
                          use_graphs=False)
    gen = torch.Generator().manual_seed(seed)
    for name in BUFFERS:
        buffer = getattr(graphs, name)
        buffer.copy_(torch.randint(0, 1000, buffer.shape, generator=gen))
    return graphs


def step_inputs(num_seqs: int, width: int, seed: int):
    gen = torch.Generator().manual_seed(seed + 100)
    ints = lambda *shape, dtype: torch.randint(0, 5000, shape, generator=gen).to(device=DEVICE, dtype=dtype)  # noqa: E731
    meta = AttentionMetadata(slot_mapping=ints(num_seqs, dtype=torch.long),
                             query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32, device=DEVICE),
                             seq_lens=ints(num_seqs, dtype=torch.int32),
                             block_tables=ints(num_seqs, width, dtype=torch.int32), max_query_len=1, max_seq_len=0)
    return ints(num_seqs, dtype=torch.long), ints(num_seqs, dtype=torch.long), meta


def check_staging(max_num_seqs: int, max_blocks_per_seq: int, num_seqs: int, width: int, seed: int = 0):
    reference, fused = stale_graphs(max_num_seqs, max_blocks_per_seq, seed), stale_graphs(max_num_seqs,
                                                                                        max_blocks_per_seq, seed)
    input_ids, positions, meta = step_inputs(num_seqs, width, seed)
    bs = next(s for s in reference.batch_sizes if s >= num_seqs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cuda_graphs, "graph_staging", None)  # the torch code
        reference.stage(bs, input_ids, positions, meta)
    graph_staging.stage_decode_inputs(bs, input_ids, positions, meta.slot_mapping, meta.seq_lens, meta.block_tables,
                                      *(getattr(fused, name) for name in BUFFERS))
    for name in BUFFERS:
        assert torch.equal(getattr(fused, name), getattr(reference, name)), name
    assert (reference.slot_mapping[num_seqs:bs] == -1).all() and (reference.seq_lens[num_seqs:bs] == 1).all()


@pytest.mark.parametrize("num_seqs,width", [(1, 3), (3, 2), (4, 5), (5, 1), (16, 5)])
def test_staging_matches_torch(num_seqs, width):
    check_staging(16, 5, num_seqs, width, seed=num_seqs)


def test_stage_is_one_launch_with_the_gate_open(monkeypatch):
    graphs = stale_graphs(8, 4, seed=1)
    input_ids, positions, meta = step_inputs(3, 2, seed=1)
    monkeypatch.setattr(cuda_graphs, "graph_staging", graph_staging)
    monkeypatch.setattr(cuda_graphs, "fused_ops", fused_ops)
    monkeypatch.setattr(fused_ops, "enabled_for", lambda x: True)
    with count_launches() as fused:
        graphs.stage(4, input_ids, positions, meta)
    monkeypatch.setattr(fused_ops, "enabled_for", lambda x: False)
    with count_launches() as unfused:
        graphs.stage(4, input_ids, positions, meta)
    assert fused == ["triton.stage_decode_inputs_kernel"]
    assert len(unfused) == 8, unfused


@pytest.mark.gpu
@pytest.mark.parametrize("num_seqs", [1, 7, 64, 200, 256])
def test_gpu_staging_matches_torch(num_seqs):
    check_staging(256, 2560, num_seqs, width=min(2560, 37 * num_seqs), seed=num_seqs)
