"""Faults: real processes on loopback, killed with SIGKILL by PID, no mocked sockets.

- a checkpoint writer killed mid-write never leaves a checkpoint that passes for complete;
- the learner killed mid-run resumes from its last complete checkpoint (`--resume latest`) with
  step numbers, data cursor and policy version continuous, skipping partial and corrupt ones;
- the rollout server gone for good: the learner notices at once, retries until
  `--reconnect_deadline_s`, then exits 2 with one line (the server is reached through a relay
  process, which is what gets killed: to the learner that is a server that never returns, and it
  spares an engine restart);
- a full disk (ENOSPC on a tmpfs when we may mount one, else EFBIG from RLIMIT_FSIZE) and an
  unwritable checkpoints directory while saving: one line, exit 2, the previous checkpoint intact
  and loadable;
- the rollout server killed mid-run and restarted on the same port: the learner waits, re-pushes
  its current adapter (canary-checked) before using new rollouts, and loses, repeats or mis-trains
  no step.

The server is the pool's, configured like test_learner_integration.py's (one engine for both). The
last test kills it, restarts it on the same port and hands the new process back to the pool.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    REPO,
    kill_pid,
    last_line,
    learner_argv,
    learner_env,
    start_learner,
    start_relay,
    start_server,
)

from learner import checkpoint
from learner.data import PromptSampler
from learner.metrics import read

FLAGS = {"max_lora_rank": 64}  # test_learner_integration.py's configuration: one engine for both files
PROMPTS_PER_STEP = 4  # learner_argv: per_device_train_batch_size 2 x gradient_accumulation_steps 2
MAX_STALENESS = 0  # the learner's default (strictly on-policy, as TRL)
NOTICE_S = 30  # a lost server is noticed at the next call to it: within one micro-batch (seconds; ~15 s on 2 busy cores)


@pytest.fixture
def server(server_pool):
    return server_pool.get(fresh=False, **FLAGS)


def train_rows(out: Path) -> list[dict]:
    return [r for r in read(out) if "loss" in r]


def wait_until(
    pred, timeout_s: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if proc is not None and proc.poll() is not None:
            pytest.fail(
                f"process exited ({proc.returncode}) while waiting for {what}:\n{log.read_text()[-3000:] if log else ''}"
            )
        if time.monotonic() > deadline:
            pytest.fail(
                f"timed out after {timeout_s:.0f} s waiting for {what}:\n{log.read_text()[-3000:] if log else ''}"
            )
        time.sleep(0.2)


def logged_step(out: Path) -> int:
    try:
        return max((r["step"] for r in train_rows(out)), default=0)
    except (OSError, ValueError):
        return 0  # the file is being written


def server_version(srv) -> int:
    with srv.client(timeout_s=30) as c:
        return c.status().policy_version


def assert_steps_and_cursor_continuous(
    rows: list[dict], n_steps: int, n_prompts: int = 32, seed: int = 42
) -> None:
    """Every step 1..n exactly once, and the data cursor where an uninterrupted run's would be."""
    assert [r["step"] for r in rows] == list(range(1, n_steps + 1))
    ref = PromptSampler(n_prompts, seed=seed)
    for r in rows:
        ref.take(PROMPTS_PER_STEP)
        assert (r["data_epoch"], r["data_index"]) == (ref.cursor.epoch, ref.cursor.index), r
    for r in rows:
        assert r["staleness_max"] is None or 0 <= r["staleness_max"] <= MAX_STALENESS, r


