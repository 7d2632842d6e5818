"""LLM: the offline interface of Nano-vLLM and vLLM, over nanoplane's two planes.

    llm = LLM("/path/to/model", enforce_eager=True, tensor_parallel_size=1)
    outputs = llm.generate(["Hello, Nano-vLLM."], SamplingParams(temperature=0.6, max_tokens=256))
    outputs[0]["text"]

`LLM(model, **engine_kwargs)` starts the planes on this host (nanoplane/local_planes.py: the
data plane as a child process, the control plane on a thread of this process);
`LLM(target="host:port")` uses a running control plane instead. Either way requests go
through the public gRPC API with AsyncClient, all of a batch at once, so the scheduler
batches them; the planes exchange steps over shared memory (the control plane's default
transport "auto" picks it for a data plane on this host). Text prompts and chat
conversations are tokenised first (the Tokenize RPC) so that the progress bar can count
prefill tokens as they are done.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import numbers
import os
from dataclasses import asdict
from typing import Sequence, Union

from client.async_client import AsyncClient
from client.errors import NanoplaneError
from nanoplane.local_planes import LocalPlanes
from client.loop_thread import EventLoopThread
from nanoplane.progress import GenerationProgress
from client.types import GenerationResult, ModelInfo, SamplingParams

__all__ = ["LLM", "SamplingParams"]

PromptInput = Union[str, Sequence[int], dict]
MAX_REQUESTS_IN_FLIGHT = 1024  # more wait here: the server would only queue them
REFRESH_S = 0.1


def _is_token_ids(value) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in value))


def normalize_prompts(prompts) -> list[str | list[int]]:
    """One prompt or a list; each a string, a list of token ids, or vLLM's {"prompt"} / {"prompt_token_ids"}."""
    if isinstance(prompts, (str, dict)) or _is_token_ids(prompts):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError("prompts must be a string, a list of token ids, or a list of those; "
                        f"got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, dict):
            if "prompt_token_ids" in p:
                p = p["prompt_token_ids"]
            elif "prompt" in p:
                p = p["prompt"]
            else:
                raise ValueError(f"prompts[{i}]: a dict prompt needs a 'prompt' or 'prompt_token_ids' key")
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, (list, tuple)) and (not p or _is_token_ids(p)):
            out.append([int(t) for t in p])
        else:
            raise TypeError(f"prompts[{i}]: expected a string or a list of token ids, got {type(p).__name__}")
    return out


def normalize_conversations(messages) -> list[list[dict]]:
    """One conversation (a list of {"role", "content"} dicts) or a list of them."""
    if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], dict):
        messages = [messages]
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a conversation or a list of conversations, got {type(messages).__name__}")
    for i, conversation in enumerate(messages):
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ValueError(f"conversation {i}: expected a non-empty list of messages")
        for j, m in enumerate(conversation):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"conversation {i}, message {j}: expected {{'role': str, 'content': str}}, got {m!r}")
    return [list(c) for c in messages]


def normalize_params(sampling_params, num_prompts: int) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * num_prompts
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * num_prompts
    params = list(sampling_params)
    if len(params) != num_prompts:
        raise ValueError(f"got {len(params)} SamplingParams for {num_prompts} prompts; give one, or one per prompt")
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise TypeError(f"sampling_params[{i}]: expected SamplingParams, got {type(p).__name__}")
    return params


