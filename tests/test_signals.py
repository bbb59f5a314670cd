"""SIGTERM / SIGINT: the learner stops at a step boundary with a complete checkpoint, exits
143 / 130, and `--resume latest` ends with exactly the adapter an uninterrupted run gets.

Real rollout server and learner processes, tiny fp32 models, fixed seed, every micro-batch sampled
by the server (lmbda 1): the resumed run must ask for the same prompts with the same per-request
seeds, from the same weights, and restore optimizer, scheduler, RNG, data cursor and policy version.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, kill_pid, last_line, learner_argv, learner_env, start_learner
from test_faults import FLAGS, logged_step, train_rows, wait_until

from learner import checkpoint

N_STEPS = 8


@pytest.fixture
def server(server_pool):
    return server_pool.get(fresh=False, **FLAGS)


def argv_for(models, data, out: Path, url: str, *extra: str) -> list[str]:
    return learner_argv(
        models,
        data,
        out,
        url,
        "--max_steps",
        str(N_STEPS),
        "--save_steps",
        "100",
        "--lmbda",
        "1",
        "--seed",
        "7",
        "--torch_dtype",
        "float32",
        "--torch_num_threads",
        "1",
        "--warmup_ratio",
        "0.25",
        *extra,
    )


def adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(server_pool, tiny_models, tiny_dataset, tmp_path_factory) -> dict:
    srv = server_pool.get(fresh=False, **FLAGS)
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    r = subprocess.run(
        argv_for(tiny_models, tiny_dataset, out, srv.url),
        cwd=REPO,
        env=learner_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return adapter(out)


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_and_resume_gives_the_uninterrupted_adapter(
    sig, code, uninterrupted, server, tiny_models, tiny_dataset, tmp_path
):
    import torch

    out, log = tmp_path / "run", tmp_path / "first.log"
    argv = argv_for(tiny_models, tiny_dataset, out, server.url)
    first = start_learner(argv, log)
    try:
        wait_until(lambda: logged_step(out) >= 2, 600, "step 2", first, log)
        os.kill(first.pid, sig)
        first.wait(300)
    finally:
        kill_pid(first)
    text = log.read_text()
    assert first.returncode == code, text[-3000:]
    line = last_line(text)
    assert f"gkd-learner: {sig.name}: stopped after step" in line and "--resume latest" in line, line
    k = int(line.split("stopped after step ")[1].split("/")[0])
    good = checkpoint.find_latest(out)
    assert good is not None and good.name == f"step-{k}" and 2 <= k < N_STEPS, (good, k)
    assert f"checkpoint {good} written" in line and "Traceback" not in text
    assert [r["step"] for r in train_rows(out)] == list(range(1, k + 1))

    second = subprocess.run(
        [*argv, "--resume", "latest"],
        cwd=REPO,
        env=learner_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {good} at step {k}" in second.stderr
    assert [r["step"] for r in train_rows(out)] == list(range(1, N_STEPS + 1))
    got = adapter(out)
    assert got.keys() == uninterrupted.keys()
    diff = {
        n: (got[n] - uninterrupted[n]).abs().max().item()
        for n in got
        if not torch.equal(got[n], uninterrupted[n])
    }
    assert not diff, (
        f"{len(diff)} of {len(got)} tensors differ from the uninterrupted run's (max |Δ| {max(diff.values()):.3g})"
    )


@pytest.mark.slow
def test_signal_while_waiting_for_a_server_exits_at_once(tiny_models, tiny_dataset, tmp_path, free_port):
    """Nothing to checkpoint before training: exit 143 at once. The wait itself is announced once,
    with its deadline."""
    out, log = tmp_path / "run", tmp_path / "learner.log"
    argv = argv_for(
        tiny_models, tiny_dataset, out, f"tcp://127.0.0.1:{free_port()}", "--reconnect_deadline_s", "600"
    )
    proc = start_learner(argv, log)
    try:
        wait_until(lambda: "waiting for rollout server" in log.read_text(), 120, "the wait", proc, log)
        time.sleep(3)  # a few more status probes: the message must still be there only once
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(60)
    finally:
        kill_pid(proc)
    text = log.read_text()
    assert proc.returncode == 143, text[-3000:]
    assert text.count("waiting for rollout server") == 1 and "UTC" in text and "600s" in text
    assert "SIGTERM before training started: nothing to save" in last_line(text)
    assert not (out / "checkpoints").exists()