def tree_digest(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_one_error_line(stderr: str, *needles: str) -> str:
    line = last_line(stderr)
    assert line.startswith("gkd-learner: error: "), stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.count("gkd-learner: error:") == 1, stderr[-3000:]
    for n in needles:
        assert n in line, (n, line)
    return line


# ---------------------------------------------------------------- checkpoints: atomic, verified


_WRITER = r"""
import sys, torch
from learner import checkpoint
from learner.checkpoint import TrainState
from learner.data import Cursor
out, step = sys.argv[1], int(sys.argv[2])
big = {"w": torch.randn(6_000_000)}  # 24 MB per file: a save takes long enough to be caught mid-write
while True:
    checkpoint.save(out, TrainState(step, step, Cursor(0, step), step), big, {"m": big["w"]}, {"last_epoch": step})
    print(step, flush=True)
    step += 1
"""


@pytest.mark.slow
def test_checkpoint_writer_killed_mid_write_never_leaves_a_complete_looking_checkpoint(tmp_path):
    out, root = tmp_path / "out", tmp_path / "out" / "checkpoints"
    mid_write_kills, next_step = 0, 1
    for _ in range(2):  # the second writer also meets the first one's leftovers
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(out), str(next_step)],
            cwd=REPO,
            env=learner_env(),
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            assert proc.stdout.readline().strip() == str(next_step)  # one complete save first
            wait_until(
                lambda: any(p.name.startswith(".tmp-") and any(p.iterdir()) for p in root.iterdir()),
                60,
                "a save in progress",
                proc,
            )
        finally:
            kill_pid(proc)
        leftovers = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
        mid_write_kills += bool(leftovers)
        complete = [p for p in root.iterdir() if p.name.startswith("step-")]
        assert all(checkpoint.verify(p) for p in complete), "a step-N directory that does not verify"
        latest = checkpoint.find_latest(out)
        assert latest is not None and latest == max(complete, key=lambda p: int(p.name[5:]))
        state = checkpoint.load(latest)["state"]
        assert (state.step, state.cursor.index) == (int(latest.name[5:]),) * 2
        next_step = state.step + 1  # the next writer resumes where the last complete one ended
    assert mid_write_kills >= 1, "no kill landed mid-write: the scenario was not exercised"


