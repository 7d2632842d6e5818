"""Online serving benchmark: requests arrive as a Poisson process; TTFT, TPOT, latency and throughput.

    python benchmarks/serving.py --target localhost:50051 --request-rate 4 --num-prompts 200
    python benchmarks/serving.py --model /models/Qwen3-0.6B --sweep 1,2,4,8 --csv-out sweep.csv
    python benchmarks/serving.py --backend http --http-url http://localhost:8000/v1 --request-rate 2

Workload (fixed by --seed): prompt lengths U[--input-len], token ids U[0, min(10000, vocab)),
output lengths U[--output-len], ignore_eos so every request generates exactly its length.
Inter-arrival times are exponential with mean 1/rate (rate inf: all at once). Requests go
through the gRPC API (AsyncClient) or, with --backend http, the OpenAI-compatible gateway.
Without --target the benchmark starts the planes itself (the offline LLM's LocalPlanes),
with --engine-arg KEY=VALUE options (e.g. max_model_len=2048), and the gateway with them.

Reports completed requests, request throughput, output tok/s, and TTFT, TPOT (time per
output token after the first) and end-to-end latency: mean, p50, p90, p99, in ms.
--sweep writes one CSV row per rate and a PNG plot (the plot needs matplotlib).
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serving_backends import BenchRequest, GrpcBackend, HttpBackend, RequestRecord  # noqa: E402

PERCENTILES = (50, 90, 99)


def workload(num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int,
             temperature: float, seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)
    max_id = min(10000, vocab_size - 1)
    lengths = [(rng.randint(*input_len), rng.randint(*output_len)) for _ in range(num_prompts)]
    return [BenchRequest([rng.randint(0, max_id) for _ in range(n_in)], n_out, temperature) for n_in, n_out in lengths]


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    values = sorted(v for v in values if not math.isnan(v))
    if not values:
        return float("nan")
    rank = (len(values) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return values[low] + (values[high] - values[low]) * (rank - low)


def summarize(records: list[RequestRecord], duration_s: float, rate: float) -> dict:
    done = [r for r in records if not r.error]
    output_tokens = sum(r.output_tokens for r in done)
    summary = {"request_rate": rate, "num_requests": len(records), "completed": len(done),
               "failed": len(records) - len(done), "duration_s": round(duration_s, 3),
               "request_throughput": round(len(done) / duration_s, 3),
               "output_tok_s": round(output_tokens / duration_s, 1),
               "total_tok_s": round((output_tokens + sum(r.prompt_tokens for r in done)) / duration_s, 1)}
    for name, values in (("ttft", [r.ttft_s for r in done]), ("tpot", [r.tpot_s for r in done]),
                         ("e2e", [r.e2e_s for r in done])):
        finite = [v for v in values if not math.isnan(v)]
        summary[f"{name}_mean_ms"] = round(1e3 * sum(finite) / len(finite), 2) if finite else float("nan")
        for q in PERCENTILES:
            summary[f"{name}_p{q}_ms"] = round(1e3 * percentile(values, q), 2)
    if len(done) < len(records):
        summary["first_error"] = next(r.error for r in records if r.error)
    return summary


async def run_at_rate(make_backend, requests: list[BenchRequest], rate: float, seed: int,
                      warm_up: bool = True) -> dict:
    backend = make_backend()
    try:
        if warm_up:  # one short request first, so that the first timed ones do not pay the connection
            await backend.send(BenchRequest(requests[0].prompt_token_ids[:16], 2, requests[0].temperature))
        gaps = random.Random(seed + 1)
        tasks = []
        start = time.perf_counter()
        for request in requests:
            tasks.append(asyncio.create_task(backend.send(request)))
            if math.isfinite(rate):
                await asyncio.sleep(gaps.expovariate(rate))
        records = await asyncio.gather(*tasks)
        return summarize(records, time.perf_counter() - start, rate)
    finally:
        await backend.close()


def print_summary(s: dict) -> None:
    print(f"rate {s['request_rate']}/s: {s['completed']}/{s['num_requests']} requests in {s['duration_s']} s; "
          f"{s['request_throughput']} req/s, {s['output_tok_s']} output tok/s")
    for name in ("ttft", "tpot", "e2e"):
        print(f"  {name.upper():5s} ms  mean {s[f'{name}_mean_ms']:9.2f}  " +
              "  ".join(f"p{q} {s[f'{name}_p{q}_ms']:9.2f}" for q in PERCENTILES))
    if s["failed"]:
        print(f"  {s['failed']} failed; first error: {s['first_error']}")


def write_csv(summaries: list[dict], path: Path) -> None:
    columns = [k for k in summaries[0] if k != "first_error"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(summaries)


def write_plot(summaries: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot written: the plot needs matplotlib (pip install matplotlib); the figures are in the CSV")
        return False
    rates = [s["request_rate"] for s in summaries]
    fig, (latency, throughput) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("ttft_p50_ms", "TTFT p50"), ("ttft_p99_ms", "TTFT p99"), ("tpot_p50_ms", "TPOT p50"),
                       ("tpot_p99_ms", "TPOT p99")):
        latency.plot(rates, [s[key] for s in summaries], marker="o", label=label)
    latency.set(xlabel="request rate (req/s)", ylabel="ms", title="latency")
    latency.legend()
    throughput.plot(rates, [s["output_tok_s"] for s in summaries], marker="o")
    throughput.set(xlabel="request rate (req/s)", ylabel="output tok/s", title="throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    low, high = int(low), int(high or low)
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return low, high


def _engine_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for convert in (int, float):
        try:
            return key, convert(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="HOST:PORT of a running control plane (default: start one here)")
    p.add_argument("--model", help="model to serve when starting the planes here (default: the default model)")
    p.add_argument("--engine-arg", type=_engine_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="engine option when starting the planes here (repeatable), e.g. max_model_len=2048")
    p.add_argument("--backend", choices=("grpc", "http"), default="grpc")
    p.add_argument("--http-url", help="gateway base URL for --backend http with --target, e.g. http://h:8000/v1")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests per second (inf = at once)")
    p.add_argument("--sweep", help="comma-separated request rates, e.g. 1,2,4,8: one run each, CSV + plot")
    p.add_argument("--input-len", type=_range, default=(100, 1024), metavar="MIN:MAX")
    p.add_argument("--output-len", type=_range, default=(100, 1024), metavar="MIN:MAX")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warm-up-request", dest="warm_up", action="store_false",
                   help="time the very first requests too (what the first users after a start see)")
    p.add_argument("--json-out", help="write the summaries here as JSON")
    p.add_argument("--csv-out", default="serving_sweep.csv", help="CSV of a sweep")
    p.add_argument("--plot-out", help="PNG of a sweep (default: the CSV's name with .png)")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.sweep.split(",")] if args.sweep else [args.request_rate]
    if any(not r > 0 for r in rates) or args.num_prompts < 1:
        parser.error("request rates and --num-prompts must be positive")
    if args.backend == "http" and args.target and not args.http_url:
        parser.error("--backend http with --target needs --http-url (the gateway in front of that target)")
    if args.target and (args.model or args.engine_arg):
        parser.error("--model and --engine-arg start planes here; they do not go with --target")
    from client import Client
    from nanoplane.local_planes import LocalPlanes
    from client.loop_thread import EventLoopThread

    loop = planes = gateway = None
    target, http_url = args.target, args.http_url
    try:
        if target is None:
            loop = EventLoopThread("bench-planes")
            planes = LocalPlanes(args.model, loop, **dict(args.engine_arg))
            target = planes.target
            if args.backend == "http":
                from gateway.config import GatewayConfig
                from gateway.http_gateway import start_http_gateway

                gateway = loop.run(start_http_gateway(GatewayConfig(target, http_port=0)))
                http_url = f"http://127.0.0.1:{gateway.port}/v1"
        with Client(target, timeout_s=60) as client:
            info = client.model_info()
        requests = workload(args.num_prompts, args.input_len, args.output_len, info.vocab_size, args.temperature,
                            args.seed)
        print(f"model {info.model_name} on {info.device} ({info.dtype}); {args.num_prompts} requests over "
              f"{args.backend}; prompts {args.input_len}, outputs {args.output_len} tokens")
        make_backend = (lambda: GrpcBackend(target)) if args.backend == "grpc" else (lambda: HttpBackend(http_url))
        summaries = []
        for rate in rates:
            summary = asyncio.run(run_at_rate(make_backend, requests, rate, args.seed, args.warm_up))
            summary.update(backend=args.backend, model=info.model_name, device=info.device)
            print_summary(summary)
            summaries.append(summary)
    finally:
        if gateway is not None:
            loop.run(gateway.stop())
        if planes is not None:
            planes.close()
        if loop is not None:
            loop.stop()
    print(json.dumps(summaries if args.sweep else summaries[0]))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summaries, indent=1))
    if args.sweep:
        csv_path = Path(args.csv_out)
        write_csv(summaries, csv_path)
        print(f"wrote {csv_path}")
        plot_path = Path(args.plot_out) if args.plot_out else csv_path.with_suffix(".png")
        if write_plot(summaries, plot_path):
            print(f"wrote {plot_path}")
    return summaries


if __name__ == "__main__":
    main()
