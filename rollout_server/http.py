"""vLLM's own OpenAI-compatible server (`--http_port`), on the rollout engine and its event loop.

`HttpServer` builds vLLM's FastAPI app (`build_app` / `init_app_state`, as `vllm serve` does) against
the AsyncLLM in `engine.py` and runs uvicorn as a task on the engine's loop, where the AsyncLLM
lives. So chat requests are engine requests like any rollout: continuously batched with them, never
serialised behind them, with vLLM's streaming, `n > 1` and logprobs.

What it serves is the live student:
- every generate goes through the service's gate (`RolloutService.admitted`), like a rollout: it
  waits while a push reloads, the push waits for it to finish, and each request runs on one policy
  version from start to end;
- in `--sync_mode lora` it runs on the LoRA serving now (`AsyncEngine.lora_request`); the served
  model name (`student`, or `teacher` for `--role teacher`) maps to that, and no other name exists.

Only /v1/models, /v1/chat/completions, /v1/completions, /health and /version are routed: vLLM's app
also carries admin routes (adapter loading, elastic scaling, ...) that would change the engine
behind the service's back. With a token (required beyond loopback) every /v1 route needs
`Authorization: Bearer <token>`, checked by vLLM's AuthenticationMiddleware (sha256 digests compared
with secrets.compare_digest, constant time).

The socket is bound when `HttpServer` is made (a taken port fails before the 20-90 s engine start)
but listens only once the app is ready, so an early client is refused rather than left hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
from collections.abc import AsyncGenerator
from typing import Any

log = logging.getLogger("gkd.rollout_server")

ROUTES = frozenset({"/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/version"})
VERSION_HEADER = "x-gkd-policy-version"

# Per HTTP request: the policy versions its engine requests ran on (filled by LiveStudent.generate,
# read by PolicyVersionHeader). A list set by the middleware, so tasks that vLLM spawns for the
# request (which copy the context) append to the same one.
_versions: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("gkd_versions", default=None)


class LiveStudent:
    """vLLM's EngineClient (our AsyncLLM) as the OpenAI app sees it: every attribute is the
    AsyncLLM's, except `generate`, which is admitted through the service's gate and runs on the
    adapter serving now (lora mode)."""

    def __init__(self, engine: Any, service: Any):
        self._engine = engine
        self._service = service

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine.client, name)

    async def generate(
        self, prompt: Any, sampling_params: Any, request_id: str, *, lora_request: Any = None, **kw: Any
    ) -> AsyncGenerator[Any, None]:
        async with self._service.admitted() as version:
            seen = _versions.get()
            if seen is not None:
                seen.append(version)
            # Read after admission: a lora push swaps the adapter only while the gate is closed.
            lora = lora_request if lora_request is not None else self._engine.lora_request
            inner = self._engine.client.generate(prompt, sampling_params, request_id, lora_request=lora, **kw)
            async with contextlib.aclosing(inner):  # a client that hangs up aborts its request
                async for out in inner:
                    yield out


class PolicyVersionHeader:
    """ASGI middleware: a reply whose engine requests all ran before its headers went out (every
    non-streaming one) says which policy version produced it in `x-gkd-policy-version` (versions,
    comma-separated, if a push fell between the prompts of one request). A stream sends its headers
    first, so it carries none; each of its requests still runs on one version."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen: list[int] = []
        _versions.set(seen)

        async def send_with_version(message: Any) -> None:
            if message["type"] == "http.response.start" and seen:
                headers = list(message.get("headers", []))
                headers.append((VERSION_HEADER.encode(), ",".join(map(str, sorted(set(seen)))).encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_version)


class BodyLimit:
    """ASGI middleware: a request whose Content-Length is over `--max_message_mb` is refused (413)
    before its body is read, as on the ZeroMQ port."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            length = dict(scope.get("headers", [])).get(b"content-length", b"0")
            if not length.isdigit() or int(length) > self.max_bytes:
                body = (
                    b'{"error": {"message": "request body over the server\'s --max_message_mb", "code": 413}}'
                )
                await send(
                    {
                        "type": "http.response.start",
                        "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def vllm_args(model: str, served_name: str, token: str | None) -> Any:
    """The argparse Namespace vLLM's app expects, from vLLM's own `vllm serve` parser."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = [
        "--model",
        model,
        "--served-model-name",
        served_name,
        "--disable-log-stats",
        "--disable-fastapi-docs",
        "--disable-uvicorn-access-log",
    ]
    if token:
        argv += ["--api-key", token]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)
    return args


class HttpServer:
    def __init__(self, host: str, port: int):
        """Bind now, so a taken port fails before the engine starts (raises OSError). As vLLM's
        create_server_socket does, without importing vLLM's launcher first."""
        self.host, self.port = host, port
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError:
            self._sock.close()
            raise
        self._server: Any = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, engine: Any, service: Any, served_name: str, token: str | None, max_bytes: int) -> None:
        """Build vLLM's app on the engine loop and start listening (returns once it listens)."""
        self._loop = engine.loop
        engine.call(self._start(LiveStudent(engine, service), served_name, token, max_bytes), timeout_s=300)

    async def _start(self, client: LiveStudent, served_name: str, token: str | None, max_bytes: int) -> None:
        import uvicorn
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app
        from vllm.entrypoints.launchers.launcher import NoSignalServer

        args = vllm_args(client.model_config.model, served_name, token)
        tasks = await client.get_supported_tasks()
        app = build_app(args, tasks, client.model_config)
        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) in ROUTES]
        await init_app_state(client, app.state, args, tasks)
        debug = log.isEnabledFor(logging.DEBUG)
        config = uvicorn.Config(
            # Ours outermost (vLLM's app has built its middleware stack already).
            BodyLimit(PolicyVersionHeader(app), max_bytes),
            log_level="debug" if debug else "warning",
            access_log=debug,
            timeout_graceful_shutdown=2,  # open streams are cut after this at exit
        )
        # vLLM's uvicorn server without signal handlers: the CLI owns SIGTERM/SIGINT.
        self._server = NoSignalServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.02)

    def close(self) -> None:
        """Stop uvicorn (open streams get timeout_graceful_shutdown) and release the port. Idempotent."""
        task, self._task = self._task, None
        if task is not None and self._loop is not None and self._loop.is_running():
            self._server.should_exit = True
            fut = asyncio.run_coroutine_threadsafe(asyncio.wait_for(_wait(task), 10), self._loop)
            try:
                fut.result(15)
            except Exception:  # noqa: BLE001 - best effort at exit
                log.debug("http server stop", exc_info=True)
        self._sock.close()


async def _wait(task: asyncio.Task) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        await task
