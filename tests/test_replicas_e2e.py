"""Two rollout replicas behind one learner (`--rollout_url tcp://a,tcp://b`): real processes on
loopback, tiny models.

- a short run finishes; both servers end at the learner's final policy version and both served
  generate requests (their status counters);
- one replica killed with SIGKILL mid-run: the run goes on with the other, steps contiguous; the
  replica restarted on the same port is brought to the current version and rejoins.

The pool's server is stopped first so that no more than two engines run at once.
"""

from __future__ import annotations

import os
import re
import signal

import pytest
from conftest import DEFAULT_SERVER_FLAGS, kill_pid, learner_argv, start_learner, start_server
from test_faults import assert_steps_and_cursor_continuous, train_rows, wait_until

from learner.metrics import read


@pytest.fixture(scope="module")
def replicas(server_pool, tiny_models, tmp_path_factory):
    server_pool.stop()
    logs = tmp_path_factory.mktemp("replica_logs")
    started = [
        start_server(tiny_models.student, logs / f"replica-{i}.log", **DEFAULT_SERVER_FLAGS) for i in range(2)
    ]
    yield started
    for s in started:
        s.stop()


def status(srv):
    with srv.client(timeout_s=60) as c:
        return c.status()


def run_argv(tiny_models, tiny_dataset, out, replicas, n_steps: int, *extra: str) -> list[str]:
    url = ",".join(s.url for s in replicas)
    return learner_argv(
        tiny_models,
        tiny_dataset,
        out,
        url,
        "--max_steps",
        str(n_steps),
        "--save_steps",
        "100",
        "--lmbda",
        "1",
        "--max_inflight",
        "4",
        "--request_timeout_s",
        "900",  # the learner is paused (SIGSTOP) while a replica restarts
        *extra,
    )


@pytest.mark.slow
def test_two_replicas_finish_a_run_and_both_serve(replicas, tiny_models, tiny_dataset, tmp_path):
    out, log, n_steps = tmp_path / "run", tmp_path / "learner.log", 4
    before = [status(s).served_requests for s in replicas]
    proc = start_learner(run_argv(tiny_models, tiny_dataset, out, replicas, n_steps), log)
    try:
        proc.wait(900)
    finally:
        kill_pid(proc)
    assert proc.returncode == 0, log.read_text()[-3000:]
    rows = train_rows(out)
    assert_steps_and_cursor_continuous(rows, n_steps)
    final = rows[-1]["policy_version"]  # a row's version includes the push after its step
    after = [status(s) for s in replicas]
    assert [st.policy_version for st in after] == [final, final]
    assert all(st.served_requests > n for st, n in zip(after, before))  # both served generate requests
    figures = rows[-1]["replicas"]
    assert [f["replica"] for f in figures] == [s.url for s in replicas]
    assert all(f["state"] == "serving" and f["policy_version"] == final for f in figures)
    assert all(r["on_policy_fraction"] == 1.0 and r["canary_max_abs"] <= 1e-3 for r in rows)


@pytest.mark.slow
def test_replica_killed_mid_run_then_restarted_rejoins(replicas, tiny_models, tiny_dataset, tmp_path):
    out, log, n_steps = tmp_path / "run", tmp_path / "learner.log", 12
    proc = start_learner(run_argv(tiny_models, tiny_dataset, out, replicas, n_steps), log)
    victim, survivor = replicas
    try:
        wait_until(lambda: len(train_rows(out)) >= 2, 900, "step 2", proc, log)
        kill_pid(victim.proc)  # SIGKILL by PID, mid-run
        wait_until(
            lambda: f"rollout replica {victim.url} lost" in log.read_text(), 120, "the loss", proc, log
        )
        # Pause the learner while the engine restarts (20-90 s on 2 cores), so that the rejoin
        # happens mid-run however fast the remaining steps are.
        os.killpg(proc.pid, signal.SIGSTOP)
        try:
            restarted = start_server(
                tiny_models.student, tmp_path / "restarted.log", port=victim.port, **DEFAULT_SERVER_FLAGS
            )
        finally:
            os.killpg(proc.pid, signal.SIGCONT)
        replicas[0] = restarted  # the module fixture stops it
        proc.wait(900)
    finally:
        kill_pid(proc)
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    rows = train_rows(out)
    assert_steps_and_cursor_continuous(rows, n_steps)
    versions = [r["policy_version"] for r in rows]
    assert versions == list(range(versions[0], versions[0] + n_steps))  # one push per step, none lost
    assert all(r["on_policy_fraction"] == 1.0 and r["canary_max_abs"] <= 1e-3 for r in rows)
    events = [r for r in read(out) if r.get("event", "").startswith("replica_")]
    assert [e["event"] for e in events] == ["replica_lost", "replica_rejoined"], events
    assert all(e["replica"] == victim.url for e in events)
    assert not any(r.get("event") == "reconnect" for r in read(out))  # never without a replica
    # It came back at version 0 and was pushed the learner's current adapter (canary-checked) before
    # any request; while the learner pushed on, it was pushed the newer one, until it rejoined at the
    # current version; from then on it took every push.
    served = [int(v) for v in re.findall(r"serving policy version (\d+)", restarted.log())]
    joined, final = events[1]["policy_version"], versions[-1]
    assert versions[0] <= served[0] and served == sorted(set(served)) and joined in served
    assert served[served.index(joined) :] == list(range(joined, final + 1))
    assert [status(s).policy_version for s in (restarted, survivor)] == [final, final]
    assert status(restarted).served_requests > 0
    assert f"rollout replica {victim.url} rejoined at policy version {joined}" in output
