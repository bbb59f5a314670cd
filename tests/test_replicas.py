"""The replica set (shared.transport.replicas) over real in-process rollout services.

Each replica is a real RolloutService (queueing, versions, pushes, merged reload of a real PEFT
adapter) reached through the in-process transport; only the vLLM engine is the recording stand-in
of test_rollout_server.py, so routing, fan-out, loss and rejoin run in milliseconds. A replica is
"killed" by closing its service (it answers `unavailable`, as a server shutting down does) and
"restarted" by putting a new service behind the same name. The same logic over real server
processes is tested in test_replicas_e2e.py.
"""

from __future__ import annotations

import time

import pytest
from test_rollout_server import RecordingEngine
from test_rollout_server import _small_request as request

from shared.transport import ServerUnavailable, connect
from shared.transport.replicas import ReplicaSet


class Fleet:
    """Named in-process services; `client(name)` is the replica set's client factory."""

    def __init__(self, model, gen_s: float):
        self.model, self.gen_s = model, gen_s
        self.services: dict[str, object] = {}
        self.made: list[object] = []

    def start(self, name: str) -> None:
        from rollout_server.service import RolloutService
        from rollout_server.settings import ServerSettings

        engine = RecordingEngine(self.gen_s)
        svc = RolloutService(engine, ServerSettings(model=str(self.model), max_lora_rank=32))
        self.services[name] = svc
        self.made.append((svc, engine))

    def served(self, name: str) -> int:
        """Sequences the replica's service has answered (its Status counter)."""
        return self.services[name].status().served_sequences

    def kill(self, name: str) -> None:
        self.services[name].close()

    def client(self, name: str):
        from shared.transport.inproc import InprocClient

        return InprocClient(service=self.services[name], timeout_s=30)


@pytest.fixture
def fleet(tiny_models):
    made: list[Fleet] = []

    def make(*names: str, gen_s: float = 0.05) -> Fleet:
        f = Fleet(tiny_models.student, gen_s)
        for n in names:
            f.start(n)
        made.append(f)
        return f

    yield make
    for f in made:
        for svc, engine in f.made:
            svc.close()
            engine.close()


