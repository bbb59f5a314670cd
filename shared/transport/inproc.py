"""The in-process transport: a RolloutClient that calls a RolloutService in this process.

It still moves encoded bytes through `RolloutService.handle_bytes`, so it exercises the same
decoding, token check and single-reply contract as the network transports (the idea of vLLM v1's
in-process engine client). Used by tests and by the Ray actor's own side.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

from shared.messages import (
    Envelope,
    GenerateReply,
    GenerateRequest,
    PushAdapter,
    PushReply,
    ScoreReply,
    ScoreRequest,
    Status,
    StatusRequest,
    decode_reply,
    encode,
)
from shared.transport.base import ServerUnavailable, expect_reply


class InprocClient:
    def __init__(self, *, service: Any, token: str | None = None, timeout_s: float = 600.0):
        self._service = service
        self._token = token or ""
        self.timeout_s = timeout_s
        self._cv = threading.Condition()
        self._replies: dict[str, bytes] = {}
        self._closed = False

    def _send(self, body: Any, key: str) -> None:
        if self._closed:
            raise ServerUnavailable("client is closed")

        def on_reply(data: bytes) -> None:
            with self._cv:
                self._replies[key] = data
                self._cv.notify_all()

        self._service.handle_bytes(encode(Envelope(token=self._token, body=body)), on_reply)

    def _wait(self, key: str, timeout_s: float | None) -> Any:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        with self._cv:
            if not self._cv.wait_for(lambda: key in self._replies, timeout):
                raise ServerUnavailable(
                    f"no reply from the in-process rollout service within {timeout:.0f} s"
                )
            data = self._replies.pop(key)
        return decode_reply(data)

    def submit(self, req: GenerateRequest | ScoreRequest) -> str:
        if not req.request_id:
            req.request_id = uuid.uuid4().hex
        self._send(req, req.request_id)
        return req.request_id

    def result(self, request_id: str, timeout_s: float | None = None) -> GenerateReply:
        return expect_reply(self._wait(request_id, timeout_s), GenerateReply)

    def generate(self, req: GenerateRequest, timeout_s: float | None = None) -> GenerateReply:
        return self.result(self.submit(req), timeout_s)

    def push_adapter(self, msg: PushAdapter, timeout_s: float | None = None) -> PushReply:
        key = "push-" + uuid.uuid4().hex
        self._send(msg, key)
        return expect_reply(self._wait(key, timeout_s), PushReply)

    def status(self, timeout_s: float | None = None) -> Status:
        key = "status-" + uuid.uuid4().hex
        self._send(StatusRequest(), key)
        return expect_reply(self._wait(key, timeout_s), Status)

    submit_score = submit  # score requests carry an id too

    def score_result(self, request_id: str, timeout_s: float | None = None) -> ScoreReply:
        return expect_reply(self._wait(request_id, timeout_s), ScoreReply)

    def score(self, req: ScoreRequest, timeout_s: float | None = None) -> ScoreReply:
        return self.score_result(self.submit_score(req), timeout_s)

    def close(self) -> None:
        self._closed = True
