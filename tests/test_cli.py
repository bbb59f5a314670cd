"""`gkd-learner` at the process edge: instant --help, one-line errors with exit code 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_config import SEED_FLAGS  # tests/ is on sys.path (pytest rootdir conftest)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=ENV)


def _help_commands() -> list[list[str]]:
    cmds = [[sys.executable, "-m", "learner", "--help"]]
    script = shutil.which("gkd-learner", path=str(Path(sys.executable).parent))
    if script:  # the console script, when the package is installed (make setup does)
        cmds.append([script, "--help"])
    return cmds


@pytest.mark.parametrize("cmd", _help_commands(), ids=lambda c: Path(c[0]).name)
def test_help_lists_every_seed_flag_fast(cmd):
    t0 = time.perf_counter()
    res = _run(cmd)
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    missing = [f for f in SEED_FLAGS if f"--{f}" not in res.stdout]
    assert not missing, missing
    assert elapsed < 3.0, f"--help took {elapsed:.2f}s"


def test_help_and_config_errors_import_no_torch_or_vllm():
    code = (
        "import sys\n"
        "from learner.cli import main\n"
        "for argv in (['--help'], ['--lmbda', '3']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'vllm', 'transformers', 'peft', 'datasets') if m in sys.modules))\n"
    )
    res = _run([sys.executable, "-c", code])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow  # imports torch and transformers in a fresh process (slow on 2 busy cores)
def test_user_errors_at_the_process_edge_are_one_line_exit_2(tmp_path, tiny_models):
    student, teacher = tiny_models.student, tiny_models.teacher
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hello there"}\n')
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    base = [
        sys.executable,
        "-m",
        "learner",
        "--model_name_or_path",
        str(student),
        "--teacher_model_name_or_path",
        str(teacher),
        "--dataset_name",
        str(data),
        "--reconnect_deadline_s",
        "2",
        "--request_timeout_s",
        "2",
    ]
    cases = {
        "unwritable output_dir": (
            ["--output_dir", str(blocker / "out"), "--rollout_url", "tcp://127.0.0.1:9"],
            "cannot be written",
        ),
        "unreachable server": (
            ["--output_dir", str(tmp_path / "o"), "--rollout_url", "tcp://127.0.0.1:9"],
            "did not answer",
        ),
    }
    for name, (extra, needle) in cases.items():
        res = _run(base + extra, timeout=300)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2, (name, res.stderr[-2000:])
        assert "Traceback" not in res.stderr, name
        assert needle in lines[-1] and lines[-1].startswith("gkd-learner: error:"), (name, lines[-3:])