def wait_for(pred, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_requests_go_to_the_least_loaded_replica_and_replies_carry_its_version(fleet):
    f = fleet("a", "b", gen_s=0.3)
    rs = ReplicaSet(["a", "b"], f.client)
    big = rs.submit(request("big", n=6))  # 6 sequences on one replica ...
    small = [rs.submit(request(f"s{i}", n=1)) for i in range(3)]  # ... so these go to the other
    replies = [rs.result(r) for r in (big, *small)]
    assert [r.request_id for r in replies] == [big, *small]  # the caller's ids, not the inner ones
    assert sorted(f.served(n) for n in f.services) == [3, 6]
    assert {r.policy_version for r in replies} == {0}
    figures = rs.replica_figures()
    assert [x["served"] for x in figures] in ([1, 3], [3, 1])
    assert all(x["outstanding"] == 0 and x["state"] == "serving" for x in figures)
    st = rs.status()
    assert (st.served_requests, st.served_sequences) == (4, 9)
    rs.close()


def test_push_fans_out_to_every_replica_and_each_reply_is_verified(fleet, make_adapter):
    f = fleet("a", "b")
    rs = ReplicaSet(["a", "b"], f.client)
    adapter = make_adapter(r=4, seed=0)
    checked = []
    reply = rs.push_adapter(adapter.push(1, [3, 4, 5]), verify=checked.append)
    assert reply.version == 1 and len(checked) == 2
    assert [svc.status().policy_version for svc in f.services.values()] == [1, 1]
    replies = [rs.generate(request(f"r{i}", min_version=1)) for i in range(4)]
    assert {r.policy_version for r in replies} == {1}
    assert all(f.served(n) for n in f.services)  # both served

    def refuse(reply):
        raise RuntimeError("canary mismatch")

    with pytest.raises(RuntimeError, match="canary mismatch"):  # a verify failure is a hard error
        rs.push_adapter(adapter.push(2), verify=refuse)
    rs.close()


def test_a_lost_replica_hands_its_work_over_and_rejoins_at_the_current_version(fleet, make_adapter):
    f = fleet("a", "b", gen_s=0.2)
    rs = ReplicaSet(["a", "b"], f.client, probe_s=0.05)
    adapter = make_adapter(r=4, seed=0)
    rs.push_adapter(adapter.push(1, [3, 4, 5]))
    ids = [rs.submit(request(f"r{i}", n=1, min_version=1)) for i in range(6)]
    f.kill("a")  # what it had not started answers `unavailable`
    replies = [rs.result(r) for r in ids]
    assert [r.request_id for r in replies] == ids and {r.policy_version for r in replies} == {1}
    lost = [e for e in rs.take_events() if e["event"] == "replica_lost"]
    assert [e["replica"] for e in lost] == ["a"] and lost[0]["moved_requests"] >= 1
    assert rs.replica_figures()[0]["state"] == "lost"
    # Training goes on with one replica; a push now reaches b alone.
    checked = []
    rs.push_adapter(make_adapter(r=4, seed=1).push(2, [3, 4, 5]), verify=checked.append)
    assert len(checked) == 1
    f.start("a")  # "restarted on the same address": a fresh service at version 0
    wait_for(lambda: any(e["event"] == "replica_rejoined" for e in rs.take_events()))
    assert len(checked) == 2  # the rejoining replica's canary went through the same check
    assert f.services["a"].status().policy_version == 2
    more = [rs.submit(request(f"m{i}", n=1, min_version=2)) for i in range(4)]
    assert {rs.result(r).policy_version for r in more} == {2}
    assert f.served("a") > 0  # back in rotation (the restarted service counts from 0)
    rs.close()


def test_with_every_replica_gone_calls_fail_until_one_rejoins(fleet, make_adapter):
    f = fleet("a", "b")
    rs = ReplicaSet(["a", "b"], f.client, probe_s=0.05)
    rs.push_adapter(make_adapter(r=4, seed=0).push(1))
    f.kill("a")
    f.kill("b")
    with pytest.raises(ServerUnavailable, match="every rollout replica is gone"):
        rs.generate(request("x"))
    with pytest.raises(ServerUnavailable):
        rs.status(timeout_s=0.3)
    f.start("b")
    assert rs.status(timeout_s=30).policy_version == 1  # waited for b to rejoin at version 1
    assert rs.generate(request("y", min_version=1)).policy_version == 1
    rs.close()


def test_connect_builds_a_replica_set_from_a_comma_separated_url():
    from shared.config import Config, validate

    rs = connect("tcp://127.0.0.1:1,tcp://127.0.0.1:2", timeout_s=1)
    try:
        assert isinstance(rs, ReplicaSet) and rs.urls == ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]
    finally:
        rs.close()
    single = connect("tcp://127.0.0.1:1", timeout_s=1)
    assert not isinstance(single, ReplicaSet)  # one URL: the plain client, as before
    single.close()
    with pytest.raises(ValueError, match="twice"):
        connect("tcp://127.0.0.1:1,tcp://127.0.0.1:1")

    def errors(url: str) -> list[str]:
        cfg = Config()
        cfg.model.model_name_or_path = cfg.model.teacher_model_name_or_path = "m"
        cfg.data.dataset_name = "d"
        cfg.rollout.rollout_url = url
        return [e for e in validate(cfg) if "rollout_url" in e]

    assert errors("tcp://a:1,tcp://b:1") == []
    assert errors("ray://r0,ray://r1") == []
    assert errors("tcp://a:1,http://b:1") and errors("tcp://a:1,tcp://a:1") and errors("tcp://a:1,")


def test_a_replica_behind_gets_only_what_it_can_serve_until_a_push_brings_it_up(fleet, make_adapter):
    f = fleet("a", "b")
    adapter = make_adapter(r=4, seed=0)
    f.client("a").push_adapter(adapter.push(1))  # b was restarted while the learner was away
    rs = ReplicaSet(["a", "b"], f.client)
    assert rs.status().policy_version == 1  # the newest in rotation
    replies = [rs.generate(request(f"r{i}", min_version=1)) for i in range(4)]
    assert {r.policy_version for r in replies} == {1} and not f.served("b")  # b would park them
    rs.push_adapter(adapter.push(2))
    assert [svc.status().policy_version for svc in f.services.values()] == [2, 2]
    for i in range(4):
        rs.generate(request(f"s{i}", min_version=2))
    assert f.served("b")  # in rotation again


def test_a_set_that_never_pushes_keeps_up_with_versions_pushed_by_another(fleet, make_adapter):
    """Learner ranks > 0: rank 0's set pushes, the others only sample, and must use every replica."""
    f = fleet("a", "b")
    rank0 = ReplicaSet(["a", "b"], f.client)
    rank1 = ReplicaSet(["a", "b"], f.client, refresh_s=0.0)
    adapter = make_adapter(r=4, seed=0)
    rank0.push_adapter(adapter.push(1))
    for i in range(2):
        rank1.generate(request(f"r{i}", n=1, min_version=1))  # rank 1 has seen both serve version 1
    rank0.push_adapter(adapter.push(2))
    assert rank1.generate(request("first", n=1, min_version=2)).policy_version == 2  # one of them at 2
    before = {n: f.served(n) for n in f.services}
    ids = [rank1.submit(request(f"s{i}", n=1, min_version=2)) for i in range(4)]
    assert {rank1.result(r).policy_version for r in ids} == {2}
    assert all(f.served(n) > before[n] for n in f.services)  # the other was asked again
    assert [x["policy_version"] for x in rank1.replica_figures()] == [2, 2]
