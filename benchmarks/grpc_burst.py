"""Calls opened at once at a plain grpc.aio server (health Check, a 50 ms handler): which statuses come back.

    python benchmarks/grpc_burst.py NUM_CALLS NUM_CHANNELS OPTIONS TIMEOUT_S   (OPTIONS: default | pending10k | ...)

gRPC core holds a call that arrives before the server has asked for one as "pending"; past
grpc.server.max_pending_requests (1,000) it cancels the excess with a bare CANCELLED, before
any handler runs (docs/reliability.md, "A burst of calls").
"""
import asyncio, collections, sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

class Slow(health_pb2_grpc.HealthServicer):
    async def Check(self, request, context):
        await asyncio.sleep(0.05)
        return health_pb2.HealthCheckResponse(status=1)

async def main(num_calls, channels, server_opts, timeout_s):
    server = grpc.aio.server(options=server_opts)
    health_pb2_grpc.add_HealthServicer_to_server(Slow(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    chans = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(channels)]
    async def one(i):
        try:
            await health_pb2_grpc.HealthStub(chans[i % channels]).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
            return ("OK", "")
        except grpc.aio.AioRpcError as e:
            return (e.code().name, e.details())
    t = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(num_calls)))
    print(sys.argv[1:], f"{time.perf_counter()-t:.1f}s", collections.Counter(results).most_common(5), flush=True)
    for c in chans: await c.close()
    await server.stop(0)

opts = {"default": [], "streams100": [("grpc.max_concurrent_streams", 100)],
        "pending10k": [("grpc.server.max_pending_requests", 10000), ("grpc.server.max_pending_requests_hard_limit", 30000)],
        "unrequested": [("grpc.server_max_unrequested_time_in_server", 300)]}
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), opts[sys.argv[3]], float(sys.argv[4])))
