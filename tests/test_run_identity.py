"""Run identity: which run an output_dir and a checkpoint belong to, what may resume it,
--overwrite_output_dir, --save_total_limit, a torn metrics line, and the signal handler.

Unit tests on real files (learner.identity, learner.checkpoint, learner.metrics, learner.signals);
the end-to-end versions (real server, learner processes) are in test_signals.py.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from learner import checkpoint, identity
from learner.checkpoint import TrainState
from learner.data import Cursor
from learner.errors import UserError
from learner.metrics import MetricsLog, read
from shared.config import ConfigError, parse_args, resume_target, write_resolved


def cfg_for(out: Path, *extra: str):
    argv = [
        "--model_name_or_path",
        "org/student",
        "--teacher_model_name_or_path",
        "org/teacher",
        "--dataset_name",
        "org/data",
        "--output_dir",
        str(out),
        *extra,
    ]
    return parse_args(argv)[0]


def start(out: Path, *extra: str) -> identity.Plan:
    """What the recipe does at start: plan, then (once everything checked out) record the run."""
    cfg = cfg_for(out, *extra)
    plan = identity.plan(cfg)
    if plan.clear:
        identity.clear_run(out)
    write_resolved(cfg, out, plan.run.to_json())
    return plan


def save(out: Path, plan: identity.Plan, step: int) -> Path:
    run = {**plan.run.to_json(), "settings": plan.run.settings}
    return checkpoint.save(
        out,
        TrainState(step, step, Cursor(0, 4 * step), 2 * step),
        {"a": torch.ones(2) * step},
        {},
        {},
        run=run,
    )


def test_every_run_has_an_id_in_config_json_and_in_every_checkpoint(tmp_path):
    out = tmp_path / "run"
    plan = start(out)
    ck = save(out, plan, 1)
    recorded = json.loads((out / "config.json").read_text())["run"]
    assert recorded["run_id"] == plan.run.run_id and recorded["config_hash"] == plan.run.config_hash
    assert json.loads((ck / "manifest.json").read_text())["run_id"] == plan.run.run_id
    assert checkpoint.read_run(ck)["config_hash"] == plan.run.config_hash
    assert start(tmp_path / "other").run.run_id != plan.run.run_id


def test_fresh_run_into_a_used_output_dir_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "run"
    first = start(out)
    save(out, first, 1)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (out / "notes.txt").write_text("the user's own file")
    with pytest.raises(
        UserError, match=r"already holds a run \(run .*checkpoint step-1\).*--overwrite_output_dir"
    ):
        identity.plan(cfg_for(out))
    second = start(out, "--overwrite_output_dir")
    assert second.clear and second.run.run_id != first.run.run_id
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    assert (out / "notes.txt").exists()  # only gkd-service's own files are removed


def test_resume_latest_takes_only_the_runs_own_checkpoints(tmp_path):
    out, other = tmp_path / "run", tmp_path / "other"
    plan = start(out)
    mine = save(out, plan, 2)
    foreign = save(other, start(other), 5)  # a newer step of another run, copied in
    (out / "checkpoints" / "step-5").mkdir()
    for f in foreign.iterdir():
        (out / "checkpoints" / "step-5" / f.name).write_bytes(f.read_bytes())
    resumed = identity.plan(cfg_for(out, "--resume", "latest"))
    assert resumed.checkpoint == mine and resumed.run.run_id == plan.run.run_id


def test_resume_of_another_runs_checkpoint_is_refused(tmp_path):
    out, other = tmp_path / "run", tmp_path / "other"
    start(out)
    foreign = save(other, start(other), 3)
    for flag in ("--resume", "--resume_from_checkpoint"):
        with pytest.raises(UserError, match=r"belongs to run .* holds run"):
            identity.plan(cfg_for(out, flag, str(foreign)))
    # into an empty output_dir the checkpoint's run continues there
    moved = identity.plan(cfg_for(tmp_path / "new", "--resume_from_checkpoint", str(foreign)))
    assert moved.checkpoint == foreign and moved.run.run_id == checkpoint.read_run(foreign)["run_id"]


def test_resume_with_another_config_is_refused_but_step_counts_may_change(tmp_path):
    out = tmp_path / "run"
    plan = start(out, "--lmbda", "0.5", "--max_steps", "10")
    ck = save(out, plan, 2)
    with pytest.raises(UserError, match=r"config hash .* differs .*lmbda 0\.5 -> 0\.7"):
        identity.plan(cfg_for(out, "--lmbda", "0.7", "--resume", "latest"))
    with pytest.raises(UserError, match=r"config hash .* differs .*lmbda 0\.5 -> 0\.7"):
        identity.plan(cfg_for(out, "--lmbda", "0.7", "--resume", str(ck)))
    longer = identity.plan(
        cfg_for(
            out, "--lmbda", "0.5", "--max_steps", "20", "--resume_from_checkpoint", "--server_port", "6000"
        )
    )
    assert longer.checkpoint == ck and longer.run.config_hash == plan.run.config_hash


def test_resume_flags(tmp_path):
    out = tmp_path / "run"
    assert resume_target(cfg_for(out)) is None
    assert resume_target(cfg_for(out, "--resume_from_checkpoint")) == "latest"  # bare: TRL's True
    assert resume_target(cfg_for(out, "--resume_from_checkpoint", "True")) == "latest"
    assert resume_target(cfg_for(out, "--resume_from_checkpoint", "false")) is None
    assert resume_target(cfg_for(out, "--resume_from_checkpoint", "/x/step-3")) == "/x/step-3"
    with pytest.raises(ConfigError, match="disagree"):
        cfg_for(out, "--resume", "latest", "--resume_from_checkpoint", "/x/step-3")
    with pytest.raises(ConfigError, match="save_total_limit=0 is invalid"):
        cfg_for(out, "--save_total_limit", "0")


def test_save_total_limit_keeps_the_newest_complete_checkpoints(tmp_path):
    out = tmp_path / "run"
    plan = start(out)
    for step in range(1, 6):
        save(out, plan, step)
    broken = out / "checkpoints" / "step-6"  # newest, but incomplete: does not count
    broken.mkdir()
    removed = checkpoint.prune(out, 2, plan.run.run_id)
    assert sorted(p.name for p in removed) == ["step-1", "step-2", "step-3"]
    assert sorted(p.name for p in checkpoint.step_dirs(out)) == ["step-4", "step-5", "step-6"]
    assert checkpoint.find_latest(out, plan.run.run_id).name == "step-5"


def test_torn_metrics_line_is_dropped_with_a_warning_on_resume(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    torn = json.dumps({"step": 4, "loss": 0.25})[:9]  # what a full disk leaves: no newline, cut JSON
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)
    with caplog.at_level(logging.WARNING, logger="gkd.learner"):
        log = MetricsLog(out, resume_step=3)
    log.log(4, {"loss": 0.2})
    log.close()
    assert [r["step"] for r in read(out)] == [1, 2, 3, 4] and read(out)[-1]["loss"] == 0.2
    assert any("torn" in r.getMessage() for r in caplog.records)


SIGNAL_CHILD = """
import os, signal, sys, time
from learner.signals import StopFlag
flag = StopFlag().install()
flag.armed = True
os.kill(os.getpid(), signal.{sig})
assert flag.requested == signal.{sig}  # the first one only asks
print("asked", flush=True)
os.kill(os.getpid(), signal.{sig})  # the second exits at once
time.sleep(30)
print("not reached", flush=True)
"""


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_second_signal_exits_at_once(sig, code):
    r = subprocess.run(
        [sys.executable, "-c", SIGNAL_CHILD.format(sig=sig)],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=25,  # well under the child's 30 s sleep: a child that did not exit fails here
    )
    assert r.returncode == code and r.stdout.strip() == "asked", (r.returncode, r.stdout, r.stderr)
    assert "second signal" in r.stderr


def test_signal_before_training_raises_interrupted():
    from learner.signals import Interrupted, StopFlag

    flag = StopFlag().install()
    try:
        with pytest.raises(Interrupted) as e:
            signal.raise_signal(signal.SIGTERM)
        assert e.value.code == 143
    finally:
        flag.uninstall()
