"""Transports between the learner and the rollout server, behind one small client interface.

`connect(url)` picks the implementation from the URL scheme (the factory keyed by transport type):

- ``tcp://host:port``   ZeroMQ (DEALER client, ROUTER server): `gkd-learner --rollout-url` and compose;
- ``ray://<actor>``     a named Ray actor; payloads travel through the object store;
- ``inproc://``         the service object in this process (tests, the Ray actor's own side).

A comma-separated list of tcp:// or ray:// URLs is a replica set (shared.transport.replicas): one
client over several servers, with routing, push fan-out and lost/rejoined replicas.

All three move the same msgspec/msgpack bytes (shared.messages), so nothing on the network path is
ever unpickled.
"""

from __future__ import annotations

from typing import Any

from shared.transport.base import RemoteError, RolloutClient, ServerUnavailable

__all__ = ["RemoteError", "RolloutClient", "ServerUnavailable", "connect", "split_urls"]


def split_urls(url: str) -> list[str]:
    """The URLs of a rollout_url: one, or a comma-separated list of replicas."""
    return [u.strip() for u in url.split(",") if u.strip()]


def connect(
    url: str,
    *,
    token: str | None = None,
    timeout_s: float = 600.0,
    max_message_mb: int | None = None,
    **kw: Any,
) -> RolloutClient:
    """Return a RolloutClient for `url` (or for a comma-separated list of them). Imports only the
    transport it needs. `max_message_mb` (None: DEFAULT_MAX_MESSAGE_BYTES) caps what the ZeroMQ and
    Ray clients send and accept; an in-process client has no wire, the service's own cap applies."""
    urls = split_urls(url)
    if len(urls) > 1:
        from shared.transport.replicas import ReplicaSet

        if any(u.startswith("inproc://") for u in urls):
            raise ValueError(f"rollout_url={url!r}: inproc:// cannot be part of a replica list")
        return ReplicaSet(
            urls,
            lambda u: connect(u, token=token, timeout_s=timeout_s, max_message_mb=max_message_mb, **kw),
        )
    if url.startswith("tcp://"):
        from shared.transport.zmq_client import ZmqClient

        return ZmqClient(url, token=token, timeout_s=timeout_s, max_message_mb=max_message_mb, **kw)
    if url.startswith("ray://"):
        from shared.transport.ray_transport import RayClient

        return RayClient(
            url.removeprefix("ray://"), token=token, timeout_s=timeout_s, max_message_mb=max_message_mb, **kw
        )
    if url.startswith("inproc://"):
        from shared.transport.inproc import InprocClient

        return InprocClient(token=token, timeout_s=timeout_s, **kw)
    raise ValueError(
        f"rollout_url={url!r}: unknown scheme; use tcp://host:port, ray://<actor name> or inproc://"
    )
