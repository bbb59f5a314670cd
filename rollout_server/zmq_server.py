"""The ZeroMQ transport, server side: a ROUTER socket on tcp://host:port in front of the service.

ZeroMQ sockets are not thread-safe, so only the loop thread touches the socket. Replies come from
the service's engine thread: they are queued and the loop is woken through a pipe it polls beside
the socket.

Size limit: `zmq.MAXMSGSIZE` makes libzmq check each message's length from its header while
decoding. A message over the limit is never buffered whole: libzmq stops reading, closes that
peer's connection and counts it as a protocol error. The client sees a disconnect (ZmqClient turns
it into ServerUnavailable at once); other clients and the server are unaffected.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from typing import Any

import zmq

from shared.messages import STARTING, ErrorReply, decode_request, encode

log = logging.getLogger("gkd.rollout_server")


class PortInUse(OSError):
    """The port is taken (another server, or a previous one still running)."""


class ZmqServer:
    def __init__(self, host: str, port: int, max_bytes: int):
        """Bind now (before the slow engine start), so a taken port fails in milliseconds."""
        self.url = f"tcp://{_bracket(host)}:{port}"
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
        if ":" in host:
            self._sock.setsockopt(zmq.IPV6, 1)
        try:
            self._sock.bind(self.url)
        except zmq.ZMQError as e:
            self._sock.close(0)
            self._ctx.term()
            if e.errno == zmq.EADDRINUSE:
                raise PortInUse(
                    f"port {port} on {host} is already in use; pick another --port or stop the process holding it"
                ) from None
            raise OSError(f"cannot bind {self.url}: {e}") from None
        self._out: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closed = False

    def serve(self, service: Any, stop: threading.Event) -> None:
        """Receive, hand to the service, send queued replies; returns when `stop` is set.

        `service` may be swapped later with `set_service` (the CLI serves a Starting placeholder
        while the engine starts)."""
        self.service = service
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not stop.is_set():
            events = dict(poller.poll(200))  # the timeout only bounds how long a stop takes
            if self._wake_r in events:
                _drain_pipe(self._wake_r)
            if self._sock in events:
                self._receive(self.service)
            self._flush()

    def set_service(self, service: Any) -> None:
        self.service = service  # one attribute store: atomic for the loop thread

    def _receive(self, service: Any) -> None:
        for _ in range(64):  # then flush replies, so a flood of requests cannot starve them
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:  # a ROUTER always prepends the peer's identity
                continue
            envelope = frames[:-1]  # identity (+ empty delimiter when the peer is a REQ socket)
            try:
                service.handle_bytes(frames[-1], lambda data, env=envelope: self._queue_reply(env, data))
            except Exception as e:  # noqa: BLE001 - one bad message must not stop the loop
                log.exception("request handling failed")
                self._queue_reply(envelope, encode(ErrorReply(code="internal", message=f"server error: {e}")))

    def _queue_reply(self, envelope: list[bytes], data: bytes) -> None:
        """Called from any thread."""
        self._out.put([*envelope, data])
        # BlockingIOError: the pipe already holds a wake-up; OSError: we are closing.
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _flush(self) -> None:
        while True:
            try:
                frames = self._out.get_nowait()
            except queue.Empty:
                return
            try:
                # A reply to a peer that has gone is dropped by the ROUTER (not mandatory routing).
                self._sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                log.warning("reply dropped: the client's queue is full")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close(0)
        self._ctx.term()
        os.close(self._wake_r)
        os.close(self._wake_w)


class Starting:
    """Answers every request while the engine starts: a clear "starting" error, no waiting."""

    def __init__(self, model: str):
        self.message = f"the rollout server is starting its engine (model {model}); retry in a few seconds"

    def handle_bytes(self, data: bytes, reply: Any) -> None:
        try:
            rid = getattr(decode_request(data).body, "request_id", "")
        except Exception:  # noqa: BLE001 - any undecodable message gets the same answer
            rid = ""
        reply(encode(ErrorReply(code=STARTING, message=self.message, request_id=rid)))


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
