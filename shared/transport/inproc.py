"""The in-process transport: a RolloutClient that calls a RolloutService in this process.

It still moves encoded bytes through `RolloutService.handle_bytes`, so it exercises the same
decoding, token check and single-reply contract as the network transports (the idea of vLLM v1's
in-process engine client). Used by tests and by the Ray actor's own side.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

from shared import messages as m
from shared.transport.base import RolloutClient, ServerUnavailable, expect_reply


class InprocClient(RolloutClient):
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

        self._service.handle_bytes(m.encode(m.Envelope(token=self._token, body=body)), on_reply)

    def _wait(self, key: str, timeout_s: float | None) -> Any:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        with self._cv:
            if not self._cv.wait_for(lambda: key in self._replies, timeout):
                raise ServerUnavailable(
                    f"no reply from the in-process rollout service within {timeout:.0f} s"
                )
            data = self._replies.pop(key)
        return m.decode_reply(data)

    def submit(self, req: m.GenerateRequest | m.ScoreRequest) -> str:
        if not req.request_id:
            req.request_id = uuid.uuid4().hex
        self._send(req, req.request_id)
        return req.request_id

    def result(self, request_id: str, timeout_s: float | None = None) -> m.GenerateReply:
        return expect_reply(self._wait(request_id, timeout_s), m.GenerateReply)

    def _push(self, msg: m.PushAdapter, timeout_s: float | None) -> m.PushReply:
        key = "push-" + uuid.uuid4().hex
        self._send(msg, key)
        return expect_reply(self._wait(key, timeout_s), m.PushReply)

    def status(self, timeout_s: float | None = None) -> m.Status:
        key = "status-" + uuid.uuid4().hex
        self._send(m.StatusRequest(), key)
        return expect_reply(self._wait(key, timeout_s), m.Status)

    def score_result(self, request_id: str, timeout_s: float | None = None) -> m.ScoreReply:
        return expect_reply(self._wait(request_id, timeout_s), m.ScoreReply)

    def close(self) -> None:
        self._closed = True