def _plant_broken_checkpoints(out: Path, good: Path, k: int) -> list[Path]:
    """What a kill mid-save or a damaged disk leaves, all newer than the good checkpoint `good` (step k)."""
    root = checkpoint.checkpoints_dir(out)
    tmp = root / f".tmp-step-{k + 1}-99999"  # the writer's temporary directory, killed mid-write
    tmp.mkdir()
    (tmp / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes()[:100])
    no_manifest = root / f"step-{k + 1}"  # a copy that never got its manifest (a non-atomic writer)
    shutil.copytree(good, no_manifest)
    (no_manifest / checkpoint.MANIFEST).unlink()
    corrupt = root / f"step-{k + 2}"  # complete-looking, but a file changed after its manifest was written
    shutil.copytree(good, corrupt)
    data = bytearray((corrupt / "adapter_model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (corrupt / "adapter_model.safetensors").write_bytes(bytes(data))
    return [tmp, no_manifest, corrupt]


def test_resume_skips_partial_and_corrupt_checkpoints(tmp_path):
    import torch

    from learner.checkpoint import TrainState
    from learner.data import Cursor
    from learner.errors import UserError

    out = tmp_path / "out"
    for step in (1, 2):
        checkpoint.save(
            out,
            TrainState(step, step + 10, Cursor(0, 4 * step), 2 * step),
            {"a": torch.full((4,), float(step))},
            {"s": step},
            {"e": step},
        )
    good = checkpoint.checkpoints_dir(out) / "step-2"
    tmp, no_manifest, corrupt = _plant_broken_checkpoints(out, good, 2)
    assert checkpoint.find_latest(out) == good
    assert checkpoint.load(good)["state"].policy_version == 12
    for bad in (no_manifest, corrupt, tmp):
        with pytest.raises(UserError, match="not a complete checkpoint"):
            checkpoint.require_complete(bad)
    # A manifest that is not even JSON is just as incomplete.
    (corrupt / checkpoint.MANIFEST).write_text("{ truncated")
    assert checkpoint.find_latest(out) == good


# ---------------------------------------------------------------- the learner killed mid-run


@pytest.mark.slow
def test_learner_killed_mid_run_resumes_from_last_complete_checkpoint(
    server, tiny_models, tiny_dataset, tmp_path
):
    out, n_steps = tmp_path / "run", 5
    argv = learner_argv(
        tiny_models,
        tiny_dataset,
        out,
        server.url,
        "--max_steps",
        str(n_steps),
        "--save_steps",
        "2",
        "--lmbda",
        "0.5",
        "--lr_scheduler_type",
        "constant",
        "--reconnect_deadline_s",
        "60",
    )
    first = start_learner(argv, tmp_path / "first.log")
    try:
        wait_until(
            lambda: logged_step(out) >= 3 and checkpoint.find_latest(out) is not None,
            600,
            "step 3",
            first,
            tmp_path / "first.log",
        )
    finally:
        kill_pid(first)
    assert first.returncode == -9
    v_at_kill = server_version(server)
    good = checkpoint.find_latest(out)
    k = int(good.name[5:])
    ck_state = checkpoint.load(good)["state"]
    before = {r["step"]: r for r in train_rows(out)}
    assert k < n_steps and ck_state.step == k and before[k]["policy_version"] == ck_state.policy_version
    _plant_broken_checkpoints(out, good, k)

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

    rows = train_rows(out)
    assert_steps_and_cursor_continuous(rows, n_steps)
    assert rows[:k] == [
        before[s] for s in range(1, k + 1)
    ]  # the rows up to the checkpoint are the killed run's
    versions = [r["policy_version"] for r in rows]
    assert versions[k:] == list(range(versions[k], versions[k] + n_steps - k))
    # Versions never go back (a number names one adapter). If the server still served the checkpoint's
    # adapter, the run continues from it; if the killed run had pushed past it, the checkpoint's
    # adapter is re-pushed as the next version and training continues from there.
    first_after = ck_state.policy_version + 1 if v_at_kill == ck_state.policy_version else v_at_kill + 2
    assert versions[k] == first_after, (versions, v_at_kill, ck_state.policy_version)
    final = checkpoint.load(checkpoint.find_latest(out))["state"]
    assert (final.step, final.micro_batches, final.policy_version) == (n_steps, 2 * n_steps, versions[-1])
    assert (final.cursor.epoch, final.cursor.index) == (0, PROMPTS_PER_STEP * n_steps)
    assert server_version(server) == versions[-1]


# ---------------------------------------------------------------- the server gone for good; a full or unwritable disk


@pytest.fixture(scope="module")
def cut_off_run(server_pool, tiny_models, tiny_dataset, tmp_path_factory):
    """A learner (checkpoint every step) whose server, reached through a relay, vanishes after step 2.

    Returns (exit code, its log, its output dir, seconds from the kill to its exit, seconds from
    the kill to its "lost" log line).
    """
    srv = server_pool.get(fresh=False, **FLAGS)
    tmp = tmp_path_factory.mktemp("cut_off")
    out, log = tmp / "run", tmp / "learner.log"
    relay = start_relay(srv.port)
    argv = learner_argv(
        tiny_models,
        tiny_dataset,
        out,
        relay.url,
        "--max_steps",
        "50",
        "--save_steps",
        "1",
        "--lmbda",
        "1",
        "--reconnect_deadline_s",
        "6",
    )
    proc = start_learner(argv, log)
    try:
        wait_until(lambda: logged_step(out) >= 2, 600, "step 2", proc, log)
        relay.kill()
        t_kill = time.monotonic()
        wait_until(lambda: "lost" in log.read_text(), 60, "the learner to notice", proc, log)
        noticed_s = time.monotonic() - t_kill
        proc.wait(120)
        exit_s = time.monotonic() - t_kill
    finally:
        kill_pid(proc)
        relay.kill()
    return proc.returncode, log.read_text(), out, exit_s, noticed_s


@pytest.mark.slow
def test_server_that_never_returns_fails_after_the_deadline(cut_off_run):
    rc, output, out, exit_s, noticed_s = cut_off_run
    print(f"\nserver gone: noticed after {noticed_s:.1f} s, exit 2 after {exit_s:.1f} s (deadline 6 s)")
    assert rc == 2
    line = assert_one_error_line(output, "went away", "did not come back within 6s", "--resume latest")
    assert len(line) < 600
    # Noticed at the learner's next call to the server (at most one micro-batch of training later),
    # not at a request timeout; then the bounded backoff ends at the deadline.
    assert noticed_s < NOTICE_S
    assert 6 <= exit_s - noticed_s + 1 < 6 + 15
    assert len(re.findall(r"attempt \d+ failed", output)) >= 2  # it did retry
    assert checkpoint.find_latest(out) is not None  # and everything finished before stays usable


def _mount_tmpfs(path: Path, size_bytes: int) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)], capture_output=True
    )
    return r.returncode == 0


