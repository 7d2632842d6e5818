"""A step's host↔device traffic without host syncs: one packed upload, one packed download.

`Uploads` packs the small numpy arrays a step needs on the device (positions, slot mapping,
sampling params, index sets, ...) into one pinned host buffer and sends them with one
non_blocking copy. `stage(array, dtype)` returns the array's device tensor at once, but its
contents arrive with `flush()`: nothing may read a staged tensor on the device before the
flush (BatchState stages everything, flushes, then launches its device work).

`Downloads` packs a step's device outputs (sampled ids, logprobs: 4-byte dtypes) into one
tensor, copies it non_blocking into a pinned buffer and records a CUDA event; the
`PendingCopy` waits for that event only when the caller asks for the arrays.

Both keep a ring of DEPTH pinned buffers, so the copies of two steps in flight never
share one. A pageable host buffer would cost a stream sync per copy (CUDA's rule for
pageable memory), serialising the host with the device; on CPU the same code runs on
ordinary tensors, and the copies are plain memcpys.
"""
from __future__ import annotations

import numpy as np
import torch

DEPTH = 2  # steps in flight (dataplane/step_loop.py's MAX_IN_FLIGHT)
_ALIGN = 16  # Triton specialises kernels on 16-byte pointer alignment: staged arrays always have it
_NUMPY_DTYPES = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32, torch.bool: np.bool_}
_WORD = {torch.int32: np.dtype("<i4"), torch.float32: np.dtype("<f4")}


def _host_buffer(num_bytes: int, device: torch.device, dtype=torch.uint8) -> torch.Tensor:
    num_bytes = -(-num_bytes // _ALIGN) * _ALIGN  # whole aligned words, for Uploads' typed views
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return torch.empty(num_bytes // itemsize, dtype=dtype, pin_memory=device.type == "cuda")


class _RingSlot:
    """One pinned buffer and the event after the last copy that used it."""

    __slots__ = ("buffer", "event", "owner")

    def __init__(self, buffer: torch.Tensor, device: torch.device):
        self.buffer = buffer
        self.event = torch.cuda.Event() if device.type == "cuda" else None
        self.owner = None  # Downloads: the PendingCopy whose data the buffer still holds

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def done(self) -> bool:
        return self.event is None or self.event.query()

    def record(self) -> None:
        if self.event is not None:
            self.event.record()


class Uploads:
    def __init__(self, device: torch.device, capacity_bytes: int):
        self.device = device
        self._ring = [_RingSlot(_host_buffer(capacity_bytes, device), device) for _ in range(DEPTH)]
        self._next = 0
        self._wanted = capacity_bytes
        self._slot: _RingSlot | None = None
        self._host_typed: dict[torch.dtype, np.ndarray] = {}  # the step's host buffer, viewed as each dtype
        self._device_buffer: torch.Tensor | None = None
        self._used = 0
        self._typed: dict[torch.dtype, torch.Tensor] = {}
        self._empties: dict[tuple, torch.Tensor] = {}

    def begin(self) -> None:
        """Starts a step's upload; waits (normally not at all) for the copy that last used this buffer."""
        slot = self._ring[self._next]
        self._next = (self._next + 1) % DEPTH
        slot.wait()
        if slot.buffer.numel() < self._wanted:  # a step overflowed before: grow, geometrically
            slot.buffer = _host_buffer(max(self._wanted, 2 * slot.buffer.numel()), self.device)
        self._slot, self._used = slot, 0
        host = slot.buffer.numpy()
        self._host_typed = {dtype: host.view(np_dtype) for dtype, np_dtype in _NUMPY_DTYPES.items()}
        # fresh from the caching allocator: stream order makes reuse safe, and a step's views stay valid
        self._device_buffer = torch.empty(slot.buffer.numel(), dtype=torch.uint8, device=self.device)
        self._typed = {dtype: self._device_buffer.view(dtype) for dtype in _NUMPY_DTYPES}

    def stage(self, array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """array as a device tensor of dtype (int64, int32, float32 or bool); filled by flush()."""
        size = array.size
        if size == 0:
            return self._empty(array.shape, dtype)
        host = self._host_typed[dtype]
        first = self._used // host.itemsize
        end = first + size
        if end > len(host):  # rare (a huge prefill): this array travels alone, the next step has room
            self._wanted = max(self._wanted, 2 * end * host.itemsize)
            return self._copy_alone(np.ascontiguousarray(array, dtype=host.dtype), dtype)
        host[first:end] = array.reshape(-1)  # numpy casts to the staged dtype
        self._used = -(-end * host.itemsize // _ALIGN) * _ALIGN
        flat = self._typed[dtype][first:end]
        return flat if array.ndim == 1 else flat.view(array.shape)

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (shape, dtype)  # never written: one per shape will do
        if key not in self._empties:
            self._empties[key] = torch.empty(shape, dtype=dtype, device=self.device)
        return self._empties[key]

    def _copy_alone(self, a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        host = torch.from_numpy(a)
        if self.device.type != "cuda":
            return host.clone()
        # the caching host allocator keeps this block until the copy is done
        return host.pin_memory().to(self.device, dtype=dtype, non_blocking=True)

    def flush(self) -> None:
        """Sends what was staged: one copy; staged tensors may be read from here on."""
        if self._used:
            self._device_buffer[:self._used].copy_(self._slot.buffer[:self._used], non_blocking=True)
        self._slot.record()
        self._slot, self._host_typed = None, {}


class PendingCopy:
    """Device tensors on their way to the host; `arrays()` waits for them (once) and unpacks."""

    __slots__ = ("_slot", "_layout", "_arrays")

    def __init__(self, slot: _RingSlot, layout: list[tuple[str, np.dtype, int]]):
        self._slot = slot
        self._layout = layout
        self._arrays: dict[str, np.ndarray] | None = None

    def ready(self) -> bool:
        """Whether arrays() would return without waiting."""
        return self._arrays is not None or self._slot.done()

    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._slot.wait()
            total = sum(n for _, _, n in self._layout)
            words = self._slot.buffer[:total].numpy().copy()  # frees the pinned buffer for a later step
            self._arrays, offset = {}, 0
            for name, dtype, n in self._layout:
                self._arrays[name] = words[offset:offset + n].view(dtype)
                offset += n
            self._slot.owner = None
        return self._arrays


class Downloads:
    def __init__(self, device: torch.device, capacity_words: int):
        self.device = device
        self._ring = [_RingSlot(_host_buffer(4 * capacity_words, device, torch.int32), device)
                      for _ in range(DEPTH)]
        self._next = 0

    def start(self, tensors: dict[str, torch.Tensor]) -> PendingCopy:
        """Enqueues the copy of tensors (int32 or float32, any shape; flattened) to the host."""
        slot = self._ring[self._next]
        self._next = (self._next + 1) % DEPTH
        if slot.owner is not None:  # a caller with more than DEPTH steps unread: keep its data first
            slot.owner.arrays()
        layout = [(name, _WORD[t.dtype], t.numel()) for name, t in tensors.items()]
        parts = [t.reshape(-1).view(torch.int32) for t in tensors.values()]
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        if slot.buffer.numel() < flat.numel():
            slot.wait()
            slot.buffer = _host_buffer(4 * max(flat.numel(), 2 * slot.buffer.numel()), self.device, torch.int32)
        slot.buffer[:flat.numel()].copy_(flat, non_blocking=True)
        slot.record()
        slot.owner = PendingCopy(slot, layout)
        return slot.owner
