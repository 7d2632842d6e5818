"""Structured output on a real model: do the outputs match their JSON schema, regex or choice?

    python benchmarks/structured_output.py                      # the default model (SmolLM2-135M), 200 requests
    python benchmarks/structured_output.py --model DIR --engine-arg device=cuda

Starts both planes here (the offline LLM's LocalPlanes) and sends --num-requests chat
requests, round-robin over a dozen JSON schemas (nested objects, arrays, enums, bounded
numbers, required fields), regexes and choices, --concurrency at a time, seeded sampling.
Every output that finished ("stop") must parse and validate (jsonschema), match its regex
fully, or equal one of its choices; one that ran out of max_tokens ("length") is counted
apart (a grammar cannot make a model finish early). Prints the counts, the tokens per
second, the grammar compile times, and the control plane's bitmask time per constrained
row. The mask's cost in throughput is benchmarks/throughput.py --structured json-schema.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jsonschema  # noqa: E402

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "email": {"type": "string", "maxLength": 60}}, "required": ["name", "age"]},
    "address": {"type": "object", "properties": {
        "street": {"type": "string", "maxLength": 60}, "city": {"type": "string", "maxLength": 40},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "country": {"type": "string", "enum": ["FR", "DE", "US", "JP"]}},
        "required": ["street", "city", "zip", "country"]},
    "order": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1},
        "items": {"type": "array", "minItems": 1, "maxItems": 4, "items": {"type": "object", "properties": {
            "sku": {"type": "string", "maxLength": 12}, "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
            "price": {"type": "number", "minimum": 0, "maximum": 10000}}, "required": ["sku", "quantity", "price"]}},
        "paid": {"type": "boolean"}}, "required": ["id", "items", "paid"]},
    "weather": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "temperature_c": {"type": "number", "minimum": -60, "maximum": 60},
        "conditions": {"type": "string", "enum": ["sunny", "cloudy", "rain", "snow", "fog"]},
        "humidity": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["city", "temperature_c", "conditions"]},
    "book": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 80},
        "authors": {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 1, "maxItems": 3},
        "year": {"type": "integer", "minimum": 1450, "maximum": 2030},
        "isbn": {"type": "string", "pattern": "^[0-9]{13}$"}}, "required": ["title", "authors", "year"]},
    "sentiment": {"type": "object", "properties": {
        "label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["label", "confidence"]},
    "event": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 50},
        "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
        "location": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                      "indoor": {"type": "boolean"}},
                     "required": ["city", "indoor"]},
        "attendees": {"type": "integer", "minimum": 0, "maximum": 100000}}, "required": ["name", "date", "location"]},
    "recipe": {"type": "object", "properties": {
        "dish": {"type": "string", "maxLength": 40},
        "ingredients": {"type": "array", "minItems": 1, "maxItems": 5, "items": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 30}, "grams": {"type": "integer", "minimum": 1, "maximum": 5000}},
            "required": ["name", "grams"]}},
        "vegetarian": {"type": "boolean"}}, "required": ["dish", "ingredients", "vegetarian"]},
    "coordinates": {"type": "object", "properties": {
        "lat": {"type": "number", "minimum": -90, "maximum": 90},
        "lon": {"type": "number", "minimum": -180, "maximum": 180}}, "required": ["lat", "lon"]},
    "ticket": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 60},
        "priority": {"type": "string", "enum": ["low", "medium", "high", "urgent"]},
        "labels": {"type": "array", "items": {"type": "string", "enum": ["bug", "feature", "docs", "ui"]},
                   "maxItems": 3},
        "estimate_hours": {"type": "integer", "minimum": 1, "maximum": 40}}, "required": ["title", "priority"]},
    "movie_list": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 50}, "rating": {"type": "number", "minimum": 0, "maximum": 10}},
        "required": ["title", "rating"]}},
    "user_profile": {"type": "object", "properties": {
        "username": {"type": "string", "pattern": "^[a-z][a-z0-9_]{2,15}$"},
        "settings": {"type": "object", "properties": {
            "theme": {"type": "string", "enum": ["light", "dark"]},
            "notifications": {"type": "boolean"},
            "language": {"type": "string", "enum": ["en", "fr", "de", "ja"]}},
            "required": ["theme", "notifications"]},
        "friends": {"type": "integer", "minimum": 0, "maximum": 5000}}, "required": ["username", "settings"]},
}
REGEXES = {
    "phone": r"\(\d{3}\) \d{3}-\d{4}", "date": r"20\d{2}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
    "ipv4": r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)", "hex_color": r"#[0-9a-f]{6}",
    "word_list": r"[a-z]+(, [a-z]+){2}", "time": r"([01]\d|2[0-3]):[0-5]\d",
}
CHOICES = {
    "capital": ["Paris", "Berlin", "Madrid", "Rome"], "yes_no": ["yes", "no"],
    "color": ["red", "green", "blue", "yellow"], "planet": ["Mercury", "Venus", "Earth", "Mars"],
}
PROMPTS = {
    "phone": "Give a US phone number.", "date": "Give a date in 2024.", "ipv4": "Give an IPv4 address.",
    "hex_color": "Give a color as a hex code.", "word_list": "List three fruits.", "time": "What time is lunch?",
    "capital": "What is the capital of France?", "yes_no": "Is the sky blue?", "color": "What color is grass?",
    "planet": "Which planet do we live on?",
}


def cases(num_requests: int) -> list[dict]:
    kinds = ([("json_schema", k) for k in SCHEMAS] * 2 + [("regex", k) for k in REGEXES]
             + [("choice", k) for k in CHOICES])
    out = []
    for i in range(num_requests):
        kind, name = kinds[i % len(kinds)]
        if kind == "json_schema":
            prompt = f"Write one example {name.replace('_', ' ')} as JSON matching this schema: {json.dumps(SCHEMAS[name])}"
        else:
            prompt = PROMPTS[name]
        out.append({"kind": kind, "name": name, "prompt": prompt, "seed": i})
    return out


def constraint(case):
    from client import StructuredOutput

    if case["kind"] == "json_schema":
        return StructuredOutput.json_schema(SCHEMAS[case["name"]])
    if case["kind"] == "regex":
        return StructuredOutput.regex(REGEXES[case["name"]])
    return StructuredOutput.choice(CHOICES[case["name"]])


def valid(case, text: str) -> bool:
    try:
        if case["kind"] == "json_schema":
            jsonschema.validate(json.loads(text), SCHEMAS[case["name"]])
            return True
        if case["kind"] == "regex":
            return re.fullmatch(REGEXES[case["name"]], text) is not None
        return text in CHOICES[case["name"]]
    except (ValueError, jsonschema.ValidationError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=320)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--engine-arg", action="append", default=[], type=lambda kv: kv.split("=", 1),
                        help="KEY=VALUE for the planes (LocalPlanes options), e.g. device=cpu")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--show-failures", type=int, default=5)
    args = parser.parse_args()

    from client import Client, SamplingParams
    from client.loop_thread import EventLoopThread
    from nanoplane.local_planes import LocalPlanes

    loop = EventLoopThread("bench-structured")
    planes = LocalPlanes(args.model, loop, **dict(args.engine_arg))
    try:
        with Client(planes.target, timeout_s=1200) as client:
            info = client.model_info()
            todo = cases(args.num_requests)

            def run(case):
                params = SamplingParams(temperature=args.temperature, seed=case["seed"], max_tokens=args.max_tokens,
                                        structured_output=constraint(case))
                t = time.perf_counter()
                r = client.chat([{"role": "user", "content": case["prompt"]}], params)
                return case, r, time.perf_counter() - t

            start = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                done = list(pool.map(run, todo))
            seconds = time.perf_counter() - start
        engine = planes._resources.control_plane.engine
        filler = engine.scheduler.bitmask_filler
        num_steps = max(engine.num_steps, 1)
    finally:
        planes.close()
        loop.stop()

    by_kind: dict[str, dict] = {}
    failures = []
    for case, r, _ in done:
        k = by_kind.setdefault(case["kind"], {"requests": 0, "finished": 0, "valid": 0, "length": 0})
        k["requests"] += 1
        if r.finish_reason == "stop":
            k["finished"] += 1
            if valid(case, r.text):
                k["valid"] += 1
            else:
                failures.append((case["name"], r.text))
        else:
            k["length"] += 1
    finished = sum(k["finished"] for k in by_kind.values())
    num_valid = sum(k["valid"] for k in by_kind.values())
    tokens = sum(r.usage.completion_tokens for _, r, _ in done)
    figures = {
        "model": info.model_name, "device": info.device, "dtype": info.dtype, "requests": len(done),
        "concurrency": args.concurrency, "finished": finished, "valid_of_finished": num_valid,
        "valid_fraction": round(num_valid / max(finished, 1), 4), "by_kind": by_kind,
        "completion_tokens": tokens, "seconds": round(seconds, 2), "tok_per_s": round(tokens / seconds, 1),
        "mask_rows": filler.num_rows, "mask_ms_per_row": round(1e3 * filler.total_s / max(filler.num_rows, 1), 4),
        "mask_ms_per_step": round(1e3 * filler.total_s / num_steps, 3), "steps": num_steps,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(figures, indent=1))
    for name, text in failures[:args.show_failures]:
        print(f"INVALID {name}: {text!r}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=1))
    if num_valid != finished:
        sys.exit(1)


if __name__ == "__main__":
    main()
