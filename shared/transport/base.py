"""The client interface every transport implements (same shape in-process and over the wire)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shared.messages import (
    STARTING,
    ErrorReply,
    GenerateReply,
    GenerateRequest,
    PushAdapter,
    PushReply,
    ScoreReply,
    ScoreRequest,
    Status,
)


class RemoteError(RuntimeError):
    """The server answered with an ErrorReply; `code` is its machine-readable kind."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ServerUnavailable(ConnectionError):
    """No answer from the server within the timeout (down, restarting or unreachable)."""


def expect_reply(reply: Any, kind: type) -> Any:
    """`reply` if it is a `kind`; otherwise raise: an exception stands for itself, an ErrorReply
    becomes RemoteError(code), any other reply type is a `bad_reply` RemoteError."""
    if isinstance(reply, BaseException):
        raise reply
    if isinstance(reply, ErrorReply) and reply.code == STARTING:
        # The port answers while the engine starts: the same as no server yet, so callers retry.
        raise ServerUnavailable(reply.message)
    if isinstance(reply, ErrorReply):
        raise RemoteError(reply.code, reply.message)
    if not isinstance(reply, kind):
        raise RemoteError("bad_reply", f"expected {kind.__name__}, got {type(reply).__name__}")
    return reply


class RolloutClient:
    """What the learner needs from a rollout (or teacher) server; every transport subclasses it.

    A transport defines the primitives (`submit`, `result`, `score_result`, `status`, `close` and
    `_push`); the calls built from them (`generate`, `submit_score`, `score`, `push_adapter`) are
    written once here. `submit` returns at once so the learner can keep several batches in flight
    while it trains; `result` blocks for one of them. Replies may arrive in any order.
    """

    def submit(self, req: GenerateRequest | ScoreRequest) -> str:
        """Send a generate (or score) request; returns its request_id."""
        raise NotImplementedError

    def result(self, request_id: str, timeout_s: float | None = None) -> GenerateReply:
        """Block until the reply for `request_id` arrives (RemoteError / ServerUnavailable otherwise)."""
        raise NotImplementedError

    def score_result(self, request_id: str, timeout_s: float | None = None) -> ScoreReply:
        """Block until the ScoreReply for `request_id` arrives (RemoteError / ServerUnavailable otherwise)."""
        raise NotImplementedError

    def status(self, timeout_s: float | None = None) -> Status:
        raise NotImplementedError

    def close(self) -> None:
        """Release sockets / handles. Idempotent."""
        raise NotImplementedError

    def _push(self, msg: PushAdapter, timeout_s: float | None) -> PushReply:
        """Send one push and return its PushReply (no verification)."""
        raise NotImplementedError

    def generate(self, req: GenerateRequest, timeout_s: float | None = None) -> GenerateReply:
        """submit + result."""
        return self.result(self.submit(req), timeout_s)

    def submit_score(self, req: ScoreRequest) -> str:
        """Send a score request to a teacher server (returns at once): score requests carry an id
        like generate requests, so they travel the same way."""
        return self.submit(req)

    def score(self, req: ScoreRequest, timeout_s: float | None = None) -> ScoreReply:
        """submit_score + score_result."""
        return self.score_result(self.submit_score(req), timeout_s)

    def push_adapter(
        self,
        msg: PushAdapter,
        timeout_s: float | None = None,
        verify: Callable[[PushReply], None] | None = None,
    ) -> PushReply:
        """Push an adapter; returns once the server serves it (and scored the canary).

        `verify(reply)` is called on the reply (for a replica set: on every replica's, and again
        when a replica rejoins); it raises to refuse it, e.g. on a canary mismatch."""
        reply = self._push(msg, timeout_s)
        if verify is not None:
            verify(reply)
        return reply
