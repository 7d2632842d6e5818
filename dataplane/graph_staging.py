"""One Triton kernel that stages a decode step's inputs into the CUDA graphs' static buffers.

It does what the torch code of DecodeGraphs.stage does in eight launches (five copies, three
fills): rows below num_seqs take the step's input ids, positions, slots, context lengths and
block-table rows; the padding rows up to the graph's batch size get slot -1, context length 1
and a zero block-table row. cuda_graphs.py calls it on CUDA; the torch code stays the CPU path
and the reference (tests/dataplane/test_graph_staging.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def stage_decode_inputs_kernel(
    input_ids_ptr, positions_ptr, slot_mapping_ptr, seq_lens_ptr, block_tables_ptr, block_tables_stride,
    static_ids_ptr, static_positions_ptr, static_slots_ptr, static_seq_lens_ptr,
    static_tables_ptr, static_tables_stride, num_seqs, width, static_width,
    BLOCK_W: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_W)
    static_row = static_tables_ptr + row.to(tl.int64) * static_tables_stride
    if row < num_seqs:
        tl.store(static_ids_ptr + row, tl.load(input_ids_ptr + row))
        tl.store(static_positions_ptr + row, tl.load(positions_ptr + row))
        tl.store(static_slots_ptr + row, tl.load(slot_mapping_ptr + row))
        tl.store(static_seq_lens_ptr + row, tl.load(seq_lens_ptr + row))
        source_row = block_tables_ptr + row.to(tl.int64) * block_tables_stride
        for start in range(0, width, BLOCK_W):
            mask = start + cols < width
            tl.store(static_row + start + cols, tl.load(source_row + start + cols, mask=mask), mask=mask)
    else:  # padding: writes no KV, reads one harmless slot
        tl.store(static_slots_ptr + row, -1)
        tl.store(static_seq_lens_ptr + row, 1)
        for start in range(0, static_width, BLOCK_W):
            mask = start + cols < static_width
            tl.store(static_row + start + cols, tl.zeros([BLOCK_W], dtype=static_tables_ptr.dtype.element_ty),
                     mask=mask)


def stage_decode_inputs(batch_size: int, input_ids: torch.Tensor, positions: torch.Tensor,
                        slot_mapping: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                        static_ids: torch.Tensor, static_positions: torch.Tensor, static_slots: torch.Tensor,
                        static_seq_lens: torch.Tensor, static_tables: torch.Tensor) -> None:
    """Rows [0, num_seqs) of the static buffers from the step's inputs, rows [num_seqs, batch_size) padding."""
    num_seqs = seq_lens.shape[0]
    for source, static in ((input_ids, static_ids), (positions, static_positions), (slot_mapping, static_slots),
                           (seq_lens, static_seq_lens)):
        assert source.shape == (num_seqs,) and static.dim() == 1 and static.shape[0] >= batch_size >= num_seqs, \
            f"a [{num_seqs}] input into a static buffer of {batch_size} rows, got {tuple(source.shape)}"
        assert source.is_contiguous() and static.is_contiguous(), "staged vectors must be contiguous"
        assert source.device == static.device, f"{source.device} input into a {static.device} buffer"
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs and block_tables.stride(1) == 1, \
        f"block_tables must be [{num_seqs}, width] with contiguous rows, got {tuple(block_tables.shape)}"
    width, static_width = block_tables.shape[1], static_tables.shape[1]
    assert static_tables.shape[0] >= batch_size and static_tables.stride(1) == 1 and width <= static_width, \
        f"a [{num_seqs}, {width}] block table into a static {tuple(static_tables.shape)}"
    if batch_size == 0:
        return
    stage_decode_inputs_kernel[(batch_size,)](
        input_ids, positions, slot_mapping, seq_lens, block_tables, block_tables.stride(0),
        static_ids, static_positions, static_slots, static_seq_lens, static_tables, static_tables.stride(0),
        num_seqs, width, static_width,
        BLOCK_W=min(1024, triton.next_power_of_2(max(static_width, 16))), num_warps=1,
    )
