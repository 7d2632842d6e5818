"""OpenAI's replies for the HTTP gateway: completion and chat bodies, stream chunks, logprobs, usage, SSE.

Logprobs name tokens by their text, which the gRPC API sends with each id (the gateway
holds no tokenizer); `token_id:N` (vLLM's return_tokens_as_token_ids format) only when a
server sends no text.
"""
from __future__ import annotations

import json

from client.types import GenerationResult, PositionLogprobs, TokenLogprob


def token_name(token: TokenLogprob) -> str:
    return token.token or f"token_id:{token.token_id}"


def token_bytes(token: TokenLogprob) -> list[int] | None:
    return list(token.token.encode()) if token.token else None


def completion_logprobs(entries: list[PositionLogprobs]) -> dict:
    return {"tokens": [token_name(e.token) for e in entries],
            "token_logprobs": [e.token.logprob for e in entries],
            "top_logprobs": [{token_name(t): t.logprob for t in e.top} for e in entries]}


def chat_logprobs(entries: list[PositionLogprobs]) -> dict:
    return {"content": [{"token": token_name(e.token), "logprob": e.token.logprob, "bytes": token_bytes(e.token),
                         "top_logprobs": [{"token": token_name(t), "logprob": t.logprob, "bytes": token_bytes(t)}
                                          for t in e.top]} for e in entries]}


def usage_of(results: list[GenerationResult], n: int) -> dict:
    """Each prompt counts once (results are prompt-major, n per prompt); every choice's completion counts."""
    prompt = sum(r.usage.prompt_tokens for r in results[::n])
    completion = sum(r.usage.completion_tokens for r in results)
    cached = sum(r.usage.cached_prompt_tokens for r in results[::n])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: list[PositionLogprobs] | None):
    return {"index": index, "text": text, "finish_reason": finish_reason,
            "logprobs": completion_logprobs(logprobs) if logprobs is not None else None}


def chat_choice(index: int, content: str, finish_reason: str | None, logprobs: list[PositionLogprobs] | None):
    return {"index": index, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason,
            "logprobs": chat_logprobs(logprobs) if logprobs is not None else None}


def chat_delta_choice(index: int, delta: dict, finish_reason: str | None,
                      logprobs: list[PositionLogprobs] | None = None) -> dict:
    return {"index": index, "delta": delta, "finish_reason": finish_reason,
            "logprobs": chat_logprobs(logprobs) if logprobs is not None else None}


def full_body(request_id: str, created: int, model: str, results: list[GenerationResult], n: int, *, chat: bool,
              with_logprobs: bool) -> dict:
    choice = chat_choice if chat else completion_choice
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "usage": usage_of(results, n),
            "choices": [choice(i, r.text, r.finish_reason, r.logprobs if with_logprobs else None)
                        for i, r in enumerate(results)]}


def chunk(request_id: str, created: int, model: str, *, chat: bool, choices: list[dict],
          usage: dict | None = None, include_usage: bool = False) -> dict:
    body = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": choices}
    if include_usage:  # as OpenAI: null on every chunk but the last, which has no choices
        body["usage"] = usage
    return body


def sse(payload: dict | str) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