def _drop_dac_caps(argv: list[str]) -> list[str] | None:
    """Root ignores file permissions (CAP_DAC_OVERRIDE): run the learner without those capabilities."""
    if os.geteuid() != 0:
        return argv  # an ordinary user: chmod alone makes the directory unwritable
    if shutil.which("setpriv") is None:
        return None
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--", *argv]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["disk_full", "unwritable"])
def test_save_fails_cleanly_and_keeps_the_previous_checkpoint(fault, cut_off_run, server, tmp_path):
    """Resume the cut-off run for one more step, whose checkpoint cannot be written."""
    src = cut_off_run[2]
    k = int(checkpoint.find_latest(src).name[5:])
    out, preexec, mechanism, mounted = tmp_path / "run", None, "", False
    if fault == "disk_full":
        used = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
        one = sum(p.stat().st_size for p in checkpoint.find_latest(src).rglob("*") if p.is_file())
        # Room for the copy and its logs, not for one more checkpoint (its size depends on the
        # LoRA targets, so it is measured, not assumed).
        mounted = _mount_tmpfs(tmp_path / "small", used + one // 2)
        if mounted:
            out, mechanism = tmp_path / "small" / "run", "tmpfs full (ENOSPC)"
        else:  # no mount rights: a file-size limit on the learner process (EFBIG), real OS behaviour too
            preexec, mechanism = _limit_file_size, "RLIMIT_FSIZE 100 KB (EFBIG)"
    try:
        shutil.copytree(src, out)
        ckpts = checkpoint.checkpoints_dir(out)
        good, before = ckpts / f"step-{k}", tree_digest(ckpts)
        cmd = _resume_argv(src, out, server.url, k + 1)
        if fault == "unwritable":
            ckpts.chmod(0o555)
            cmd = _drop_dac_caps(cmd)
            if cmd is None:
                pytest.skip(
                    "running as root without setpriv: cannot make a directory unwritable for the learner"
                )
            probe = [
                *cmd[: cmd.index(sys.executable)],
                sys.executable,
                "-c",
                f"open({str(ckpts / 'probe')!r}, 'w')",
            ]
            assert subprocess.run(probe, capture_output=True).returncode != 0, (
                "checkpoints/ is still writable for the learner"
            )
            mechanism = "checkpoints/ mode 0555" + (
                ", learner without CAP_DAC_OVERRIDE (setpriv)" if os.geteuid() == 0 else ""
            )
        print(f"\n{fault}: {mechanism}")
        r = subprocess.run(
            cmd, cwd=REPO, env=learner_env(), capture_output=True, text=True, timeout=900, preexec_fn=preexec
        )
        assert r.returncode == 2, r.stderr[-3000:]
        why = (
            "Permission denied"
            if fault == "unwritable"
            else "No space left on device"
            if mounted
            else "File too large"
        )
        assert_one_error_line(
            r.stderr,
            f"cannot write checkpoint {ckpts / f'step-{k + 1}'}",
            why,
            "earlier checkpoints are intact",
        )
        assert (
            f"resumed from {good} at step {k}" in r.stderr
        )  # it trained one more step, then failed saving it
        # The previous checkpoint is untouched, nothing half-written is left, and it still loads.
        ckpts.chmod(0o755)
        assert tree_digest(ckpts) == before
        assert checkpoint.find_latest(out) == good
        assert _loads(good) == k
    finally:
        if mounted and subprocess.run(["umount", str(tmp_path / "small")]).returncode != 0:
            subprocess.run(["umount", "-l", str(tmp_path / "small")], check=False)


def _loads(path: Path) -> int:
    """Load a checkpoint completely; return its step (its tensors, memory-mapped, are released on return)."""
    ck = checkpoint.load(path)
    assert ck["adapter"] and ck["optimizer"] and ck["scheduler"]
    return ck["state"].step


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (100 * 1024, resource.RLIM_INFINITY))


def _resume_argv(src: Path, out: Path, url: str, max_steps: int) -> list[str]:
    """The cut-off run's command line (from its config.json), pointed at `out` and straight at the server."""
    cfg = json.loads((src / "config.json").read_text())
    m, d = cfg["model"], cfg["data"]
    from conftest import TinyModels

    models = TinyModels(Path(m["model_name_or_path"]), Path(m["teacher_model_name_or_path"]))
    return learner_argv(
        models,
        Path(d["dataset_name"]),
        out,
        url,
        "--max_steps",
        str(max_steps),
        "--save_steps",
        "1",
        "--lmbda",
        "1",
        "--resume",
        "latest",
        "--reconnect_deadline_s",
        "30",
    )


# ---------------------------------------------------------------- the server killed and restarted (last: it restarts the engine)


