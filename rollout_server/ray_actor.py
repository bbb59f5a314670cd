"""The rollout server as a named Ray actor (the server side of `ray://<actor name>`).

`RolloutActor` builds the vLLM engine and the RolloutService inside the actor (vLLM's engine core
runs in a process of its own, started by the actor) and
exposes one method, `call(data: bytes) -> bytes`: an encoded Envelope in, an encoded Reply out. Only
msgpack bytes cross the actor boundary (the settings too), so nothing of ours is ever pickled. The
learner's side is `shared.transport.ray_transport.RayClient`.

Ray is imported lazily: importing this module costs nothing until an actor is made.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import msgspec

from rollout_server.settings import ServerSettings
from shared.transport.ray_transport import NAMESPACE

# Concurrent `call`s an actor accepts: enough for the learner's in-flight generates plus a push and
# status polls. Each waits for its reply while the service runs the work on its engine loop.
MAX_CONCURRENCY = 16


class RolloutActor:
    """The rollout server inside a Ray actor (wrapped with `ray.remote` by `start_rollout_actor`)."""

    def __init__(self, settings_msgpack: bytes):
        from rollout_server.cli import check
        from rollout_server.engine import AsyncEngine
        from rollout_server.service import RolloutService

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
    scheduling_strategy: Any = None,
) -> Any:
    """Create the named rollout actor and return its handle at once (the engine starts inside).

    The actor is owned by the calling driver: it dies with it, so a finished or failed job never
    leaves a vLLM engine holding GPUs. A client's first call waits for the engine to come up.
    `scheduling_strategy` places it, e.g. on a bundle of the job's placement group.
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
        scheduling_strategy=scheduling_strategy,
    ).remote(msgspec.msgpack.encode(settings))
