"""Transports between the learner and the rollout server, behind one small client interface.

`connect(url)` picks the implementation from the URL scheme (the factory keyed by transport type):

- ``tcp://host:port``   ZeroMQ (DEALER client, ROUTER server): `gkd-learner --rollout-url` and compose;
- ``ray://<actor>``     a named Ray actor; payloads travel through the object store;
- ``inproc://``         the service object in this process (tests, the Ray actor's own side).

All three move the same msgspec/msgpack bytes (shared.messages), so nothing on the network path is
ever unpickled.
"""

from __future__ import annotations

from typing import Any

from shared.transport.base import RemoteError, RolloutClient, ServerUnavailable

__all__ = ["RemoteError", "RolloutClient", "ServerUnavailable", "connect"]


def connect(url: str, *, token: str | None = None, timeout_s: float = 600.0, **kw: Any) -> RolloutClient:
    """Return a RolloutClient for `url`. Imports only the transport it needs."""
    if url.startswith("tcp://"):
        from shared.transport.zmq_client import ZmqClient

        return ZmqClient(url, token=token, timeout_s=timeout_s, **kw)
    if url.startswith("ray://"):
        from shared.transport.ray_transport import RayClient

        return RayClient(url.removeprefix("ray://"), token=token, timeout_s=timeout_s, **kw)
    if url.startswith("inproc://"):
        from shared.transport.inproc import InprocClient

        return InprocClient(token=token, timeout_s=timeout_s, **kw)
    raise ValueError(
        f"rollout_url={url!r}: unknown scheme; use tcp://host:port, ray://<actor name> or inproc://"
    )
