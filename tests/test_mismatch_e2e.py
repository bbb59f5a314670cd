"""The learner's guards against serving the wrong policy, end to end (real server, real learner).

- A student whose base model differs from the server's (fingerprint: config + tokenizer) exits 2
  before anything is pushed.
- A healthy fp32 run logs the policy-mismatch figures, near zero, on every step.
- A server that reports each new version but keeps sampling the previous weights (the test-only
  hook GKD_TEST_STALE_WEIGHTS=1; it passes the canary, which it scores before reverting) makes the
  learner exit 2 on the first on-policy batch after the push, naming both versions and the figure.
"""

from __future__ import annotations

import pytest
from conftest import DEFAULT_SERVER_FLAGS, last_line, learner_argv, start_learner, start_server

from learner.metrics import read
from learner.mismatch import FP32_MEAN_ABS_BOUND

pytestmark = pytest.mark.slow

FLAGS = {"max_lora_rank": 64}  # test_learner_integration.py's configuration: one engine for several files
# Every micro-batch on-policy; a learning rate at which one step moves the policy visibly.
ON_POLICY = ("--lmbda", "1", "--learning_rate", "1e-2")


@pytest.fixture
def server(server_pool):
    return server_pool.get(fresh=False, **FLAGS)


def _version(srv) -> int:
    with srv.client(timeout_s=30) as c:
        return c.status().policy_version


def _run(argv, log, timeout_s=300) -> tuple[int, str]:
    proc = start_learner(argv, log)
    try:
        rc = proc.wait(timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    return rc, log.read_text(errors="replace")


def test_a_student_of_another_model_exits_2_before_any_push(tiny_models, tiny_dataset, tmp_path, server):
    before = _version(server)
    argv = learner_argv(tiny_models, tiny_dataset, tmp_path / "run", server.url, "--max_steps", "1")
    argv[argv.index("--model_name_or_path") + 1] = str(tiny_models.teacher)  # 3 layers, not 2
    rc, text = _run(argv, tmp_path / "learner.log")
    line = last_line(text)
    assert rc == 2, text[-2000:]
    assert "fingerprint" in line and "nothing was pushed" in line, line
    assert str(tiny_models.teacher) in line and str(tiny_models.student) in line, line
    assert _version(server) == before  # nothing reached the server


def test_a_healthy_fp32_run_logs_mismatch_near_zero(tiny_models, tiny_dataset, tmp_path, server):
    out = tmp_path / "run"
    argv = learner_argv(tiny_models, tiny_dataset, out, server.url, "--max_steps", "2", *ON_POLICY)
    rc, text = _run(argv, tmp_path / "learner.log")
    assert rc == 0, text[-3000:]
    rows = [r for r in read(out) if "loss" in r]
    assert len(rows) == 2
    for r in rows:
        assert r["mismatch/tokens"] > 0
        assert 0 <= r["mismatch/mean_abs_logprob"] < FP32_MEAN_ABS_BOUND, r
        assert 0 <= r["mismatch/kl_k3"] < FP32_MEAN_ABS_BOUND**2, r
        assert r["mismatch/frac_abs_gt_0.5"] == 0.0, r
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "runs").rglob("*"))


def test_a_server_left_on_the_previous_adapter_exits_2_after_the_push(
    tiny_models, tiny_dataset, tmp_path, server_pool, monkeypatch
):
    server_pool.shrink(1)  # two engines at most: one pool server and this one
    monkeypatch.setenv("GKD_TEST_STALE_WEIGHTS", "1")
    srv = start_server(tiny_models.student, tmp_path / "server.log", **DEFAULT_SERVER_FLAGS)
    try:
        argv = learner_argv(
            tiny_models, tiny_dataset, tmp_path / "run", srv.url, "--max_steps", "3", *ON_POLICY
        )
        rc, text = _run(argv, tmp_path / "learner.log")
        line = last_line(text)
        assert rc == 2, text[-3000:]
        # Version 1 (the fresh LoRA, a no-op) serves correctly; version 2 is the first the hook drops.
        assert "policy mismatch right after a push" in line, line
        assert "policy version 2" in line and "learner's version 2" in line, line
        assert "canary" not in line  # the canary passed: this is the mismatch check's catch
        assert "version 2 reported, previous weights serving" in srv.log()  # the hook did act
        figure = float(line.split("mean |Δ logprob| ")[1].split()[0])
        assert figure > FP32_MEAN_ABS_BOUND
    finally:
        srv.stop()