def sample_dict(result: GenerationResult) -> dict:
    usage = result.usage
    out = {"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
           "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                     "cached_prompt_tokens": usage.cached_prompt_tokens} if usage else None}
    if result.logprobs:
        out["logprobs"] = [asdict(p) for p in result.logprobs]
    if result.prompt_logprobs:
        out["prompt_logprobs"] = [asdict(p) for p in result.prompt_logprobs]
    return out


def output_dict(samples: list[GenerationResult]) -> dict:
    """Sample 0's fields; with n > 1 also "outputs", every sample's (vLLM's RequestOutput.outputs)."""
    out = sample_dict(samples[0])
    if len(samples) > 1:
        out["outputs"] = [sample_dict(s) for s in samples]
    return out


async def generate_all(client: AsyncClient, items: list, params: list[SamplingParams],
                       progress: GenerationProgress) -> list[dict]:
    """Every request of a batch at once; the first failure cancels the rest. A module function, not a method:
    the loop thread must never hold the last reference to an LLM (its close() waits on that thread)."""
    in_flight = asyncio.Semaphore(MAX_REQUESTS_IN_FLIGHT)
    tasks = [asyncio.create_task(generate_one(client, i, item, p, progress, in_flight))
             for i, (item, p) in enumerate(zip(items, params))]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def generate_one(client: AsyncClient, index: int, item, params: SamplingParams, progress: GenerationProgress,
                       in_flight: asyncio.Semaphore) -> dict:
    async with in_flight:
        try:
            if isinstance(item, str):
                prompt_ids = await client.tokenize(item)
            elif item and isinstance(item[0], dict):
                prompt_ids = await client.tokenize(messages=item)
            else:
                prompt_ids = item
            samples: dict[int, GenerationResult] = {}  # by sample index (n > 1)
            prefilled = False
            async for delta in client.generate_stream(prompt_ids, params):
                if delta.token_ids:
                    if not prefilled:  # the first token: the prompt is prefilled
                        prefilled = True
                        progress.add_prefill(len(prompt_ids))
                        progress.add_decode(len(delta.token_ids) - 1)
                    else:
                        progress.add_decode(len(delta.token_ids))
                samples.setdefault(delta.index, GenerationResult()).add(delta)
        except NanoplaneError as e:
            raise type(e)(e.code, f"prompt {index}: {e.message}") from None
    progress.finish_one()
    return output_dict([samples[i] for i in sorted(samples)])


class LLM:
    """`LLM(model, **engine_kwargs)` or `LLM(target="host:port")`; see the module docstring.

    With target=, `token` and `tls_ca` reach a secured server (as AsyncClient takes them).

    engine_kwargs are the data plane's options (enforce_eager, max_num_seqs,
    max_num_batched_tokens, max_model_len, gpu_memory_utilization, dtype, block_size,
    num_kv_blocks, device, ...; Nano-vLLM's kvcache_block_size and num_kvcache_blocks too)
    and the control plane's (tokenizer, served_model_name, enable_prefix_caching, max_logprobs, max_n).
    Without a model, the default model (SmolLM2-135M-Instruct) is served.
    """

    def __init__(self, model: str | os.PathLike | None = None, *, target: str | None = None,
                 token: str | None = None, tls_ca=None, startup_timeout_s: float = 600.0, **engine_kwargs):
        if target is not None and (model is not None or engine_kwargs):
            raise ValueError("give a model (and engine options) to start the planes here, or target= to use a "
                             "running server, not both")
        self._closed = False
        self._planes = None
        self._client = None
        self._loop = EventLoopThread("nanoplane-llm")
        try:
            if target is None:
                self._planes = LocalPlanes(model, self._loop, startup_timeout_s=startup_timeout_s, **engine_kwargs)
                target = self._planes.target
            self.target = target
            self._client = self._loop.run(self._open_client(target, token, tls_ca))
            self.model_info: ModelInfo = self._loop.run(self._client.model_info(), startup_timeout_s)
        except BaseException:
            self.close()
            raise

    @staticmethod
    async def _open_client(target: str, token: str | None, tls_ca) -> AsyncClient:
        return AsyncClient(target, token=token, tls_ca=tls_ca)  # a grpc.aio channel belongs to its loop

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[dict]:
        """Completes every prompt; returns [{"text", "token_ids", "finish_reason", "usage"}] in input order,
        with "logprobs" when asked for and, for n > 1, "outputs" (every sample's). sampling_params: one for all,
        or one per prompt; None = the server's defaults (max_tokens = the room the model length leaves)."""
        items = normalize_prompts(prompts)
        return self._run(items, normalize_params(sampling_params, len(items)), use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[dict]:
        """Like generate, for one conversation or a list of them; the model's chat template is applied."""
        conversations = normalize_conversations(messages)
        return self._run(conversations, normalize_params(sampling_params, len(conversations)), use_tqdm)

    def _run(self, items: list, params: list[SamplingParams], use_tqdm: bool) -> list[dict]:
        if self._closed:
            raise RuntimeError("this LLM is closed")
        if not items:
            return []
        progress = GenerationProgress(len(items), use_tqdm)
        future = self._loop.submit(generate_all(self._client, items, params, progress))
        try:
            while not concurrent.futures.wait([future], timeout=REFRESH_S).done:
                progress.refresh()
            return future.result()
        except BaseException:
            future.cancel()  # e.g. Ctrl-C: cancels every request of the batch on the server
            raise
        finally:
            progress.close()

    def close(self) -> None:
        """Stops the planes this LLM started (if any); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._client is not None and self._loop.running:
            try:
                self._loop.run(self._client.close(), timeout_s=10)
            except Exception:  # closing anyway
                pass
        if self._planes is not None:
            self._planes.close()
        self._loop.stop()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass
