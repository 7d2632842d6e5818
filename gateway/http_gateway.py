"""The OpenAI-compatible HTTP gateway: a FastAPI app served by uvicorn in front of the public gRPC API.

Routes: /v1/models, /v1/models/{model}, /v1/completions, /v1/chat/completions (what
openai_service.py does), the probes /health (liveness: this process answers) and /ready
(readiness: the control plane's grpc.health.v1 says SERVING), and FastAPI's OpenAPI
schema at /openapi.json with its pages at /docs. Bodies are checked against the pydantic
models of openai_models.py. Every error has OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`): a body that does not fit its model
is a 400 naming the field, not FastAPI's 422; gRPC errors keep the server's message
(INVALID_ARGUMENT -> 400, UNAUTHENTICATED -> 401, UNAVAILABLE -> 503).

The gateway holds no key: the Authorization header of a /v1 call is passed on to the gRPC
API (forwarded_auth.py), whose --auth-token-file decides; the probes and the schema call
nothing that needs one. `nanoplane gateway` and `nanoplane serve --http-port` start it (main.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass

import structlog
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from client import NanoplaneError
from gateway.config import GatewayConfig, comma_list
from gateway.forwarded_auth import forwarded_authorization, is_valid_header_value
from gateway.openai_models import SHAPES, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Completion, \
    CompletionRequest, ErrorResponse, ModelCard, ModelList, Status
from gateway.openai_protocol import OpenAIError, error_of, parse_chat_request, parse_completion_request
from gateway.openai_service import OpenAIService

log = structlog.get_logger("gateway.http_gateway")

ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503)}


def error_response(error: OpenAIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _path(loc: tuple) -> str:
    """("messages", 0, "role") -> "messages[0].role"."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def validation_error(errors: list[dict]) -> OpenAIError:
    """pydantic's complaints about a body as OpenAI's 400, naming the (top-level) field as its param."""
    first = errors[0]
    loc = tuple(first["loc"][1:]) if first["loc"][:1] == ("body",) else tuple(first["loc"])
    if first["type"] == "json_invalid":
        return OpenAIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
    if not loc:
        if first["type"] == "missing":
            return OpenAIError(400, "the request body is empty; send a JSON object")
        return OpenAIError(400, "the request body must be a JSON object (with Content-Type: application/json)")
    # a field of several shapes fails once per shape, each error's loc naming the shape: say what would fit
    shaped = next((i for i, part in enumerate(loc) if part in SHAPES), None)
    if shaped is not None and len(loc) > shaped + 1:
        return OpenAIError(400, f"{_path(loc[:shaped + 1])}: must be {SHAPES[loc[shaped]]}", param=str(loc[0]))
    message = "is required" if first["type"] == "missing" else first["msg"]
    return OpenAIError(400, f"{_path(loc)}: {message}", param=str(loc[0]))


def body_too_large(max_body_bytes: int) -> OpenAIError:
    return OpenAIError(413, f"the request body is larger than the limit of {max_body_bytes} bytes (--max-body-bytes)",
                       code="body_too_large")


def http_error(request: Request, e: HTTPException) -> OpenAIError:
    if e.status_code == 404:
        return OpenAIError(404, f"no route for {request.method} {request.url.path}", code="not_found")
    if e.status_code == 405:
        allowed = (e.headers or {}).get("Allow", "")
        return OpenAIError(405, f"{request.url.path} takes {allowed}, not {request.method}",
                           code="method_not_allowed")
    if e.status_code == 413:
        return body_too_large(request.app.state.max_body_bytes)
    kind = "server_error" if e.status_code >= 500 else "invalid_request_error"
    return OpenAIError(e.status_code, str(e.detail), type=kind)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, e: OpenAIError):
        return error_response(e)

    @app.exception_handler(NanoplaneError)
    async def grpc_error(request: Request, e: NanoplaneError):
        return error_response(error_of(e, chat=request.url.path.rstrip("/").endswith("/chat/completions")))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError):
        return error_response(validation_error(list(e.errors())))

    @app.exception_handler(HTTPException)
    async def framing_error(request: Request, e: HTTPException):
        return error_response(http_error(request, e), headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("HTTP handler failed", method=request.method, path=request.url.path)
        return error_response(OpenAIError(500, "internal error; see the gateway's log", type="server_error"))


bearer = HTTPBearer(auto_error=False, description="the API key: passed on to the gRPC API, which checks it when its "
                                                  "--auth-token-file is set")


async def forward_authorization(request: Request, _=Depends(bearer)) -> None:
    """Hands the caller's Authorization header to the gRPC calls of this request (forwarded_auth.py)."""
    value = request.headers.get("authorization")
    if value is not None and not is_valid_header_value(value):
        raise OpenAIError(400, "the Authorization header must be printable ASCII", code="invalid_header")
    forwarded_authorization.set(value)


class EventStream(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, events):
        super().__init__(events, headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope, receive, send):
        # however the response ends (done, client gone), the events' finally cancels their gRPC calls now
        async with contextlib.aclosing(self.body_iterator):
            await super().__call__(scope, receive, send)


def _v1_router(service: OpenAIService) -> APIRouter:
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(forward_authorization)], responses=ERROR_RESPONSES)

    async def respond(job):
        body = await service.generate(job)
        return body if isinstance(body, dict) else EventStream(body)

    @v1.get("/models", response_model=ModelList)
    async def models():
        return await service.models()

    @v1.get("/models/{model:path}", response_model=ModelCard)
    async def model(model: str):
        return await service.model(model)

    @v1.post("/completions", response_model=Completion,
             responses={200: {"description": "the completion; with stream: true, server-sent events of "
                                             "Completion chunks ending in `data: [DONE]`",
                              "content": {"text/event-stream": {}}}})
    async def completions(body: CompletionRequest):
        return await respond(parse_completion_request(body.model_dump(exclude_unset=True)))

    @v1.post("/chat/completions", response_model=ChatCompletion,
             responses={200: {"description": "the chat completion; with stream: true, server-sent events of "
                                             "ChatCompletionChunk ending in `data: [DONE]`",
                              "content": {"text/event-stream": {"schema": ChatCompletionChunk.model_json_schema(
                                  ref_template="#/components/schemas/{model}")}}}})
    async def chat(body: ChatCompletionRequest):
        return await respond(parse_chat_request(body.model_dump(exclude_unset=True)))

    return v1


def build_app(service: OpenAIService, config: GatewayConfig) -> FastAPI:
    app = FastAPI(title="nanoplane OpenAI-compatible API", version="1", max_body_size=config.max_body_bytes,
                  strict_content_type=False,
                  description="OpenAI's completions and chat completions, served by nanoplane; errors in OpenAI's "
                              "shape; the API key is passed on to the gRPC API.")
    app.state.max_body_bytes = config.max_body_bytes
    add_error_handlers(app)
    app.include_router(_v1_router(service))

    @app.get("/health", response_model=Status, tags=["probes"])
    async def health():
        """Liveness: the gateway answers (needs no key, asks nothing of the control plane)."""
        return {"status": "ok"}

    @app.get("/ready", response_model=Status, tags=["probes"], responses={503: {"model": ErrorResponse}})
    async def ready():
        """Readiness: the control plane behind the gateway is SERVING (needs no key)."""
        problem = await service.ready()
        if problem is not None:
            raise OpenAIError(503, problem, type="server_error", code="not_ready")
        return {"status": "ready"}

    return app


class DeclaredBodyLimit:
    """Refuses a body whose Content-Length is over the limit before reading it. FastAPI's max_body_size
    counts every body as it comes (chunked ones too) and its 413 reaches our handler, but for a declared
    length it sends its own plain-text one; this answers those first, in OpenAI's shape."""

    def __init__(self, app, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = Headers(scope=scope).get("content-length", "")
            if length.isdigit() and int(length) > self.max_body_bytes:
                return await error_response(body_too_large(self.max_body_bytes))(scope, receive, send)
        return await self.app(scope, receive, send)


def asgi_app(service: OpenAIService, config: GatewayConfig):
    """The app as uvicorn serves it: CORS (when configured) outermost, so that every answer carries its headers."""
    app = DeclaredBodyLimit(build_app(service, config), config.max_body_bytes)
    origins = comma_list(config.cors_allowed_origins)
    if not origins:
        return app
    return CORSMiddleware(app, allow_origins=origins, allow_methods=comma_list(config.cors_allowed_methods),
                          allow_headers=comma_list(config.cors_allowed_headers),
                          allow_credentials=config.cors_allow_credentials)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # SIGTERM and SIGINT belong to the caller (main.py): it stops both planes in order
        yield


@dataclass
class RunningGateway:
    server: uvicorn.Server
    serving: asyncio.Task
    service: OpenAIService
    port: int

    def stop_accepting(self) -> None:
        """No new connections; requests in flight run on for up to --shutdown-grace-s."""
        self.server.should_exit = True

    async def stop(self, hurry: asyncio.Event | None = None) -> None:
        """Stops accepting, waits for the requests in flight (at most the grace period; at once when `hurry`
        is set), then closes the gRPC channel."""
        self.stop_accepting()
        hurried = asyncio.ensure_future(hurry.wait() if hurry is not None else asyncio.Event().wait())
        await asyncio.wait({self.serving, hurried}, return_when=asyncio.FIRST_COMPLETED)
        if hurried.done():
            self.server.force_exit = True
        hurried.cancel()
        await self.serving
        await self.service.close()


def listening_socket(host: str, port: int) -> socket.socket:
    """Bound here rather than by uvicorn, so that a port in use is an OSError to the caller (uvicorn would exit)."""
    return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)


async def start_http_gateway(config: GatewayConfig, root_certificates: bytes | None = None) -> RunningGateway:
    """Serves the gateway on the running event loop, in front of the Generation API at config.target
    (over TLS verified against root_certificates, PEM, when given)."""
    sock = listening_socket(config.host, config.http_port)
    service = OpenAIService(config.target, root_certificates)
    server = _Server(uvicorn.Config(asgi_app(service, config), lifespan="off", ws="none", log_config=None,
                                    access_log=False, timeout_graceful_shutdown=config.shutdown_grace_s))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            await service.close()
            serving.result()
            raise RuntimeError("the HTTP server stopped while starting")
        await asyncio.sleep(0.01)
    port = sock.getsockname()[1]
    log.info("OpenAI-compatible HTTP gateway serving", address=f"http://{config.host}:{port}/v1",
             target=config.target)
    return RunningGateway(server, serving, service, port)
