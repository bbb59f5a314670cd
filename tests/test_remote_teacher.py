"""The learner with its teacher on a teacher server (`--teacher_url`): flags, loss dispatch, and
real runs against a student rollout server plus a `--role teacher` server (tiny models, vLLM CPU).

The slow tests share one student server (the pool's default) and one teacher server, both alive at
once. The learner is started without `--teacher_model_name_or_path`, so it has no teacher weights
it could load; its log must name the remote teacher and never a local one.
"""

from __future__ import annotations

import math
import subprocess

import pytest
import torch
import torch.nn.functional as F
from conftest import last_line, learner_argv, learner_env, start_server

from learner.loss import generalized_jsd_loss, sampled_rkl_loss
from learner.step import IGNORE, TeacherTargets, targets_loss

# ---------------------------------------------------------------- flags (no server: config errors)

BAD_FLAGS = [
    (["--teacher_topk", "0"], "teacher_topk=0 is invalid"),
    (["--teacher_topk", "-3"], "teacher_topk=-3 is invalid"),
    (["--loss_type", "sampled_rkl", "--lmbda", "0.5", "--temperature", "1"], "needs lmbda=1"),
    (
        ["--loss_type", "sampled_rkl", "--lmbda", "1", "--temperature", "0.9", "--loss_temperature", "1"],
        "sampling temperature",
    ),
    (["--teacher_url", "tcp://127.0.0.1:1", "--loss_temperature", "0.9"], "pass --loss_temperature 1"),
    (
        ["--teacher_url", "http://127.0.0.1:1", "--loss_temperature", "1"],
        "teacher_url='http://127.0.0.1:1' is invalid",
    ),
]


