"""The soak test's clients, in their own process: `count` requests, `concurrency` at a time, a fixed mix of endings.

Request i's kind is a function of i (`kind_of`): most complete (greedy, seeded sampling, or
n = 2), some are cancelled by the client (after their first delta, or while they wait), some
run past their deadline. Each request's observed ending is compared with its kind's; the
counts and any mismatch come back as one JSON line on stdout (no pickle between processes).

    python -m tests.soak_clients --target HOST:PORT --start 0 --count 1000 --concurrency 200
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections import Counter

from client import AsyncClient, CancelledError, DeadlineExceededError, NanoplaneError, SamplingParams

MAX_TOKENS = 6
LONG_MAX_TOKENS = 480  # requests meant to be cut off: far more than they can make before their end (~500 steps)
DEADLINE_S = 0.25
KINDS = ("greedy", "seeded", "n2", "greedy", "seeded", "greedy", "cancel_after_first", "greedy", "seeded",
         "deadline", "greedy", "cancel_while_waiting", "seeded", "greedy", "n2", "cancel_after_first", "greedy",
         "deadline", "seeded", "greedy")
EXPECTED = {"greedy": "completed", "seeded": "completed", "n2": "completed", "cancel_after_first": "cancelled",
            "cancel_while_waiting": "cancelled", "deadline": "deadline_exceeded"}


def kind_of(i: int) -> str:
    return KINDS[i % len(KINDS)]


def num_samples(i: int) -> int:
    return 2 if kind_of(i) == "n2" else 1


def expected_outcomes(start: int, count: int) -> Counter:
    return Counter(EXPECTED[kind_of(i)] for i in range(start, start + count))


def prompt_of(i: int) -> str:
    # a few shared openings, so prefix-cache hits and evictions happen too
    return f"{('Once upon a time', 'The weather today', 'Soak test')[i % 3]}, request {i} asks for a story"


async def complete(client: AsyncClient, i: int, kind: str) -> str:
    if kind == "n2":
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, seed=i, n=2, ignore_eos=True)
        results = await client.generate_n(prompt_of(i), params)
    else:
        params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **(
            dict(temperature=0) if kind == "greedy" else dict(temperature=0.8, top_p=0.9, seed=i)))
        results = [await client.generate(prompt_of(i), params)]
    ok = all(r.finish_reason == "length" and len(r.token_ids) == MAX_TOKENS for r in results)
    return "completed" if ok and len(results) == num_samples(i) else "wrong_output"


async def cut_off(client: AsyncClient, i: int, kind: str) -> str:
    params = SamplingParams(max_tokens=LONG_MAX_TOKENS, temperature=0, ignore_eos=True)
    if kind == "deadline":
        try:
            await client.generate(prompt_of(i), params, timeout_s=DEADLINE_S)
        except DeadlineExceededError:
            return "deadline_exceeded"
        return "completed"
    if kind == "cancel_after_first":
        async with contextlib.aclosing(client.generate_stream(prompt_of(i), params)) as stream:
            async for _ in stream:
                return "cancelled"  # aclosing cancels the call on the way out
        return "completed"
    task = asyncio.create_task(client.generate(prompt_of(i), params))
    await asyncio.sleep(0.002 * (i % 7))  # before, or soon after, the server takes it in
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return "cancelled"
    return "completed"


async def one(client: AsyncClient, semaphore: asyncio.Semaphore, i: int) -> tuple[int, str]:
    kind = kind_of(i)
    async with semaphore:
        try:
            if EXPECTED[kind] == "completed":
                return i, await complete(client, i, kind)
            return i, await cut_off(client, i, kind)
        except (CancelledError, DeadlineExceededError, NanoplaneError) as e:
            return i, f"error:{e.code.name}"


async def drive(target: str, start: int, count: int, concurrency: int) -> dict:
    semaphore = asyncio.Semaphore(concurrency)
    async with AsyncClient(target, timeout_s=120, retries=0) as client:
        outcomes = await asyncio.gather(*(one(client, semaphore, i) for i in range(start, start + count)))
    mismatches = {i: f"{kind_of(i)} -> {outcome}" for i, outcome in outcomes if outcome != EXPECTED[kind_of(i)]}
    return {"outcomes": dict(Counter(o for _, o in outcomes)), "mismatches": dict(list(mismatches.items())[:20]),
            "num_mismatches": len(mismatches)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=200)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(drive(args.target, args.start, args.count, args.concurrency))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
