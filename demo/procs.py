"""Start, watch and stop the processes the demo runs (rollout server, learner).

Each child gets its own session (process group), so stopping it also stops whatever it spawned
(vLLM helpers): SIGTERM to the group, then SIGKILL to the same group if it lingers. Nothing is
ever killed by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


class ProcessFailed(RuntimeError):
    """A child exited early or did not become ready; the message carries its log tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_script(name: str, module: str) -> list[str]:
    """The console script next to this interpreter, else `python -m module` (no PATH lookups)."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def spawn(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")  # noqa: SIM115 - one log per run; the child owns it for its lifetime
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)


def stop(proc: subprocess.Popen | None, grace_s: float = 20.0) -> None:
    """Stop a child we started, and its process group. Safe to call twice."""
    if proc is None or proc.poll() is not None and not group_alive(proc.pid):
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if proc.poll() is not None and not group_alive(proc.pid):
                return
            time.sleep(0.2)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def log_tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


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
        self.proc = spawn(cmd, log_path, env)
        self.client = None
        self.ready_s = float("nan")  # seconds from spawn to the first healthy status

    def wait_ready(self, timeout_s: float = 600.0, desc: str = "starting the rollout server"):
        """Block until the server answers a status request (a spinner meanwhile); returns the client."""
        from tqdm import tqdm

        from shared.transport import ServerUnavailable, connect

        t0 = time.monotonic()
        self.client = connect(self.url, timeout_s=600.0)
        with tqdm(desc=desc, unit="s", bar_format="{desc}: {elapsed}") as bar:
            while time.monotonic() - t0 < timeout_s:
                bar.update()
                if self.proc.poll() is not None:
                    raise ProcessFailed(
                        f"rollout server exited with code {self.proc.returncode}; its log {self.log_path} ends:\n{log_tail(self.log_path)}"
                    )
                try:
                    st = self.client.status(timeout_s=3.0)
                except ServerUnavailable:
                    continue
                if st.healthy:
                    self.ready_s = time.monotonic() - t0
                    return self.client
                time.sleep(1.0)
        raise ProcessFailed(
            f"rollout server not ready after {timeout_s:.0f} s; its log {self.log_path} ends:\n{log_tail(self.log_path)}"
        )

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