@pytest.mark.parametrize("flags,says", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_exit_2_with_one_line(flags, says, tiny_models, tiny_dataset, tmp_path):
    argv = learner_argv(tiny_models, tiny_dataset, tmp_path / "out", "tcp://127.0.0.1:1", *flags)
    p = subprocess.run(argv, env=learner_env(), capture_output=True, text=True, timeout=120)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and says in lines[0], p.stderr
    assert not (tmp_path / "out").exists()


def test_teacher_model_is_optional_only_with_a_teacher_url():
    from shared.config import Config, ModelConfig, validate

    cfg = Config(model=ModelConfig(model_name_or_path="s"))
    assert any("teacher_model_name_or_path" in e for e in validate(cfg))
    cfg.model.teacher_url = "tcp://127.0.0.1:5556,tcp://127.0.0.1:5557"
    cfg.gkd.loss_temperature = 1.0
    assert not any("teacher" in e for e in validate(cfg))


# ---------------------------------------------------------------- the loss from teacher targets


def _logits(seed, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def test_targets_loss_local_and_topk_of_the_whole_vocabulary_agree():
    B, C, V = 2, 5, 12
    s, t = _logits(0, (B, C, V)).requires_grad_(), _logits(1, (B, C, V))
    labels = torch.randint(0, V, (B, C), generator=torch.Generator().manual_seed(2))
    labels[1, 3:] = IGNORE
    full = targets_loss(s, TeacherTargets(logits=t), labels, loss_type="jsd", beta=0.3, temperature=1.0)
    ref = generalized_jsd_loss(s, t, labels=labels, beta=0.3)
    torch.testing.assert_close(full, ref)
    lp, ids = F.log_softmax(t, -1).topk(V, dim=-1)  # k = V: the top-k + tail JSD is the full one
    sparse = targets_loss(
        s, TeacherTargets(topk_ids=ids, topk_logprobs=lp), labels, loss_type="jsd", beta=0.3, temperature=1.0
    )
    torch.testing.assert_close(sparse.double(), full.double(), atol=1e-6, rtol=0)
    # sampled RKL from a local teacher: its actual-token log-probs come from its logits.
    tok = F.log_softmax(t, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    local = targets_loss(
        s, TeacherTargets(logits=t), labels, loss_type="sampled_rkl", beta=0.3, temperature=1.0
    )
    remote = targets_loss(
        s, TeacherTargets(token_logprobs=tok), labels, loss_type="sampled_rkl", beta=0.3, temperature=1.0
    )
    torch.testing.assert_close(local, remote)
    torch.testing.assert_close(local, sampled_rkl_loss(s, labels, tok, labels=labels))


# ---------------------------------------------------------------- real servers


@pytest.fixture(scope="module")
def servers(tiny_models, server_pool, tmp_path_factory):
    """(student rollout server, teacher server), both running."""
    student = server_pool.get(fresh=False, alone=True)  # two engines at most: this one and the teacher
    teacher = start_server(
        tiny_models.teacher,
        tmp_path_factory.mktemp("teacher") / "teacher.log",
        role="teacher",
        max_model_len=1024,
        kv_cache_gb=1,
        max_logprobs=64,
    )
    yield student, teacher
    teacher.stop()


def _remote_argv(models, data, out, rollout_url, teacher_url, *extra):
    argv = learner_argv(models, data, out, rollout_url, "--teacher_url", teacher_url, *extra)
    i = argv.index("--teacher_model_name_or_path")
    del argv[i : i + 2]  # nothing the learner could load the teacher from
    return argv + ["--torch_num_threads", "1", "--reconnect_deadline_s", "30"]


def _run(argv, tmp_path, timeout=900):
    log = tmp_path / "learner.log"
    with open(log, "w") as f:
        p = subprocess.run(argv, env=learner_env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    return p.returncode, log.read_text(errors="replace")


@pytest.mark.slow
def test_remote_teacher_run_finishes_without_loading_the_teacher(
    tiny_models, tiny_dataset, tmp_path, servers
):
    from learner.metrics import read
    from learner.rollouts import is_on_policy

    student, teacher = servers
    out = tmp_path / "out"
    argv = _remote_argv(
        tiny_models,
        tiny_dataset,
        out,
        student.url,
        teacher.url,
        "--max_steps",
        "2",
        "--loss_temperature",
        "1",
        "--lmbda",
        "0.5",
        "--seq_kd",
        "true",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--eval_samples",
        "4",
    )
    rc, log = _run(argv, tmp_path)
    assert rc == 0, log[-3000:]
    assert f"teacher: remote {teacher.url}" in log and "no teacher weights are loaded" in log
    assert "teacher: local" not in log
    rows = read(out)
    train = [r for r in rows if "loss" in r and "event" not in r]
    assert len(train) == 2 and all(math.isfinite(r["loss"]) for r in train)
    # Off-policy micro-batches (seq_kd) were sampled by the teacher server.
    teacher_mbs = sum(not is_on_policy(42, i, 0.5) for i in range(4))
    assert sum(r["teacher_generated_fraction"] * 2 for r in train) == pytest.approx(teacher_mbs)
    ev = [r for r in rows if any(k.startswith("eval/") for k in r)][-1]
    for name in (
        "eval/student/jsd_top20_tail",
        "eval/teacher_text/kl_fwd_top20_tail",
        "eval/student/teacher_nll",
    ):
        assert math.isfinite(ev[name]), name
    assert "eval/student/jsd" not in ev and "eval/teacher_text/jsd" not in ev  # never a full-vocab name


@pytest.mark.slow
def test_sampled_rkl_run_finishes(tiny_models, tiny_dataset, tmp_path, servers):
    from learner.metrics import read

    student, teacher = servers
    argv = _remote_argv(
        tiny_models,
        tiny_dataset,
        tmp_path / "out",
        student.url,
        teacher.url,
        "--max_steps",
        "2",
        "--loss_type",
        "sampled_rkl",
        "--lmbda",
        "1",
        "--temperature",
        "1",
    )
    rc, log = _run(argv, tmp_path)
    assert rc == 0, log[-3000:]
    assert "top-k 1, loss sampled_rkl" in log  # one log-prob per token is all it asks for
    train = [r for r in read(tmp_path / "out") if "loss" in r and "event" not in r]
    assert len(train) == 2 and all(math.isfinite(r["loss"]) for r in train)
    assert all(r["on_policy_fraction"] == 1.0 for r in train)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    ["other_tokenizer", "student_as_teacher", "teacher_as_rollout", "topk_over_max_logprobs"],
)
def test_bad_teacher_setups_exit_2_with_one_line(case, tiny_models, tiny_dataset, tmp_path, servers):
    from shared.tiny import build_model, build_tokenizer

    student, teacher = servers
    rollout, teach, extra, models = student.url, teacher.url, ["--loss_temperature", "1"], tiny_models
    if case == "other_tokenizer":  # the student tokenizes otherwise than the teacher server
        build_tokenizer(tmp_path / "tok", seed=1)
        other = build_model(tmp_path / "other_student", num_layers=2, seed=9, tokenizer_dir=tmp_path / "tok")
        models = type(tiny_models)(other, tiny_models.teacher)
        says = "tokenizes differently from the student"
    elif case == "student_as_teacher":
        teach, says = student.url, "is a student rollout server"
    elif case == "teacher_as_rollout":
        rollout, says = teacher.url, "is a teacher server (--role teacher)"
    else:
        extra, says = [*extra, "--teacher_topk", "100"], "refused a top-100 score request"
    rc, log = _run(
        _remote_argv(models, tiny_dataset, tmp_path / "out", rollout, teach, *extra), tmp_path, 300
    )
    assert rc == 2, log[-3000:]
    line = last_line(log)
    assert line.startswith("gkd-learner: error:") and says in line, log[-3000:]
    assert "Traceback" not in log


@pytest.mark.slow
def test_two_teacher_urls_are_one_replica_set(tiny_models, tiny_dataset, tmp_path, servers, relay):
    """`--teacher_url a,b`: each URL is checked, then scores are routed over both. The second URL is
    a TCP relay to the same teacher server (a second engine would not fit beside the others)."""
    from learner.metrics import read

    student, teacher = servers
    second = relay(teacher.port)
    argv = _remote_argv(
        tiny_models,
        tiny_dataset,
        tmp_path / "out",
        student.url,
        f"{teacher.url},{second.url}",
        "--max_steps",
        "2",
        "--loss_temperature",
        "1",
    )
    rc, log = _run(argv, tmp_path)
    assert rc == 0, log[-3000:]
    assert f"teacher: remote {teacher.url},{second.url}" in log
    train = [r for r in read(tmp_path / "out") if "loss" in r and "event" not in r]
    assert len(train) == 2 and all(math.isfinite(r["loss"]) for r in train)
    assert train[-1]["teacher_positions"] > 0
