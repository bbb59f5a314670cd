"""Start, watch and stop the child processes we run (rollout servers, learners, Ray heads, relays).

Used by the tests, the demo and the benchmarks alike. Each child gets its own session (process
group) and one log file for stdout + stderr. Stopping sends SIGTERM to the group, waits, then
SIGKILLs the group and every descendant that left it (Ray workers start sessions of their own).
Nothing is ever killed by name, only by the ids of processes we started. Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path


class ProcessFailed(RuntimeError):
    """A child exited early or did not become ready; the message carries its log tail."""


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    cmd: list[str],
    log_path: Path,
    env: Mapping[str, str | None] | None = None,
    *,
    cwd: Path | None = None,
) -> subprocess.Popen:
    """Start `cmd` in a new process group, stdout + stderr to `log_path` (created or truncated).

    `env` is applied over this process's environment; a None value removes that variable.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ}
    for k, v in (env or {}).items():
        if v is None:
            full_env.pop(k, None)
        else:
            full_env[k] = v
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            cmd, cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def log_tail(path: Path, n: int = 25) -> str:
    """The last `n` lines of a log ("(no log)" if it cannot be read)."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def wait_for(
    proc: subprocess.Popen,
    log_path: Path,
    ready: Callable[[], bool],
    timeout_s: float,
    what: str,
    poll_s: float = 0.5,
) -> float:
    """Poll `ready()` until true; returns the seconds it took. Raises ProcessFailed (with the log
    tail) if the child exits first or `timeout_s` passes (the child is left running then)."""
    t0 = time.monotonic()
    while True:
        if ready():
            return time.monotonic() - t0
        if proc.poll() is not None:
            raise ProcessFailed(
                f"{what} exited with code {proc.returncode} before it was ready; {log_path} ends:\n{log_tail(log_path)}"
            )
        if time.monotonic() - t0 > timeout_s:
            raise ProcessFailed(
                f"{what} not ready after {timeout_s:.0f} s; {log_path} ends:\n{log_tail(log_path)}"
            )
        time.sleep(poll_s)


def wait_for_line(proc: subprocess.Popen, log_path: Path, text: str, timeout_s: float, what: str) -> float:
    """Wait until `text` appears in the child's log (e.g. a server's "ready" line)."""

    def seen() -> bool:
        try:
            return text in Path(log_path).read_text(errors="replace")
        except OSError:
            return False

    return wait_for(proc, log_path, seen, timeout_s, what)


def wait_for_port(
    proc: subprocess.Popen, log_path: Path, port: int, timeout_s: float, what: str, host: str = "127.0.0.1"
) -> float:
    """Wait until something accepts TCP connections on host:port."""

    def accepting() -> bool:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            return False

    return wait_for(proc, log_path, accepting, timeout_s, what)


def group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` is still alive."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    return _start_time(pid) is not None


def stop(proc: subprocess.Popen | None, grace_s: float = 20.0) -> int | None:
    """Stop a child we started and everything it started: SIGTERM to its group, up to `grace_s` to
    go, then SIGKILL to the group and to every descendant still alive. Safe to call twice; returns
    the child's exit code."""
    if proc is None:
        return None
    tree = _descendants(proc.pid)  # before SIGTERM: once the parent is gone they are reparented
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        if _gone(proc, tree):
            break
        _signal(proc.pid, tree, sig)
        deadline = time.monotonic() + wait_s
        while not _gone(proc, tree) and time.monotonic() < deadline:
            time.sleep(0.2)
    return proc.poll()


def _signal(pgid: int, pids: list[tuple[int, str]], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
    if sig == signal.SIGKILL:
        for pid, start_time in pids:
            if _start_time(pid) == start_time:  # still the same process, not a reused pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)


def _gone(proc: subprocess.Popen, tree: list[tuple[int, str]]) -> bool:
    if proc.poll() is None or group_alive(proc.pid):
        return False
    return all(_start_time(pid) != st for pid, st in tree)


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every live descendant of `pid`, from /proc (empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        stat = _stat(int(entry.name))
        if stat is not None:
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        st = _start_time(p)
        if st is not None:
            out.append((p, st))
        todo += children.get(p, [])
    return out


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields after the command name: [state, ppid, pgrp, ...]."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    stat = _stat(pid)
    if stat is None or stat[0] == "Z":  # a zombie is dead, only not reaped yet
        return None
    return stat[19]
