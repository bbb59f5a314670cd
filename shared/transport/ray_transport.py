"""The Ray transport: the rollout service as a named Ray actor, bytes in and bytes out.

`RolloutActor` builds the vLLM engine and the RolloutService inside the actor (vLLM's engine core runs
in a process of its own, started by the actor) and
exposes one method, `call(data: bytes) -> bytes`: an encoded Envelope in, an encoded Reply out. Only
msgpack bytes cross the actor boundary (the settings too), so nothing of ours is ever pickled; Ray
moves payloads over ~100 KB (adapters, rollout batches) through its object store.

`RayClient` is the learner's side (`--rollout_url ray://<actor name>`); it implements
`shared.transport.base.RolloutClient` exactly like the ZeroMQ client: `submit` returns at once and
keeps the ObjectRef, `result` waits for it with a timeout.

Ray is imported lazily: importing this module costs nothing until an actor or client is made.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import time
from typing import TYPE_CHECKING, Any

import msgspec

from shared.messages import (
    Envelope,
    ErrorReply,
    GenerateReply,
    PushReply,
    ScoreReply,
    Status,
    StatusRequest,
    decode_reply,
    encode,
)
from shared.transport.base import RemoteError, ServerUnavailable

if TYPE_CHECKING:
    from rollout_server.settings import ServerSettings
    from shared.messages import GenerateRequest, PushAdapter, Request, ScoreRequest

# Named actors live in a namespace; a fixed one lets any driver on the cluster find the server
# (a job's default namespace is anonymous and private to that job).
NAMESPACE = "gkd"

# Concurrent `call`s an actor accepts: enough for the learner's in-flight generates plus a push and
# status polls. The service queues them for its single engine thread.
MAX_CONCURRENCY = 16


class RolloutActor:
    """The rollout server inside a Ray actor (wrapped with `ray.remote` by `start_rollout_actor`)."""

    def __init__(self, settings_msgpack: bytes):
        from rollout_server.cli import check
        from rollout_server.engine import AsyncEngine
        from rollout_server.service import RolloutService
        from rollout_server.settings import ServerSettings

        # The server CLI's own checks; a hub id is fetched here, on the actor's node.
        settings = check(msgspec.msgpack.decode(settings_msgpack, type=ServerSettings))
        self._service = RolloutService(AsyncEngine(settings), settings)

    def call(self, data: bytes) -> bytes:
        """One encoded Envelope in, its encoded Reply out (the service answers exactly once)."""
        done: concurrent.futures.Future[bytes] = concurrent.futures.Future()
        self._service.handle_bytes(data, done.set_result)
        return done.result()


def settings_env(settings: ServerSettings) -> dict[str, str]:
    """Env vars the actor's worker needs before vLLM is imported."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(settings.kv_cache_gb))),
        "TOKENIZERS_PARALLELISM": "false",
    }


def start_rollout_actor(
    settings: ServerSettings,
    name: str,
    num_cpus: float = 1,
    num_gpus: float = 0,
    *,
    namespace: str = NAMESPACE,
    max_concurrency: int = MAX_CONCURRENCY,
) -> Any:
    """Create the named rollout actor and return its handle at once (the engine starts inside).

    The actor is owned by the calling driver: it dies with it, so a finished or failed job never
    leaves a vLLM engine holding GPUs. A client's first call waits for the engine to come up.
    """
    import ray

    cls = ray.remote(RolloutActor)
    return cls.options(
        name=name,
        namespace=namespace,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_concurrency=max_concurrency,
        max_restarts=0,  # a restarted engine would serve the base model under a stale version
        runtime_env={"env_vars": settings_env(settings)},
    ).remote(msgspec.msgpack.encode(settings))


