"""The rollout server the demo and the benchmarks run, as a child process with a client to it.

Starting, waiting and stopping are `shared.procs` (re-exported here for the demo's callers).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from shared.procs import ProcessFailed, free_port, log_tail, start, stop, wait_for

__all__ = ["ProcessFailed", "RolloutServer", "free_port", "log_tail", "start", "stop", "venv_script"]


def venv_script(name: str, module: str) -> list[str]:
    """The console script next to this interpreter, else `python -m module` (no PATH lookups)."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


class RolloutServer:
    """`gkd-rollout-server` as a child process, plus a ZeroMQ client to it."""

    def __init__(
        self,
        model: Path,
        log_path: Path,
        *,
        dtype: str = "auto",
        http_port: int | None = None,
        extra: list[str] | None = None,
    ):
        self.port = free_port()
        self.url = f"tcp://127.0.0.1:{self.port}"
        self.http_port = http_port
        self.log_path = log_path
        cmd = venv_script("gkd-rollout-server", "rollout_server.cli") + [
            "--model",
            str(model),
            "--port",
            str(self.port),
            "--dtype",
            dtype,
            *(extra or []),
        ]
        if http_port is not None:
            cmd += ["--http_port", str(http_port)]
        env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        self.proc = start(cmd, log_path, env)
        self.client = None
        self.ready_s = float("nan")  # seconds from spawn to the first healthy status

    def wait_ready(self, timeout_s: float = 600.0, desc: str = "starting the rollout server"):
        """Block until the server answers a status request (a spinner meanwhile); returns the client."""
        from tqdm import tqdm

        from shared.transport import ServerUnavailable, connect

        self.client = connect(self.url, timeout_s=600.0)

        def healthy() -> bool:
            bar.update()
            try:
                return self.client.status(timeout_s=3.0).healthy
            except ServerUnavailable:
                return False

        with tqdm(desc=desc, unit="s", bar_format="{desc}: {elapsed}") as bar:
            self.ready_s = wait_for(
                self.proc, self.log_path, healthy, timeout_s, "rollout server", poll_s=1.0
            )
        return self.client

    def stop(self) -> None:
        if self.client is not None:
            # Closing a socket to a dying server must not mask the real error.
            with contextlib.suppress(Exception):
                self.client.close()
            self.client = None
        stop(self.proc)

    def __enter__(self) -> RolloutServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
