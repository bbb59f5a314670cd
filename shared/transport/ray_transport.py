"""The Ray transport's client side: the rollout service as a named Ray actor, bytes in and bytes out.

The actor itself (`rollout_server.ray_actor.RolloutActor`) exposes one method,
`call(data: bytes) -> bytes`: an encoded Envelope in, an encoded Reply out. Only msgpack bytes cross
the actor boundary, so nothing of ours is ever pickled; Ray moves payloads over ~100 KB (adapters,
rollout batches) through its object store.

`RayClient` is the learner's side (`--rollout_url ray://<actor name>`); it implements
`shared.transport.base.RolloutClient` exactly like the ZeroMQ client: `submit` returns at once and
keeps the ObjectRef, `result` waits for it with a timeout.

Ray is imported lazily: importing this module costs nothing until a client is made.
"""

from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING, Any

from shared.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Envelope,
    GenerateReply,
    PushAdapter,
    PushReply,
    ScoreReply,
    Status,
    StatusRequest,
    decode_reply,
    encode,
)
from shared.transport.base import RemoteError, RolloutClient, ServerUnavailable, expect_reply

if TYPE_CHECKING:
    from shared.messages import GenerateRequest, Request, ScoreRequest

# Named actors live in a namespace; a fixed one lets any driver on the cluster find the server
# (a job's default namespace is anonymous and private to that job).
NAMESPACE = "gkd"


class RayClient(RolloutClient):
    """A RolloutClient talking to a named RolloutActor through Ray."""

    def __init__(
        self,
        actor_name: str,
        *,
        namespace: str = NAMESPACE,
        lookup_timeout_s: float = 60.0,
        token: str | None = None,
        timeout_s: float = 600.0,
        max_message_mb: int | None = None,
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
        # Larger messages are refused here, before they reach the object store (the actor's service
        # applies the server's own --max_message_mb on its side).
        self.max_bytes = max_message_mb * 1024 * 1024 if max_message_mb else DEFAULT_MAX_MESSAGE_BYTES
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
        return expect_reply(reply, kind)

    def _push(self, msg: PushAdapter | Any, timeout_s: float | None) -> PushReply:
        """`msg` may also be what `share` returned: the same object-store copy for every actor."""
        ref = self._send(msg) if isinstance(msg, PushAdapter) else self._actor.call.remote(msg)
        return expect_reply(self._wait(ref, timeout_s), PushReply)

    def share(self, msg: PushAdapter) -> Any:
        """Put the encoded push in the object store once; any RayClient of the same token can push
        it (a replica set fans one adapter out to N actors without N copies through the driver)."""
        import ray

        return ray.put(encode(Envelope(token=self._token, body=msg)))

    def status(self, timeout_s: float | None = None) -> Status:
        return expect_reply(self._wait(self._send(StatusRequest()), timeout_s), Status)

    def score_result(self, request_id: str, timeout_s: float | None = None) -> ScoreReply:
        return self.result(request_id, timeout_s, kind=ScoreReply)

    def close(self) -> None:
        # Dropping the refs is all there is: the actor belongs to whoever started it, not to us.
        self._pending.clear()

    # ---- internals --------------------------------------------------------------------------

    def _send(self, body: Request) -> Any:
        import ray

        data = encode(Envelope(token=self._token, body=body))
        if len(data) > self.max_bytes:
            raise RemoteError(
                "too_large",
                f"message of {len(data)} bytes exceeds max_message_mb={self.max_bytes // (1024 * 1024)}",
            )
        # ray.put sends the payload through the object store explicitly (not inlined in the call).
        return self._actor.call.remote(ray.put(data))

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