class RayClient:
    """A RolloutClient talking to a named RolloutActor through Ray."""

    def __init__(
        self,
        actor_name: str,
        *,
        token: str | None = None,
        timeout_s: float = 600.0,
        namespace: str = NAMESPACE,
        lookup_timeout_s: float = 60.0,
    ):
        import ray

        if not actor_name:
            raise ValueError("ray:// URL needs an actor name: ray://<actor name>")
        if not ray.is_initialized():
            # Outside a Ray worker: join the running cluster (RAY_ADDRESS or the local one).
            ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), namespace=namespace, log_to_driver=False)
        self.name = actor_name
        self._token = token or ""
        self._timeout_s = timeout_s
        self._pending: dict[str, Any] = {}  # request_id -> ObjectRef of the encoded reply
        self._actor = _lookup(actor_name, namespace, lookup_timeout_s)

    # ---- RolloutClient ----------------------------------------------------------------------

    def submit(self, req: GenerateRequest | ScoreRequest) -> str:
        if req.request_id in self._pending:
            raise ValueError(f"request_id {req.request_id!r} is already in flight")
        self._pending[req.request_id] = self._send(req)
        return req.request_id

    def result(self, request_id: str, timeout_s: float | None = None, kind: type = GenerateReply) -> Any:
        ref = self._pending.get(request_id)
        if ref is None:
            raise KeyError(f"no request {request_id!r} in flight")
        reply = self._wait(ref, timeout_s)  # on timeout the ref stays pending: result() may be retried
        del self._pending[request_id]
        return _expect(reply, kind)

    def generate(self, req: GenerateRequest, timeout_s: float | None = None) -> GenerateReply:
        return self.result(self.submit(req), timeout_s)

    def push_adapter(self, msg: PushAdapter, timeout_s: float | None = None) -> PushReply:
        return _expect(self._wait(self._send(msg), timeout_s), PushReply)

    def status(self, timeout_s: float | None = None) -> Status:
        return _expect(self._wait(self._send(StatusRequest()), timeout_s), Status)

    submit_score = submit  # score requests carry an id too

    def score_result(self, request_id: str, timeout_s: float | None = None) -> ScoreReply:
        return self.result(request_id, timeout_s, kind=ScoreReply)

    def score(self, req: ScoreRequest, timeout_s: float | None = None) -> ScoreReply:
        return self.score_result(self.submit_score(req), timeout_s)

    def close(self) -> None:
        # Dropping the refs is all there is: the actor belongs to whoever started it, not to us.
        self._pending.clear()

    # ---- internals --------------------------------------------------------------------------

    def _send(self, body: Request) -> Any:
        import ray

        # ray.put sends the payload through the object store explicitly (not inlined in the call).
        data = ray.put(encode(Envelope(token=self._token, body=body)))
        return self._actor.call.remote(data)

    def _wait(self, ref: Any, timeout_s: float | None) -> Any:
        import ray
        from ray import exceptions as rx

        timeout = self._timeout_s if timeout_s is None else timeout_s
        try:
            data = ray.get(ref, timeout=timeout)
        except rx.GetTimeoutError:
            raise ServerUnavailable(f"ray://{self.name}: no reply within {timeout:g}s") from None
        except (rx.RayActorError, rx.ActorUnavailableError) as e:
            raise ServerUnavailable(f"ray://{self.name}: the rollout actor is gone: {cause_line(e)}") from e
        except rx.RayTaskError as e:
            # The service answers errors as ErrorReply; an exception here is a bug in the actor.
            raise RemoteError("internal", f"ray://{self.name}: {cause_line(e)}") from e
        return decode_reply(data)


def _lookup(name: str, namespace: str, timeout_s: float) -> Any:
    """Find the named actor; it may still be registering when the learner starts."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get_actor(name, namespace=namespace)
        except ValueError:
            if time.monotonic() > deadline:
                raise ServerUnavailable(
                    f"ray://{name}: no such actor in namespace {namespace!r} after {timeout_s:g}s"
                ) from None
            time.sleep(0.5)


def _expect(reply: Any, kind: type) -> Any:
    if isinstance(reply, ErrorReply):
        raise RemoteError(reply.code, reply.message)
    if not isinstance(reply, kind):
        raise RemoteError("bad_reply", f"expected {kind.__name__}, got {type(reply).__name__}")
    return reply


_EXC_HEADER = re.compile(r"^[\w.]*(Error|Exception|Exit|Interrupt)\w*: ")


def cause_line(e: BaseException) -> str:
    """The root cause of a Ray error as one line: Ray's message is a banner plus a remote
    traceback, whose last `SomeError: message` line (and its continuation) says what went wrong."""
    lines = [ln.rstrip() for ln in str(e).splitlines() if ln.strip()]
    headers = [i for i, ln in enumerate(lines) if _EXC_HEADER.match(ln.strip())]
    if not headers:
        return lines[-1].strip() if lines else type(e).__name__
    i = headers[-1]
    text = lines[i].strip()
    if (
        i + 1 < len(lines)
        and lines[i + 1].startswith((" ", "\t"))
        and not lines[i + 1].strip().startswith("For further")
    ):
        text += " " + lines[i + 1].strip()  # e.g. pydantic: "1 validation error for X" + the error itself
    return text if len(text) <= 500 else text[:497] + "..."
