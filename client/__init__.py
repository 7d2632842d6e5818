"""The nanoplane client library: Client (blocking) and AsyncClient over the public gRPC API."""
from client.async_client import AsyncClient
from client.errors import (CancelledError, DeadlineExceededError, InvalidArgumentError, NanoplaneError,
                           ResourceExhaustedError, UnavailableError)
from client.structured import StructuredOutput
from client.sync_client import Client
from client.types import GenerationDelta, GenerationResult, ModelInfo, SamplingParams, Usage

__all__ = [
    "AsyncClient", "Client", "SamplingParams", "StructuredOutput", "GenerationDelta", "GenerationResult",
    "ModelInfo", "Usage",
    "NanoplaneError", "InvalidArgumentError", "UnavailableError", "DeadlineExceededError",
    "ResourceExhaustedError", "CancelledError",
]
