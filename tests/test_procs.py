"""shared.procs on real child processes (bash, sleep, python): start, wait, stop, log tail."""

from __future__ import annotations

import socket
import sys

import pytest

from shared import procs


def test_stop_ends_the_child_and_everything_it_spawned(tmp_path):
    """Stopping is by process group: a grandchild must not outlive its parent."""
    proc = procs.start(["bash", "-c", "sleep 60 & sleep 60"], tmp_path / "child.log")
    assert procs.group_alive(proc.pid)
    procs.stop(proc, grace_s=5)
    assert proc.poll() is not None and not procs.group_alive(proc.pid)
    assert procs.stop(proc) == proc.returncode  # idempotent


def test_stop_kills_a_descendant_in_a_session_of_its_own(tmp_path):
    """Ray workers leave our process group (setsid); stop still ends them, by their pid."""
    pid_file = tmp_path / "grandchild.pid"
    proc = procs.start(
        ["bash", "-c", f"setsid sleep 60 & echo $! > {pid_file}; trap '' TERM; sleep 60"], tmp_path / "c.log"
    )
    procs.wait_for(
        proc, tmp_path / "c.log", lambda: pid_file.is_file() and pid_file.read_text().strip(), 30, "child"
    )
    grandchild = int(pid_file.read_text())
    assert procs.pid_alive(grandchild)  # in a session of its own
    procs.stop(proc, grace_s=1)  # the parent ignores SIGTERM: SIGKILL after the grace period
    assert proc.poll() is not None
    assert not procs.pid_alive(grandchild)


def test_wait_for_line_returns_once_the_line_is_logged(tmp_path):
    log = tmp_path / "ready.log"
    proc = procs.start([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"], log)
    try:
        assert procs.wait_for_line(proc, log, "ready", 60, "child") >= 0
    finally:
        procs.stop(proc, grace_s=5)


def test_a_child_that_dies_first_fails_with_its_log_tail(tmp_path):
    log = tmp_path / "dies.log"
    proc = procs.start(["bash", "-c", "echo first; echo the-last-words >&2; exit 3"], log)
    with pytest.raises(procs.ProcessFailed) as e:
        procs.wait_for_line(proc, log, "never printed", 60, "the child")
    assert "the child exited with code 3" in str(e.value) and "the-last-words" in str(e.value)


def test_wait_for_port_sees_a_listener_and_times_out_without_one(tmp_path):
    port = procs.free_port()
    code = (
        f"import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(60)"
    )
    log = tmp_path / "listen.log"
    proc = procs.start([sys.executable, "-c", code], log)
    try:
        procs.wait_for_port(proc, log, port, 60, "listener")
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        with pytest.raises(procs.ProcessFailed, match="not ready after 1 s"):
            procs.wait_for_port(proc, log, procs.free_port(), 1, "listener")
    finally:
        procs.stop(proc, grace_s=5)


def test_env_overrides_and_removes_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("GKD_PROCS_DROP", "x")
    log = tmp_path / "env.log"
    code = "import os; print(os.environ.get('GKD_PROCS_DROP'), os.environ.get('GKD_PROCS_SET'))"
    proc = procs.start([sys.executable, "-c", code], log, {"GKD_PROCS_DROP": None, "GKD_PROCS_SET": "y"})
    proc.wait(60)
    assert log.read_text().split() == ["None", "y"]