@pytest.mark.slow
def test_server_killed_mid_run_and_restarted(server, server_pool, tiny_models, tiny_dataset, tmp_path):
    out, log, n_steps = tmp_path / "run", tmp_path / "learner.log", 6
    argv = learner_argv(
        tiny_models,
        tiny_dataset,
        out,
        server.url,
        "--max_steps",
        str(n_steps),
        "--save_steps",
        "100",
        "--lmbda",
        "1",
        "--reconnect_deadline_s",
        "400",
    )  # an engine restart takes 20-90 s on 2 cores
    proc = start_learner(argv, log)
    try:
        wait_until(lambda: logged_step(out) >= 2, 600, "step 2", proc, log)
        kill_pid(server.proc)  # SIGKILL by PID, mid-run
        t_kill = time.monotonic()
        wait_until(lambda: "lost" in log.read_text(), 60, "the learner to notice", proc, log)
        noticed_s = time.monotonic() - t_kill
        restarted = start_server(
            server_pool.model, tmp_path / "restarted-server.log", port=server.port, **server.args
        )
        server_pool.replace(server, restarted)  # same flags, same port: the pool serves it to later tests
        proc.wait(600)
    finally:
        kill_pid(proc)
    output = log.read_text()
    print(
        f"\nserver killed: learner noticed after {noticed_s:.1f} s; restarted server ready after {time.monotonic() - t_kill:.1f} s"
    )
    assert proc.returncode == 0, output[-3000:]
    assert noticed_s < NOTICE_S

    rows = train_rows(out)
    assert_steps_and_cursor_continuous(rows, n_steps)
    versions = [r["policy_version"] for r in rows]
    assert versions == list(
        range(versions[0], versions[0] + n_steps)
    )  # one push per step, none lost or repeated
    assert all(
        r["on_policy_fraction"] == 1.0 for r in rows
    )  # every micro-batch trained on server rollouts...
    assert all(r["canary_max_abs"] <= 1e-3 for r in rows)  # ...from a server whose weights matched ours
    events = [r for r in read(out) if r.get("event") == "reconnect"]
    assert len(events) >= 1 and all(0 < e["down_s"] < 400 for e in events)
    # The restarted server came back at version 0 with the bare base model. The first thing it was
    # given is the learner's current adapter, as the learner's current version; staleness <= 1
    # above shows no rollout of the bare model (version 0) was trained on.
    served = [int(v) for v in re.findall(r"serving policy version (\d+)", restarted.log())]
    assert served[0] == events[0]["policy_version"] and served[0] in versions + [versions[0] - 1]
    assert served == sorted(served) and served[-1] == versions[-1] == server_version(restarted)
    assert "rollout server" in output and "is back after" in output


@pytest.mark.slow
def test_no_version_is_reused_across_a_server_restart(
    server, server_pool, tiny_models, tiny_dataset, tmp_path
):
    """sync_steps 4: the server is killed after step 5, while the adapter has trained one step past
    its last push (version v, step 4). The restarted server must not get that newer adapter as v
    again: a version number names one adapter (its sha256, logged per push), never two."""
    out, log, n_steps = tmp_path / "run", tmp_path / "learner.log", 9
    argv = learner_argv(
        tiny_models,
        tiny_dataset,
        out,
        server.url,
        "--max_steps",
        str(n_steps),
        "--sync_steps",
        "4",
        "--save_steps",
        "100",
        "--lmbda",
        "1",
        "--max_staleness",
        "3",
        "--reconnect_deadline_s",
        "400",
    )
    proc = start_learner(argv, log)
    try:
        wait_until(lambda: logged_step(out) >= 5, 600, "step 5", proc, log)
        kill_pid(server.proc)
        wait_until(lambda: "lost" in log.read_text(), 60, "the learner to notice", proc, log)
        restarted = start_server(
            server_pool.model, tmp_path / "restarted-server.log", port=server.port, **server.args
        )
        server_pool.replace(server, restarted)
        proc.wait(600)
    finally:
        kill_pid(proc)
    assert proc.returncode == 0, log.read_text()[-3000:]
    pushes = [r for r in read(out) if r.get("event") == "push"]
    names: dict[int, set[str]] = {}
    for p in pushes:
        names.setdefault(p["policy_version"], set()).add(p["sha256"])
    assert all(len(s) == 1 for s in names.values()), names
    before = [p["policy_version"] for p in pushes if p["step"] <= 4]
    reconnect = next(r for r in read(out) if r.get("event") == "reconnect")
    assert reconnect["policy_version"] == max(before) + 1  # the trained-on adapter got a new number
    served = [int(v) for v in re.findall(r"serving policy version (\d+)", restarted.log())]
    assert served[0] == max(before) + 1 and served == sorted(served)
