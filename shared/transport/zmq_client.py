"""The ZeroMQ transport, client side: a DEALER socket speaking to the server's ROUTER.

Single-threaded by design (the learner's thread). Generate replies are matched by request_id and
may arrive in any order; push and status calls block, and their replies (which carry no id) are
matched to the one such call outstanding.

When a reply does not come in time, or the server drops the connection (it restarted, died, or
refused a message over its size limit), every outstanding request is failed with
ServerUnavailable and the socket is recreated, so a stale reply can never be taken for a new one.
A drop noticed while idle fails the next request instead: a restarted server has lost the adapter it
served, so the caller must re-sync before relying on it. A call also fails once no connection has
existed for `connect_grace_s` (the server is down, not slow).
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from shared import messages as m
from shared.transport.base import RemoteError, RolloutClient, ServerUnavailable, expect_reply

_MiB = 1024 * 1024


class ZmqClient(RolloutClient):
    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout_s: float = 600.0,
        max_message_mb: int | None = None,
        connect_grace_s: float = 5.0,
    ):
        self.url = url
        self.timeout_s = timeout_s
        # A call fails once no connection to the server has existed for this long: a dead server is
        # noticed in seconds even when it died while this client was idle (nothing pending to fail).
        self.connect_grace_s = connect_grace_s
        self._down_since: float | None = None  # monotonic time the link went down; None while connected
        self._lost: str | None = None  # why the link was last reset, until a caller has been told
        self._token = token or ""
        self.max_bytes = max_message_mb * _MiB if max_message_mb else m.DEFAULT_MAX_MESSAGE_BYTES
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None
        self._mon: zmq.Socket | None = None
        self._pending: set[str] = set()  # generate request ids sent, reply not yet taken
        self._done: dict[str, Any] = {}  # request id -> reply, or the exception to raise
        self._anon: deque[Any] = deque()  # replies without an id (push / status)
        self._anon_waiting = False
        self._open()

    # ---- the RolloutClient interface ------------------------------------------------------

    def submit(self, req: m.GenerateRequest | m.ScoreRequest) -> str:
        if not req.request_id:
            req.request_id = uuid.uuid4().hex
        if req.request_id in self._pending:
            raise ValueError(f"request id {req.request_id!r} is already in flight")
        try:
            self._send(req)
        except ServerUnavailable as e:  # submit returns at once; result() reports it
            self._done[req.request_id] = e
        self._pending.add(req.request_id)
        return req.request_id

    def result(self, request_id: str, timeout_s: float | None = None, kind: type = m.GenerateReply) -> Any:
        if request_id not in self._pending and request_id not in self._done:
            raise KeyError(f"unknown request id {request_id!r}")
        self._wait(lambda: request_id in self._done, timeout_s)
        self._pending.discard(request_id)
        return self._expect(self._done.pop(request_id), kind)

    def _push(self, msg: m.PushAdapter, timeout_s: float | None) -> m.PushReply:
        return self._expect(self._call(msg, timeout_s), m.PushReply)

    def status(self, timeout_s: float | None = None) -> m.Status:
        return self._expect(self._call(m.StatusRequest(), timeout_s), m.Status)

    def score_result(self, request_id: str, timeout_s: float | None = None) -> m.ScoreReply:
        return self.result(request_id, timeout_s, kind=m.ScoreReply)

    def close(self) -> None:
        if self._ctx is None:
            return
        self._close_socket()
        self._ctx.term()
        self._ctx = None

    # ---- internals ------------------------------------------------------------------------

    def _open(self) -> None:
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, self.max_bytes)  # also bounds what we accept from the server
        if "[" in self.url:
            s.setsockopt(zmq.IPV6, 1)
        self._mon = s.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED)
        self._down_since = time.monotonic()  # not connected until EVENT_CONNECTED
        s.connect(self.url)
        self._sock = s

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.disable_monitor()
            self._sock.close(0)
            self._mon.close(0)
            self._sock = self._mon = None

    def _reset(self, why: str) -> None:
        """The connection is unusable: fail everything outstanding and start a clean socket.

        Until some caller has been handed a ServerUnavailable, the next send fails too (`_lost`)."""
        for rid in self._pending:
            self._done.setdefault(rid, ServerUnavailable(why))
        if self._anon_waiting:
            self._anon.append(ServerUnavailable(why))
        self._lost = why
        self._close_socket()
        self._open()

    def _send(self, body: Any) -> None:
        if self._ctx is None:
            raise ServerUnavailable("client is closed")
        self._drain_monitor()
        if self._lost is not None:  # stays set until a caller is told (_call, _expect)
            raise ServerUnavailable(self._lost)
        data = m.encode(m.Envelope(token=self._token, body=body))
        if len(data) > self.max_bytes:
            raise RemoteError(
                "too_large", f"message of {len(data)} bytes exceeds max_message_mb={self.max_bytes // _MiB}"
            )
        try:
            self._sock.send(data, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise ServerUnavailable(
                f"cannot queue a request for {self.url} (too many unsent; is the server up?)"
            ) from None

    def _call(self, body: Any, timeout_s: float | None) -> Any:
        """A blocking request whose reply carries no id (push, status)."""
        self._anon.clear()  # anything here answered a call that already timed out
        try:
            self._send(body)
        except ServerUnavailable:
            self._lost = None  # this caller hears of the drop
            raise
        self._anon_waiting = True
        try:
            self._wait(lambda: bool(self._anon), timeout_s)
        finally:
            self._anon_waiting = False
        return self._anon.popleft()

    def _wait(self, ready, timeout_s: float | None) -> None:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._mon, zmq.POLLIN)
        while not ready():
            left = deadline - time.monotonic()
            if left <= 0:
                self._reset(f"no reply from {self.url} within {timeout:.0f} s")
                break
            events = dict(poller.poll(min(left, 1.0) * 1000))
            if self._sock in events:
                self._receive()
            if self._mon in events and self._disconnected():
                self._receive()  # replies that arrived before the drop are still good
                self._reset(
                    f"{self.url} closed the connection (server restarted or died, or a message exceeded its --max_message_mb)"
                )
                break
            if self._down_since is not None and time.monotonic() - self._down_since > self.connect_grace_s:
                self._reset(
                    f"cannot reach {self.url}: not connected for {self.connect_grace_s:g} s (is the server running?)"
                )
                break

    def _receive(self) -> None:
        while True:
            try:
                data = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply = m.decode_reply(data)
            rid = getattr(reply, "request_id", "")
            if rid and rid in self._pending:
                self._done[rid] = reply
            elif not rid:
                self._anon.append(reply)
            # else: a reply to a request this client gave up on; drop it

    def _disconnected(self) -> bool:
        seen = False
        while True:
            try:
                evt = recv_monitor_message(self._mon, zmq.NOBLOCK)
            except zmq.Again:
                return seen
            seen = seen or evt["event"] == zmq.EVENT_DISCONNECTED
            if evt["event"] == zmq.EVENT_CONNECTED:
                self._down_since = None
            elif evt["event"] == zmq.EVENT_DISCONNECTED:
                self._down_since = time.monotonic()

    def _drain_monitor(self) -> None:
        """Before sending: if the connection dropped since we last looked, reset (the send then
        fails). Even when nothing was outstanding, a server that restarted has lost its state (the
        adapter it served, queued work): the caller must hear of it and re-sync first."""
        if self._disconnected():
            self._receive()
            self._reset(f"{self.url} closed the connection (server restarted or died)")

    def _expect(self, reply: Any, kind: type) -> Any:
        if isinstance(reply, ServerUnavailable):
            self._lost = None  # this caller hears of the drop
        return expect_reply(reply, kind)

    def __enter__(self) -> ZmqClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
