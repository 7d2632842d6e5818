"""Attention backends by name: the torch reference, the CPU path (cpu_paged.py), plus Triton and flash-attn
where they can run.

A backend is a pair of functions with the reference's signatures (see reference.py):
`store_kv(k, v, k_cache, v_cache, slot_mapping)` and
`forward(q, k_cache, v_cache, meta, scale) -> out`. A module adds one with
`register_backend(AttentionBackend("name", store_kv, forward))`. The optional backends
live in `dataplane.attention.<name with - as _>_backend` and register themselves on import
only when they can run here; they are imported lazily, the first time the registry is
asked about them, so importing this package does not import Triton.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from dataplane.attention import cpu_paged, reference


@dataclass(frozen=True, slots=True)
class AttentionBackend:
    name: str
    store_kv: Callable
    forward: Callable


OPTIONAL_BACKENDS = ("triton", "flash-attn")
_BACKENDS: dict[str, AttentionBackend] = {}
_optional_imported = False


def register_backend(backend: AttentionBackend) -> None:
    _BACKENDS[backend.name] = backend


def _import_optional_backends() -> None:
    global _optional_imported
    if _optional_imported:
        return
    _optional_imported = True
    for name in OPTIONAL_BACKENDS:
        module = f"{__name__}.{name.replace('-', '_')}_backend"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # the backend module is there but one of its imports is not
                raise


def available_backends() -> list[str]:
    _import_optional_backends()
    return sorted(_BACKENDS)


def get_attention_backend(name: str) -> AttentionBackend:
    if name not in _BACKENDS:
        _import_optional_backends()
    if name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r} is not available here; available: {', '.join(available_backends())}")
    return _BACKENDS[name]


register_backend(AttentionBackend("torch", reference.store_kv, reference.paged_attention))
register_backend(AttentionBackend("cpu", cpu_paged.store_kv, cpu_paged.paged_attention))
